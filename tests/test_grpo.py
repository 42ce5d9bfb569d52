"""Online RL: rewards, the rollout source, and the GRPO stage through the trainer
(accumulation, mesh, exact resume)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import (assert_same_update, init_params, make_grpo_config, make_trainer, run_env,
                      step_with_accumulation, train)
from research import losses, rewards, sampling
from research.data import sft as sft_data
from research.errors import UserError
from research.models.llama import Config, Model
from research.rollouts import RolloutSettings, RolloutSource
from research.training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sample(completion, row, n_tokens=3, truncated=False):
  return rewards.Sample([{'role': 'user', 'content': 'q'}], completion, tuple(range(n_tokens)), row, truncated)


def test_builtin_rewards():
  add, rev, code = {'family': 'add', 'answer': '42'}, {'family': 'reverse', 'answer': 'c b a'}, {'family': 'code'}
  s = [_sample('42', add), _sample(' 41 ', add), _sample('x', add), _sample('c a b', rev), _sample('c b a', rev),
       _sample('def f(): pass', code)]
  assert rewards.exact_match(s) == [1.0, 0.0, 0.0, 0.0, 1.0, None]
  assert rewards.partial_credit(s) == [1.0, 0.9, 0.0, 1 / 3, 1.0, None]
  assert rewards.answer_format(s + [_sample('42', add, truncated=True)]) == [1.0, 1.0, 0.0, 1.0, 1.0, None, 0.0]
  overlong = rewards.overlong_penalty(10, 4)  # 0 up to 6 tokens, then down to -1 at 10
  assert overlong([_sample('', {}, n) for n in (5, 6, 8, 10)] + [_sample('', {}, 3, True)]) == [0.0, 0.0, -0.5, -1.0, -1.0]
  combined = rewards.combine({'a': [1.0, None, 0.5], 'b': [None, None, 1.0]}, {'a': 2.0, 'b': 0.5})
  np.testing.assert_allclose(combined, [2.0, 0.0, 1.5])


def test_reward_contract_errors_are_one_line():
  s = [_sample('42', {'answer': '42'})]
  with pytest.raises(UserError, match='neither a built-in'):
    rewards.resolve('no_such_reward')
  with pytest.raises(UserError, match='cannot be imported'):
    rewards.resolve('os:no_such_function')
  with pytest.raises(UserError, match='returned 2 values for 1'):
    rewards.check_contract(lambda samples: [1.0, 2.0], 'two', s)
  with pytest.raises(UserError, match="e.g. 'yes'"):
    rewards.check_contract(lambda samples: ['yes'], 'text', s)
  with pytest.raises(UserError, match='ZeroDivisionError'):
    rewards.check_contract(lambda samples: [1 / 0], 'boom', s)
  rewards.check_contract(rewards.resolve('rl_rewards:even_tokens'), 'custom', s)  # a valid custom reward


@pytest.fixture(scope='module')
def policy(test_config):
  model = Model(Config(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64))
  return sampling.Policy(model, init_params(model))


@pytest.fixture(scope='module')
def test_config(corpus_dir, data_dir):  # module scope, for the policy fixture
  from conftest import make_test_config
  return lambda **kw: make_test_config(corpus_dir, data_dir, **kw)


def _source(tok, test_config, fns=None, **settings):
  c = make_grpo_config(test_config)
  prompts = sft_data.prompt_stream(c.data, tok, max_len=32, seed=0)
  s = RolloutSettings(**{**dict(prompts_per_step=3, group_size=4, prompt_len=32, max_new_tokens=8), **settings})
  fns = fns or {'even': rewards.resolve('rl_rewards:even_tokens')}
  return RolloutSource(prompts, tok, s, fns, {k: 1.0 for k in fns})


def test_rollout_batch_layout_and_advantages(tok, test_config, policy):
  source = _source(tok, test_config)
  batch = source.next(policy)
  B, L = batch['inputs'].shape
  assert (B, L) == (12, 32 + 8 - 1) and batch['advantages'].shape == (12,)
  np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
  for g in range(3):  # a group shares its prompt; its advantages are centred
    rows = batch['inputs'][4 * g:4 * g + 4, :31]
    assert (rows == rows[0]).all()
  mask = batch['loss_mask']
  assert mask[:, :31].sum() == 0 and mask.sum() > 0  # only reply tokens are trained
  assert (batch['old_logps'][mask == 0] == 0).all() and (batch['old_logps'][mask > 0] < 0).all()
  # The advantages are those of the rewards (the share of even reply tokens, recomputed here).
  reward = np.asarray([np.mean(t[m > 0] % 2 == 0) for t, m in zip(batch['targets'], mask)])
  np.testing.assert_allclose(batch['advantages'], np.asarray(losses.group_advantages(reward, 4)), rtol=1e-5, atol=1e-6)
  assert source.metrics['reward/mean'] == pytest.approx(reward.mean(), rel=1e-6)
  assert np.abs(batch['advantages']).max() > 0


def test_prompt_families_keep_only_those_rows(tok, test_config):
  c = make_grpo_config(test_config)
  stream = iter(sft_data.prompt_stream(c.data, tok, max_len=40, seed=0, families=('add', 'sort')))
  rows = [next(stream)['row'] for _ in range(60)]
  assert {r['family'] for r in rows} == {'add', 'sort'}
  # The filter reads the row, and the row is the task: additions ask for a sum, sorts for a list.
  for r in rows:
    question = r['messages'][0]['content']
    assert ('+' in question) == (r['family'] == 'add'), question
  with pytest.raises(UserError, match=r"no rows of the task families \['divide'\] in sft_tasks .*'reverse'"):
    sft_data.prompt_stream(c.data, tok, max_len=40, seed=0, families=('divide',))


def test_state_resumes_the_same_rollouts(tok, test_config, policy):
  a = _source(tok, test_config)
  a.next(policy)
  b = _source(tok, test_config)
  b.set_state(json.loads(json.dumps(a.get_state())))
  from research.training.checkpoint import json_lists_to_tuples
  b.set_state(json_lists_to_tuples(json.loads(json.dumps(a.get_state()))))
  x, y = a.next(policy), b.next(policy)
  for k in x:
    np.testing.assert_array_equal(x[k], y[k])


def test_dynamic_sampling_keeps_shapes_with_zero_weight_fill(tok, test_config, policy):
  """A random model never answers right: every group is flat under exact match,
  so DAPO's filter keeps none and fills the batch with zero-weight rows."""
  source = _source(tok, test_config, fns={'em': rewards.exact_match}, oversample=2)
  batch = source.next(policy)
  assert batch['inputs'].shape == (12, 39)
  assert batch['loss_mask'].sum() == 0 and (batch['advantages'] == 0).all()
  assert source.metrics['groups/kept'] == 0.0 and source.metrics['groups/zero_spread'] == 1.0


