"""Fail-stop for multi-process runs: one process's error stops every process, at once.

Without it, a process that exits on an error only it meets (a user error, a
bug, a full local disk, an out-of-memory) leaves the others blocked in their
next collective, and jax.distributed's shutdown barrier holds the failing
process too: all of them hang for `shutdown_timeout_seconds` (5 minutes), then
die with a coordination-service crash dump that does not say what went wrong.

Here the failing process posts its one-line error in the coordination
service's key-value store (the service every jax.distributed run already has)
and exits without the shutdown barrier; a watcher thread in every process
polls that directory and exits the same way, printing which process stopped
and why. Exiting mid-step is a kill as far as the run directory goes:
checkpoints are written atomically (orbax), so the run resumes from the last
complete one, as after a preemption.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, NoReturn

_ERRORS = 'research/failstop/errors/'  # one key per failing process
_SEEN = 'research/failstop/seen'       # how many other processes have read an error
POLL_SECONDS = 0.5
# Process 0 hosts the coordination service: when it fails it waits (at most
# this long) for the others to read its error before the service goes with it.
HOST_WAIT_SECONDS = 10.0
# ... and when another process failed, process 0 waits this long before exiting:
# the failing process exits right after posting its error, and if the service
# went first, its coordination client would abort it (SIGABRT and a C++ crash
# dump in place of its exit code).
HOST_GRACE_SECONDS = 1.0
_stopping = threading.Event()  # set by this process's own stop_all_processes


def _client():
  """jax.distributed's coordination-service client, or None for one process.
  JAX has no public accessor; orbax's multihost utilities read the same object."""
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state.client


def multi_process() -> bool:
  """Whether jax.distributed is initialised (a run of several processes)."""
  return _client() is not None


def _process() -> tuple[int, int]:
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state.process_id, distributed.global_state.num_processes


def _exit_now(code: int) -> NoReturn:
  """Exits without atexit handlers: jax.distributed's shutdown barrier would wait
  for processes that are not coming."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


def _exit_after_peer(line: str, me: int, count: int) -> NoReturn:
  """Exits with 2 because another process posted the error `line`; process 0
  (the service's host) first gives the failing process HOST_GRACE_SECONDS to exit."""
  print(f'{line}; stopping process {me} of {count} too', file=sys.stderr)
  if me == 0:
    time.sleep(HOST_GRACE_SECONDS)
  _exit_now(2)


def _first_error(client) -> str | None:
  """The error line of the lowest-numbered failed process, if any has posted one."""
  try:
    posted = client.key_value_dir_get(_ERRORS)
  except Exception:  # pylint: disable=broad-except  # the service is gone or busy: poll again
    return None
  return min(posted)[1] if posted else None


def _watch(client, stop: threading.Event) -> None:
  me, count = _process()
  while not stop.wait(POLL_SECONDS):
    line = None if _stopping.is_set() else _first_error(client)
    if line is None:
      continue
    try:
      client.key_value_increment(_SEEN, 1)
    except Exception:  # pylint: disable=broad-except  # only a courtesy to the failed process 0
      pass
    _exit_after_peer(line, me, count)


def start_watcher() -> Callable[[], None]:
  """In a multi-process run, starts the thread that exits this process when
  another posts an error (stop_all_processes). Returns the function that stops
  it (call it before jax.distributed shuts down); a no-op for one process."""
  if not multi_process():
    return lambda: None
  stop = threading.Event()
  thread = threading.Thread(target=_watch, args=(_client(), stop), name='failstop', daemon=True)
  thread.start()

  def stop_watching() -> None:
    stop.set()
    thread.join(timeout=10 * POLL_SECONDS)  # not inside a call to the service when it shuts down

  return stop_watching


def stop_all_processes(line: str, code: int, *, defer_to_peers: bool = False) -> NoReturn:
  """Prints `line` (the one-line error), posts it for the other processes of a
  multi-process run, and exits with `code` without waiting for them. A single
  process just prints and exits.

  defer_to_peers: when another process has already posted an error, print that
  one instead and exit with 2 (for a crash, usually a collective that broke
  because that process left first)."""
  _stopping.set()  # this process's watcher must not report the error back to it
  if not multi_process():
    print(line, file=sys.stderr)
    sys.exit(code)
  client, (me, count) = _client(), _process()
  peer = _first_error(client) if defer_to_peers else None
  if peer is not None:
    _exit_after_peer(peer, me, count)
  print(line, file=sys.stderr)
  try:
    client.key_value_set(f'{_ERRORS}{me:06d}', f'{line} [process {me} of {count}]')
  except Exception:  # pylint: disable=broad-except  # the service is gone
    _exit_now(code)
  if me == 0:
    deadline = time.monotonic() + HOST_WAIT_SECONDS
    while time.monotonic() < deadline:
      try:
        if int(client.key_value_try_get(_SEEN)) >= count - 1:
          break
      except Exception:  # pylint: disable=broad-except  # nobody has read it yet
        pass
      time.sleep(POLL_SECONDS / 5)
  _exit_now(code)


def peer_error() -> str | None:
  """The error line another process of this run has posted, if any."""
  return _first_error(_client()) if multi_process() else None
