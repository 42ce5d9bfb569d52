"""Losses against numpy implementations of their formulas."""

import jax
import numpy as np
import pytest

from research import losses


def test_cross_entropy_matches_numpy():
  rng = np.random.RandomState(0)
  logits = rng.randn(3, 5, 11).astype(np.float32) * 3
  targets = rng.randint(0, 11, (3, 5))
  mask = rng.rand(3, 5) > 0.3
  loss, n = losses.cross_entropy(logits, targets, mask)
  lg = logits.astype(np.float64)
  logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), (nll * mask).sum() / mask.sum(), rtol=1e-6)
  assert float(n) == mask.sum()


def test_token_log_probs_gradient_is_onehot_minus_softmax():
  """token_log_probs and its gradient against their closed forms in float64
  numpy; a bfloat16 input gets a bfloat16 gradient."""
  rng = np.random.RandomState(1)
  logits = rng.randn(2, 4, 9).astype(np.float32) * 3
  targets = rng.randint(0, 9, (2, 4))
  g = rng.randn(2, 4).astype(np.float32)
  logps, vjp = jax.vjp(lambda x: losses.token_log_probs(x, targets), logits)
  lg = logits.astype(np.float64)
  p = np.exp(lg - lg.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(logps), np.log(np.take_along_axis(p, targets[..., None], -1)[..., 0]),
                             rtol=1e-5, atol=1e-6)
  want = g[..., None] * (np.eye(9)[targets] - p)
  np.testing.assert_allclose(np.asarray(vjp(g)[0]), want, rtol=1e-5, atol=1e-6)
  got = jax.vjp(lambda x: losses.token_log_probs(x, targets), logits.astype(jax.numpy.bfloat16))[1](g)[0]
  assert got.dtype == jax.numpy.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2)


def test_cross_entropy_empty_mask_is_zero():
  loss, n = losses.cross_entropy(np.zeros((1, 2, 3), np.float32), np.zeros((1, 2), int),
                                 np.zeros((1, 2), bool))
  assert float(loss) == 0.0 and float(n) == 0.0


def _logsig(x):
  return -np.logaddexp(0.0, -x)


def _pairs(seed=0, n=7):
  r = np.random.RandomState(seed)
  return [r.randn(n) * 5 - 20 for _ in range(4)]


def test_sequence_logprobs_matches_numpy():
  rng = np.random.RandomState(1)
  logits = rng.randn(2, 4, 9)
  targets = rng.randint(0, 9, (2, 4))
  mask = rng.rand(2, 4) > 0.4
  got, n = losses.sequence_logprobs(logits.astype(np.float32), targets, mask)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = (np.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask).sum(-1)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(n), mask.sum(-1))


def test_dpo_family_matches_numpy():
  pc, pr, rc, rr = _pairs()
  beta, e = 0.3, 0.1
  h = (pc - pr) - (rc - rr)
  want = {
      'sigmoid': (-(1 - e) * _logsig(beta * h) - e * _logsig(-beta * h)).mean(),
      'ipo': ((h - 1 / (2 * beta)) ** 2).mean(),
      'robust': ((-(1 - e) * _logsig(beta * h) + e * _logsig(-beta * h)) / (1 - 2 * e)).mean(),
  }
  for loss_type, value in want.items():
    got, m = losses.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=e, loss_type=loss_type)
    np.testing.assert_allclose(float(got), value, rtol=1e-6)
  chosen, rejected = beta * (pc - rc), beta * (pr - rr)
  np.testing.assert_allclose(float(m['rewards/chosen']), chosen.mean(), rtol=1e-6)
  np.testing.assert_allclose(float(m['rewards/margins']), (chosen - rejected).mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m['rewards/accuracies']), (chosen > rejected).mean(), rtol=1e-6)


def test_dpo_with_policy_equal_to_reference_is_ln2():
  pc, pr, _, _ = _pairs(3)
  for e in (0.0, 0.2):
    loss, m = losses.dpo_loss(pc, pr, pc, pr, beta=0.5, label_smoothing=e)
    # Each pair's loss is ln 2 exactly; the float32 mean of 7 copies may round by one ulp.
    one, _ = losses.dpo_loss(pc[:1], pr[:1], pc[:1], pr[:1], beta=0.5, label_smoothing=e)
    assert float(one) == float(np.float32(np.log(2.0)))
    assert abs(float(loss) - float(one)) <= np.spacing(np.float32(np.log(2.0)))
    assert float(m['rewards/chosen']) == 0.0 and float(m['rewards/rejected']) == 0.0
    assert float(m['rewards/accuracies']) == 0.5  # every pair a tie: half right in expectation


