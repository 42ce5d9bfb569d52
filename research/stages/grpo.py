"""Online RL with group-relative advantages: GRPO and its relatives
(Dr.GRPO, DAPO, GSPO, RLOO; presets in configs/grpo.py).

Each step samples `num_generations` replies to each of batch_size /
num_generations prompts from the current policy (research/rollouts.py), scores
them with the configured rewards (research/rewards.py), turns rewards into
group advantages, and takes the clipped policy-gradient step
(losses.policy_loss), with a KL penalty to the frozen reference when
config.grpo.beta > 0 (the initial model; with LoRA the base with adapters off,
so one copy of the base). Prompts come from any SFT-format dataset (the
embedded `sft_tasks` by default); their length plus max_new_tokens is seq_len.

Evaluation logs greedy exact match per family and pass@k / mean@k at the
training temperature on the held-out tasks; every log step also logs the
rollout's rewards (overall, per reward, per family), completion lengths, the
share of groups without reward spread, and the rollout time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from research import losses, rl
from research.data import chat
from research.rollouts import RolloutSource
from research.training.stage import Hook, Stage

BATCH_AXES = {**{k: ('batch', 'length') for k in ('inputs', 'targets', 'segment_ids', 'positions',
                                                  'loss_mask', 'old_logps')},
              'advantages': ('batch',), 'vocab_limit': ('batch',)}
BATCH_DTYPES = {'old_logps': 'float32', 'advantages': 'float32'}


def make_loss(g):
  """loss(model, params, batch, frozen, rng) for a config.grpo section."""

  def loss(model, params, batch, frozen, rng):
    mask = batch['loss_mask']
    logps, entropy = rl.token_logps(model, params, batch, g.temperature, rng, with_entropy=True)
    ref = None
    if 'reference' in frozen:
      ref = rl.token_logps(model, jax.lax.stop_gradient(frozen['reference']), batch, g.temperature)
    value, metrics = losses.policy_loss(
        logps, batch['old_logps'], batch['advantages'], mask, ref_logps_BT=ref, beta=g.beta, kl=g.kl,
        clip_eps=g.clip_eps, clip_eps_high=g.clip_eps_high or None, importance=g.importance,
        aggregation=g.aggregation, max_len=g.max_new_tokens)
    m = mask.astype(jnp.float32)
    if g.aggregation == 'token_mean':
      weight = jnp.sum(m)
    else:  # per-sequence means: weigh by the rows that hold a reply (zero-weight rows do not count)
      rows = jnp.sum(jnp.max(m, axis=-1))
      value, weight = value * m.shape[0] / jnp.maximum(rows, 1.0), rows
    metrics.update(rl.policy_metrics(entropy, logps, batch))
    return value, weight, metrics
  return loss


def stage(config) -> Stage:
  """GRPO (or a relative, configs/grpo.py:algo=...) on config.data's prompts."""
  g = config.grpo
  prompt_len = rl.validate(config, g)
  settings = rl.rollout_settings(config, g, prompt_len, advantage=g.advantage, scale=g.scale,
                              mask_truncated=g.mask_truncated, oversample=g.oversample)

  def train_source(tokenizer):
    return rl.rollout_source(config, g, prompt_len, tokenizer,
                          lambda prompts, fns, weights: RolloutSource(prompts, tokenizer, settings, fns, weights))

  def eval_batches(tokenizer):
    del tokenizer
    return []  # the policy loss has no held-out value; evaluators measure the policy

  return Stage(name='grpo', loss=make_loss(g), batch_axes=BATCH_AXES, batch_dtypes=BATCH_DTYPES,
               train_source=train_source, eval_batches=eval_batches,
               frozen=('reference',) if g.beta > 0 else (), evaluators=rl.evaluators(config, g),
               prompt_format=chat.CHAT, hooks=(Hook(config.log_every, rl.log_rollout),),
               plan=rl.rollout_plan(settings))
