"""Stages: each module exports `stage(config) -> research.training.stage.Stage`,
binding its data, its loss and its evaluators. research/main.py picks one by
config.stage and hands it to the training loop.

To add a stage: write research/stages/<name>.py with `stage(config)`, add the
stage to STAGES, and add configs/<name>.py (see README, "Extending").
"""

from __future__ import annotations

from typing import Callable

from research.errors import UserError
from research.stages import dpo, grpo, ppo, pretrain, reward, sft

STAGES: dict[str, Callable] = {
    'pretrain': pretrain.stage,
    'sft': sft.stage,
    'dpo': dpo.stage,
    'reward': reward.stage,
    'grpo': grpo.stage,
    'ppo': ppo.stage,
}


def get(name: str) -> Callable:
  """The `stage(config) -> Stage` function of stage `name`."""
  if name not in STAGES:
    raise UserError(f'config.stage={name!r} is not a stage; choose one of {sorted(STAGES)}.')
  return STAGES[name]
