"""What the online-RL stages (research/stages/grpo.py, ppo.py) share: the
policy's log-probabilities at the sampling temperature and its metrics, the
config checks, the rollout source built from a config section (config.grpo or
config.ppo), the rollout log line, the evaluators, and the rollout's part of the
dry-run plan. (Stages do not import each other; this module is their common ground.)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from research import evaluation, models, rewards, sampling
from research.data import sft as sft_data
from research.errors import UserError
from research.rollouts import RolloutSettings
from research.training.metrics import log


def sampler_logits(logits_BTV, batch, temperature: float):
  """`logits_BTV` as the rollout sampled from them: divided by the sampling
  temperature, ids >= batch['vocab_limit'] (per row: the tokenizer's size, which
  the sampler never draws past; absent: no mask) at -inf-ish. Masking the same
  ids as the sampler keeps the trainer's log-probs (and the ratio) on its distribution."""
  logits = logits_BTV / temperature if temperature > 0 else logits_BTV
  masked = sampling.mask_vocab(logits, batch.get('vocab_limit'))
  # Kept laid out as the model's logits: otherwise the [B] limit can steer the
  # partitioner to another split of the vocabulary reductions (same values, other rounding).
  return nn.with_logical_constraint(masked, ('batch', 'length', 'vocab'))


def scaled_logits(model, params, batch, temperature: float, rng=None):
  """Logits [B, T, V] of the training forward pass at the sampling temperature,
  over the ids the sampler draws from (`sampler_logits`)."""
  logits = models.forward(model, params, batch['inputs'], batch['positions'], batch['segment_ids'], rng)
  return sampler_logits(logits, batch, temperature)


def token_logps(model, params, batch, temperature: float, rng=None, **outputs):
  """log p [B, T] of each target token at `temperature` (the sampling distribution),
  chunked with config.model.logits_chunk; `outputs` (with_entropy, with_values)
  adds the entropy and the critic's values as models.target_log_probs does."""
  return models.target_log_probs(model, params, batch, rng,
                                 logits_fn=lambda logits: sampler_logits(logits, batch, temperature), **outputs)


def policy_metrics(entropy_BT, logps_BT, batch) -> dict:
  """The policy's entropy (nats per reply token, at the sampling temperature:
  token_logps(..., with_entropy=True)) and the sampler-versus-trainer
  log-probability difference (max and mean over reply tokens): on a rollout's
  first step the parameters are equal, so the difference is the mismatch of the
  two code paths."""
  m = batch['loss_mask'].astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m), 1.0)
  diff = jnp.abs(jax.lax.stop_gradient(logps_BT) - batch['old_logps']) * m
  entropy = jax.lax.stop_gradient(entropy_BT)
  return {'entropy': jnp.sum(entropy * m) / n, 'logp_diff/max': jnp.max(diff), 'logp_diff/mean': jnp.sum(diff) / n}


def validate(config, g, *, min_group: int = 2) -> int:
  """The prompt length; a UserError for a config (section `g`: config.grpo or
  config.ppo) that cannot run."""
  section = config.stage
  prompt_len = config.seq_len - g.max_new_tokens
  checks = [
      (prompt_len >= 8, f'config.seq_len={config.seq_len} leaves {prompt_len} prompt tokens after '
                        f'{section}.max_new_tokens={g.max_new_tokens}; raise seq_len.'),
      (g.num_generations >= min_group and config.batch_size % g.num_generations == 0,
       f'config.batch_size={config.batch_size} must be a multiple of {section}.num_generations='
       f'{g.num_generations} (>= {min_group}): each row is one reply.'),
      (g.temperature > 0, f'{section}.temperature={g.temperature}: sampling needs a temperature > 0.'),
      (config.checkpoint_every % g.num_iterations == 0 and config.steps % g.num_iterations == 0,
       f'config.checkpoint_every and steps must be multiples of {section}.num_iterations={g.num_iterations} '
       '(a checkpoint falls between rollouts, so resume is exact).'),
      (len(g.rewards) == len(g.reward_weights) and g.rewards,
       f'{section}.rewards {tuple(g.rewards)} and {section}.reward_weights {tuple(g.reward_weights)} '
       'need one weight each.'),
  ]
  for ok, message in checks:
    if not ok:
      raise UserError(message)
  return prompt_len


