"""Reward models: a scalar head read at the last response token, trained with
the Bradley-Terry loss on preference pairs.

Data are the DPO pairs ({"prompt", "chosen", "rejected"}), each side rendered
whole by research/data/pairs.py:render_scored: prompt and reply up to (not
including) the closing <|end|>, and score_index, the reply's last token. The
model (config.model.head = 'score': a [D, 1] `score` layer instead of the
output layer) is read there. The backbone starts from init_from (an SFT run);
the head starts random (normal, init_std). With LoRA the head trains in full
next to the adapters.

    loss = -log sigma(r(x, y_w) - r(x, y_l) - margin)
           + center_coef * mean((r(x, y_w) + r(x, y_l))^2)

The second term (Eisenstein et al., 2023) keeps rewards centred on zero, so
their scale means the same across prompts when online RL adds them up.
Evaluation logs eval/accuracy (held-out pairs ranked correctly) and
eval/margin. Score conversations with a finished run: research/rewards.py.
"""

from __future__ import annotations

import jax.numpy as jnp

from research import losses, rewards
from research.data import pairs, pipeline
from research.errors import UserError
from research.training.stage import Stage

BATCH_AXES = {k: ('batch',) if k.endswith('score_index') else ('batch', 'length')
              for k in pairs.side_keys(pairs.SCORED_KEYS)}


def pair_rewards(model, params, batch, rng=None):
  """(chosen rewards [B], rejected rewards [B]) in one forward pass."""
  side = lambda k: pairs.stack_sides(batch, k)
  r_2B = rewards.scores(model, params, side('inputs'), side('positions'), side('segment_ids'),
                        side('score_index'), rng)
  B = batch['chosen_inputs'].shape[0]
  return r_2B[:B], r_2B[B:]


def make_loss(reward_cfg):
  """loss(model, params, batch, frozen, rng) for a config.reward section:
  Bradley-Terry plus centring."""
  c = reward_cfg

  def loss(model, params, batch, frozen, rng):
    del frozen
    chosen, rejected = pair_rewards(model, params, batch, rng)
    value, metrics = losses.bradley_terry_loss(chosen, rejected, margin=c.margin)
    if c.center_coef > 0:
      value = value + c.center_coef * jnp.mean(jnp.square(chosen + rejected))
    metrics['rewards/chosen'] = jnp.mean(chosen)
    metrics['rewards/rejected'] = jnp.mean(rejected)
    return value, jnp.float32(chosen.shape[0]), metrics
  return loss


def stage(config) -> Stage:
  """A reward model on config.data's pairs (config.model.head must be 'score')."""
  if config.model.head != 'score':
    raise UserError(f"config.model.head={config.model.head!r}: a reward model needs head='score'.")
  d = config.data
  render = lambda tok: pairs.RenderPair(tok, config.seq_len, d.text_key, render=pairs.render_scored)
  return Stage(
      name='reward', loss=make_loss(config.reward), batch_axes=BATCH_AXES,
      train_source=lambda tok: pipeline.GrainSource(pairs.train_dataset(
          d, render(tok), batch_size=config.batch_size, seed=config.seed)),
      eval_batches=lambda tok: pairs.eval_batches(d, render(tok), batch_size=config.batch_size,
                                                  max_batches=config.eval_batches))
