"""Two processes x 4 CPU devices (jax.distributed on 127.0.0.1) against one process x 8."""

import json
import os
import socket
import subprocess
import sys

from conftest import run_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _cmd(workdir, corpus_dir, data_dir, *extra):
  return [sys.executable, '-m', 'research.main', '--config=configs/pretrain.py:size=test',
          f'--workdir={workdir}', '--config.data.name=files',
          f'--config.data.files={corpus_dir}/*.txt', f'--config.data.data_dir={data_dir}',
          '--config.sample.prompts=()', '--config.log_every=1', *extra]


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['train/loss'] for r in map(json.loads, f) if 'train/loss' in r}


def test_two_processes_match_one(tmp_path, corpus_dir, data_dir):
  """data.streams=1: both processes build every global batch and keep their
  half; the losses equal 1 process x 8 devices."""
  flags = ['--config.steps=4', '--config.mesh.data=2', '--config.mesh.fsdp=4']
  one = str(tmp_path / 'one')
  subprocess.run(_cmd(one, corpus_dir, data_dir, *flags), cwd=ROOT, env=run_env(8), check=True,
                 capture_output=True, timeout=600)

  two = str(tmp_path / 'two')
  port = _free_port()
  procs = [subprocess.Popen(
      _cmd(two, corpus_dir, data_dir, *flags, f'--coordinator_address=127.0.0.1:{port}',
           '--num_processes=2', f'--process_id={i}'),
      cwd=ROOT, env=run_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  assert '2 processes' in outs[0]

  want, got = _losses(one), _losses(two)
  assert sorted(got) == [1, 2, 3, 4]
  for step in got:
    assert abs(got[step] - want[step]) / abs(want[step]) < 1e-5, (step, got[step], want[step])


def test_per_host_input_each_process_builds_its_own_rows(tmp_path, corpus_dir, data_dir):
  """data.streams=2: each of 2 processes builds (reads, tokenizes, packs) only
  its half of every global batch, the losses equal 1 process x 8 devices
  building both streams, and the 2-process checkpoint resumes in 1 process, on
  a tensor-parallel mesh, on the same data."""
  # A constant learning rate: the 4-step run continued to 6 follows the 6-step schedule.
  flags = ['--config.mesh.data=2', '--config.mesh.fsdp=4', '--config.data.streams=2',
           '--config.optimizer.decay=constant']
  one = str(tmp_path / 'one')
  subprocess.run(_cmd(one, corpus_dir, data_dir, *flags, '--config.steps=6'), cwd=ROOT, env=run_env(8),
                 check=True, capture_output=True, timeout=600)

  two = str(tmp_path / 'two')
  port = _free_port()
  procs = [subprocess.Popen(
      _cmd(two, corpus_dir, data_dir, *flags, '--config.steps=4', '--config.checkpoint_every=4',
           f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'),
      cwd=ROOT, env=run_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs

  # The checkpoint's data state records the rows each process built: half each.
  with open(os.path.join(two, 'checkpoints', '4', 'data', 'metadata')) as f:
    data_state = json.load(f)
  batch_rows = 8  # the test preset's batch_size
  assert data_state['rows_built'] == [4 * batch_rows // 2] * 2
  assert sorted(data_state['states']) == ['0', '1']

  want = _losses(one)
  got = _losses(two)
  assert sorted(got) == [1, 2, 3, 4]
  for step in got:
    assert abs(got[step] - want[step]) / abs(want[step]) < 1e-5, (step, got[step], want[step])

  moved = [f for f in flags if not f.startswith('--config.mesh.')] + ['--config.mesh.data=4',
                                                                      '--config.mesh.tensor=2']
  r = subprocess.run(_cmd(two, corpus_dir, data_dir, *moved, '--config.steps=6'),
                     cwd=ROOT, env=run_env(8), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'resumed from' in r.stdout
  got = _losses(two)
  assert sorted(got) == [1, 2, 3, 4, 5, 6]
  for step in (5, 6):
    assert abs(got[step] - want[step]) / abs(want[step]) < 1e-5, (step, got[step], want[step])
