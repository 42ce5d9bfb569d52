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

from research import evaluation, losses, models, rewards
from research.data import chat
from research.data import sft as sft_data
from research.errors import UserError
from research.rollouts import RolloutSettings, RolloutSource
from research.training.metrics import log
from research.training.stage import Hook, Stage

BATCH_AXES = {**{k: ('batch', 'length') for k in ('inputs', 'targets', 'segment_ids', 'positions',
                                                  'loss_mask', 'old_logps')},
              'advantages': ('batch',)}
BATCH_DTYPES = {'old_logps': 'float32', 'advantages': 'float32'}


def token_logps(model, params, batch, temperature: float, rng=None):
  """log p [B, T] of each target token at `temperature` (the sampling distribution)."""
  logits = models.forward(model, params, batch['inputs'], batch['positions'], batch['segment_ids'], rng)
  return losses.token_log_probs(logits / temperature if temperature > 0 else logits, batch['targets'])


def make_loss(g):
  """loss(model, params, batch, frozen, rng) for a config.grpo section."""

  def loss(model, params, batch, frozen, rng):
    mask = batch['loss_mask']
    logps = token_logps(model, params, batch, g.temperature, rng)
    ref = None
    if 'reference' in frozen:
      ref = token_logps(model, jax.lax.stop_gradient(frozen['reference']), batch, g.temperature)
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
    # Sampler against trainer: equal parameters on a rollout's first step, so this
    # is the log-probability mismatch of the two code paths.
    diff = jnp.abs(jax.lax.stop_gradient(logps) - batch['old_logps']) * m
    metrics['logp_diff/max'] = jnp.max(diff)
    metrics['logp_diff/mean'] = jnp.sum(diff) / jnp.maximum(jnp.sum(m), 1.0)
    return value, weight, metrics
  return loss


def _validate(config) -> int:
  """The prompt length; a UserError for a config that cannot run."""
  g = config.grpo
  prompt_len = config.seq_len - g.max_new_tokens
  checks = [
      (prompt_len >= 8, f'config.seq_len={config.seq_len} leaves {prompt_len} prompt tokens after '
                        f'grpo.max_new_tokens={g.max_new_tokens}; raise seq_len.'),
      (g.num_generations >= 2 and config.batch_size % g.num_generations == 0,
       f'config.batch_size={config.batch_size} must be a multiple of grpo.num_generations='
       f'{g.num_generations} (>= 2): each row is one reply.'),
      (g.temperature > 0, f'grpo.temperature={g.temperature}: sampling needs a temperature > 0.'),
      (config.checkpoint_every % g.num_iterations == 0 and config.steps % g.num_iterations == 0,
       f'config.checkpoint_every and steps must be multiples of grpo.num_iterations={g.num_iterations} '
       '(a checkpoint falls between rollouts, so resume is exact).'),
      (len(g.rewards) == len(g.reward_weights) and g.rewards,
       f'grpo.rewards {tuple(g.rewards)} and grpo.reward_weights {tuple(g.reward_weights)} need one weight each.'),
  ]
  for ok, message in checks:
    if not ok:
      raise UserError(message)
  return prompt_len


def _log_rollout(run, step: int) -> None:
  """Writes the latest rollout's host-side metrics as rollout/<name>."""
  metrics = {f'rollout/{k}': v for k, v in run.source.metrics.items()}
  if metrics:
    run.writer.write(step, metrics)
    run.last.update(metrics)
    log(f'  rollout | reward {metrics["rollout/reward/mean"]:.3f} | length '
        f'{metrics["rollout/completion/length"]:.1f} | zero-spread groups {metrics["rollout/groups/zero_spread"]:.2f}')


def stage(config) -> Stage:
  """GRPO (or a relative, configs/grpo.py:algo=...) on config.data's prompts."""
  g, d = config.grpo, config.data
  prompt_len = _validate(config)
  settings = RolloutSettings(
      prompts_per_step=config.batch_size // g.num_generations, group_size=g.num_generations,
      prompt_len=prompt_len, max_new_tokens=g.max_new_tokens, temperature=g.temperature, seed=config.seed,
      iterations=g.num_iterations, advantage=g.advantage, scale=g.scale, mask_truncated=g.mask_truncated,
      oversample=g.oversample)

  def train_source(tokenizer):
    prompts = sft_data.prompt_stream(d, tokenizer, max_len=prompt_len, seed=config.seed)
    fns = {spec: rewards.resolve(spec, max_tokens=g.max_new_tokens, overlong_buffer=g.overlong_buffer)
           for spec in g.rewards}
    probe = next(iter(prompts))  # the reward contract, checked once on a real row
    sample = rewards.Sample(probe['messages'], '', (), probe['row'], False)
    for spec, fn in fns.items():
      rewards.check_contract(fn, spec, [sample])
    return RolloutSource(prompts, tokenizer, settings, fns, dict(zip(g.rewards, g.reward_weights)))

  def eval_batches(tokenizer):
    del tokenizer
    return []  # the policy loss has no held-out value; evaluators measure the policy

  t = config.task_eval
  evaluators = evaluation.task_evaluators(d, t)
  if t.exact_match and g.eval_samples > 0:
    evaluators += (evaluation.PassAtK(d, n=g.eval_samples, k=g.eval_k, temperature=g.temperature,
                                      examples=t.examples, max_new_tokens=t.max_new_tokens, seed=config.seed),)
  return Stage(name='grpo', loss=make_loss(g), batch_axes=BATCH_AXES, batch_dtypes=BATCH_DTYPES,
               train_source=train_source, eval_batches=eval_batches,
               frozen=('reference',) if g.beta > 0 else (), evaluators=evaluators, prompt_format=chat.CHAT,
               hooks=(Hook(config.log_every, _log_rollout),))
