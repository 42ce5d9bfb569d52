"""Online-RL advantages and losses against numpy transcriptions of their formulas."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import losses


def _np_group_advantages(r, G, method, scale, eps):
  r = np.asarray(r, np.float64)
  out = np.zeros_like(r)
  for g in range(len(r) // G):
    x = r[g * G:(g + 1) * G]
    for i in range(G):
      others = np.delete(x, i)
      if method == 'rloo':
        a = x[i] - others.mean()
      else:
        a = x[i] - x.mean()
      if method == 'grpo' and scale == 'group':
        a /= x.std(ddof=1) + eps
      elif method == 'grpo' and scale == 'batch':
        a /= r.std(ddof=1) + eps
      out[g * G + i] = 0.0 if x.max() == x.min() else a
  return out


@pytest.mark.parametrize('method,scale', [('grpo', 'group'), ('grpo', 'batch'), ('grpo', 'none'),
                                          ('drgrpo', 'group'), ('rloo', 'group')])
def test_group_advantages_match_numpy(method, scale):
  rng = np.random.RandomState(0)
  r = rng.randn(24).astype(np.float32)
  r[8:12] = 0.3  # one group without spread: exactly 0
  got = np.asarray(losses.group_advantages(r, 4, method=method, scale=scale, eps=1e-4))
  want = _np_group_advantages(r, 4, method, scale, 1e-4)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert (got[8:12] == 0).all()
  with pytest.raises(ValueError):
    losses.group_advantages(r, 5)


def _np_policy_loss(logps, old, adv, mask, ref, beta, kl, eps, eps_high, importance, aggregation, max_len):
  logps, old, ref = (np.asarray(x, np.float64) for x in (logps, old, ref))
  B, T = logps.shape
  high = eps if eps_high is None else eps_high
  per = np.zeros((B, T))
  ratio = np.zeros((B, T))
  kls = np.zeros((B, T))
  for b in range(B):
    valid = mask[b] > 0
    seq = (logps[b] - old[b])[valid].mean() if valid.any() else 0.0
    for t in range(T):
      lr = seq if importance == 'sequence' else logps[b, t] - old[b, t]
      r = np.exp(lr)
      ratio[b, t] = r
      pg = -min(r * adv[b], np.clip(r, 1 - eps, 1 + high) * adv[b])
      d = ref[b, t] - logps[b, t]
      kls[b, t] = -d if kl == 'k1' else np.exp(d) - d - 1
      per[b, t] = pg + beta * kls[b, t]
  m = mask.astype(np.float64)
  if aggregation == 'token_mean':
    loss = (per * m).sum() / m.sum()
  elif aggregation == 'sequence_mean':
    loss = np.mean([(per[b] * m[b]).sum() / max(m[b].sum(), 1) for b in range(B)])
  else:
    loss = (per * m).sum() / (B * max_len)
  low_clip = ((ratio < 1 - eps) & (adv[:, None] < 0) & (m > 0)).sum() / m.sum()
  high_clip = ((ratio > 1 + high) & (adv[:, None] > 0) & (m > 0)).sum() / m.sum()
  return loss, {'clip/low': low_clip, 'clip/high': high_clip, 'kl': (kls * m).sum() / m.sum(),
                'ratio': (ratio * m).sum() / m.sum()}


def _rl_batch(seed=0, B=5, T=9):
  rng = np.random.RandomState(seed)
  logps = -rng.rand(B, T).astype(np.float32) * 3
  # Rows pushed apart from the old policy by +-0.5 nats a token, with advantages of
  # the sign that makes the clip bite (low clip: r < 0.8 with A < 0; high: r > 1.28 with A > 0).
  offset = np.asarray([0.5, -0.5, 0.4, -0.4, 0.1], np.float32)[:B, None]
  old = logps + offset + 0.2 * rng.randn(B, T).astype(np.float32)
  ref = logps + 0.3 * rng.randn(B, T).astype(np.float32)
  adv = np.asarray([-1.2, 0.8, -0.5, 1.1, 0.3], np.float32)[:B] * (1 + 0.1 * rng.rand(B).astype(np.float32))
  mask = np.zeros((B, T), np.int32)
  for b, n in enumerate([9, 5, 1, 7, 3]):  # padding after each completion
    mask[b, :n] = 1
  return logps, old, ref, adv, mask


@pytest.mark.parametrize('importance,kl,eps_high,aggregation', list(itertools.product(
    ['token', 'sequence'], ['k1', 'k3'], [None, 0.28], ['token_mean', 'sequence_mean', 'fixed_length'])))
def test_policy_loss_matches_numpy(importance, kl, eps_high, aggregation):
  logps, old, ref, adv, mask = _rl_batch()
  kw = dict(beta=0.05, kl=kl, clip_eps=0.2, clip_eps_high=eps_high, importance=importance,
            aggregation=aggregation, max_len=12)
  got, metrics = losses.policy_loss(logps, old, adv, mask, ref_logps_BT=ref, **kw)
  want, want_metrics = _np_policy_loss(logps, old, adv, mask, ref, kw['beta'], kl, 0.2, eps_high, importance,
                                       aggregation, 12)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  for k, v in want_metrics.items():
    np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-6, atol=1e-7)
  assert float(metrics['clip/low']) > 0 and float(metrics['clip/high']) > 0  # both clips bite


@pytest.mark.parametrize('aggregation', ['token_mean', 'sequence_mean', 'fixed_length'])
def test_on_policy_ratio_is_one_and_gradient_is_reinforce(aggregation):
  """With old_logps == logps every ratio is exactly 1 and the gradient is the
  plain policy gradient of -sum(A * logps * mask) / weight."""
  logps, _, _, adv, mask = _rl_batch(seed=1)
  m = mask.astype(np.float32)
  loss_fn = lambda lp: losses.policy_loss(lp, jax.lax.stop_gradient(lp), adv, mask,
                                          aggregation=aggregation, max_len=12)
  _, metrics = loss_fn(jnp.asarray(logps))
  assert float(metrics['ratio']) == 1.0 and float(metrics['clip/low']) == float(metrics['clip/high']) == 0.0
  got = jax.grad(lambda lp: loss_fn(lp)[0])(jnp.asarray(logps))
  weight = {'token_mean': m.sum(), 'fixed_length': 5 * 12}.get(aggregation)
  if aggregation == 'sequence_mean':  # each sequence's tokens weigh 1 / (B * its length)
    want = jax.grad(lambda lp: -jnp.sum(adv[:, None] * lp * m / m.sum(1, keepdims=True)) / 5)(jnp.asarray(logps))
  else:
    want = jax.grad(lambda lp: -jnp.sum(adv[:, None] * lp * m) / weight)(jnp.asarray(logps))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-9)


def _np_gae(r, v, mask, gamma, lam):
  B, T = r.shape
  adv = np.zeros((B, T))
  for b in range(B):
    last = 0.0
    for t in reversed(range(T)):
      if not mask[b, t]:
        last = 0.0
        continue
      next_v = v[b, t + 1] if t + 1 < T and mask[b, t + 1] else 0.0
      delta = r[b, t] + gamma * next_v - v[b, t]
      last = delta + gamma * lam * last
      adv[b, t] = last
  return adv, (adv + v) * mask


def test_gae_and_value_loss_match_numpy():
  rng = np.random.RandomState(2)
  _, _, _, _, mask = _rl_batch()
  r = rng.randn(*mask.shape).astype(np.float32)
  v = rng.randn(*mask.shape).astype(np.float32)
  adv, ret = losses.gae(r, v, mask, gamma=0.99, lam=0.9)
  want_adv, want_ret = _np_gae(r.astype(np.float64), v.astype(np.float64), mask, 0.99, 0.9)
  np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-6, atol=1e-6)
  old = v + 0.5 * rng.randn(*v.shape).astype(np.float32)
  got = losses.value_loss(v, old, want_ret.astype(np.float32), mask, clip_eps=0.2)
  clipped = old + np.clip(v - old, -0.2, 0.2)
  per = 0.5 * np.maximum((v - want_ret) ** 2, (clipped - want_ret) ** 2)
  np.testing.assert_allclose(float(got), (per * mask).sum() / mask.sum(), rtol=1e-6)


def test_pass_at_k_matches_the_combinatorial_formula():
  import math
  from research.evaluation import pass_at_k
  for n in range(1, 9):
    for c in range(n + 1):
      for k in range(1, n + 1):
        want = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert abs(pass_at_k(n, c, k) - want) < 1e-12, (n, c, k)
