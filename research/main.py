"""Entry point for every stage: flags, jax.distributed, stage dispatch -> the loop.

    python -m research.main --config=configs/pretrain.py:size=tiny --workdir=runs/demo \
        --config.steps=200 --config.optimizer.lr=1e-3

Multi-host: JAX detects TPU pods, SLURM and similar clusters by itself; for an
explicit launch give every process the same --coordinator_address and
--num_processes, and its own --process_id. --heartbeat_timeout (seconds, 100 by
default) is how long a hard-crashed process goes unnoticed before the others end.

User errors (config, environment, data) print one line and exit with status 2;
so do OS errors the user fixes (a full disk, a read-only workdir). In a
multi-process run, an error on one process stops every process within a second,
each printing that line (research/training/failstop.py).
"""

from __future__ import annotations

import errno
import math
import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from research.training import failstop, host_memory

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Stage config file[:arg].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (created; re-running resumes).')
_COORD = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for explicit multi-process launches.')
_NPROC = flags.DEFINE_integer('num_processes', None, 'Total number of processes.')
_PID = flags.DEFINE_integer('process_id', None, 'This process\'s index.')
JAX_HEARTBEAT_TIMEOUT_S = 100  # jax.distributed.initialize's own default
_HEARTBEAT = flags.DEFINE_integer(
    'heartbeat_timeout', JAX_HEARTBEAT_TIMEOUT_S,
    'Seconds without a heartbeat after which jax.distributed declares a process dead and stops the others (a hard crash: SIGKILL, out of memory, a lost host).')


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, heartbeat_timeout_s: int = JAX_HEARTBEAT_TIMEOUT_S) -> None:
  """Initialises jax.distributed: explicitly when given all three of
  coordinator_address, num_processes and process_id, else auto-detected on
  clusters (SLURM with more than one task, TPU pods), else not at all.

  heartbeat_timeout_s: after this long without a heartbeat from one process (a
  hard crash, which failstop.py cannot report), JAX's coordination service ends
  every other process with a message naming the dead one; until then they wait
  in their next collective.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from research.errors import UserError  # pylint: disable=import-outside-toplevel
  if heartbeat_timeout_s < 1:
    raise UserError(f'--heartbeat_timeout={heartbeat_timeout_s}: give a positive number of seconds.')
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise UserError('give all of --coordinator_address, --num_processes and --process_id, or none.')
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_s)
  elif any(k in os.environ for k in ('SLURM_NTASKS', 'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS')):
    if int(os.environ.get('SLURM_NTASKS', '2')) > 1:
      jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)  # cluster auto-detection


def simulate_devices_for_dry_run(config) -> None:
  """Lets a laptop plan a pod: the CPU backend gets as many (fake) devices as
  the mesh asks for. Must run before JAX initialises its backends; it only
  affects the CPU platform, so real accelerators are untouched."""
  sizes = [int(config.mesh.get(a, 1)) for a in ('data', 'fsdp', 'expert', 'tensor')]
  flags_now = os.environ.get('XLA_FLAGS', '')
  if -1 not in sizes and 'xla_force_host_platform_device_count' not in flags_now:
    n = math.prod(sizes)
    os.environ['XLA_FLAGS'] = f'{flags_now} --xla_force_host_platform_device_count={n}'.strip()


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  from research.errors import UserError  # pylint: disable=import-outside-toplevel
  try:
    if flags.FLAGS['config'].present == 0:
      raise UserError('--config is required, e.g. --config=configs/pretrain.py:size=tiny')
    if not _WORKDIR.value:
      raise UserError('--workdir is required: the run directory (re-running the same command resumes).')
    try:
      config = _CONFIG.value
      config.stage  # pylint: disable=pointless-statement  # the config file loads lazily
    except OSError as e:
      raise UserError(f'cannot load --config: {str(e).splitlines()[-1].strip()}') from None
    if config.dry_run:
      simulate_devices_for_dry_run(config)
    init_distributed(_COORD.value, _NPROC.value, _PID.value, _HEARTBEAT.value)
    stop_watching = failstop.start_watcher()  # another process's error stops this one too
    try:
      from research import stages  # pylint: disable=import-outside-toplevel
      from research.training import init, loop  # pylint: disable=import-outside-toplevel
      config = init.resolve_config(config)  # init_from=hf:<dir> decides the architecture
      loop.train(config, _WORKDIR.value, stages.get(config.stage)(config))
    finally:
      stop_watching()
  except UserError as e:
    failstop.stop_all_processes(f'error: {e}', 2)
  except OSError as e:
    message = environment_error(e)
    if message is None:
      _stop_on_crash(e)
    failstop.stop_all_processes(f'error: {message}', 2)
  except Exception as e:  # pylint: disable=broad-except  # a bug or a crash: the others must not hang
    _stop_on_crash(e)


def _stop_on_crash(e: BaseException) -> None:
  """A crash (not a user error): re-raised in a single process; in a
  multi-process run, the traceback, then every process stops (failstop)."""
  if not failstop.multi_process():
    raise e
  if failstop.peer_error() is None:  # else the crash is most likely that process leaving
    traceback.print_exc()
  failstop.stop_all_processes(f'error: {type(e).__name__}: {e}'.splitlines()[0], 1, defer_to_peers=True)


def environment_error(e: OSError) -> str | None:
  """One line for an OSError the user fixes (a full disk, a read-only or
  forbidden path) that no layer below turned into a UserError; else None."""
  if e.errno in (errno.ENOSPC, errno.EDQUOT):
    fix = 'free some space or use another --workdir'
  elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
    fix = 'check its permissions or use another --workdir'
  else:
    return None
  return f'{e.filename or "writing in the workdir"}: {e.strerror}; {fix}.'


def parse_flags(argv):
  """absl flag parsing, with bad flags and unknown --config keys as one-line errors."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  # absl/ml_collections raise many types
    msg = ' '.join(str(e).replace('\\n', ' ').replace("\\'", "'").split())
    if 'Traceback' in msg:  # an exception inside get_config(): keep its last line
      msg = msg.rsplit('Error: ', 1)[-1]
    bad = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
    flag = next((b for b in bad if any(part in msg for part in b.split('.')[1:])), None)
    hint = (f' ({flag}: check the key and type against the config file; unknown keys are '
            'rejected)') if flag else ''
    print(f'error: {msg}{hint}', file=sys.stderr)
    sys.exit(2)


def run():
  """Console entry point."""
  host_memory.reexec_with_huge_pages()
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
