"""Checks of a run's config against the devices, before anything is compiled.

Every failure is a UserError naming the field and the fix; the model's own
fields are checked by its family's Config.validate (research/models).
"""

from __future__ import annotations

import jax

from research import lora, models
from research.errors import UserError
from research.training import sharding


def build_model(config):
  """The model described by config.model, with the adapters of config.lora (when rank > 0)."""
  return models.build(config.model, lora.from_config(config.lora))


def validate_run(config, mesh, rules) -> None:
  """Checks the run shape (steps, batch split, processes, sampling knobs)."""
  for key in ('steps', 'batch_size', 'seq_len', 'log_every', 'eval_every', 'checkpoint_every'):
    if int(config[key]) <= 0:
      raise UserError(f'config.{key}={config[key]} must be positive.')
  if int(config.keep_checkpoints) < 0:
    raise UserError(f'config.keep_checkpoints={config.keep_checkpoints}: keep the newest N >= 1 checkpoints, '
                    'or 0 to keep every one.')
  if int(config.optimizer.get('max_skipped_steps', 1)) < 1:
    raise UserError(f'config.optimizer.max_skipped_steps={config.optimizer.max_skipped_steps}: the run '
                    'stops after this many non-finite steps in a row; it must be at least 1.')
  accum = int(config.optimizer.grad_accum_steps)
  if accum <= 0:
    raise UserError(f'config.optimizer.grad_accum_steps={accum} must be positive.')
  shards = sharding.data_parallel_size(mesh, rules)
  if config.batch_size % (shards * accum):
    raise UserError(
        f'config.batch_size={config.batch_size} does not divide over {shards} batch shards '
        f'(mesh data x fsdp x expert) x {accum} grad_accum_steps; make it a multiple of {shards * accum}.')
  if config.batch_size % jax.process_count():
    raise UserError(f'config.batch_size={config.batch_size} does not divide over '
                    f'{jax.process_count()} processes.')
  if shards % jax.process_count():
    raise UserError(f'config.mesh: the batch is split {shards} ways (data x fsdp x expert) over '
                    f'{jax.process_count()} processes; each process must feed its own rows, so make '
                    'data x fsdp x expert a multiple of the process count (keep tensor parallelism within a host).')
  s = config.sample
  if s.temperature < 0 or not 0 < s.top_p <= 1 or not 0 <= s.top_k <= config.model.vocab_size:
    raise UserError(f'config.sample: need temperature >= 0, 0 < top_p <= 1 and 0 <= top_k <= vocab '
                    f'(got {s.temperature}, {s.top_p}, {s.top_k}).')
