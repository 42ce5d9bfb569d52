"""The dry run plans an 8B model on 8 fake devices without allocating it."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_8b_dry_run_with_fsdp8():
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # the dry run itself asks for the 8 fake devices the mesh needs
  r = subprocess.run([sys.executable, '-m', 'research.main', '--config=configs/pretrain.py:size=8b',
                      '--workdir=/tmp/unused-dry-run', '--config.dry_run=True', '--config.mesh.data=1',
                      '--config.mesh.fsdp=8'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert '8.03B parameters' in r.stdout
  report = json.loads(r.stdout.strip().splitlines()[-1])
  # fp32 parameters split 8 ways; Adam's two moments twice that.
  assert abs(report['param_bytes_per_device'] - 8.03e9 * 4 / 8) / (8.03e9 * 4 / 8) < 0.01
  assert abs(report['opt_state_bytes_per_device'] - 2 * report['param_bytes_per_device']) < 1e6
  assert not os.path.exists('/tmp/unused-dry-run/checkpoints')