def test_pairwise_accuracy_counts_ties_half():
  chosen, rejected = np.array([1.0, 0.0, 2.0, 3.0]), np.array([0.0, 0.0, 5.0, 3.0])
  assert float(losses.pairwise_accuracy(chosen, rejected)) == (1 + 0.5 + 0 + 0.5) / 4


def test_simpo_orpo_bradley_terry_match_numpy():
  pc, pr, _, _ = _pairs(5)
  nc, nr = np.arange(7) + 3.0, np.arange(7) + 5.0
  got, _ = losses.simpo_loss(pc, pr, nc, nr, beta=2.0, gamma=0.7)
  want = -_logsig(2.0 * pc / nc - 2.0 * pr / nr - 0.7).mean()
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  got, _ = losses.orpo_loss(pc, pr, nc, nr, lam=0.2)
  ac, ar = pc / nc, pr / nr
  odds = lambda a: np.log(np.exp(a) / (1 - np.exp(a)))
  want = (-ac - 0.2 * _logsig(odds(ac) - odds(ar))).mean()
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  got, _ = losses.bradley_terry_loss(pc / 10, pr / 10, margin=0.3)
  np.testing.assert_allclose(float(got), -_logsig(pc / 10 - pr / 10 - 0.3).mean(), rtol=1e-6)


def test_dpo_ipo_normalize_matches_numpy():
  """ipo_normalize: h from per-token averages (TRL's ipo), policy and reference
  divided by the same reply token counts; the default keeps sums."""
  pc, pr, rc, rr = _pairs(7)
  nc, nr = np.arange(7) + 2.0, np.arange(7) * 3 + 1.0
  beta = 0.3
  h = (pc / nc - pr / nr) - (rc / nc - rr / nr)
  got, m = losses.dpo_loss(pc, pr, rc, rr, nc, nr, beta=beta, loss_type='ipo', ipo_normalize=True)
  np.testing.assert_allclose(float(got), ((h - 1 / (2 * beta)) ** 2).mean(), rtol=1e-6)
  chosen, rejected = beta * (pc - rc) / nc, beta * (pr - rr) / nr
  np.testing.assert_allclose(float(m['rewards/chosen']), chosen.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m['rewards/margins']), (chosen - rejected).mean(), rtol=1e-5)
  summed, _ = losses.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type='ipo')
  counts_unread, _ = losses.dpo_loss(pc, pr, rc, rr, nc, nr, beta=beta, loss_type='ipo')
  assert float(summed) == float(counts_unread)  # counts matter only with ipo_normalize
  with pytest.raises(ValueError, match='ipo_normalize'):
    losses.dpo_loss(pc, pr, rc, rr, nc, nr, loss_type='sigmoid', ipo_normalize=True)
  with pytest.raises(ValueError, match='token'):
    losses.dpo_loss(pc, pr, rc, rr, loss_type='ipo', ipo_normalize=True)


def test_robust_dpo_needs_label_smoothing_below_one_half():
  pc, pr, rc, rr = _pairs(8)
  for e in (0.5, 0.7, -0.1):
    with pytest.raises(ValueError, match='label_smoothing'):
      losses.dpo_loss(pc, pr, rc, rr, label_smoothing=e, loss_type='robust')
  losses.dpo_loss(pc, pr, rc, rr, label_smoothing=0.5, loss_type='sigmoid')  # finite there: allowed


def test_robust_label_smoothing_is_a_user_error_when_the_dpo_stage_is_built():
  from configs import dpo as dpo_cfg
  from research.errors import UserError
  from research.stages import dpo
  c = dpo_cfg.get_config()
  c.dpo.loss_type, c.dpo.label_smoothing = 'robust', 0.5
  with pytest.raises(UserError, match=r'^config\.dpo\.label_smoothing=0\.5 with loss_type=robust') as e:
    dpo.stage(c)
  assert '\n' not in str(e.value)
  c.dpo.loss_type, c.dpo.label_smoothing, c.dpo.ipo_normalize = 'sigmoid', 0.0, True
  with pytest.raises(UserError, match='ipo_normalize'):
    dpo.stage(c)


# ---- ORPO's odds ratio against float64 --------------------------------------

# Per-token average log-probs from nearly certain replies to unlikely ones.
_AVG_LOGPS = -np.logspace(-7, np.log10(20.0), 120)


