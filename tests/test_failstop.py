"""One process's error stops every process of a multi-process run at once
(research/training/failstop.py). Without it the others block in their next
collective and jax.distributed's shutdown barrier holds everyone for 5 minutes."""

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import run_env

from tests.test_multihost import ROOT, _cmd, _free_port

# Process `failing` meets an error after the first collective; the other goes on
# into the next collective, which can never complete.
_SCRIPT = textwrap.dedent('''
    import sys
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from research.training import failstop
    me, failing, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=me)
    failstop.start_watcher()
    multihost_utils.process_allgather(np.zeros(1))
    if me == failing:
      failstop.stop_all_processes('error: the row is malformed; fix it', 2)
    multihost_utils.process_allgather(np.ones(1))
    print('passed the collective')
''')


def _run_both(cmds, env):
  """Runs the two processes' commands side by side; (return codes, [(stdout, stderr)])."""
  procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for cmd in cmds]
  try:
    outs = [p.communicate(timeout=120) for p in procs]  # the hang failstop prevents lasts 300 s
  finally:
    for p in procs:
      p.kill()
  return [p.returncode for p in procs], outs


_ONE_DEVICE = run_env(1)


@pytest.mark.parametrize('failing', [1, 0])  # 0 also hosts the coordination service
def test_an_error_on_one_process_stops_both_with_its_message(failing):
  port = _free_port()
  codes, outs = _run_both([[sys.executable, '-c', _SCRIPT, str(i), str(failing), str(port)] for i in range(2)],
                          _ONE_DEVICE)
  assert codes == [2, 2], outs
  assert not any('passed the collective' in out for out, _ in outs)
  errors = [[line for line in err.splitlines() if line.startswith('error:')] for _, err in outs]
  other = 1 - failing
  assert errors[failing] == ['error: the row is malformed; fix it']
  assert errors[other] == [f'error: the row is malformed; fix it [process {failing} of 2]; '
                           f'stopping process {other} of 2 too']


def test_a_data_path_missing_on_one_host_stops_the_run_in_seconds(tmp_path, corpus_dir, data_dir):
  """Through research.main: per-host input where process 1's data path matches
  nothing (the files were copied to the first host only). Before failstop both
  processes hung for 5 minutes and died with crash dumps."""
  port = _free_port()
  missing = str(tmp_path / 'not_copied' / '*.txt')
  codes, outs = _run_both([
      _cmd(str(tmp_path / 'run'), corpus_dir, data_dir, '--config.mesh.data=2', '--config.mesh.fsdp=4',
           '--config.data.streams=2', f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
           f'--process_id={i}', *([f'--config.data.files={missing}'] if i == 1 else [])) for i in range(2)], run_env(4))
  assert codes == [2, 2], outs
  want = f"error: data.files='{missing}' matches no file; give comma-separated globs of .txt or .jsonl files."
  assert outs[1][1].strip().splitlines()[-1] == want
  assert outs[0][1].strip().splitlines()[-1] == f'{want} [process 1 of 2]; stopping process 0 of 2 too'


_CRASH_SCRIPT = textwrap.dedent('''
    import sys, time
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from research.training import failstop
    me, port = int(sys.argv[1]), sys.argv[2]
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=me)
    multihost_utils.process_allgather(np.zeros(1))
    if me == 1:
      failstop.stop_all_processes('error: the row is malformed; fix it', 2)
    while failstop.peer_error() is None:  # as if its collective broke once process 1 left
      time.sleep(0.1)
    failstop.stop_all_processes('error: RuntimeError: gloo connection reset', 1, defer_to_peers=True)
''')


def test_a_crash_after_another_process_failed_reports_that_process_error():
  """A process whose collective breaks because another left reports the other's
  error (the cause), not its own crash."""
  port = _free_port()
  codes, outs = _run_both([[sys.executable, '-c', _CRASH_SCRIPT, str(i), str(port)] for i in range(2)], _ONE_DEVICE)
  assert codes == [2, 2], outs
  errors = [line for line in outs[0][1].splitlines() if line.startswith('error:')]
  assert errors == ['error: the row is malformed; fix it [process 1 of 2]; stopping process 0 of 2 too']



def test_a_failing_process_slow_to_exit_still_exits_with_its_code():
  """Process 0 hosts the coordination service and, once it reads another
  process's error, waits HOST_GRACE_SECONDS before exiting: a failing process
  descheduled between posting its error and exiting (here 0.5 s, as on a loaded
  machine) would otherwise be aborted by its coordination client (-6 and a C++
  crash dump in place of its exit code 2)."""
  slow = _CRASH_SCRIPT.replace('from research.training import failstop\n', textwrap.dedent("""\
      from research.training import failstop
      _exit_now = failstop._exit_now
      def _late_exit(code):
        if int(sys.argv[1]) == 1:
          time.sleep(0.5)
        _exit_now(code)
      failstop._exit_now = _late_exit
      """))
  assert slow != _CRASH_SCRIPT
  port = _free_port()
  codes, outs = _run_both([[sys.executable, '-c', slow, str(i), str(port)] for i in range(2)], _ONE_DEVICE)
  assert codes == [2, 2], outs

# Process 1 dies hard (SIGKILL: nothing of it can report) after the first
# collective; process 0 goes on into the next one.
_KILL_SCRIPT = textwrap.dedent('''
    import os, signal, sys
    import numpy as np
    from jax.experimental import multihost_utils
    from research.main import init_distributed
    me, port, heartbeat = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    init_distributed(f'127.0.0.1:{port}', 2, me, heartbeat_timeout_s=heartbeat)
    multihost_utils.process_allgather(np.zeros(1))
    if me == 1:
      os.kill(os.getpid(), signal.SIGKILL)
    multihost_utils.process_allgather(np.ones(1))
    print('passed the collective')
''')


def test_a_hard_crash_of_one_process_ends_the_others_after_the_heartbeat_timeout():
  """init_distributed's heartbeat timeout (research.main's --heartbeat_timeout)
  reaches jax.distributed: with 3 s, the survivor of a SIGKILLed peer is ended
  within seconds (JAX's default takes 100 s), with JAX's message naming the
  dead process."""
  port = _free_port()
  t0 = time.monotonic()
  codes, outs = _run_both([[sys.executable, '-c', _KILL_SCRIPT, str(i), str(port), '3'] for i in range(2)],
                          _ONE_DEVICE)
  waited = time.monotonic() - t0
  assert codes[1] == -signal.SIGKILL
  assert codes[0] != 0 and 'passed the collective' not in outs[0][0], outs[0]
  assert 'stopped sending heartbeats' in outs[0][1], outs[0][1][-2000:]
  assert waited < 60, f'the survivor took {waited:.0f} s: the 3 s heartbeat timeout did not reach jax.distributed'
