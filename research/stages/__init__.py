"""Stages: each supplies how a batch is made and the loss on it.

A stage module defines:
  train_dataset(config, tokenizer) -> grain IterDataset of global numpy batches
  eval_batches(config, tokenizer)  -> list of global numpy batches
  loss(model, params, batch, rng)  -> (loss, weight, metrics); rng is None in evaluation
and optionally:
  make_loss(config) -> loss function (used instead of `loss` when present)
  needs_reference = True: loss gets `reference=` the frozen initial parameters
  evaluate(trainer, params, tokenizer) -> dict of extra eval metrics
  prompt_ids(tokenizer, text), stop_tokens(tokenizer): the sampling format
  BATCH_KEYS: the names of a batch's [batch, length] arrays (for dry runs;
    default: inputs, targets, segment_ids, positions)
"""

import importlib

from research.errors import UserError

STAGES = ('pretrain', 'sft', 'dpo', 'reward')


def get_stage(name: str):
  """The module implementing stage `name`."""
  if name not in STAGES:
    raise UserError(f'config.stage={name!r} is not a stage; choose one of {STAGES}.')
  return importlib.import_module(f'research.stages.{name}')
