"""Metric sinks: the console, workdir/metrics.jsonl, TensorBoard events and,
optionally, Weights & Biases (process 0 only)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import uuid

import jax

from research.errors import UserError


def log(msg: str) -> None:
  """Prints on process 0 only."""
  if jax.process_index() == 0:
    print(msg, flush=True)


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX imports torch whenever it is installed (to accept its tensors),
  2-4 s of every start on a machine that has it; the writer is only given
  Python floats here. `sys.modules['torch'] = None` makes that import fail as
  if torch were absent, for the duration of this import only.
  """
  if 'torch' in sys.modules or 'tensorboardX' in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    return SummaryWriter
  sys.modules['torch'] = None
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    del sys.modules['torch']
  return SummaryWriter


class MetricWriter:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard,
  and to Weights & Biases when `logging.wandb_project` is set (config.logging)."""

  def __init__(self, workdir: str, logging=None, run_config: dict | None = None):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = self._wandb = None
    if self.enabled:
      self._tb = _summary_writer_class()(os.path.join(workdir, 'tensorboard'))
      if logging is not None and logging.get('wandb_project'):
        self._wandb = open_wandb(workdir, logging, run_config or {})

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
    if self._wandb is not None:
      self._wandb.log({k: v for k, v in row.items() if k != 'step'}, step=int(step))

  def close(self) -> None:
    if self._tb is not None:
      try:
        self._tb.close()
      except OSError:
        pass  # write() flushed every row; a full disk must not hide the error that stopped the run
      self._tb = None
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None


WANDB_ID_FILE = 'wandb_id.txt'


def open_wandb(workdir: str, logging, run_config: dict):
  """A wandb run for this workdir: the same wandb run id on every resume (kept in
  workdir/wandb_id.txt), files under workdir/wandb, `logging.wandb_mode` ('' =
  wandb's default or $WANDB_MODE; 'offline' needs no network)."""
  try:
    import wandb  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError('config.logging.wandb_project is set but wandb is not installed: `pip install wandb`, '
                    'or leave logging.wandb_project empty.') from None
  id_path = os.path.join(workdir, WANDB_ID_FILE)
  if os.path.exists(id_path):
    with open(id_path) as f:
      run_id = f.read().strip()
  else:
    run_id = uuid.uuid4().hex[:8]  # wandb run ids: short, lowercase alphanumeric
    with open(id_path, 'w') as f:
      f.write(run_id)
  return wandb.init(project=logging.wandb_project, entity=logging.get('wandb_entity') or None,
                    name=logging.get('wandb_name') or os.path.basename(os.path.abspath(workdir)),
                    id=run_id, resume='allow', dir=workdir, mode=logging.get('wandb_mode') or None,
                    config=run_config)


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
