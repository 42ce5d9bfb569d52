"""Issue 13's GPU check of the RL step, as one script: on the 1b preset (bf16
compute, float32 parameters), synthetic prompts, one device:

1. rollout tokens/s: `sampling.rollout` of P prompts x n replies (one prefill
   per prompt), timed after a compile;
2. the sampler-versus-trainer log-probability difference in the compute dtype:
   the rollout's log-probs against `sampling.completion_logprobs` (a training
   forward pass of the same parameters), mean and max over reply tokens;
3. the split of one GRPO step: rollout, reference forward, update (the jitted
   train step with the GRPO loss), each timed after its compile;
4. memory: the device's peak bytes in use after the update against the dry
   run's plan for the same step (XLA's memory analysis: arguments + outputs +
   temporaries, minus donated aliases) plus the rollout's temporaries.

    python -m experiments.benchmarks.rl_gpu_check --size=1b          # the GPU check
    python -m experiments.benchmarks.rl_gpu_check --size=test        # a CPU smoke run

On the GPU machine it is the last part of `bash experiments/gpu/check.sh`
(README: The GPU check); results in experiments/benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import grpo as grpo_config
from research import losses, models, rl, sampling
from research.stages import grpo
from research.training import step as step_lib
from research.training.optimizer import make_optimizer
from research.training.state import TrainState, no_skips


def timed(fn, *args, repeats: int = 2):
  """(result, compile-and-first-run seconds, mean seconds of `repeats` more runs)."""
  t0 = time.time()
  out = jax.block_until_ready(fn(*args))
  first = time.time() - t0
  t0 = time.time()
  for _ in range(repeats):
    out = jax.block_until_ready(fn(*args))
  return out, first, (time.time() - t0) / repeats


def _with_attention(model_cfg, impl: str):
  """A copy of config.model with attention_impl=impl."""
  out = model_cfg.copy_and_resolve_references()
  out.attention_impl = impl
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--size', default='1b')
  parser.add_argument('--prompts', type=int, default=32)
  parser.add_argument('--n', type=int, default=8)
  parser.add_argument('--prompt_len', type=int, default=256)
  parser.add_argument('--new_tokens', type=int, default=256)
  args = parser.parse_args()
  c = grpo_config.get_config(f'size={args.size}')
  c.grpo.max_new_tokens = args.new_tokens
  model = models.build(c.model)
  cfg = model.cfg
  params = jax.jit(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))['params'])(jax.random.PRNGKey(0))
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, 'unbox') else x, params)
  P0, P, N, n = args.prompts, args.prompt_len, args.new_tokens, args.n
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, cfg.vocab_size, size=(P0, P)).astype(np.int32)
  segs, pos = np.ones_like(tokens), np.broadcast_to(np.arange(P, dtype=np.int32), (P0, P)).copy()
  stops = np.asarray([-5], np.int32)  # no stop token: every reply runs to N tokens (a fixed workload)
  report = {'device': str(jax.devices()[0].device_kind), 'size': args.size, 'prompts': P0, 'replies_per_prompt': n,
            'prompt_len': P, 'new_tokens': N, 'compute_dtype': cfg.dtype}

  roll = lambda p: sampling.rollout(model, p, tokens, segs, pos, jax.random.PRNGKey(1), stops, max_new_tokens=N,
                                    n=n, temperature=1.0)
  out, compile_s, roll_s = timed(roll, params)
  mask = np.asarray(out['mask'])
  report.update(rollout_s=roll_s, rollout_compile_s=compile_s, rollout_tokens_per_s=float(mask.sum()) / roll_s)

  # The trainer's forward with the configured attention ('auto': cuDNN on a GPU in
  # bf16) and with einsum, the path the sampler's KV-cache decode takes.
  for impl in (cfg.attention_impl, 'einsum'):
    scorer = model if impl == cfg.attention_impl else models.build(_with_attention(c.model, impl))
    trainer_logps = jax.jit(lambda p, o, m=scorer: sampling.completion_logprobs(m, p, o, P, 1.0))(params, out)
    diff = np.abs(np.asarray(trainer_logps) - np.asarray(out['logps'])) * mask
    suffix = '' if impl == cfg.attention_impl else f'_trainer_{impl}'
    report.update({f'logp_diff_mean{suffix}': float(diff.sum() / mask.sum()),
                   f'logp_diff_max{suffix}': float(diff.max())})

  # One GRPO step on this rollout: rewards are random (no task), advantages from them.
  B, L = P0 * n, P + N
  seq = np.asarray(out['sequences'])
  loss_mask = np.zeros((B, L - 1), np.int32)
  loss_mask[:, P - 1:] = mask
  old = np.zeros((B, L - 1), np.float32)
  old[:, P - 1:] = np.asarray(out['logps'])
  adv = np.asarray(losses.group_advantages(rng.random(B).astype(np.float32), n))
  batch = {'inputs': seq[:, :-1], 'targets': seq[:, 1:], 'segment_ids': np.asarray(out['segment_ids'])[:, :-1],
           'positions': np.asarray(out['positions'])[:, :-1], 'loss_mask': loss_mask, 'old_logps': old,
           'advantages': adv}
  ref_fn = jax.jit(lambda p, b: rl.token_logps(model, p, b, 1.0))
  _, _, ref_s = timed(ref_fn, params, batch)
  tx, schedule = make_optimizer(c.optimizer, c.steps)
  frozen = {'reference': params}
  step = jax.jit(lambda s, b, f: step_lib.train_step(s, b, f, model=model, loss_fn=grpo.make_loss(c.grpo), tx=tx,
                                                      schedule=schedule, frozen_names=('reference',)),
                 donate_argnums=(0,))
  state = TrainState(step=jnp.int32(0), params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(2), skipped=no_skips())
  mem = step.lower(state, batch, frozen).compile().memory_analysis()
  t0 = time.time()
  state, metrics = jax.block_until_ready(step(state, batch, frozen))
  update_compile_s = time.time() - t0
  t0 = time.time()
  state, metrics = jax.block_until_ready(step(state, batch, frozen))
  update_s = time.time() - t0
  report.update(reference_s=ref_s, update_s=update_s, update_compile_s=update_compile_s,
                loss=float(metrics['train/loss']))
  total = roll_s + ref_s + update_s
  report['split'] = {k: round(v / total, 3) for k, v in (('rollout', roll_s), ('reference', ref_s),
                                                         ('update', update_s))}
  if mem is not None:
    planned = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    report['planned_step_bytes'] = int(planned)
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    report['peak_bytes_in_use'] = int(stats['peak_bytes_in_use'])
    if mem is not None:
      report['peak_over_plan'] = report['peak_bytes_in_use'] / planned
  print(json.dumps(report, indent=1))


if __name__ == '__main__':
  main()