@pytest.mark.production_compile
def test_accumulation_gives_the_same_update(test_config, tok):
  one, four = step_with_accumulation(lambda **kw: make_grpo_config(test_config, **kw),
                                     lambda policy: _source(tok, test_config, prompts_per_step=4,
                                                            prompt_len=32).next(policy))
  assert_same_update(one, four)


def _metric_rows(workdir, key):
  return {r['step']: r[key] for r in read_metrics(workdir) if key in r}


def test_mesh_matches_one_device_for_three_steps(test_config, tmp_path):
  one = tmp_path / 'one'
  train(make_grpo_config(test_config), one, devices=jax.devices()[:1])
  mesh = tmp_path / 'mesh'
  train(make_grpo_config(test_config, mesh__data=2, mesh__fsdp=2, mesh__tensor=2), mesh)
  # (train/loss is not compared: on-policy it is -mean(A) = 0 up to rounding.)
  # train/kl is a mean of exp(d) - d - 1 over tokens, d a difference of float32
  # log-probs of size ~1-10 (ulp 1e-7 to 1e-6), so it cannot agree better than
  # about |d| x ulp in absolute terms: 3e-7. (With the sampler's vocabulary mask
  # active, as here, the meshes differ by 1.3e-7 at step 3, 2e-5 of a KL of 0.006.)
  floor = {'train/kl': 3e-7}
  for key in ('train/grad_norm', 'train/kl', 'rollout/reward/mean', 'rollout/completion/length'):
    want, got = _metric_rows(str(one), key), _metric_rows(str(mesh), key)
    assert sorted(got) == [1, 2, 3], key
    for step in got:
      assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]) + floor.get(key, 1e-9), \
          (key, step, got[step], want[step])
  assert _metric_rows(str(one), 'train/kl')[3] > 0 and _metric_rows(str(one), 'train/grad_norm')[1] > 0


def _cli(workdir, data_dir, *extra):
  return [sys.executable, '-m', 'research.main', '--config=configs/grpo.py:size=test', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', "--config.grpo.rewards=('rl_rewards:even_tokens',)",
          '--config.grpo.max_new_tokens=8', '--config.grpo.num_generations=4', '--config.grpo.eval_samples=0',
          '--config.task_eval.exact_match=False', '--config.sample.prompts=()', '--config.seq_len=40',
          '--config.batch_size=16', '--config.steps=12', '--config.checkpoint_every=4', '--config.log_every=1',
          '--config.eval_every=100', '--config.optimizer.lr=0.01', *extra]


def test_resume_after_sigkill_is_bitwise_identical(tmp_path, data_dir):
  env = run_env(PYTHONPATH=os.path.join(ROOT, 'tests'))
  full = str(tmp_path / 'full')
  subprocess.run(_cli(full, data_dir), cwd=ROOT, env=env, check=True, capture_output=True)
  killed = str(tmp_path / 'killed')
  proc = subprocess.Popen(_cli(killed, data_dir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  last = lambda: max(_metric_rows(killed, 'train/loss'), default=0) if os.path.exists(
      os.path.join(killed, 'metrics.jsonl')) else 0
  while last() < 6 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert 6 <= last() < 12, 'the run was not killed mid-way'
  subprocess.run(_cli(killed, data_dir), cwd=ROOT, env=env, check=True, capture_output=True)
  for key in ('train/loss', 'train/grad_norm', 'rollout/reward/mean', 'rollout/completion/length'):
    want, got = _metric_rows(full, key), _metric_rows(killed, key)
    assert sorted(got) == list(range(1, 13)), key
    assert got == want, key


def test_lora_grpo_keeps_one_base_and_derives_the_reference(test_config, tmp_path):
  """With LoRA the KL reference is the base with adapters off: no copy is held,
  and the first step's KL is exactly 0 (the adapters start at zero)."""
  c = make_grpo_config(test_config, lora__rank=4, steps=3, optimizer__lr=3e-2)
  t = make_trainer(c, jax.devices()[:1])
  assert t.stage.frozen == ('reference',) and t.held_frozen == ('base',)
  train(c, tmp_path / 'run', devices=jax.devices()[:1])
  kl = _metric_rows(str(tmp_path / 'run'), 'train/kl')
  assert kl[1] == kl[2] == 0.0 and kl[3] > 0  # step 1 runs at the warm-up's learning rate 0
