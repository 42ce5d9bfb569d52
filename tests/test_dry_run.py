"""The dry run plans an 8B model on 8 fake devices without allocating it."""

import importlib
import json
import os
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize('stage', ['sft', 'dpo', 'reward'])
def test_dry_run_compiles_each_post_training_stage(stage, tmp_path):
  """Each stage's batch layout (pairs, loss masks) compiles without data or allocation."""
  from research.training import trainer as trainer_lib
  config = importlib.import_module(f'configs.{stage}').get_config('size=test')
  config.dry_run = True
  report = trainer_lib.train(config, str(tmp_path / 'run'))
  m = config.model
  dh = m.d_model // m.n_heads
  per_layer = m.d_model * dh * (2 * m.n_heads + 2 * m.n_kv_heads) + 3 * m.d_model * m.d_ff + 2 * m.d_model
  head = m.d_model * (1 if stage == 'reward' else m.vocab_size)  # score [D, 1] or lm_head [D, V]
  assert report['params'] == m.vocab_size * m.d_model + m.n_layers * per_layer + m.d_model + head
  assert report['compile_seconds'] > 0
  assert not os.path.exists(tmp_path / 'run')