def _orpo_float64(pc, pr, nc, nr, lam):
  """ORPO's loss per pair and its gradient w.r.t. the summed log-probs, in float64
  from the same (float32) inputs: log odds(p) = a - log(1 - p) with 1 - p = -expm1(a)."""
  pc, pr, nc, nr = (np.asarray(x, np.float64) for x in (pc, pr, nc, nr))
  a, b = pc / nc, pr / nr
  log_odds = lambda x: x - np.log(-np.expm1(x))
  z = log_odds(a) - log_odds(b)
  loss = -a + lam * np.logaddexp(0.0, -z)
  s = np.exp(-np.logaddexp(0.0, z))  # sigma(-z) = 1 / (1 + e^z), without overflow
  d_log_odds = lambda x: -1.0 / np.expm1(x)  # = 1 / (1 - p)
  return loss, (-1.0 - lam * s * d_log_odds(a)) / nc, lam * s * d_log_odds(b) / nr


def _orpo_per_pair(pc, pr, nc, nr, lam):
  """orpo_loss of each pair alone, and its gradient w.r.t. pc and pr."""
  one = lambda *xs: losses.orpo_loss(*(x[None] for x in xs), lam=lam)[0]
  loss, (g_c, g_r) = jax.jit(jax.vmap(jax.value_and_grad(one, argnums=(0, 1))))(pc, pr, nc, nr)
  return [np.asarray(x, np.float64) for x in (loss, g_c, g_r)]


def _grid(counts_c, counts_r):
  """Every (chosen, rejected) pair of _AVG_LOGPS as float32 sums over the given counts."""
  a, b = (x.ravel() for x in np.meshgrid(_AVG_LOGPS, _AVG_LOGPS, indexing='ij'))
  nc, nr = np.full(a.shape, counts_c, np.float32), np.full(b.shape, counts_r, np.float32)
  return (a * counts_c).astype(np.float32), (b * counts_r).astype(np.float32), nc, nr


@pytest.mark.parametrize('lam', [0.1, 1.0])
def test_orpo_matches_float64_from_nearly_certain_to_unlikely_replies(lam):
  """Loss and gradients within 1e-6 of float64 for per-token averages -1e-7 .. -20
  (the inputs here are the averages themselves: counts 1)."""
  pc, pr, nc, nr = _grid(1, 1)
  got, want = _orpo_per_pair(pc, pr, nc, nr, lam), _orpo_float64(pc, pr, nc, nr, lam)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=0)


@pytest.mark.parametrize('counts', [(7, 13), (200, 3)])
def test_orpo_with_token_counts_matches_float64(counts):
  """Sums over replies of several tokens: the loss and its gradient w.r.t. the
  chosen sum to 1e-6. The gradient w.r.t. the rejected sum is only checked finite:
  it is proportional to exp(b - a) for averages a, b, so rounding a = sum / count
  to float32 (half an ulp: 9.5e-7 absolute at |a| = 16..32) alone moves it by up to
  about 1.4e-6 relative (measured 1.3e-6; the counts-1 test above holds it to 1e-6)."""
  pc, pr, nc, nr = _grid(*counts)
  (loss, g_c, g_r), (w_loss, w_c, _) = _orpo_per_pair(pc, pr, nc, nr, 0.1), _orpo_float64(pc, pr, nc, nr, 0.1)
  np.testing.assert_allclose(loss, w_loss, rtol=1e-6, atol=0)
  np.testing.assert_allclose(g_c, w_c, rtol=1e-6, atol=0)
  assert np.all(np.isfinite(g_r))


def test_orpo_is_finite_for_certain_and_hopeless_replies():
  """Averages at and next to 0 (every token certain) and far below -20: the loss
  and its gradients stay finite (the old log1p(-exp(a)) form gave inf and NaN)."""
  edge = np.array([0.0, -0.0, -1e-45, -1e-38, -1e-30, -1e-19, -1e-18, -1e-12, -1e-7, -0.69, -0.7,
                   -20.0, -90.0, -1e4], np.float32)
  a, b = (x.ravel() for x in np.meshgrid(edge, edge, indexing='ij'))
  ones = np.ones_like(a)
  loss, g_c, g_r = _orpo_per_pair(a, b, ones, ones, 0.1)
  assert np.all(np.isfinite(loss)) and np.all(np.isfinite(g_c)) and np.all(np.isfinite(g_r))
  # A certain chosen reply against a likely-wrong one: the odds term is ~0, the loss ~0.
  at_zero, _ = losses.orpo_loss(np.float32([0.0]), np.float32([-20.0]), 1.0, 1.0)
  assert 0.0 <= float(at_zero) < 1e-20
