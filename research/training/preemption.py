"""Preemption: SIGTERM/SIGINT noticed as a step every process agrees on.

The loop asks `reached(step)` after every step; when it is true it saves that
step's checkpoint synchronously and returns (research/training/loop.py).
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils


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
