"""Environment errors at the command line: a read-only workdir, a full disk at
start and during an asynchronous checkpoint save, a resume with another model
size. Each exits with status 2 and one `error:` line, without a traceback.

The disk tests mount a small tmpfs in a private mount namespace (unshare), so
nothing outlives them; where mounting is not allowed they are skipped.
"""

import os
import shlex
import subprocess
import sys

import pytest

from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(workdir, corpus_dir, data_dir, *extra, python=(sys.executable, '-m', 'research.main')):
  return [*python, '--config=configs/pretrain.py:size=test', f'--workdir={workdir}',
          '--config.data.name=files', f'--config.data.files={corpus_dir}/*.txt',
          f'--config.data.data_dir={data_dir}', '--config.sample.prompts=()', *extra]


# The CLI with the free-space check before each save turned off, so that the
# disk fills up in the middle of an asynchronous save.
_NO_SPACE_CHECK = (sys.executable, '-c', 'import sys; from research.training import disk; '
                   'disk.free_bytes = lambda path: None; from research import main; '
                   'sys.argv[0] = "research.main"; main.run()')


def _in_tmpfs(tmp_path, size, *commands):
  """Runs `commands` (argv lists, or shell lines) one after another in a
  private mount namespace where tmp_path/mnt is an empty tmpfs of `size`;
  returns (exit status, output) of each argv list. Skips the test where
  mounting is not allowed."""
  mnt = tmp_path / 'mnt'
  mnt.mkdir()
  # One device: the sizes below assume its checkpoint (about 0.7 MB; 8 fake devices write 1.5 MB).
  script = [f'mount -t tmpfs -o size={size} tmpfs {mnt} || exit 99', f'cd {ROOT}',
            f"export XLA_FLAGS='{xla_flags(1)}'"]
  outs = []
  for c in commands:
    if isinstance(c, str):
      script.append(c)
    else:
      out = tmp_path / f'out{len(outs)}'
      script.append(f'{shlex.join(c)} > {out} 2>&1; echo $? > {out}.rc')
      outs.append(out)
  try:
    r = subprocess.run(['unshare', '-rm', 'sh', '-c', '\n'.join(script)], capture_output=True, text=True)
  except FileNotFoundError:
    pytest.skip('no unshare command')
  if r.returncode == 99 or not outs or not os.path.exists(f'{outs[0]}.rc'):
    pytest.skip(f'cannot mount a tmpfs here: {r.stderr.strip()[-200:]}')
  return [(int(open(f'{o}.rc').read()), open(o).read()) for o in outs]


def _assert_one_line_error(result, *needles):
  """Status 2; the output ends with one `error:` line holding every needle;
  no traceback nor logged error came before it."""
  status, out = result
  lines = out.strip().splitlines()
  assert status == 2 and lines and lines[-1].startswith('error: '), out[-3000:]
  assert 'Traceback' not in out and sum(line.startswith('error') for line in lines) == 1, out[-3000:]
  assert not [line for line in lines if line[:1] == 'E' and line[1:5].isdigit()], out[-3000:]  # absl errors
  for needle in needles:
    assert needle in lines[-1], (needle, lines[-1])
  return lines[-1]


def test_read_only_workdir(tmp_path, corpus_dir, data_dir):
  mnt = tmp_path / 'mnt'
  (first,) = _in_tmpfs(tmp_path, '1M', f'mount -o remount,ro {mnt} || exit 99',
                       _cmd(mnt / 'w', corpus_dir, data_dir))
  _assert_one_line_error(first, str(mnt / 'w'), 'Read-only file system')


def test_full_disk_at_start(tmp_path, corpus_dir, data_dir):
  mnt = tmp_path / 'mnt'
  (first,) = _in_tmpfs(tmp_path, '64k', f'cat /dev/zero > {mnt}/fill 2>/dev/null',
                       _cmd(mnt / 'w', corpus_dir, data_dir))
  _assert_one_line_error(first, str(mnt / 'w'), 'No space left on device')


def test_checkpoint_that_cannot_fit_is_not_started(tmp_path, corpus_dir, data_dir):
  # A checkpoint of the test model takes about 0.7 MB: the first fits, the second not.
  mnt = tmp_path / 'mnt'
  flags = ['--config.steps=10', '--config.checkpoint_every=5', '--config.keep_checkpoints=0']
  (first,) = _in_tmpfs(tmp_path, '1M', _cmd(mnt / 'w', corpus_dir, data_dir, *flags))
  _assert_one_line_error(first, f'disk full while saving checkpoint 10 to {mnt}/w/checkpoints',
                         'free, a checkpoint takes about', 'the previous checkpoint 5 is kept')
  assert 'step 10/10' in first[1]


def test_disk_full_during_async_save_keeps_the_previous_checkpoint(tmp_path, corpus_dir, data_dir):
  mnt = tmp_path / 'mnt'
  flags = ['--config.steps=15', '--config.checkpoint_every=5', '--config.keep_checkpoints=0']
  unchecked = _cmd(mnt / 'w', corpus_dir, data_dir, *flags, python=_NO_SPACE_CHECK)
  first, again = _in_tmpfs(tmp_path, '1M', unchecked, f'ls {mnt}/w/checkpoints > {tmp_path}/left',
                           f'mount -o remount,size=8M {mnt}',  # space freed: the same command resumes
                           _cmd(mnt / 'w', corpus_dir, data_dir, *flags))
  # Checkpoint 10 fails while step 11.. train; the save of 15 finds out and stops.
  _assert_one_line_error(first, f'disk full while saving checkpoint 10 to {mnt}/w/checkpoints',
                         'No space left on device', 'the previous checkpoint 5 is kept')
  assert '10.orbax-checkpoint-tmp' in open(tmp_path / 'left').read().split()
  status, out = again
  assert status == 0 and f'resumed from {mnt}/w/checkpoints/5' in out, out[-3000:]
  assert 'done: 10 steps' in out, out[-3000:]


def test_resume_with_another_model_size(tmp_path, corpus_dir, data_dir):
  workdir = tmp_path / 'w'
  flags = ['--config.steps=2', '--config.checkpoint_every=2', '--config.eval_every=100']
  subprocess.run(_cmd(workdir, corpus_dir, data_dir, *flags), cwd=ROOT, check=True, capture_output=True)
  # allow_changes passes the config check at resume, so that the restore itself meets the other shapes.
  r = subprocess.run(_cmd(workdir, corpus_dir, data_dir, *flags, '--config.model.d_model=64',
                          '--config.allow_changes=model.d_model'),
                     cwd=ROOT, capture_output=True, text=True)
  _assert_one_line_error((r.returncode, r.stdout + r.stderr), f'{workdir}/checkpoints/2',
                         "params['embed']['embedding'] is (512, 32) in the checkpoint but (512, 64)")
