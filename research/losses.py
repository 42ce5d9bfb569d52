"""Losses: pure functions of arrays, importable into any script.

Convention for stage losses used by the trainer: they return
`(loss, weight, metrics)` where `loss` is a mean over `weight` items (tokens,
pairs, ...). The trainer combines micro-batches and devices as
sum(loss * weight) / sum(weight), so gradient accumulation is exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_log_probs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """log p(target) per position, in float32: [B, T]."""
  logits = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
  return target_logit_BT - log_z_BT


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array,
                  mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Masked next-token cross-entropy.

  Returns (mean loss over masked positions, number of masked positions); an
  all-zero mask gives loss 0 rather than NaN.
  """
  mask = mask_BT.astype(jnp.float32)
  nll_BT = -token_log_probs(logits_BTV, targets_BT)
  n = jnp.sum(mask)
  return jnp.sum(nll_BT * mask) / jnp.maximum(n, 1.0), n
