"""Preemption (SIGTERM/SIGINT: save the step reached, exit, resume exactly) and
the workdir lock (one run per workdir; a dead holder's lock is taken over)."""

import dataclasses
import json
import os
import random
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


@pytest.fixture
def sigint_default():
  """SIGINT handled as in an interactive Python, whatever launched the tests: a
  shell's background job (`cmd &`, nohup) starts with SIGINT ignored, which the
  loop rightly keeps ignored."""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, previous)


def test_sigint_in_process_saves_the_step_and_restores_handlers(test_config, tmp_path, capsys, sigint_default):
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  c = test_config(steps=8, log_every=5, checkpoint_every=100, eval_every=100)
  _train(c, tmp_path, [_signal_at(3, signal.SIGINT)])
  assert {s: signal.getsignal(s) for s in before} == before
  assert 'preempted at step 3: saved; rerun the same command to resume' in capsys.readouterr().out
  assert _saved_steps(str(tmp_path)) == [3]
  assert sorted(_losses(tmp_path)) == [3]  # the step in flight is logged though log_every=5
  _train(c, tmp_path)  # resumes from 3
  assert sorted(_losses(tmp_path)) == [3, 5, 8] and _saved_steps(str(tmp_path)) == [3, 8]


_RUN_60 = ['--config.steps=60', '--config.log_every=1', '--config.eval_every=1000']


@pytest.fixture(scope='module')
def uninterrupted_60(tmp_path_factory, corpus_dir, data_dir):
  """train/loss per step of the 60-step run both kill tests interrupt, run once
  without interruption (where it checkpoints does not change a loss)."""
  full = str(tmp_path_factory.mktemp('full'))
  subprocess.run(_cmd(full, corpus_dir, data_dir, *_RUN_60), cwd=ROOT, check=True, capture_output=True)
  return _losses(full)


@pytest.mark.xdist_group('uninterrupted_60')
def test_sigterm_saves_exits_and_resumes_bitwise(tmp_path, corpus_dir, data_dir, uninterrupted_60):
  flags = _RUN_60 + ['--config.checkpoint_every=50']

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
  want, got = uninterrupted_60, _losses(stopped)
  assert sorted(got) == list(range(1, 61))
  assert got == want, [(s, got[s], want[s]) for s in range(1, 61) if got[s] != want[s]][:5]


def _logged_steps(workdir):
  """Steps with a train/loss row so far, skipping a half-written last line (a
  killed writer's) that read_metrics would reject."""
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      lines = f.read().splitlines()
  except OSError:
    return []
  steps = []
  for line in lines:
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if 'train/loss' in row:
      steps.append(row['step'])
  return steps


def _saving(workdir):
  """Whether a save is on disk but not yet committed (orbax's temporary directory)."""
  try:
    return any('tmp' in n for n in os.listdir(os.path.join(workdir, 'checkpoints')))
  except OSError:
    return False


@pytest.mark.xdist_group('uninterrupted_60')
def test_five_sigkills_at_random_moments_then_the_run_completes_bitwise(tmp_path, corpus_dir, data_dir,
                                                                       uninterrupted_60):
  # checkpoint_every=3 keeps a save (and, with keep_checkpoints=2, a deletion)
  # in flight most of the time, so kills land in every phase of a save.
  flags = _RUN_60 + ['--config.checkpoint_every=3', '--config.keep_checkpoints=2']
  t0 = time.time()

  killed = str(tmp_path / 'killed')
  rng = random.Random(14)
  reached, kills = 0, []
  for i in range(5):
    # Its own process group, so that the kill takes every process it started (a lost machine).
    log_path = tmp_path / f'launch{i}.log'  # a file: an unread pipe could fill and stall the run
    with open(log_path, 'w') as log:
      proc = subprocess.Popen(_cmd(killed, corpus_dir, data_dir, *flags), cwd=ROOT, start_new_session=True,
                              stdout=log, stderr=subprocess.STDOUT)
    # The file holds the killed run's rows until the restart truncates it, so
    # wait for `ahead` steps past the last kill: this launch trained them.
    ahead = rng.randint(1, 6)
    deadline = time.time() + 300
    while (max(_logged_steps(killed), default=0) < reached + ahead and proc.poll() is None
           and time.time() < deadline):
      time.sleep(0.005)
    if i % 2:  # odd kills: while a save is being written
      while not _saving(killed) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
      time.sleep(rng.uniform(0, 0.02))
    else:  # even kills: anywhere within the next few steps, a save or deletion included
      time.sleep(rng.uniform(0, 0.3))
    assert proc.poll() is None, f'launch {i} ended before its kill: {log_path.read_text()[-2000:]}'
    on_disk = sorted(os.listdir(os.path.join(killed, 'checkpoints')))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reached = max(_logged_steps(killed), default=0)
    kills.append((reached, on_disk))
    assert reached < 60, 'the run finished before all five kills'

  t1 = time.time()
  last = subprocess.run(_cmd(killed, corpus_dir, data_dir, *flags), cwd=ROOT, capture_output=True, text=True)
  t_last = time.time() - t1
  print(f'kills (last logged step, checkpoints/ at the kill): {kills}')
  print(f'last restart {t_last:.1f}s, all {time.time() - t0:.1f}s')
  assert last.returncode == 0, last.stderr[-3000:]
  assert 'resumed from' in last.stdout
  rows = [r for r in read_metrics(killed) if 'train/loss' in r]
  assert [r['step'] for r in rows] == list(range(1, 61)), 'each step logged exactly once, in order'
  want, got = uninterrupted_60, {r['step']: r['train/loss'] for r in rows}
  assert got == want, [(s, got[s], want[s]) for s in range(1, 61) if got[s] != want[s]][:5]
  assert _saved_steps(killed) == [57, 60]


