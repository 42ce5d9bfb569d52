"""Losses: pure functions of arrays, importable into any script.

Convention for stage losses used by the trainer: they return
`(loss, weight, metrics)` where `loss` is a mean over `weight` items (tokens,
pairs, ...). The trainer combines micro-batches and devices as
sum(loss * weight) / sum(weight), so gradient accumulation is exact.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp


def token_log_probs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """log p(target) per position, in float32: [B, T]."""
  logits = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
  return target_logit_BT - log_z_BT


def token_entropy(logits_BTV: jax.Array) -> jax.Array:
  """Entropy in nats of each position's distribution softmax(logits): [B, T], float32."""
  logits = logits_BTV.astype(jnp.float32)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def _chunk_log_probs(logits_fn, with_entropy, features, targets_BC):
  """token_log_probs (and token_entropy, without gradient) of one chunk's logits."""
  logits_BCV = logits_fn(features).astype(jnp.float32)
  logps_BC = token_log_probs(logits_BCV, targets_BC)
  if not with_entropy:
    return logps_BC
  return logps_BC, token_entropy(jax.lax.stop_gradient(logits_BCV))


def chunked_token_log_probs(logits_fn: Callable[[Any], jax.Array], features: Any, targets_BT: jax.Array,
                            chunk_size: int, *, with_entropy: bool = False):
  """token_log_probs(logits_fn(features), targets_BT) [B, T] without the whole
  logits: they are formed `chunk_size` positions at a time (jax.lax.map), so only
  one chunk's float32 logits [B, chunk_size, V] (and its softmax) live at once,
  and under jax.checkpoint, so the backward recomputes each chunk's logits rather
  than storing them (one more [B, T, D] x [D, V] matmul in all).

  `features` is a pytree of per-position inputs [B, T, ...] (the final hidden
  states: models.target_log_probs passes the model's layers.Unembedding) and
  `logits_fn` maps a chunk of it ([B, C, ...]) to logits [B, C, V], including any
  per-row transform (temperature, vocabulary mask). Chunks run over the sequence
  (not flattened tokens), so the batch axis keeps its sharding. A length that
  `chunk_size` does not divide ends with one shorter chunk. With with_entropy,
  returns (log-probs, token_entropy of each position, no gradient).
  """
  # prevent_cse=False: the chunks run inside a loop, which already keeps XLA from
  # merging the backward's recomputation with the forward (JAX's advice for scan).
  chunk = jax.checkpoint(functools.partial(_chunk_log_probs, logits_fn, with_entropy), prevent_cse=False)
  return map_over_length(chunk, (features, targets_BT), chunk_size)


def map_over_length(fn: Callable[..., Any], xs: Any, chunk_size: int) -> Any:
  """fn(*xs) computed `chunk_size` positions at a time and joined: `xs` is a tuple
  of pytrees of [B, T, ...] arrays, `fn` maps their [B, C, ...] chunks to a pytree
  of [B, C] arrays. The chunks run one after another (jax.lax.map), so only one
  chunk's intermediates live at once; a length that `chunk_size` does not divide
  ends with one shorter chunk."""
  if chunk_size <= 0:
    raise ValueError(f'chunk_size={chunk_size} must be positive')
  B, T = jax.tree.leaves(xs)[0].shape[:2]
  n, C = T // chunk_size, chunk_size
  outs = []
  if n:  # whole chunks, one after another: [B, n*C, ...] -> [n, B, C, ...]
    split = lambda x: jnp.moveaxis(x[:, :n * C].reshape((B, n, C) + x.shape[2:]), 1, 0)
    ys = jax.lax.map(lambda chunk_xs: fn(*chunk_xs), jax.tree.map(split, xs))
    outs.append(jax.tree.map(lambda y_NBC: jnp.moveaxis(y_NBC, 0, 1).reshape(B, n * C), ys))
  if T > n * C:  # the remainder
    outs.append(fn(*jax.tree.map(lambda x: x[:, n * C:], xs)))
  if len(outs) == 1:
    return outs[0]
  return jax.tree.map(lambda *ys: jnp.concatenate(ys, axis=1), *outs)


