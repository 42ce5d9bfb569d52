"""Reward models: a scalar head read at the last response token, trained with
the Bradley-Terry loss on preference pairs.

Data are the DPO pairs ({"prompt", "chosen", "rejected"}) or rankings
({"prompt", "ranked": [best, ..., worst]}: all K(K-1)/2 pairs, in one batch,
as InstructGPT trains its reward model), each side rendered whole by
research/data/pairs.py:render_scored: prompt and reply up to (not including)
the closing <|end|>, and score_index, the reply's last token. The model
(config.model.head = 'score': a [D, 1] `score` layer instead of the output
layer) is read there. With config.reward.pairs_per_row > 1, rows are packed
with several pairs and `score_mask` marks each pair's scored token. The
backbone starts from init_from (an SFT run); the head starts random (normal,
init_std). With LoRA the head trains in full next to the adapters.

    loss = mean over the batch's pairs of -log sigma(r(x, y_w) - r(x, y_l) - margin)
           + center_coef * mean((r(x, y_w) + r(x, y_l))^2)

The second term (Eisenstein et al., 2023) keeps rewards centred on zero, so
their scale means the same across prompts when online RL adds them up. Padding
pairs (slots a ranking left free) weigh 0, and the loss's weight is the number
of real pairs, so accumulation and evaluation average over real pairs exactly.
Each pair of a ranking weighs as much as a pair row (InstructGPT divides a
prompt's comparisons by K(K-1)/2 instead, so each prompt weighs the same).
Evaluation logs eval/accuracy (held-out pairs ranked correctly) and
eval/margin. Score conversations with a finished run: research/rewards.py.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from research import losses, models, rewards
from research.data import pairs, pipeline
from research.errors import UserError
from research.training.stage import Stage


def batch_axes(pairs_per_row: int) -> dict[str, tuple[str, ...]]:
  """Logical axes of a reward batch: one pair per row reads score_index [B];
  packed rows mark each pair's scored token in score_mask [B, T]."""
  keys = pairs.SCORED_KEYS if pairs_per_row == 1 else pairs.PACKED_SCORED_KEYS
  return {k: ('batch',) if k.endswith('score_index') else ('batch', 'length') for k in pairs.side_keys(keys)}


BATCH_AXES = batch_axes(1)


def pair_rewards(model, params, batch, rng=None, pairs_per_row: int = 1):
  """(chosen rewards [P], rejected rewards [P]) in one forward pass; P = rows
  for one pair per row, rows * pairs_per_row packed (research/data/pairs.py)."""
  side = lambda k: pairs.stack_sides(batch, k)
  if pairs_per_row == 1:
    r_2P = rewards.scores(model, params, side('inputs'), side('positions'), side('segment_ids'),
                          side('score_index'), rng)
    R = batch['chosen_inputs'].shape[0]
    return r_2P[:R], r_2P[R:]
  seg_2RT = side('segment_ids')
  out_2RT = models.forward(model, params, side('inputs'), side('positions'), seg_2RT, rng)[..., 0]
  r_2P = pairs.segment_sums(out_2RT * side('score_mask'), seg_2RT, pairs_per_row).reshape(2, -1)
  return r_2P[0], r_2P[1]


def make_loss(reward_cfg):
  """loss(model, params, batch, frozen, rng) for a config.reward section:
  Bradley-Terry plus centring, means over the batch's real pairs (padding
  pairs weigh 0); the weight is their number."""
  c = reward_cfg

  def tail(means, chosen, rejected):
    """The loss and metrics from per-pair rewards [P] (`means`: pairs.over_real_pairs)."""
    value, metrics = means.of(functools.partial(losses.bradley_terry_loss, margin=c.margin), chosen, rejected)
    if c.center_coef > 0:
      value = value + c.center_coef * means.mean(jnp.square(chosen + rejected))
    metrics['rewards/chosen'] = means.mean(chosen)
    metrics['rewards/rejected'] = means.mean(rejected)
    return value, metrics

  def loss(model, params, batch, frozen, rng):
    del frozen
    S = 1 if 'chosen_score_index' in batch else c.pairs_per_row  # the batch's layout, by its keys
    w_P = pairs.pair_weights(batch, S)
    # Padding pairs (all-zero rows) read 0: their weight 0 keeps them out of every mean already, and
    # this keeps their value out of the arithmetic too (it is finite: a fully masked row attends uniformly).
    chosen, rejected = (jnp.where(w_P > 0, r, 0.0) for r in pair_rewards(model, params, batch, rng, S))
    value, metrics = pairs.over_real_pairs(tail, w_P, chosen, rejected)
    return value, jnp.sum(w_P), metrics
  return loss


def stage(config) -> Stage:
  """A reward model on config.data's pairs (config.model.head must be 'score')."""
  if config.model.head != 'score':
    raise UserError(f"config.model.head={config.model.head!r}: a reward model needs head='score'.")
  d, S = config.data, config.reward.pairs_per_row
  if S < 1:
    raise UserError(f'config.reward.pairs_per_row={S}; use 1 (one pair per row) or more (packed rows).')
  render = lambda tok: pairs.RenderPair(tok, config.seq_len, d.text_key, render=pairs.render_scored)
  return Stage(
      name='reward', loss=make_loss(config.reward), batch_axes=batch_axes(S),
      train_source=lambda tok: pipeline.stream_source(lambda s, n, rows: pairs.train_dataset(
          d, render(tok), batch_size=rows, seed=config.seed, pairs_per_row=S, stream=(s, n)),
          d.streams, config.batch_size),
      eval_batches=lambda tok: pairs.eval_batches(d, render(tok), batch_size=config.batch_size,
                                                  max_batches=config.eval_batches, pairs_per_row=S))
