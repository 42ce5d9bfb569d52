"""PPO for RLHF (Ouyang et al., 2022): the policy against a learned reward
model, with a per-token KL penalty to the frozen reference in the reward and a
critic for GAE advantages.

Each step samples `num_generations` replies to each of batch_size /
num_generations prompts (research/rollouts.py: PPOSource), scores them with
config.ppo.rewards (by default the reward stage's model), and builds per-token
rewards, -kl_coef (log pi - log ref) on every reply token plus the score on the
last one. The critic is a `value` head on the policy's trunk
(config.model.value_head, read with the log-probs by rl.token_logps): one parameter
tree, one optimizer state and one forward pass serve both, where a separate
critic would double the model's memory. Its values at the rollout's parameters
give GAE advantages (whitened over the batch) and returns; the loss is

    policy_loss(logps, old_logps, advantages_BT, mask, token_mean)
      + vf_coef * value_loss(values, old_values, returns, mask, clip=value_clip)

both means over the batch's reply tokens, so the (loss, weight = tokens) pair
accumulates exactly. Evaluation logs greedy exact match on the held-out tasks
and, for a reward_model reward, that model's mean score of the greedy replies;
`rollout/kl/sequence` is the summed KL to the reference per reply.
"""

from __future__ import annotations

import jax.numpy as jnp

from research import losses, rl
from research.data import chat
from research.errors import UserError
from research.rollouts import CriticSettings, PPOSource
from research.training.stage import Hook, Stage

BATCH_AXES = {**{k: ('batch', 'length') for k in ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask',
                                                  'old_logps', 'advantages', 'returns', 'old_values')},
              'vocab_limit': ('batch',)}
BATCH_DTYPES = {k: 'float32' for k in ('old_logps', 'advantages', 'returns', 'old_values')}


def make_loss(p):
  """loss(model, params, batch, frozen, rng) for a config.ppo section."""

  def loss(model, params, batch, frozen, rng):
    del frozen  # the KL to the reference is in the rollout's rewards
    logps, entropy, values = rl.token_logps(model, params, batch, p.temperature, rng, with_entropy=True,
                                            with_values=True)
    mask = batch['loss_mask']
    pg, metrics = losses.policy_loss(logps, batch['old_logps'], batch['advantages'], mask,
                                     clip_eps=p.clip_eps, aggregation='token_mean')
    vf = losses.value_loss(values, batch['old_values'], batch['returns'], mask, clip_eps=p.value_clip)
    m = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    metrics.update(rl.policy_metrics(entropy, logps, batch))
    metrics.pop('kl')  # the KL is in the rewards: rollout/kl/sequence
    metrics.update({'policy_loss': pg, 'value_loss': vf, 'values/mean': jnp.sum(values * m) / n})
    return pg + p.vf_coef * vf, jnp.sum(m), metrics
  return loss


def stage(config) -> Stage:
  """PPO on config.data's prompts against config.ppo.rewards."""
  p = config.ppo
  if config.model.value_head == 'none':
    raise UserError("stage ppo needs a critic: set config.model.value_head='shared' or 'detached' "
                    '(configs/ppo.py does).')
  prompt_len = rl.validate(config, p, min_group=1)
  settings = rl.rollout_settings(config, p, prompt_len)
  critic = CriticSettings(kl_coef=p.kl_coef, gamma=p.gamma, lam=p.lam, whiten=p.whiten)

  def train_source(tokenizer):
    return rl.rollout_source(
        config, p, prompt_len, tokenizer,
        lambda prompts, fns, weights: PPOSource(prompts, tokenizer, settings, fns, weights, critic))

  return Stage(name='ppo', loss=make_loss(p), batch_axes=BATCH_AXES, batch_dtypes=BATCH_DTYPES,
               train_source=train_source, eval_batches=lambda tokenizer: [],
               frozen=('reference',) if p.kl_coef > 0 else (), evaluators=rl.evaluators(config, p),
               prompt_format=chat.CHAT, hooks=(Hook(config.log_every, rl.log_rollout),),
               plan=rl.rollout_plan(settings))
