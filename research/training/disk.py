"""Disk and permission errors, as one line: what orbax and the OS report when a
workdir is full, read-only or forbidden, and the free-space check before a save.

orbax reports a failed asynchronous save from several threads (its own log
records, futures its event loop abandons, callbacks into a closed loop); the
Checkpointer turns the failure into one UserError line (checkpoint.py), and
`quiet_orbax_after_failed_saves` drops the rest of that noise, and only it.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import shutil
import sys
import traceback

import jax
from jax.experimental import multihost_utils

# Errors the user fixes, as orbax/tensorstore report them: an OSError, or a
# message carrying "[Errno 28]" or "[os_error_code='28']", anywhere in the
# exception chain.
ERRNO_WORDS = {errno.ENOSPC: 'disk full', errno.EDQUOT: 'disk quota exceeded',
                errno.EROFS: 'read-only filesystem', errno.EACCES: 'permission denied',
                errno.EPERM: 'permission denied'}
_FREE_SPACE = 'Free some space (or keep fewer checkpoints: keep_checkpoints)'
ERRNO_FIX = {errno.ENOSPC: _FREE_SPACE, errno.EDQUOT: _FREE_SPACE, errno.EROFS: 'Make the workdir writable',
              errno.EACCES: 'Make the workdir writable', errno.EPERM: 'Make the workdir writable'}
_ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\]|os_error_code='?(\d+)")


def _errno_in_text(text: str) -> int | None:
  """The first errno of ERRNO_WORDS that `text` quotes, else None."""
  codes = [int(a or b) for a, b in _ERRNO_IN_TEXT.findall(text)]
  return next((c for c in codes if c in ERRNO_WORDS), None)


def environment_errno(error: BaseException | None) -> int | None:
  """The errno of ERRNO_WORDS behind `error` or its causes, else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in ERRNO_WORDS:
      return error.errno
    code = _errno_in_text(str(error))
    if code is not None:
      return code
    error = error.__cause__ or error.__context__
  return None


class _DropOrbaxEnvironmentErrors(logging.Filter):
  """Drops orbax's logs (tracebacks from its save threads) of a failure the
  Checkpointer reports itself as one line (a full disk, ...)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or (record.name != 'asyncio' and
                                          f'{os.sep}orbax{os.sep}' not in record.pathname):
      return True
    error = record.exc_info[1] if record.exc_info else None
    return environment_errno(error) is None and _errno_in_text(record.getMessage()) is None


def quiet_orbax_after_failed_saves() -> None:
  """Installs _DropOrbaxEnvironmentErrors, once, on absl's logger (orbax logs
  through it) and asyncio's (which reports the futures orbax abandons), and
  _drop_closed_loop_callbacks as sys.unraisablehook."""
  for logger in (logging.getLogger('absl'), logging.getLogger('asyncio')):
    if not any(isinstance(f, _DropOrbaxEnvironmentErrors) for f in logger.filters):
      logger.addFilter(_DropOrbaxEnvironmentErrors())
  if not getattr(sys.unraisablehook, 'drops_closed_loop_callbacks', False):
    sys.unraisablehook = functools.partial(_drop_closed_loop_callbacks, sys.unraisablehook)
    sys.unraisablehook.drops_closed_loop_callbacks = True


def _drop_closed_loop_callbacks(previous, unraisable) -> None:
  """An unraisable-exception hook that drops 'Event loop is closed' from
  call_soon_threadsafe, passing the rest to `previous`. When one write of an
  orbax save fails (a full disk), orbax closes its event loop with the other
  writes still in flight; each then reports its end to the closed loop from a
  tensorstore thread, a traceback apiece, after the failure is already known."""
  error, frames = unraisable.exc_value, traceback.extract_tb(unraisable.exc_traceback)
  closed_loop = (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed' and
                 any(f.name == 'call_soon_threadsafe' for f in frames))
  if not closed_loop:
    previous(unraisable)


def state_bytes(state) -> int:
  """Bytes of the state's arrays (global), a lower bound on a checkpoint's size."""
  return sum(int(getattr(x, 'nbytes', 0)) for x in jax.tree.leaves((state.params, state.opt_state)))


def disk_usage(path: str) -> int:
  """Bytes the files under `path` take on disk (0 if it is gone)."""
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.lstat(os.path.join(root, name)).st_blocks * 512
      except OSError:
        pass  # deleted meanwhile (orbax's garbage collection)
  return total


def size_text(n: int) -> str:
  """'684 kB', '1.25 GB': bytes for a message."""
  for unit in ('B', 'kB', 'MB', 'GB'):
    if n < 1000:
      break
    n /= 1000
  else:
    unit = 'TB'
  return f'{n:.3g} {unit}'


def free_bytes(path: str) -> int | None:
  """Free bytes on the disk holding `path`, None where that is unknown."""
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def broadcast_pair(pair: tuple[int, int] | None) -> tuple[int, int] | None:
  """Process 0's `pair` (or None) on every process."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  values = multihost_utils.broadcast_one_to_all(np.array(pair or (-1, -1), np.int64))
  return None if int(values[0]) < 0 else (int(values[0]), int(values[1]))


def space_shortfall(checkpoint_dir: str, latest: int | None, state) -> tuple[int, int] | None:
  """(free, needed) bytes when the next checkpoint cannot fit in `checkpoint_dir`,
  else None. A checkpoint takes about what the previous one (`latest`) does, at
  least the state's bytes; process 0 decides, every process gets its answer."""
  short = None
  if jax.process_index() == 0:
    previous = 0 if latest is None else disk_usage(os.path.join(checkpoint_dir, str(latest)))
    need = max(state_bytes(state), previous)
    free = free_bytes(checkpoint_dir)
    if free is not None and free < need:
      short = (free, need)
  return broadcast_pair(short) if jax.process_count() > 1 else short
