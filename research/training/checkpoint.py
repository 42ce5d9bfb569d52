"""Checkpoints with orbax: train state and data-iterator state, saved together.

Layout of `workdir/checkpoints/<step>/`: `params`, `opt_state`, `meta` (step
and rng) and `data` (the grain iterator state as JSON). Saves are
asynchronous and atomic (orbax writes to a temporary directory and renames it),
so a run killed mid-save leaves the previous checkpoint intact. Restores take
an abstract target carrying shardings, so a checkpoint loads onto any mesh.

Preemption (SIGTERM, SIGINT) is noticed by `Preemption`; the loop then saves
the step it finished synchronously and exits (research/training/loop.py).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from research.errors import UserError
from research.training.state import TrainState

_ITEMS = ('params', 'opt_state', 'meta', 'data')


def json_lists_to_tuples(obj: Any) -> Any:
  """Undoes JSON's tuple -> list: grain compares state slices with tuples."""
  if isinstance(obj, dict):
    return {k: json_lists_to_tuples(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return tuple(json_lists_to_tuples(v) for v in obj)
  return obj


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


class Checkpointer:
  """Saves and restores TrainState + data state under workdir/checkpoints."""

  def __init__(self, workdir: str, keep: int = 2):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                         item_names=_ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, data_state: dict) -> None:
    step = int(jax.device_get(state.step))
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        meta=ocp.args.StandardSave({'step': state.step, 'rng': state.rng}),
        data=ocp.args.JsonSave(data_state)))

  def wait(self) -> None:
    """Blocks until every save issued so far is committed on disk."""
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict]:
    """Restores onto the shardings carried by `abstract_state`."""
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_state.params),
          opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
          meta=ocp.args.StandardRestore({'step': abstract_state.step, 'rng': abstract_state.rng}),
          data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types
      raise UserError(
          f'checkpoint {self.manager.directory}/{step} cannot be restored ({type(e).__name__}: '
          f'{str(e).splitlines()[0][:300]}). If it is damaged, move that step directory away to '
          'resume from the previous checkpoint; if the model or optimizer config changed, use '
          'a new workdir with init_from instead.') from None
    state = TrainState(step=out['meta']['step'], params=out['params'],
                       opt_state=out['opt_state'], rng=out['meta']['rng'])
    return state, json_lists_to_tuples(out['data'])

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class Preemption:
  """Whether the run was asked to stop, as a step every process agrees on.

  One process: SIGTERM and SIGINT set a flag (the step in flight finishes; a
  second signal acts as if this handler were not there, e.g. Ctrl-C twice
  interrupts at once). Several processes: jax.distributed's preemption
  service already catches SIGTERM (a Python handler would replace its own), and
  its sync point is true on every process at the same step, so no handler is
  installed. A context manager: the previous handlers come back on exit.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self) -> 'Preemption':
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
      return self  # signal.signal works in the main thread only
    for s in self.SIGNALS:
      previous = signal.getsignal(s)
      if previous is not None and previous is not signal.SIG_IGN:  # keep ignored (nohup, &) and foreign ones
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    # No printing here: the handler may interrupt a print (reentrant-call error).
    if self.signum is None:
      self.signum = signum
      return
    previous = self._previous.get(signum, signal.SIG_DFL)
    self.__exit__()
    if callable(previous):
      previous(signum, frame)
    else:  # SIG_DFL: terminate as the signal would have
      os.kill(os.getpid(), signum)

  def reached(self, step: int) -> bool:
    """True when the run should stop after `step` (on every process at once).
    Call it after every step, on every process, with increasing steps."""
    if jax.process_count() > 1:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # jax_enable_preemption_service is off: no notice can come
        return False
    return self.signum is not None


def _saved_param_names(path: str, step: int) -> set[str]:
  """Top-level module names in a checkpoint's params item (from metadata only)."""
  with ocp.CheckpointManager(path, item_names=_ITEMS,
                             item_handlers={'params': ocp.StandardCheckpointHandler()}) as manager:
    meta = manager.item_metadata(step)['params']
  return set(getattr(meta, 'tree', meta))


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
      saved = _saved_param_names(path, step)
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
