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


def test_mesh_and_batch_errors_are_one_line(tmp_path, corpus_dir, data_dir):
  for flag, field in (('--config.mesh.data=3', 'config.mesh.data'),
                      ('--config.batch_size=12', 'config.batch_size')):
    r, _ = _error(tmp_path, corpus_dir, data_dir, flag)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], r.stderr
