"""Pretraining: next-token prediction on a text corpus.

Run (the CPU demo on the embedded Python-stdlib corpus):

    python -m research.main --config=configs/pretrain.py:size=tiny --workdir=runs/pretrain

Presets: size=tiny|small|1b|7b|8b (test is for unit tests), family=llama|qwen3.
Override any field, e.g. --config.steps=200 --config.optimizer.lr=1e-3 --config.mesh.fsdp=8.
"""

from configs import base


def get_config(arg=None):
  """Returns the pretraining config for `arg` ('size=tiny' by default)."""
  args = base.parse_arg(arg, size='tiny', family='llama')
  return base.base_config('pretrain', args['size'], args['family'])
