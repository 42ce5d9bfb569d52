"""Export a run's latest parameters as an HF checkpoint that transformers loads.

    python -m research.export --workdir=runs/pretrain --out=exports/pretrain [--model_type=mistral]

Writes config.json, model.safetensors and (when the run has one)
tokenizer.model, or tokenizer.json and its configs. LoRA adapters are merged into the weights. --model_type
defaults to the model family's own (llama, qwen3); a Llama-family model may
also be written as mistral (or qwen2, which it becomes anyway with q/k/v biases).
"""

from __future__ import annotations

import argparse
import sys

from research.errors import UserError


def export(workdir: str, out: str, model_type: str | None = None) -> str:
  """Writes `out` from the latest checkpoint of `workdir` (LoRA adapters merged); returns `out`."""
  from research import lora, models  # pylint: disable=import-outside-toplevel
  from research.interop import hf  # pylint: disable=import-outside-toplevel
  from research.training.init import load_params  # pylint: disable=import-outside-toplevel
  run = load_params(workdir)
  params = lora.merge(run.params, run.model.lora) if run.model.lora is not None else run.params
  model = models.family(run.model.cfg.family).Model(run.model.cfg)
  hf.save_pretrained(out, model, params, model_type=model_type, tokenizer=run.tokenizer)
  if run.tokenizer is not None:
    hf.save_tokenizer(out, run.tokenizer)
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--model_type', default=None, help="HF model_type (default: the family's own)")
  args = parser.parse_args(argv)
  try:
    print(f'wrote {export(args.workdir, args.out, args.model_type)}')
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main()
