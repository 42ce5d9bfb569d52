"""Export a run's latest parameters as an HF checkpoint that transformers loads.

    python -m research.export --workdir=runs/pretrain --out=exports/pretrain [--model_type=llama]

Writes config.json, model.safetensors and (when the run has one) tokenizer.model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys

import jax
import ml_collections

from research.errors import UserError


def export(workdir: str, out: str, model_type: str = 'llama') -> str:
  """Writes `out` from the latest checkpoint of `workdir` (LoRA adapters merged); returns `out`."""
  from research import lora  # pylint: disable=import-outside-toplevel
  from research.data.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
  from research.interop import hf  # pylint: disable=import-outside-toplevel
  from research.models.llama import Transformer  # pylint: disable=import-outside-toplevel
  from research.stages import get_stage  # pylint: disable=import-outside-toplevel
  from research.training import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from research.training.trainer import Trainer  # pylint: disable=import-outside-toplevel
  cfg_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(cfg_path):
    raise UserError(f'{workdir} has no config.json; point --workdir at a training run.')
  with open(cfg_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if ckpt_lib.Checkpointer(workdir).latest_step() is None:
    raise UserError(f'{workdir} has no complete checkpoint to export.')
  config.mesh.update(data=1, fsdp=1, tensor=1)  # one device: export gathers everything anyway
  trainer = Trainer(config, workdir, get_stage(config.stage), devices=jax.devices()[:1])
  state, frozen, _ = trainer.setup_state(ckpt_lib.Checkpointer(workdir))
  params = trainer.full_params(state.params, frozen)
  cfg = trainer.model.cfg
  if trainer.use_lora:
    params = lora.merge(params, cfg)
    cfg = dataclasses.replace(cfg, lora_rank=0)
  tok = os.path.join(workdir, 'tokenizer.model')
  tokenizer = Tokenizer.load(tok) if os.path.exists(tok) else None
  hf.save_pretrained(out, Transformer(cfg), params, model_type=model_type, tokenizer=tokenizer)
  if tokenizer is not None:
    shutil.copy(tok, os.path.join(out, 'tokenizer.model'))
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