def _launch_two(workdir, corpus_dir, data_dir, *flags):
  """Processes 0 and 1 of a two-process run (4 CPU devices each, jax.distributed on 127.0.0.1)."""
  from conftest import run_env
  from test_multihost import _free_port
  port = _free_port()
  return [subprocess.Popen(
      _cmd(workdir, corpus_dir, data_dir, *flags, f'--coordinator_address=127.0.0.1:{port}',
           '--num_processes=2', f'--process_id={i}'),
      cwd=ROOT, env=run_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]


def _finish(procs, timeout=300):
  """Their outputs, once both exited with status 0; a hung pair is killed, not left behind."""
  try:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
  return outs


def test_sigterm_to_one_of_two_processes_makes_both_save_the_same_step(tmp_path, corpus_dir):
  # With several processes no Python handler is installed: jax.distributed's
  # preemption service catches SIGTERM and agrees on the step to stop at.
  # A data dir of its own: the first launch prepares the data and trains the
  # tokenizer with two processes (it once hung there, at mismatched barriers).
  data_dir = str(tmp_path / 'tfds')
  flags = ['--config.steps=30', '--config.checkpoint_every=50', '--config.log_every=1',
           '--config.eval_every=1000', '--config.mesh.data=2', '--config.mesh.fsdp=4']
  full = str(tmp_path / 'full')
  _finish(_launch_two(full, corpus_dir, data_dir, *flags))

  stopped = str(tmp_path / 'stopped')
  procs = _launch_two(stopped, corpus_dir, data_dir, *flags)
  deadline = time.time() + 300
  while _last_step(stopped) < 10 and procs[0].poll() is None and time.time() < deadline:
    time.sleep(0.02)
  procs[1].send_signal(signal.SIGTERM)  # not process 0: the notice must reach the others
  t0 = time.time()
  outs = _finish(procs, timeout=120)
  seconds = time.time() - t0
  line = [l for l in outs[0].splitlines() if l.startswith('preempted at step')]
  assert len(line) == 1, outs[0][-3000:]
  step = int(line[0].split()[3].rstrip(':'))
  print(f'SIGTERM to process 1: both saved step {step}, exited {seconds:.2f}s later')
  assert 10 <= step < 30, 'the run was not stopped mid-way'
  assert seconds < 60
  assert _saved_steps(stopped) == [step]
  ckpts = os.path.join(stopped, 'checkpoints')
  assert os.listdir(ckpts) == [str(step)], 'no save left uncommitted'
  assert {'params', 'opt_state', 'meta', 'data'} <= set(os.listdir(os.path.join(ckpts, str(step))))
  assert sorted(_losses(stopped)) == list(range(1, step + 1))

  outs = _finish(_launch_two(stopped, corpus_dir, data_dir, *flags))
  assert f'resumed from {stopped}/checkpoints/{step}' in outs[0]
  want, got = _losses(full), _losses(stopped)
  assert sorted(got) == list(range(1, 31))
  assert got == want, [(s, got[s], want[s]) for s in range(1, 31) if got[s] != want[s]][:5]


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
