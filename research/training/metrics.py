"""Metric sinks: the console, workdir/metrics.jsonl and TensorBoard events (process 0 only)."""

from __future__ import annotations

import contextlib
import json
import math
import os

import jax


def log(msg: str) -> None:
  """Prints on process 0 only."""
  if jax.process_index() == 0:
    print(msg, flush=True)


class MetricWriter:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def truncate_after(self, step: int) -> None:
    """Drops rows logged after `step` (a resumed run logs them again)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [line for line in f if line.strip()]
    keep = []
    for line in rows:
      try:
        if json.loads(line)['step'] <= step:
          keep.append(line)
      except (ValueError, KeyError):
        pass  # a half-written last line from a killed run
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(keep)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {'step': int(step)}
    row.update({k: float(v) for k, v in metrics.items()})
    with _naming(self.path):
      with open(self.path, 'a') as f:
        f.write(json.dumps(row) + '\n')
    with _naming(self._tb.logdir):
      for k, v in row.items():
        if k != 'step' and math.isfinite(v):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      try:
        self._tb.close()
      except OSError:
        pass  # write() flushed every row; a full disk must not hide the error that stopped the run
      self._tb = None


@contextlib.contextmanager
def _naming(path: str):
  """Gives an OSError raised inside the `path` it concerns: a full disk fails
  at flush or close, where the OSError names no file."""
  try:
    yield
  except OSError as e:
    if e.filename:
      raise
    raise OSError(e.errno, e.strerror, path) from None


def read_metrics(workdir: str) -> list[dict]:
  """All rows of workdir/metrics.jsonl."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]
