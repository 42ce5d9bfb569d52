"""Checkpoints with orbax: train state and data-iterator state, saved together.

Layout of `workdir/checkpoints/<step>/`: `params`, `opt_state`, `meta` (step
and rng) and `data` (the grain iterator state as JSON). Saves are
asynchronous and atomic (orbax writes to a temporary directory and renames it),
so a run killed mid-save leaves the previous checkpoint intact. Restores take
an abstract target carrying shardings, so a checkpoint loads onto any mesh.

Preemption (SIGTERM, SIGINT) is noticed by `preemption.Preemption`; the loop
then saves the step it finished synchronously and exits (loop.py).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import time
from typing import Any
import warnings

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from research.errors import UserError
from research.training import checkpoint_meta, disk
from research.training.checkpoint_meta import checkpoint_dir
from research.training.metrics import log
from research.training.state import TrainState, no_skips

_ITEMS = checkpoint_meta.ITEMS


def json_lists_to_tuples(obj: Any) -> Any:
  """Undoes JSON's tuple -> list: grain compares state slices with tuples."""
  if isinstance(obj, dict):
    return {k: json_lists_to_tuples(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return tuple(json_lists_to_tuples(v) for v in obj)
  return obj


# Restore failures that say nothing about the checkpoint itself: never a reason to fall back.
_NOT_DAMAGE = ('RESOURCE_EXHAUSTED', 'Out of memory', 'UNAVAILABLE', 'DEADLINE_EXCEEDED')


class CheckpointError(UserError):
  """A checkpoint that cannot be restored (damaged, or written for another config)."""

  def __init__(self, message: str, reason: str = ''):
    super().__init__(message)
    self.reason = reason  # the underlying error, in one short line


@functools.cache  # once per process: the setting is global
def write_replicated_arrays_from_one_device() -> None:
  """In one process, has orbax write each replicated array from one device.

  orbax's CPU/TPU default splits replicated shards into a slice per replica so
  that hosts share the writing; in one process each slice is only an eager
  `lax.slice` (~1.6 s of the first save of the tests' model on 8 CPU devices).
  orbax 0.12 reads this setting only from its global type-handler registry.
  """
  if jax.process_count() > 1:
    return
  default = ocp.type_handlers.get_type_handler(jax.Array)
  store = getattr(default, '_array_metadata_store', None)  # kept, read as orbax itself reads it
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False, array_metadata_store=store),
      override=True)