def log_rollout(run, step: int) -> None:
  """Writes the latest rollout's host-side metrics as rollout/<name>."""
  metrics = {f'rollout/{k}': v for k, v in run.source.metrics.items()}
  if metrics:
    run.writer.write(step, metrics)
    run.last.update(metrics)
    spread = metrics.get('rollout/groups/zero_spread')
    log(f'  rollout | reward {metrics["rollout/reward/mean"]:.3f} | length '
        f'{metrics["rollout/completion/length"]:.1f}'
        + ('' if spread is None else f' | zero-spread groups {spread:.2f}')
        + f" | {metrics['rollout/tokens_per_sec']:,.0f} tok/s sampled")


def rollout_settings(config, g, prompt_len: int, **overrides) -> RolloutSettings:
  """How a stage with section `g` samples (RolloutSettings from its fields)."""
  fields = dict(prompts_per_step=config.batch_size // g.num_generations, group_size=g.num_generations,
                prompt_len=prompt_len, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                seed=config.seed, iterations=g.num_iterations)
  return RolloutSettings(**{**fields, **overrides})


def rollout_source(config, g, prompt_len: int, tokenizer, make_source):
  """The prompt stream of config.data, the checked reward functions of `g`, and
  `make_source(prompts, reward_fns, reward_weights)` on them."""
  prompts = sft_data.prompt_stream(config.data, tokenizer, max_len=prompt_len, seed=config.seed,
                                   families=g.prompt_families)
  fns = {spec: rewards.resolve(spec, max_tokens=g.max_new_tokens, overlong_buffer=g.get('overlong_buffer', 0))
         for spec in g.rewards}
  probe = next(iter(prompts))  # the reward contract, checked once on a real row
  sample = rewards.Sample(probe['messages'], '', (), probe['row'], False)
  for spec, fn in fns.items():
    rewards.check_contract(fn, spec, [sample])
  return make_source(prompts, fns, dict(zip(g.rewards, g.reward_weights)))


def evaluators(config, g) -> tuple:
  """Greedy exact match per family, pass@k / mean@k at the training temperature
  (g.eval_samples > 0), and each learned reward's mean score of greedy replies."""
  t, d = config.task_eval, config.data
  reward_models = tuple(spec.partition(':')[2] for spec in g.rewards if spec.partition(':')[0] == 'reward_model')
  out = evaluation.task_evaluators(d, t, reward_models)  # one set of greedy replies for both
  if t.exact_match and g.eval_samples > 0:
    out += (evaluation.PassAtK(d, n=g.eval_samples, k=g.eval_k, temperature=g.temperature,
                               examples=t.examples, max_new_tokens=t.max_new_tokens, seed=config.seed),)
  return out


def rollout_plan(settings: RolloutSettings):
  """trainer -> the rollout's memory for the dry run: its KV cache (analytic: 2 x
  layers x rows x (prompt + new tokens) x kv heads x head dim, at the compute
  dtype; rows = prompts x replies, replicated) and the compiled sampler's
  temporaries (XLA's memory analysis of sampling.rollout on abstract inputs)."""

  def plan(trainer) -> dict[str, int]:
    s, cfg = settings, trainer.model.cfg
    prompts = s.prompts_per_step * s.oversample
    rows, length = prompts * s.group_size, s.prompt_len + s.max_new_tokens
    cache = 2 * cfg.n_layers * rows * length * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    with trainer.mesh_context():
      compiled = sampling.rollout.lower(
          trainer.model, trainer.layout.abstract, ints(prompts, s.prompt_len), ints(prompts, s.prompt_len),
          ints(prompts, s.prompt_len), jax.ShapeDtypeStruct((2,), jnp.uint32), ints(2),
          max_new_tokens=s.max_new_tokens, n=s.group_size, temperature=s.temperature).compile()
    mem = compiled.memory_analysis()
    out = {'rollout_kv_cache': int(cache)}  # part of the sampler's temporaries
    if mem is not None:
      out['rollout_temp'] = int(mem.temp_size_in_bytes)
    return out
  return plan
