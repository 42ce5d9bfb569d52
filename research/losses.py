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


def sequence_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array,
                      mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed log-probabilities of the masked target tokens of each sequence.

  Returns (logps_B, n_tokens_B); logps_B / n_tokens_B is the per-token average
  used by length-normalised losses (SimPO, ORPO).
  """
  mask = mask_BT.astype(jnp.float32)
  return jnp.sum(token_log_probs(logits_BTV, targets_BT) * mask, axis=-1), jnp.sum(mask, axis=-1)


def _mean(x):
  return jnp.mean(x.astype(jnp.float32))


def pairwise_accuracy(chosen, rejected):
  """Fraction of pairs ranked right, a tie counting one half (its expected value
  under a random tie-break): 0.5 when policy = reference, where every implicit
  reward is 0. (TRL counts ties as wrong, which reads 0 at step 0.)"""
  return _mean(jnp.where(chosen > rejected, 1.0, jnp.where(chosen == rejected, 0.5, 0.0)))


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = 'sigmoid'):
  """Direct Preference Optimization and relatives; returns (batch-mean loss, metrics).

  With h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)):
    sigmoid  -(1 - e) log sigma(beta h) - e log sigma(-beta h)      DPO (Rafailov et al., 2023);
             e = label_smoothing > 0 is conservative DPO (Mitchell, 2023)
    ipo      (h - 1 / (2 beta))^2                                    IPO (Azar et al., 2023)
    robust   (-(1 - e) log sigma(beta h) + e log sigma(-beta h)) / (1 - 2e)
                                                                     robust DPO (Chowdhury et al., 2024)
  Implicit rewards: beta (log pi(y) - log ref(y)) for chosen and rejected;
  metrics hold their means, the fraction with chosen > rejected (ties count
  one half: see pairwise_accuracy), and the margin.
  """
  h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
  e = label_smoothing
  if loss_type == 'sigmoid':  # written so that h = 0 gives ln 2 exactly, for any e
    losses = -jax.nn.log_sigmoid(beta * h) + e * (jax.nn.log_sigmoid(beta * h) - jax.nn.log_sigmoid(-beta * h))
  elif loss_type == 'ipo':
    losses = (h - 1.0 / (2.0 * beta)) ** 2
  elif loss_type == 'robust':
    losses = (-(1 - e) * jax.nn.log_sigmoid(beta * h) + e * jax.nn.log_sigmoid(-beta * h)) / (1 - 2 * e)
  else:
    raise ValueError(f'loss_type={loss_type!r}; choose sigmoid, ipo or robust')
  chosen = beta * (policy_chosen_logps - ref_chosen_logps)
  rejected = beta * (policy_rejected_logps - ref_rejected_logps)
  metrics = {'rewards/chosen': _mean(chosen), 'rewards/rejected': _mean(rejected),
             'rewards/accuracies': pairwise_accuracy(chosen, rejected),
             'rewards/margins': _mean(chosen - rejected)}
  return _mean(losses), metrics


def simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_tokens, rejected_tokens, *,
               beta: float = 2.0, gamma: float = 0.5):
  """SimPO (Meng et al., 2024), reference-free and length-normalised:
  -log sigma(beta / |y_w| log pi(y_w) - beta / |y_l| log pi(y_l) - gamma).
  Returns (batch-mean loss, metrics)."""
  chosen = beta * policy_chosen_logps / jnp.maximum(chosen_tokens, 1.0)
  rejected = beta * policy_rejected_logps / jnp.maximum(rejected_tokens, 1.0)
  losses = -jax.nn.log_sigmoid(chosen - rejected - gamma)
  return _mean(losses), {'rewards/chosen': _mean(chosen), 'rewards/rejected': _mean(rejected),
                         'rewards/accuracies': pairwise_accuracy(chosen, rejected),
                         'rewards/margins': _mean(chosen - rejected)}


def orpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_tokens, rejected_tokens, *,
              lam: float = 0.1):
  """ORPO (Hong et al., 2024): NLL of the chosen response plus an odds-ratio term,
    L = -mean_t log pi(y_w) - lam log sigma(log odds(y_w) - log odds(y_l)),
  with odds(y) = p / (1 - p) and p = exp(per-token average log pi(y)).
  Returns (batch-mean loss, metrics)."""
  avg_c = policy_chosen_logps / jnp.maximum(chosen_tokens, 1.0)
  avg_r = policy_rejected_logps / jnp.maximum(rejected_tokens, 1.0)
  log_odds = (avg_c - avg_r) - (jnp.log1p(-jnp.exp(avg_c)) - jnp.log1p(-jnp.exp(avg_r)))
  ratio = jax.nn.log_sigmoid(log_odds)
  nll = -avg_c
  return _mean(nll - lam * ratio), {'nll': _mean(nll), 'log_odds_ratio': _mean(ratio),
                                    'rewards/accuracies': pairwise_accuracy(log_odds, 0.0)}


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=0.0):
  """Reward-model loss (Bradley and Terry, 1952; Ouyang et al., 2022):
  mean of -log sigma(r(y_w) - r(y_l) - margin). Returns (loss, metrics)."""
  diff = chosen_rewards - rejected_rewards
  return _mean(-jax.nn.log_sigmoid(diff - margin)), {'accuracy': pairwise_accuracy(diff, 0.0),
                                                     'margin': _mean(diff)}
