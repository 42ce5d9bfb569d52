"""PPO: the critic head, per-token rewards, GAE advantages from the rollout
source, and the stage through the trainer (accumulation, a run end to end)."""

import dataclasses

import jax
import numpy as np
import pytest

from conftest import assert_same_update, init_params, make_ppo_config, step_with_accumulation, train
from research import models, rewards, sampling
from research.data import sft as sft_data
from research.errors import UserError
from research.models.llama import Config, Model
from research.rollouts import CriticSettings, PPOSource, RolloutSettings, token_rewards
from research.training.metrics import read_metrics

CFG = Config(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


def test_token_rewards_against_a_loop():
  rng = np.random.default_rng(0)
  mask = np.zeros((4, 9), np.int32)
  for b, (start, end) in enumerate([(2, 7), (3, 9), (0, 0), (5, 6)]):
    mask[b, start:end] = 1
  logps, ref = rng.normal(size=(2, 4, 9)).astype(np.float32)
  score = np.asarray([1.5, -2.0, 3.0, 0.25], np.float32)
  got, kl = token_rewards(score, logps, ref, mask, kl_coef=0.1)
  want = np.zeros((4, 9), np.float32)
  for b in range(4):
    idx = [t for t in range(9) if mask[b, t]]
    for t in idx:
      want[b, t] = -0.1 * (logps[b, t] - ref[b, t])
    if idx:
      want[b, idx[-1]] += score[b]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(kl.sum(), ((logps - ref) * mask).sum(), rtol=1e-5)
  assert (got[2] == 0).all()  # no reply: no reward


def test_value_head_leaves_the_logits_alone():
  critic = Model(dataclasses.replace(CFG, value_head='shared'))
  params = init_params(critic)
  assert params['value']['kernel'].shape == (32, 1)
  tokens = np.arange(24, dtype=np.int32).reshape(2, 12) % 512
  logits, values = models.forward_with_values(critic, params, tokens)
  plain = models.forward(Model(CFG), {k: v for k, v in params.items() if k != 'value'}, tokens)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain))
  assert values.shape == (2, 12) and np.isfinite(np.asarray(values)).all()
  assert 'value' in models.NEW_HEADS  # loading a language model's weights leaves it at its init


@pytest.fixture()
def critic_policy():
  model = Model(dataclasses.replace(CFG, value_head='shared'))
  params = init_params(model)
  return sampling.Policy(model, params, lambda: {'reference': params})


def _ppo_source(tok, test_config, critic: CriticSettings, prompts_per_step=3):
  c = make_ppo_config(test_config)
  prompts = sft_data.prompt_stream(c.data, tok, max_len=32, seed=0)
  s = RolloutSettings(prompts_per_step=prompts_per_step, group_size=2, prompt_len=32, max_new_tokens=8)
  return PPOSource(prompts, tok, s, {'even': rewards.resolve('rl_rewards:even_tokens')}, {'even': 1.0}, critic)


def test_monte_carlo_returns_and_whitened_advantages(tok, test_config, critic_policy):
  """With the reference equal to the policy the KL term is 0, so with gamma = lam = 1
  every reply token's return is the reply's score (the reward's own formula)."""
  source = _ppo_source(tok, test_config, CriticSettings(kl_coef=0.1, gamma=1.0, lam=1.0, whiten=True))
  batch = source.next(critic_policy)
  mask = batch['loss_mask'] > 0
  assert batch['advantages'].shape == batch['returns'].shape == batch['old_values'].shape == mask.shape == (6, 39)
  score = np.asarray([np.mean(t[m] % 2 == 0) for t, m in zip(batch['targets'], mask)])
  np.testing.assert_allclose(batch['returns'], np.where(mask, score[:, None], 0.0), rtol=1e-5, atol=1e-6)
  adv = batch['advantages'][mask]
  assert abs(adv.mean()) < 1e-5 and adv.std() == pytest.approx(1.0, rel=1e-4)
  assert (batch['advantages'][~mask] == 0).all() and (batch['old_values'][~mask] == 0).all()
  assert abs(source.metrics['kl/sequence']) < 1e-5  # sampler vs trainer forward: float32 rounding only
  for key in ('time/update_s', 'time/rollout_s', 'time/reward_s', 'time/reference_s', 'tokens_per_sec'):
    assert key in source.metrics


def test_ppo_needs_a_value_head(test_config):
  from research.stages import ppo
  with pytest.raises(UserError, match='value_head'):
    ppo.stage(make_ppo_config(test_config, model__value_head='none'))


# The policy term is a mean of O(1) terms (whitened advantages) that cancel to 0: the loss's last
# digits at 1e-6 are float32 rounding, which only the production compile's is known to meet.
@pytest.mark.production_compile
def test_accumulation_gives_the_same_update(test_config, tok):
  one, four = step_with_accumulation(lambda **kw: make_ppo_config(test_config, **kw),
                                     lambda policy: _ppo_source(tok, test_config, CriticSettings(),
                                                                prompts_per_step=8).next(policy))
  assert float(one[1]['train/value_loss']) > 0
  assert_same_update(one, four)


def test_ppo_run_logs_rl_metrics(test_config, tmp_path):
  train(make_ppo_config(test_config), tmp_path / 'run', devices=jax.devices()[:1])
  last = {}
  for row in read_metrics(str(tmp_path / 'run')):
    last.update(row)
  for key in ('train/value_loss', 'train/policy_loss', 'train/entropy', 'train/logp_diff/max', 'rollout/kl/sequence',
              'rollout/reward/mean', 'rollout/time/update_s', 'rollout/time/reference_s'):
    assert np.isfinite(last[key]), key
  assert last['train/logp_diff/max'] < 1e-4  # sampler and trainer agree (float32)
  assert last['rollout/kl/sequence'] != 0.0  # the policy moved away from the reference


@pytest.mark.parametrize('mode', ['shared', 'detached'])
def test_a_detached_critic_trains_only_its_layer(mode):
  model = Model(dataclasses.replace(CFG, value_head=mode))
  params = init_params(model)
  tokens = np.arange(16, dtype=np.int32).reshape(2, 8)
  grads = jax.grad(lambda p: jax.numpy.sum(models.forward_with_values(model, p, tokens)[1] ** 2))(params)
  trunk = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves({k: v for k, v in grads.items() if k != 'value'}))
  assert float(np.abs(np.asarray(grads['value']['kernel'])).max()) > 0
  assert (trunk == 0.0) == (mode == 'detached'), trunk


def test_head_lr_scale_multiplies_only_the_new_heads_update():
  import ml_collections
  import optax
  from configs import base
  from research.training.optimizer import make_optimizer
  rng = np.random.default_rng(0)
  params = {'value': {'kernel': rng.normal(size=(8, 1)).astype(np.float32)},
            'layers_0': {'w': rng.normal(size=(8, 8)).astype(np.float32)}}
  grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
  updates = {}
  for scale in (1.0, 30.0):
    opt = ml_collections.ConfigDict(base.base_config('ppo', 'test').optimizer.to_dict())
    opt.update(head_lr_scale=scale, warmup_steps=0, decay='constant', lr=1e-3)
    tx, _ = make_optimizer(opt, 10)
    updates[scale], _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates[30.0]['value']['kernel'], 30 * updates[1.0]['value']['kernel'], rtol=1e-6)
  np.testing.assert_array_equal(updates[30.0]['layers_0']['w'], updates[1.0]['layers_0']['w'])
  assert np.abs(optax.tree.norm(updates[1.0]['value'])) > 0
