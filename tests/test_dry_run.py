"""The dry run plans an 8B model on 8 fake devices without allocating it."""

import importlib
import json
import os
import subprocess
import sys

import pytest

from conftest import run_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plan(workdir, size: str, *flags: str) -> tuple[str, dict]:
  """(stdout, JSON report) of `research.main` planning the pretrain preset `size`
  with config.dry_run and `flags` (mesh sizes and such)."""
  env = run_env()  # no device count: the dry run itself asks for the fake devices the mesh needs
  r = subprocess.run([sys.executable, '-m', 'research.main', f'--config=configs/pretrain.py:size={size}',
                      f'--workdir={workdir}', '--config.dry_run=True', '--config.mesh.data=1', *flags],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout, json.loads(r.stdout.strip().splitlines()[-1])


def test_8b_dry_run_with_fsdp8(tmp_path):
  workdir = tmp_path / 'plan'
  stdout, report = _plan(workdir, '8b', '--config.mesh.fsdp=8')
  assert '8.03B parameters' in stdout
  # Llama 3 8B: 8,030,261,248 parameters in fp32, split 8 ways over fsdp but for the
  # 65 norm scales [4096] (replicated); AdamW's two moments twice that, plus two
  # int32 step counts (Adam's and the learning-rate schedule's).
  assert report['params'] == 8_030_261_248
  assert report['param_bytes_per_device'] == 8_030_261_248 * 4 // 8 + 4 * 4096 * 65 * 7 // 8
  assert report['opt_state_bytes_per_device'] == 2 * report['param_bytes_per_device'] + 2 * 4
  assert report['frozen_bytes_per_device'] == 0
  assert not workdir.exists()


@pytest.mark.parametrize('size,count', [('gemma2-2b', 2_614_341_888), ('gemma3-4b', 3_880_263_168)])
def test_gemma_presets_plan_on_fsdp8(size, count, tmp_path):
  """The Gemma presets (scanned sliding/global layers, soft-capping, GeGLU, q/k norms)
  compile for 8 devices and count the published parameters."""
  _, report = _plan(tmp_path / 'plan', size, '--config.mesh.fsdp=8', '--config.batch_size=8')
  assert report['params'] == count and report['logits_held_bytes_per_device'] < report['logits_bytes_per_device']


def test_mixtral_plans_its_experts_over_the_expert_axis(tmp_path):
  """Mixtral 8x7B on fsdp=2 x expert=4: the published parameter count, and each
  device holds an eighth of the expert weights (experts over `expert`, their
  model dimension over `fsdp`)."""
  stdout, report = _plan(tmp_path / 'plan', 'mixtral-8x7b', '--config.mesh.fsdp=2', '--config.mesh.expert=4',
                         '--config.batch_size=8', '--config.seq_len=1024')
  assert 'experts per device' in stdout
  assert report['params'] == 46_702_792_704
  assert report['expert_bytes_per_device'] == 32 * 8 * 3 * 4096 * 14336 * 4 // 8


def _n_params(m, stage):
  per_layer = m.d_model * m.head_dim * (2 * m.n_heads + 2 * m.n_kv_heads) + 3 * m.d_model * m.d_ff + 2 * m.d_model
  head = m.d_model * (1 if stage == 'reward' else m.vocab_size)  # score [D, 1] or lm_head [D, V]
  value = m.d_model if stage == 'ppo' else 0  # PPO's critic: value [D, 1]
  return m.vocab_size * m.d_model + m.n_layers * per_layer + m.d_model + head + value


@pytest.mark.parametrize('stage,frozen', [('sft', 0), ('dpo', 1), ('reward', 0), ('grpo', 1), ('ppo', 1)])
def test_dry_run_compiles_each_post_training_stage(stage, frozen, tmp_path):
  """Each stage's batch layout (pairs, loss masks, [batch] score indices and
  advantages, float old log-probs) compiles without data or allocation; DPO and
  GRPO (KL to the reference) hold one frozen reference copy."""
  from conftest import train
  config = importlib.import_module(f'configs.{stage}').get_config('size=test')
  config.dry_run = True
  report = train(config, tmp_path / 'run')
  m = config.model
  m.head_dim = m.d_model // m.n_heads
  n = _n_params(m, stage)
  assert report['params'] == n
  assert report['param_bytes_per_device'] == 4 * n  # one device, float32
  assert report['frozen_bytes_per_device'] == frozen * 4 * n
  assert report['model_flops_per_step'] > 0 and report['temp_size_in_bytes'] > 0
  if stage in ('grpo', 'ppo'):  # the rollout: KV cache of every reply (k and v, float32) and the sampler
    section = config.grpo if stage == 'grpo' else config.ppo
    rows = config.batch_size * section.get('oversample', 1)
    kv = 2 * m.n_layers * rows * config.seq_len * m.n_kv_heads * m.head_dim * 4
    assert report['rollout_kv_cache_bytes_per_device'] == kv
    assert report['rollout_temp_bytes_per_device'] > 0
  assert not os.path.exists(tmp_path / 'run')
