"""The non-finite guard's run side. The step skips an update whose loss or
gradient norm is not finite (training/step.py); here the run stops once too
many are skipped in a row, and a non-finite state is never checkpointed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from research.errors import UserError

FIX = ('Lower optimizer.lr (or raise optimizer.warmup_steps), then rerun with '
       '--config.allow_changes=optimizer to resume from that checkpoint, or start a new workdir.')


@jax.jit
def all_finite(tree) -> jax.Array:
  """True when every value of every array in `tree` is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def check(step: int, in_row: int, limit: int, newest_checkpoint: int | None) -> None:
  """UserError naming the step where divergence began once `in_row` (skipped
  steps in a row up to `step`) reaches `limit` (optimizer.max_skipped_steps)."""
  if in_row >= limit:
    first = step - in_row + 1
    raise UserError(f'training diverged at step {first}: the loss or gradient norm was not finite in '
                    f'{in_row} steps in a row ({first}..{step}; optimizer.max_skipped_steps={limit}), each '
                    f'skipped. Checkpoints hold only finite parameters (newest: step {newest_checkpoint}). {FIX}')


def check_finite(params, step: int, newest_checkpoint: int | None) -> None:
  """UserError unless `params` are finite (before a save: the step's guard skips
  non-finite updates, so only an update that overflows gets here)."""
  if not bool(all_finite(params)):
    raise UserError(f'step {step}: the parameters are not finite, so they were not saved; the newest '
                    f'checkpoint ({newest_checkpoint}) is finite. {FIX}')