def masked_mean_nll(logps_BT: jax.Array, mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy from target log-probs: (mean of -logps over masked positions,
  number of masked positions); an all-zero mask gives loss 0 rather than NaN."""
  mask = mask_BT.astype(jnp.float32)
  n = jnp.sum(mask)
  return jnp.sum(-logps_BT * mask) / jnp.maximum(n, 1.0), n


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array,
                  mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Masked next-token cross-entropy.

  Returns (mean loss over masked positions, number of masked positions); an
  all-zero mask gives loss 0 rather than NaN.
  """
  return masked_mean_nll(token_log_probs(logits_BTV, targets_BT), mask_BT)


def masked_sums(logps_BT: jax.Array, mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(summed log-probs of the masked positions of each sequence [B], their number [B])."""
  mask = mask_BT.astype(jnp.float32)
  return jnp.sum(logps_BT * mask, axis=-1), jnp.sum(mask, axis=-1)


def sequence_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array,
                      mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed log-probabilities of the masked target tokens of each sequence.

  Returns (logps_B, n_tokens_B); logps_B / n_tokens_B is the per-token average
  used by length-normalised losses (SimPO, ORPO).
  """
  return masked_sums(token_log_probs(logits_BTV, targets_BT), mask_BT)


def _mean(x):
  return jnp.mean(x.astype(jnp.float32))


def pairwise_accuracy(chosen, rejected):
  """Fraction of pairs ranked right, a tie counting one half (its expected value
  under a random tie-break): 0.5 when policy = reference, where every implicit
  reward is 0. (TRL counts ties as wrong, which reads 0 at step 0.)"""
  return _mean(jnp.where(chosen > rejected, 1.0, jnp.where(chosen == rejected, 0.5, 0.0)))


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             chosen_tokens=None, rejected_tokens=None, *, beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = 'sigmoid', ipo_normalize: bool = False):
  """Direct Preference Optimization and relatives; returns (batch-mean loss, metrics).

  With h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)):
    sigmoid  -(1 - e) log sigma(beta h) - e log sigma(-beta h)      DPO (Rafailov et al., 2023);
             e = label_smoothing > 0 is conservative DPO (Mitchell, 2023)
    ipo      (h - 1 / (2 beta))^2                                    IPO (Azar et al., 2023)
    robust   (-(1 - e) log sigma(beta h) + e log sigma(-beta h)) / (1 - 2e)
                                                                     robust DPO (Chowdhury et al., 2024),
             for a flip rate 0 <= e < 0.5 (else ValueError: 1 - 2e = 0 at 0.5)
  The log-probs are sums over each reply's tokens. ipo_normalize=True (ipo only)
  divides each by its reply's token count (chosen_tokens, rejected_tokens; the
  reference scores the same tokens) before h, so h is a difference of per-token
  averages, as TRL's ipo computes it; the target margin 1 / (2 beta) is then in
  nats per token rather than per reply, so a beta tuned for one form does not
  carry over to the other. The default, False, keeps sums (earlier runs unchanged).
  Implicit rewards: beta (log pi(y) - log ref(y)) for chosen and rejected (per-token
  averages with ipo_normalize); metrics hold their means, the fraction with
  chosen > rejected (ties count one half: see pairwise_accuracy), and the margin.
  """
  e = label_smoothing
  if loss_type == 'robust' and not 0.0 <= e < 0.5:
    raise ValueError(f'label_smoothing={e}: robust DPO divides by 1 - 2 label_smoothing; '
                     'use a flip rate in [0, 0.5)')
  if ipo_normalize:
    if loss_type != 'ipo':
      raise ValueError(f'ipo_normalize applies to loss_type=ipo, not {loss_type!r}')
    if chosen_tokens is None or rejected_tokens is None:
      raise ValueError('ipo_normalize needs chosen_tokens and rejected_tokens (reply token counts)')
    n_c, n_r = jnp.maximum(chosen_tokens, 1.0), jnp.maximum(rejected_tokens, 1.0)
    policy_chosen_logps, ref_chosen_logps = policy_chosen_logps / n_c, ref_chosen_logps / n_c
    policy_rejected_logps, ref_rejected_logps = policy_rejected_logps / n_r, ref_rejected_logps / n_r
  h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
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
  Returns (batch-mean loss, metrics).

  No NLL term here. The DPO stage's rpo_alpha adds one, averaged per sequence
  (each chosen reply's per-token mean, pairs weighing equally); TRL's CPOTrainer
  (SimPO with cpo_alpha) averages over all chosen tokens of the batch instead.
  """
  chosen = beta * policy_chosen_logps / jnp.maximum(chosen_tokens, 1.0)
  rejected = beta * policy_rejected_logps / jnp.maximum(rejected_tokens, 1.0)
  losses = -jax.nn.log_sigmoid(chosen - rejected - gamma)
  return _mean(losses), {'rewards/chosen': _mean(chosen), 'rewards/rejected': _mean(rejected),
                         'rewards/accuracies': pairwise_accuracy(chosen, rejected),
                         'rewards/margins': _mean(chosen - rejected)}


# ORPO reads per-token averages above this as this. An average of exactly 0 (every
# reply token certain in float32) has infinite odds; other averages are below about
# -6e-8 / (reply tokens), since a float32 log-prob is 0 or below about -6e-8, so
# only those zeros move. At -1e-18 the square of 1 - p that autodiff's quotient
# rule forms, 1e-36, is still a normal float32; near 1e-20 it underflows to 0 and
# the gradient becomes inf or NaN.
_ORPO_MAX_AVG_LOGP = -1e-18


def _exp_difference(lo, hi):
  """exp(lo - hi) for lo <= hi <= 0, to float precision. Rounding lo - hi costs up
  to half an ulp of the difference (up to 1e-6 relative at a difference of 20), so
  its rounding error, exact by Fast2Sum since |lo| >= |hi|, is put back."""
  d = lo - hi
  return jnp.exp(d) * (1.0 + ((lo - d) - hi))


def log_odds_ratio(avg_a, avg_b):
  """(log_odds, log sigma(log_odds)) with log_odds = log odds(p_a) - log odds(p_b),
  odds(p) = p / (1 - p), p = exp(avg), for per-token average log-probs avg <= 0.

  Float32 without cancellation: for averages from -1e-7 to -20, ORPO's loss and
  its gradients w.r.t. the averages are within 1e-6 relative of float64
  (tests/test_losses.py); every average <= 0 gives finite values and gradients
  (above -1e-18 counts as -1e-18). No log(1 - p) of each reply is formed, not even
  a stable one (log1mexp): for a nearly certain reply it is large (-16 at
  avg = -1e-7), and the float32 roundings of two such logs do not cancel in their
  difference (up to 2e-6 relative error in the loss, 4e-6 in its gradients).
  Instead, with hi = max(avg) and lo = min(avg),
    |log_odds| = (hi - lo) - log(expm1(hi) / expm1(lo))     (two terms of one sign),
    log sigma(log_odds) = min(log_odds, 0) - log1p(exp(-|log_odds|)),
  where exp(-|log_odds|) = odds(lo) / odds(hi) = exp(lo - hi) expm1(hi) / expm1(lo)
  is a product of accurate factors: exp of the rounded |log_odds| would turn its
  absolute error into relative error (1e-6 at |log_odds| = 10).
  """
  a = jnp.minimum(avg_a, _ORPO_MAX_AVG_LOGP)
  b = jnp.minimum(avg_b, _ORPO_MAX_AVG_LOGP)
  swap = a < b  # jnp.where, not max/min: their gradient splits ties in halves, wrong here
  hi, lo = jnp.where(swap, b, a), jnp.where(swap, a, b)
  q = jnp.expm1(hi) / jnp.expm1(lo)  # (1 - p_hi) / (1 - p_lo), in [1e-18, 1]
  abs_log_odds = (hi - lo) - jnp.log(q)
  log_sig = -jnp.where(swap, abs_log_odds, 0.0) - jnp.log1p(_exp_difference(lo, hi) * q)
  return jnp.where(swap, -abs_log_odds, abs_log_odds), log_sig


def orpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_tokens, rejected_tokens, *,
              lam: float = 0.1):
  """ORPO (Hong et al., 2024): NLL of the chosen response plus an odds-ratio term,
    L = -log pi(y_w) / |y_w| - lam log sigma(log odds(y_w) - log odds(y_l)),
  with odds(y) = p / (1 - p) and p = exp(per-token average log pi(y)), the odds
  term computed stably (log_odds_ratio). Returns (batch-mean loss, metrics).

  The NLL term is averaged per sequence: each pair's chosen reply contributes its
  own per-token mean, and pairs weigh equally. TRL's ORPOTrainer averages over
  all chosen tokens of the batch (per token: long replies weigh more); the two
  agree when the chosen replies have equal lengths. TRL's beta is lam here.
  """
  avg_c = policy_chosen_logps / jnp.maximum(chosen_tokens, 1.0)
  avg_r = policy_rejected_logps / jnp.maximum(rejected_tokens, 1.0)
  log_odds, ratio = log_odds_ratio(avg_c, avg_r)
  nll = -avg_c
  return _mean(nll - lam * ratio), {'nll': _mean(nll), 'log_odds_ratio': _mean(ratio),
                                    'rewards/accuracies': pairwise_accuracy(log_odds, 0.0)}


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=0.0):
  """Reward-model loss (Bradley and Terry, 1952; Ouyang et al., 2022):
  mean of -log sigma(r(y_w) - r(y_l) - margin). Returns (loss, metrics)."""
  diff = chosen_rewards - rejected_rewards
  return _mean(-jax.nn.log_sigmoid(diff - margin)), {'accuracy': pairwise_accuracy(diff, 0.0),
                                                     'margin': _mean(diff)}


# ---- Online RL: advantages, policy and value losses --------------------------


def group_advantages(rewards_N, group_size: int, *, method: str = 'grpo', scale: str = 'group',
                     eps: float = 1e-4):
  """Advantages [N] of rewards [N] whose rows come in consecutive groups of
  `group_size` samples of one prompt.

    grpo    (r - group mean) / (std + eps), std with ddof=1 over the group
            (scale='group', Shao et al., 2024), over the whole batch
            (scale='batch'), or no division (scale='none')
    drgrpo  r - group mean: no division by a std (Liu et al., 2025)
    rloo    r - mean of the group's other samples (Ahmadian et al., 2024)

  `scale` applies to grpo (drgrpo and rloo are unscaled by definition). A group
  whose rewards are all equal gets exactly 0.
  """
  if method not in ('grpo', 'drgrpo', 'rloo'):
    raise ValueError(f'method={method!r}; choose grpo, drgrpo or rloo')
  if scale not in ('group', 'batch', 'none'):
    raise ValueError(f'scale={scale!r}; choose group, batch or none')
  if method != 'grpo' and scale == 'batch':
    raise ValueError(f'scale applies to grpo; {method} advantages are not divided by a std')
  r = jnp.asarray(rewards_N, jnp.float32)
  G = int(group_size)
  if G < 2 or r.shape[0] % G:
    raise ValueError(f'group_size={G} must be >= 2 and divide the {r.shape[0]} rewards')
  r_GS = r.reshape(-1, G)
  mean_G1 = jnp.mean(r_GS, axis=1, keepdims=True)
  if method == 'rloo':
    adv_GS = (r_GS - mean_G1) * (G / (G - 1))  # = r - (sum - r) / (G - 1)
  else:
    adv_GS = r_GS - mean_G1
  if method == 'grpo' and scale == 'group':
    adv_GS = adv_GS / (jnp.std(r_GS, axis=1, keepdims=True, ddof=1) + eps)
  elif method == 'grpo' and scale == 'batch':
    adv_GS = adv_GS / (jnp.std(r, ddof=1) + eps)
  # Exactly 0 for a group without spread (the mean of equal floats may round away from them).
  flat_G1 = jnp.max(r_GS, axis=1, keepdims=True) == jnp.min(r_GS, axis=1, keepdims=True)
  return jnp.where(flat_G1, 0.0, adv_GS).reshape(-1)


def policy_loss(logps_BT, old_logps_BT, advantages_B, mask_BT, *, ref_logps_BT=None, beta: float = 0.0,
                kl: str = 'k3', clip_eps: float = 0.2, clip_eps_high: float | None = None,
                importance: str = 'token', aggregation: str = 'token_mean', max_len: int | None = None):
  """Clipped policy-gradient loss (PPO's surrogate, as GRPO and its relatives use it).

  `advantages_B` is one advantage per sequence [B] (GRPO and relatives) or per
  token [B, T] (PPO with GAE). Ratio r = exp(logps - old_logps) per token ('token'), or for 'sequence'
  (GSPO, Zheng et al., 2025) exp of the masked mean log-ratio of the sequence,
  broadcast to its tokens (the gradient reaches each token through the mean).
  Per token:  -min(r A, clip(r, 1 - clip_eps, 1 + clip_eps_high) A) + beta * KL
  (clip_eps_high None = clip_eps; DAPO's clip-higher sets it larger), with
  KL to the reference k1 = logps - ref or k3 = exp(ref - logps) - (ref - logps) - 1
  (Schulman's estimators). Aggregation over masked tokens:
    token_mean     sum / number of masked tokens
    sequence_mean  mean over sequences of each sequence's token mean
    fixed_length   sum / (B * max_len)   (Dr.GRPO)
  Returns (loss, metrics): clip fractions (low: r < 1 - eps with A < 0; high:
  r > 1 + eps_high with A > 0), mean KL and mean ratio, over masked tokens.
  """
  if importance not in ('token', 'sequence'):
    raise ValueError(f'importance={importance!r}; choose token or sequence')
  if kl not in ('k1', 'k3'):
    raise ValueError(f'kl={kl!r}; choose k1 or k3')
  high = clip_eps if clip_eps_high is None else clip_eps_high
  mask = mask_BT.astype(jnp.float32)
  n_B = jnp.sum(mask, axis=-1)
  log_ratio_BT = logps_BT - old_logps_BT
  if importance == 'sequence':
    seq_B = jnp.sum(log_ratio_BT * mask, axis=-1) / jnp.maximum(n_B, 1.0)
    log_ratio_BT = jnp.broadcast_to(seq_B[:, None], logps_BT.shape)
  ratio_BT = jnp.exp(log_ratio_BT)
  adv_B1 = advantages_B if advantages_B.ndim == 2 else advantages_B[:, None]  # [B, T]: per token (PPO)
  per_token = -jnp.minimum(ratio_BT * adv_B1, jnp.clip(ratio_BT, 1 - clip_eps, 1 + high) * adv_B1)
  kl_BT = jnp.zeros_like(logps_BT)
  if ref_logps_BT is not None:
    d = ref_logps_BT - logps_BT
    kl_BT = -d if kl == 'k1' else jnp.exp(d) - d - 1
    per_token = per_token + beta * kl_BT
  loss = _aggregate(per_token, mask, aggregation, max_len)
  n = jnp.maximum(jnp.sum(mask), 1.0)
  masked_mean = lambda x: jnp.sum(x * mask) / n
  metrics = {'clip/low': masked_mean(((ratio_BT < 1 - clip_eps) & (adv_B1 < 0)).astype(jnp.float32)),
             'clip/high': masked_mean(((ratio_BT > 1 + high) & (adv_B1 > 0)).astype(jnp.float32)),
             'kl': masked_mean(kl_BT), 'ratio': masked_mean(ratio_BT)}
  return loss, metrics


def _aggregate(per_token_BT, mask_BT, aggregation: str, max_len: int | None):
  """One number from per-token losses over the masked tokens (see policy_loss)."""
  if aggregation == 'token_mean':
    return jnp.sum(per_token_BT * mask_BT) / jnp.maximum(jnp.sum(mask_BT), 1.0)
  if aggregation == 'sequence_mean':
    per_seq = jnp.sum(per_token_BT * mask_BT, axis=-1) / jnp.maximum(jnp.sum(mask_BT, axis=-1), 1.0)
    return jnp.mean(per_seq)
  if aggregation == 'fixed_length':
    if not max_len:
      raise ValueError('aggregation=fixed_length needs max_len (the generation budget)')
    return jnp.sum(per_token_BT * mask_BT) / (per_token_BT.shape[0] * max_len)
  raise ValueError(f'aggregation={aggregation!r}; choose token_mean, sequence_mean or fixed_length')


def gae(rewards_BT, values_BT, mask_BT, *, gamma: float = 1.0, lam: float = 0.95):
  """Generalized advantage estimation (Schulman et al., 2016) over the masked
  tokens of each row: delta_t = r_t + gamma V_{t+1} - V_t (V after the last
  masked token is 0), A_t = delta_t + gamma lam A_{t+1}. Returns
  (advantages_BT, returns_BT = advantages + values), 0 where the mask is 0."""
  mask = mask_BT.astype(jnp.float32)
  r, v = rewards_BT * mask, values_BT * mask
  next_v = jnp.concatenate([v[:, 1:] * mask[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
  delta_BT = (r + gamma * next_v - v) * mask

  def back(carry_B, xs):
    delta_B, m_B = xs
    adv_B = delta_B + gamma * lam * carry_B
    adv_B = adv_B * m_B
    return adv_B, adv_B

  _, adv_TB = jax.lax.scan(back, jnp.zeros_like(delta_BT[:, 0]), (delta_BT.T, mask.T), reverse=True)
  adv_BT = adv_TB.T
  return adv_BT, (adv_BT + v) * mask


def value_loss(values_BT, old_values_BT, returns_BT, mask_BT, *, clip_eps: float = 0.2):
  """PPO's clipped value loss: the masked token mean of
  0.5 * max((V - R)^2, (old V + clip(V - old V, -eps, eps) - R)^2)."""
  clipped = old_values_BT + jnp.clip(values_BT - old_values_BT, -clip_eps, clip_eps)
  per_token = 0.5 * jnp.maximum(jnp.square(values_BT - returns_BT), jnp.square(clipped - returns_BT))
  return _aggregate(per_token, mask_BT.astype(jnp.float32), 'token_mean', None)
