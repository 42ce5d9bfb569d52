"""What a checkpoint holds, read from its metadata alone (no array is loaded):
the newest complete step, the top-level keys of an item, and its parameter
shapes against a model's.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

ITEMS = ('params', 'opt_state', 'meta', 'data')


def checkpoint_dir(workdir: str) -> str:
  """Where the run in `workdir` keeps its checkpoints."""
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def latest_saved_step(workdir: str) -> int | None:
  """The newest complete checkpoint step of the run in `workdir`, None if none."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  with ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS) as manager:
    return manager.latest_step()


def tree_keys(item_dir: str) -> set[str]:
  """Top-level keys of a saved pytree item (from its metadata only)."""
  handler = ocp.StandardCheckpointHandler()
  try:
    meta = handler.metadata(epath.Path(item_dir))
  finally:
    handler.close()
  return set(getattr(meta, 'tree', meta))


def saved_param_names(path: str, step: int) -> set[str]:
  """Top-level module names in a checkpoint's params item (from metadata only)."""
  return tree_keys(os.path.join(path, str(step), 'params'))


def shapes(tree: Any) -> dict[str, tuple]:
  """{"['a']['b']": shape} of a tree of arrays, abstract arrays or array metadata."""
  return {jax.tree_util.keystr(k): tuple(getattr(v, 'shape', ()))
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def params_mismatch(step_dir, abstract_params: Any) -> str | None:
  """How the parameter shapes saved in checkpoint directory `step_dir` (an
  epath.Path; read from its metadata alone) differ from `abstract_params`, or
  None if they match or the metadata cannot be read. Checked before a restore:
  orbax's own failure leaves reads in flight that print tracebacks later."""
  handler = ocp.StandardCheckpointHandler()
  try:
    saved = handler.metadata(step_dir / 'params')
  except Exception:  # pylint: disable=broad-except  # damaged: the restore reports it
    return None
  finally:
    handler.close()
  saved, wanted = shapes(getattr(saved, 'tree', saved)), shapes(abstract_params)
  for key in sorted(saved.keys() | wanted.keys()):
    if saved.get(key) != wanted.get(key):
      return (f'params{key} is {saved.get(key, "absent")} in the checkpoint but '
              f'{wanted.get(key, "absent")} in this config')
  return None