class Checkpointer:
  """Saves and restores TrainState + data state under workdir/checkpoints."""

  def __init__(self, workdir: str, keep: int = 2):
    # cleanup_tmp_directories: a save that failed (disk full) or was killed
    # leaves <step>.orbax-checkpoint-tmp behind; the next run frees its space
    # (safe: a run writes here only while it holds the workdir lock).
    write_replicated_arrays_from_one_device()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                         item_names=_ITEMS)
    self._saving = None  # the step of the save in flight, checked before the next save
    self._closed = False
    disk.quiet_orbax_after_failed_saves()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, data_state: dict) -> None:
    """Starts an asynchronous save of `state`'s step, once the previous one is
    committed; raises UserError (disk full, ...) if that one or this one failed."""
    self.wait()
    step = int(jax.device_get(state.step))
    self._check_space(step, state)
    self._saving = step
    with self._stop_on_environment_error():
      self._save(step, state, data_state)

  def _check_space(self, step: int, state: TrainState) -> None:
    """Refuses a save that cannot fit on the disk (UserError): one that runs out
    of space mid-way has orbax's threads fail noisily."""
    short = disk.space_shortfall(str(self.manager.directory), self.manager.latest_step(), state)
    if short is not None:
      free, need = short
      raise self._save_failed(step, errno.ENOSPC,
                              f'{disk.size_text(free)} free, a checkpoint takes about {disk.size_text(need)}')

  def _save(self, step: int, state: TrainState, data_state: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        meta=ocp.args.StandardSave({'step': state.step, 'rng': state.rng, 'skipped': state.skipped}),
        data=ocp.args.JsonSave(data_state)))

  def wait(self) -> None:
    """Blocks until every save issued so far is committed on disk; raises
    UserError when one failed for a reason the user fixes (disk full, ...)."""
    with self._stop_on_environment_error():
      self.manager.wait_until_finished()
    self._saving = None

  @contextlib.contextmanager
  def _stop_on_environment_error(self):
    """Turns a failed save of step self._saving into one UserError line, after
    closing the manager so that no orbax thread outlives it; other errors pass."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types
      code = disk.environment_errno(e)
      if code is None or self._saving is None:
        raise
      step, self._saving = self._saving, None
      self._close_after_failure()
      # The writes orbax abandoned are collected at exit, each warning that it never ran.
      warnings.filterwarnings('ignore', r"coroutine '.*' was never awaited", RuntimeWarning)
      raise self._save_failed(step, code, os.strerror(code)) from None

  def _save_failed(self, step: int, code: int, detail: str) -> UserError:
    """The one-line error for a save of `step` that failed (or cannot fit) with errno `code`."""
    # orbax forgets a failed step, so every step left is committed (saves run one at a time).
    kept = max((s for s in self.manager.all_steps() if s != step), default=None)
    kept_msg = 'no earlier checkpoint exists' if kept is None else f'the previous checkpoint {kept} is kept'
    return UserError(f'{disk.ERRNO_WORDS[code]} while saving checkpoint {step} to {self.manager.directory}: '
                     f'{detail}; {kept_msg}. {disk.ERRNO_FIX[code]}, then rerun the same command to resume.')

  def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict]:
    """Restores onto the shardings carried by `abstract_state`."""
    mismatch = checkpoint_meta.params_mismatch(self.manager.directory / str(step), abstract_state.params)
    if mismatch:  # checked first: orbax's own failure leaves reads in flight that print tracebacks
      raise CheckpointError(f'checkpoint {self.manager.directory}/{step} holds another model ({mismatch}); '
                            'resume with the model config it was written with, or use a new workdir '
                            'with init_from.', mismatch)
    try:
      meta = {'step': abstract_state.step, 'rng': abstract_state.rng}
      # Checkpoints written before the non-finite guard have no `skipped` counters.
      meta_dir = os.path.join(str(self.manager.directory), str(step), 'meta')
      has_skipped = 'skipped' in checkpoint_meta.tree_keys(meta_dir)
      if has_skipped:
        meta['skipped'] = abstract_state.skipped
      out = self.manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_state.params),
          opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
          meta=ocp.args.StandardRestore(meta),
          data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types
      reason = f'{type(e).__name__}: {(str(e).splitlines() or [""])[0][:300]}'
      raise CheckpointError(
          f'checkpoint {self.manager.directory}/{step} cannot be restored ({reason}). If it is '
          'damaged, move that step directory away to resume from the previous checkpoint; if the '
          'model or optimizer config changed, use a new workdir with init_from instead.', reason) from None
    skipped = out['meta']['skipped'] if has_skipped else jax.device_put(no_skips(), abstract_state.skipped.sharding)
    state = TrainState(step=out['meta']['step'], params=out['params'], opt_state=out['opt_state'],
                       rng=out['meta']['rng'], skipped=skipped)
    return state, json_lists_to_tuples(out['data'])

  def restore_latest(self, abstract_state: TrainState, *, fallback: bool = True
                     ) -> tuple[TrainState, dict] | None:
    """(state, data state) of the newest checkpoint, or None if there is none.

    With `fallback`, a checkpoint that cannot be restored (truncated, bit-flipped)
    is moved to workdir/damaged_checkpoints/ with a one-line warning and the
    previous one is tried, so an auto-restarting job does not loop on the same
    error. Nothing is moved unless an older checkpoint restores: when none does
    (most likely a changed model config, not damage) the newest one's error is
    raised. Without `fallback`, the newest one's error is raised at once.
    """
    failed = []  # (step, error), newest first
    for step in sorted(self.manager.all_steps(), reverse=True):
      error, restored = None, None
      try:
        restored = self.restore(step, abstract_state)
      except CheckpointError as e:
        error = e
      # Every process must agree (a damaged file may be read by some processes only).
      if jax.process_count() > 1 and not multihost_utils.process_allgather(np.int32(error is None)).all():
        error = error or CheckpointError(f'checkpoint {self.manager.directory}/{step} cannot be restored '
                                         'on another process', 'not restorable on another process')
      if error is not None:
        if not fallback or any(word in error.reason for word in _NOT_DAMAGE):
          raise error
        failed.append((step, error))
        continue
      # Only now, with an older checkpoint known to restore, move the newer ones
      # away: when none restores (a changed model config, not damage) nothing moves.
      for bad_step, e in failed:
        moved = self._move_damaged(bad_step)
        log(f'warning: checkpoint {bad_step} cannot be restored ({e.reason[:150]}); moved it to {moved} '
            f'and resumed from checkpoint {step} (config.checkpoint_fallback=False turns this off)')
      return restored
    if failed:
      raise failed[0][1]
    return None

  def _move_damaged(self, step: int) -> str:
    """Moves checkpoint `step` out of the checkpoint directory (process 0; all wait)."""
    src = os.path.join(str(self.manager.directory), str(step))
    dst = os.path.join(os.path.dirname(str(self.manager.directory)), 'damaged_checkpoints', f'{step}-{int(time.time())}')
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'moved damaged checkpoint {step}')
    self.manager.reload()
    return dst

  def close(self) -> None:
    """Waits for the last save (raising UserError if it failed), then closes; idempotent."""
    if self._closed:
      return
    self.wait()
    self._closed = True
    self.manager.close()

  def _close_after_failure(self) -> None:
    # The failure is already in hand: anything close() raises would only hide it.
    self._closed = True
    try:
      self.manager.close()
    except Exception:  # pylint: disable=broad-except
      pass


def restore_params(workdir: str, abstract_params: Any, *, optional: tuple[str, ...] = (),
                   role: str = 'init_from', step: int = 0) -> tuple[Any, int]:
  """(parameters, step) of the latest checkpoint of a run (or of checkpoint
  `step` when > 0): another run's, for init_from, or a finished run's (`role`
  names it in error messages).

  `optional` names top-level modules that the checkpoint may lack (a reward
  model's new `score` head when init_from is a language model); the result then
  lacks them too, and the checkpoint's leaves the model has no use for (that
  language model's output layer) are skipped. Any other mismatch is an error.
  """
  path = checkpoint_dir(workdir)
  if not os.path.isdir(path):
    raise UserError(f'{role}={workdir!r} has no checkpoints/ directory; point it at the '
                    'workdir of a finished run.')
  manager = ocp.CheckpointManager(path, item_names=_ITEMS)
  if step > 0 and step not in manager.all_steps():
    raise UserError(f'{role}={workdir!r} has no checkpoint of step {step}; it has {sorted(manager.all_steps())}.')
  step = step or manager.latest_step()
  if step is None:
    raise UserError(f'{role}={workdir!r} holds no complete checkpoint.')
  try:
    if optional:
      saved = checkpoint_meta.saved_param_names(path, step)
      abstract_params = {k: v for k, v in abstract_params.items()
                         if k not in optional or k in saved}
      restore = ocp.args.PyTreeRestore(
          abstract_params, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_params),
          partial_restore=True)
    else:
      restore = ocp.args.StandardRestore(abstract_params)
    out = manager.restore(step, args=ocp.args.Composite(params=restore))
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'{role}={workdir!r}: its parameters do not fit this model '
                    f'({type(e).__name__}: {str(e).splitlines()[0][:300]}); the model config '
                    'must match the one that run used.') from None
  manager.close()
  # A partial restore leaves what the checkpoint lacks as abstract leaves: a mismatch.
  missing = [jax.tree_util.keystr(path) for path, leaf in
             jax.tree_util.tree_flatten_with_path(out['params'])[0] if not isinstance(leaf, jax.Array)]
  if missing:
    raise UserError(f'{role}={workdir!r}: its parameters do not fit this model (it lacks '
                    f'{", ".join(missing[:3])}{" ..." if len(missing) > 3 else ""}); the model config '
                    'must match the one that run used.')
  return out['params'], step
