"""Preemption (SIGTERM/SIGINT: save the step reached, exit, resume exactly) and
the workdir lock (one run per workdir; a dead holder's lock is taken over)."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from research.errors import UserError
from research.training.lock import LOCK_FILE, WorkdirLock
from research.training.metrics import read_metrics
from research.training.stage import Hook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(workdir, corpus_dir, data_dir, *extra):
  return [sys.executable, '-m', 'research.main', '--config=configs/pretrain.py:size=test',
          f'--workdir={workdir}', '--config.data.name=files', f'--config.data.files={corpus_dir}/*.txt',
          f'--config.data.data_dir={data_dir}', '--config.sample.prompts=()', *extra]


def _losses(workdir):
  return {r['step']: r['train/loss'] for r in read_metrics(str(workdir)) if 'train/loss' in r}


def _last_step(workdir):
  try:
    return max(_losses(workdir), default=0)
  except (OSError, ValueError):
    return 0


def _saved_steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _train(config, workdir, extra_hooks=()):
  """Like conftest.train, with more stage hooks."""
  from research import stages
  from research.training import init, loop
  config = init.resolve_config(config)
  stage = stages.get(config.stage)(config)
  stage = dataclasses.replace(stage, hooks=tuple(stage.hooks) + tuple(extra_hooks))
  return loop.train(config, str(workdir), stage)


def _signal_at(step, signum):
  def fn(run, s):
    del run
    if s == step:
      os.kill(os.getpid(), signum)
  return Hook(1, fn)


def test_sigint_in_process_saves_the_step_and_restores_handlers(test_config, tmp_path, capsys):
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  c = test_config(steps=8, log_every=5, checkpoint_every=100, eval_every=100)
  _train(c, tmp_path, [_signal_at(3, signal.SIGINT)])
  assert {s: signal.getsignal(s) for s in before} == before
  assert 'preempted at step 3: saved; rerun the same command to resume' in capsys.readouterr().out
  assert _saved_steps(str(tmp_path)) == [3]
  assert sorted(_losses(tmp_path)) == [3]  # the step in flight is logged though log_every=5
  _train(c, tmp_path)  # resumes from 3
  assert sorted(_losses(tmp_path)) == [3, 5, 8] and _saved_steps(str(tmp_path)) == [3, 8]


def test_sigterm_saves_exits_and_resumes_bitwise(tmp_path, corpus_dir, data_dir):
  flags = ['--config.steps=60', '--config.checkpoint_every=50', '--config.log_every=1',
           '--config.eval_every=1000']
  full = str(tmp_path / 'full')
  subprocess.run(_cmd(full, corpus_dir, data_dir, *flags), cwd=ROOT, check=True, capture_output=True)

  stopped = str(tmp_path / 'stopped')
  proc = subprocess.Popen(_cmd(stopped, corpus_dir, data_dir, *flags), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while _last_step(stopped) < 20 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  t0 = time.time()
  out, err = proc.communicate(timeout=60)
  seconds = time.time() - t0
  assert proc.returncode == 0, err[-2000:]
  line = [l for l in out.splitlines() if l.startswith('preempted at step')]
  assert len(line) == 1, out[-2000:]
  step = int(line[0].split()[3].rstrip(':'))
  print(f'SIGTERM: saved step {step}, exited {seconds:.2f}s later')
  assert 20 <= step < 60, 'the run was not stopped mid-way'
  assert seconds < 60
  assert _saved_steps(stopped) == [step] and sorted(_losses(stopped)) == list(range(1, step + 1))

  resumed = subprocess.run(_cmd(stopped, corpus_dir, data_dir, *flags), cwd=ROOT, check=True,
                           capture_output=True, text=True)
  assert f'resumed from {stopped}/checkpoints/{step}' in resumed.stdout
  want, got = _losses(full), _losses(stopped)
  assert sorted(got) == list(range(1, 61))
  assert got == want, [(s, got[s], want[s]) for s in range(1, 61) if got[s] != want[s]][:5]


def test_second_launch_on_a_locked_workdir_fails_fast(test_config, tmp_path, corpus_dir, data_dir):
  workdir = str(tmp_path / 'w')
  with WorkdirLock(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      f.write('{"step": 1, "train/loss": 1.0}\n')
    holder = json.load(open(os.path.join(workdir, LOCK_FILE)))
    assert holder['pid'] == os.getpid() and holder['host'] == socket.gethostname()
    with pytest.raises(UserError, match=f'in use by pid {os.getpid()} on {socket.gethostname()} '
                       rf'\(started {holder["start"]}\)'):
      _train(test_config(steps=2), workdir)
    t0 = time.time()
    r = subprocess.run(_cmd(workdir, corpus_dir, data_dir), cwd=ROOT, capture_output=True, text=True)
    seconds = time.time() - t0
    print(f'second CLI launch failed in {seconds:.1f}s')
    assert r.returncode == 2 and seconds < 60
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f'pid {os.getpid()}' in lines[0] and 'in use' in lines[0], r.stderr
    assert sorted(os.listdir(workdir)) == [LOCK_FILE, 'metrics.jsonl']  # nothing else written
    assert open(os.path.join(workdir, 'metrics.jsonl')).read() == '{"step": 1, "train/loss": 1.0}\n'
  assert open(os.path.join(workdir, LOCK_FILE)).read() == ''  # released cleanly


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path, capsys):
  dead = subprocess.Popen(['true'])
  dead.wait()
  with open(tmp_path / LOCK_FILE, 'w') as f:
    json.dump({'host': socket.gethostname(), 'pid': dead.pid, 'start': 'then'}, f)
  with WorkdirLock(str(tmp_path)):
    out = capsys.readouterr().out
    assert out.count('\n') == 1 and f'from pid {dead.pid}' in out and 'no longer running' in out
    assert json.load(open(tmp_path / LOCK_FILE))['pid'] == os.getpid()
  with WorkdirLock(str(tmp_path)):  # a clean release leaves nothing to warn about
    assert capsys.readouterr().out == ''


def test_dry_run_does_not_create_the_workdir(test_config, tmp_path):
  from conftest import train
  train(test_config(dry_run=True), tmp_path / 'plan')
  assert not os.path.exists(tmp_path / 'plan')
