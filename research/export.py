"""Export a run's latest parameters as an HF checkpoint that transformers loads.

    python -m research.export --workdir=runs/pretrain --out=exports/pretrain [--model_type=llama]

Writes config.json, model.safetensors and (when the run has one) tokenizer.model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections

from research.errors import UserError


def export(workdir: str, out: str, model_type: str = 'llama') -> str:
  """Writes `out` from the latest checkpoint of `workdir`; returns `out`."""
  from research.interop import hf  # pylint: disable=import-outside-toplevel
  from research.models.llama import ModelConfig, Transformer  # pylint: disable=import-outside-toplevel
  from research.training.checkpoint import restore_params  # pylint: disable=import-outside-toplevel
  cfg_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(cfg_path):
    raise UserError(f'{workdir} has no config.json; point --workdir at a training run.')
  with open(cfg_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  model = Transformer(ModelConfig.from_dict(config.model))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          nn.meta.unbox(shapes['params']))
  params, _ = restore_params(workdir, abstract)
  hf.save_pretrained(out, model, params, model_type=model_type)
  tok = os.path.join(workdir, 'tokenizer.model')
  if os.path.exists(tok):
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
