"""One run per workdir: process 0 holds an exclusive lock on workdir/.lock.

The lock is fcntl.flock, which the OS drops when the process dies (even on
SIGKILL), so a crashed run never blocks the next launch. The file records the
holder (host, pid, start time) for the error message a second launch prints;
a clean exit empties it, so a record found on taking the lock means its
holder died without releasing it (a one-line warning says so).

    with WorkdirLock(workdir):   # raises UserError naming the holder if taken
      ...train...
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

import jax
import numpy as np

from research.errors import UserError
from research.training.metrics import log

LOCK_FILE = '.lock'


def _read_record(fd: int) -> dict:
  """The holder's record, {} if none (empty file, or one being written)."""
  try:
    record = json.loads(os.pread(fd, 4096, 0).decode() or '{}')
  except ValueError:
    return {}
  return record if isinstance(record, dict) else {}


def describe(record: dict) -> str:
  """'pid 123 on host (started 2024-01-01 12:00:00 UTC)', or a fallback for no record."""
  if not record:
    return 'another process (which has not recorded itself yet)'
  return f'pid {record.get("pid")} on {record.get("host")} (started {record.get("start")})'


def _unwritable(workdir: str, error: OSError) -> UserError:
  """The UserError for an OSError met writing in `workdir` (read-only, full, forbidden)."""
  full = error.errno in (errno.ENOSPC, errno.EDQUOT)
  fix = 'free some space' if full else 'check its permissions'
  where = f' ({error.filename})' if error.filename and error.filename != workdir else ''
  return UserError(f'cannot write in workdir {workdir!r}: {error.strerror}{where}; {fix} or use '
                   'another --workdir.')


def _pid_alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except (OSError, ValueError, TypeError):
    return False
  return True


def _any_process(flag: bool) -> bool:
  """Process 0's flag on every process (all must raise together, or the others hang)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


class WorkdirLock:
  """Context manager: process 0 holds workdir/.lock exclusively while inside.

  Creates the workdir. Entering raises UserError (on every process) when
  another live process holds the lock; exiting empties the record and unlocks.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = None

  def __enter__(self) -> 'WorkdirLock':
    error = None
    if jax.process_index() == 0:
      try:
        self._acquire()
      except UserError as e:
        error = e
    if _any_process(error is not None):
      raise error or UserError(f'workdir {self.workdir!r} is locked by another run (see process 0).')
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def _acquire(self) -> None:
    try:
      os.makedirs(self.workdir, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise _unwritable(self.workdir, e) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_record(fd)
      os.close(fd)
      raise UserError(f'workdir {self.workdir!r} is in use by {describe(holder)}; stop that run '
                      'first, or use another --workdir.') from None
    except OSError as e:  # a filesystem without flock (some NFS mounts): run unlocked
      os.close(fd)
      log(f'warning: cannot lock {self.path} ({e.strerror}); nothing stops a second run on this workdir')
      return
    self._warn_if_stale(_read_record(fd))
    record = {'host': socket.gethostname(), 'pid': os.getpid(),
              'start': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(record) + '\n').encode(), 0)
    except OSError as e:  # a full disk: the first write of the run fails here
      os.close(fd)
      raise _unwritable(self.workdir, e) from None
    self._fd = fd

  def _warn_if_stale(self, previous: dict) -> None:
    # A record left behind: its holder exited without release (killed, crashed).
    if not previous:
      return
    dead = previous.get('host') == socket.gethostname() and not _pid_alive(previous.get('pid'))
    log(f'warning: taking over the lock of {self.workdir} from {describe(previous)}, which '
        f'{"is no longer running" if dead else "did not release it"}')

  def release(self) -> None:
    """Empties the record (a clean exit) and unlocks; a no-op when not held."""
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None
