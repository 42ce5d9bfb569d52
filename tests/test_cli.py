"""The command line: exact resume after SIGKILL, and one-line user errors."""

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(workdir, corpus_dir, data_dir, *extra):
  return [sys.executable, '-m', 'research.main', '--config=configs/pretrain.py:size=test',
          f'--workdir={workdir}', '--config.data.name=files',
          f'--config.data.files={corpus_dir}/*.txt', f'--config.data.data_dir={data_dir}',
          '--config.sample.prompts=()', *extra]


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


def _last_step(workdir):
  try:
    return max(_losses(workdir), default=0)
  except (OSError, ValueError):
    return 0


def test_resume_after_sigkill_is_bitwise_identical(tmp_path, corpus_dir, data_dir):
  flags = ['--config.steps=40', '--config.checkpoint_every=10', '--config.log_every=1']
  full = str(tmp_path / 'full')
  subprocess.run(_cmd(full, corpus_dir, data_dir, *flags), cwd=ROOT, check=True, capture_output=True)

  killed = str(tmp_path / 'killed')
  proc = subprocess.Popen(_cmd(killed, corpus_dir, data_dir, *flags), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while _last_step(killed) < 25 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert 25 <= _last_step(killed) < 40, 'the run was not killed mid-way'
  subprocess.run(_cmd(killed, corpus_dir, data_dir, *flags), cwd=ROOT, check=True, capture_output=True)

  want, got = _losses(full), _losses(killed)
  assert sorted(got) == list(range(1, 41))
  for step in range(31, 41):
    assert got[step] == want[step], (step, [(s, got[s], want[s]) for s in range(18, 41)])


def _error(tmp_path, corpus_dir, data_dir, *extra):
  t0 = time.time()
  r = subprocess.run(_cmd(str(tmp_path / 'w'), corpus_dir, data_dir, *extra), cwd=ROOT,
                     capture_output=True, text=True)
  return r, time.time() - t0


def test_misspelled_key_fails_fast_with_short_message(tmp_path, corpus_dir, data_dir):
  r, seconds = _error(tmp_path, corpus_dir, data_dir, '--config.optimizer.lrr=1')
  assert r.returncode != 0 and seconds < 15
  assert 'lrr' in r.stderr and 'Traceback' not in r.stderr
  assert len(r.stderr.strip().splitlines()) <= 3, r.stderr


def test_mesh_batch_and_flag_errors_are_one_line(tmp_path, corpus_dir, data_dir):
  for flag, field in (('--config.mesh.data=3', 'config.mesh.data'),
                      ('--config.batch_size=12', 'config.batch_size'),
                      ('--heartbeat_timeout=0', '--heartbeat_timeout=0')):
    r, _ = _error(tmp_path, corpus_dir, data_dir, flag)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], r.stderr


def _tfrecords(path):
  """The records of a TFRecord file (TensorBoard's event format): u64 length, u32 crc, data, u32 crc."""
  import struct
  with open(path, 'rb') as f:
    data = f.read()
  out, i = [], 0
  while i < len(data):
    (n,) = struct.unpack('<Q', data[i:i + 8])
    out.append(data[i + 12:i + 12 + n])
    i += 12 + n + 4
  return out


def test_metric_writer_logs_tensorboard_scalars_without_importing_torch(tmp_path):
  # torch is installed here (a test oracle): tensorboardX would import it, seconds of every start.
  script = ('import sys, jax\n'
            'from research.training.metrics import MetricWriter\n'
            f'w = MetricWriter({str(tmp_path)!r})\n'
            'w.write(3, {"train/loss": 1.5, "eval/loss": float("nan")})\n'
            'w.close()\n'
            'print("torch" in sys.modules)\n')
  r = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == 'False'
  import torch  # noqa: F401  # the check above means something only where torch is importable
  from tensorboardX.proto import event_pb2
  events_dir = tmp_path / 'tensorboard'
  (name,) = os.listdir(events_dir)
  events = [event_pb2.Event.FromString(rec) for rec in _tfrecords(events_dir / name)]
  scalars = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]
  assert scalars == [(3, 'train/loss', 1.5)]  # the non-finite value is left out of TensorBoard
  assert json.loads((tmp_path / 'metrics.jsonl').read_text())['train/loss'] == 1.5
