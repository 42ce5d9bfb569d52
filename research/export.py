"""Export a run's latest parameters as an HF checkpoint that transformers loads.

    python -m research.export --workdir=runs/pretrain --out=exports/pretrain [--model_type=llama]

Writes config.json, model.safetensors and (when the run has one) tokenizer.model.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys

from research.errors import UserError


def export(workdir: str, out: str, model_type: str = 'llama') -> str:
  """Writes `out` from the latest checkpoint of `workdir` (LoRA adapters merged); returns `out`."""
  from research import lora  # pylint: disable=import-outside-toplevel
  from research.interop import hf  # pylint: disable=import-outside-toplevel
  from research.models.llama import Transformer  # pylint: disable=import-outside-toplevel
  from research.training.trainer import load_run  # pylint: disable=import-outside-toplevel
  trainer, params, tokenizer = load_run(workdir)
  cfg = trainer.model.cfg
  if trainer.use_lora:
    params = lora.merge(params, cfg)
    cfg = dataclasses.replace(cfg, lora_rank=0)
  hf.save_pretrained(out, Transformer(cfg), params, model_type=model_type, tokenizer=tokenizer)
  if tokenizer is not None:
    shutil.copy(tokenizer.path, os.path.join(out, 'tokenizer.model'))
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--model_type', default='llama', choices=('llama', 'mistral', 'qwen2'))
  args = parser.parse_args(argv)
  try:
    print(f'wrote {export(args.workdir, args.out, args.model_type)}')
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main()
