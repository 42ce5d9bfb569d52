"""Losses against numpy implementations of their formulas."""

import numpy as np

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
