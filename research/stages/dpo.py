"""Preference optimization: DPO and relatives on {"prompt", "chosen", "rejected"}
pairs and {"prompt", "ranked": [best, ..., worst]} rankings (every pair of a
ranking, all in one batch).

Pairs are rendered by research/data/pairs.py (the loss reads log-probabilities
of the final assistant reply only), one per row or, with config.dpo.pairs_per_row
> 1, packed several per row (a pair is a segment; its log-probabilities are
summed over the segment). The loss and metrics are means over a batch's real
pairs (padding pairs weigh 0), with their number as the weight, so
accumulation and evaluation average over real pairs exactly.

The reference model is frozen: a copy of the initial parameters, or, with
LoRA, the same base with the adapters switched off, so only one copy of the
base exists. The reference-free losses (SimPO, ORPO) hold no reference at all.

config.dpo.loss_type: sigmoid (DPO), ipo, robust (use beta, label_smoothing;
robust needs label_smoothing in [0, 0.5); ipo_normalize: IPO on per-token average
log-probs, as TRL), or the reference-free simpo (beta, simpo_gamma) and orpo
(orpo_lambda).
config.dpo.rpo_alpha > 0 adds alpha x the NLL of the chosen reply (RPO), which
stops DPO from lowering the likelihood of both replies. Like ORPO's NLL term it is
averaged per sequence: each chosen reply's NLL per token, then the mean over
pairs (the RPO paper, too, divides each sequence's NLL by its length). TRL's
rpo_alpha and cpo_alpha average over all chosen tokens of the batch instead, so
long replies weigh more there.
Evaluation logs the held-out loss, eval/rewards/accuracies and the other
reward metrics, and exact match on the held-out generated tasks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from research import evaluation, losses, models
from research.data import chat, pairs, pipeline
from research.data import sft as sft_data
from research.errors import UserError
from research.training.stage import Stage

LOSS_TYPES = ('sigmoid', 'ipo', 'robust', 'simpo', 'orpo')
REFERENCE_FREE = ('simpo', 'orpo')
BATCH_AXES = {k: ('batch', 'length') for k in pairs.side_keys(sft_data.BATCH_KEYS)}


def pair_logps(model, params, batch, rng=None, pairs_per_row: int = 1):
  """Summed log-probs [P] and token counts [P] of the chosen and rejected
  replies: (chosen, rejected, chosen count, rejected count), in one forward
  pass. P = rows for one pair per row, rows * pairs_per_row packed (a pair is
  a segment; research/data/pairs.py); padding pairs get 0 and 0."""
  rows = {k: pairs.stack_sides(batch, k) for k in ('inputs', 'positions', 'segment_ids', 'targets', 'loss_mask')}
  seg_2RT = rows['segment_ids']
  tok_2RT = models.target_log_probs(model, params, rows, rng)  # chunked with config.model.logits_chunk
  mask_2RT = (rows['loss_mask'] > 0) & (seg_2RT > 0)
  if pairs_per_row == 1:  # a sum over each row
    logps, n = losses.masked_sums(tok_2RT, mask_2RT)
  else:  # a sum over each pair's segment
    mask = mask_2RT.astype(jnp.float32)
    logps, n = (pairs.segment_sums(x, seg_2RT, pairs_per_row) for x in (tok_2RT * mask, mask))
  logps_2P, n_2P = logps.reshape(2, -1), n.reshape(2, -1)  # the chosen rows come first
  return logps_2P[0], logps_2P[1], n_2P[0], n_2P[1]


def _real_or_placeholder(w_P, logps, counts):
  """The log-probs and counts of real pairs; -1 and 1 for padding, where 0
  tokens would make the length-normalised losses NaN (0 * NaN is still NaN,
  in the loss and its gradient)."""
  return ([jnp.where(w_P > 0, x, -1.0) for x in logps], [jnp.where(w_P > 0, n, 1.0) for n in counts])


def make_loss(dpo_cfg):
  """loss(model, params, batch, frozen, rng) for a config.dpo section; reads
  frozen['reference'] unless the loss is reference-free. The loss and metrics
  are means over the batch's real pairs (padding pairs weigh 0); the weight is
  their number."""
  c = dpo_cfg
  S = c.pairs_per_row
  if c.loss_type == 'simpo':
    pair_loss = functools.partial(losses.simpo_loss, beta=c.beta, gamma=c.simpo_gamma)
  elif c.loss_type == 'orpo':
    pair_loss = functools.partial(losses.orpo_loss, lam=c.orpo_lambda)
  else:
    pair_loss = functools.partial(losses.dpo_loss, beta=c.beta, label_smoothing=c.label_smoothing,
                                  loss_type=c.loss_type, ipo_normalize=c.ipo_normalize)
  counts = lambda nc, nr: (nc, nr) if c.ipo_normalize else ()  # normalised IPO reads token counts

  def tail(means, pc, pr, nc, nr, rc, rr):
    """The loss and metrics from per-pair log-probs [P] (`means`: pairs.over_real_pairs)."""
    if c.loss_type in REFERENCE_FREE:
      value, metrics = means.of(pair_loss, pc, pr, nc, nr)
    else:
      value, metrics = means.of(pair_loss, pc, pr, rc, rr, *counts(nc, nr))
    if c.rpo_alpha > 0:  # RPO: keep the chosen reply likely (Pang et al., 2024)
      nll = means.mean(-pc / jnp.maximum(nc, 1.0))
      value = value + c.rpo_alpha * nll
      metrics['nll/chosen'] = nll
    metrics['logps/chosen'] = means.mean(pc)
    metrics['logps/rejected'] = means.mean(pr)
    return value, metrics

  def loss(model, params, batch, frozen, rng):
    w_P = pairs.pair_weights(batch, S)
    pc, pr, nc, nr = pair_logps(model, params, batch, rng, S)
    if c.loss_type in REFERENCE_FREE:
      rc = rr = jnp.zeros_like(pc)  # unread
    else:
      rc, rr, _, _ = pair_logps(model, jax.lax.stop_gradient(frozen['reference']), batch, None, S)
    (pc, pr, rc, rr), (nc, nr) = _real_or_placeholder(w_P, (pc, pr, rc, rr), (nc, nr))
    value, metrics = pairs.over_real_pairs(tail, w_P, pc, pr, nc, nr, rc, rr)
    return value, jnp.sum(w_P), metrics
  return loss


def stage(config) -> Stage:
  """DPO (or a relative, config.dpo.loss_type) on config.data's pairs."""
  if config.dpo.loss_type not in LOSS_TYPES:
    raise UserError(f'config.dpo.loss_type={config.dpo.loss_type!r}; choose one of {LOSS_TYPES}.')
  if config.dpo.loss_type == 'robust' and not 0 <= config.dpo.label_smoothing < 0.5:
    raise UserError(f'config.dpo.label_smoothing={config.dpo.label_smoothing} with loss_type=robust '
                    'divides by 1 - 2 x label_smoothing; use a value in [0, 0.5).')
  if config.dpo.ipo_normalize and config.dpo.loss_type != 'ipo':
    raise UserError(f'config.dpo.ipo_normalize=True applies to loss_type=ipo, not '
                    f'{config.dpo.loss_type!r}; set it False or use ipo.')
  if config.dpo.pairs_per_row < 1:
    raise UserError(f'config.dpo.pairs_per_row={config.dpo.pairs_per_row}; use 1 (one pair per row) '
                    'or more (packed rows).')
  d, S = config.data, config.dpo.pairs_per_row
  render = lambda tok: pairs.RenderPair(tok, config.seq_len, d.text_key)
  return Stage(
      name='dpo', loss=make_loss(config.dpo), batch_axes=BATCH_AXES,
      train_source=lambda tok: pipeline.stream_source(lambda s, n, rows: pairs.train_dataset(
          d, render(tok), batch_size=rows, seed=config.seed, pairs_per_row=S, stream=(s, n)),
          d.streams, config.batch_size),
      eval_batches=lambda tok: pairs.eval_batches(d, render(tok), batch_size=config.batch_size,
                                                  max_batches=config.eval_batches, pairs_per_row=S),
      frozen=() if config.dpo.loss_type in REFERENCE_FREE else ('reference',),
      evaluators=evaluation.task_evaluators(d, config.task_eval), prompt_format=chat.CHAT)
