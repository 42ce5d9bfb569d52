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
