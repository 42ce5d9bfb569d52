"""The one training loop every stage shares.

    train(config, workdir, stage):
      setup:  Trainer (mesh, shardings, jitted steps) -> tokenizer -> batch source
              -> state: resumed from a checkpoint, or fresh (seed / init_from)
      loop:   batch = source.next(policy)                      # offline sources ignore the policy
              state, metrics = trainer.train_step(state, batch, frozen)
              hooks: log every log_every, checkpoint every checkpoint_every,
                     evaluate (+ samples) every eval_every, then the stage's own

A hook is `Hook(every, fn)` with `fn(run, step)`; `run` (a Run) holds the
run's parts and its current state, so a hook can read or replace them.

Process 0 holds workdir/.lock for the run's lifetime (research/training/lock.py):
a second launch on the same workdir fails at once. SIGTERM or SIGINT stops the
run after the step in flight: that step's metrics are logged, its checkpoint
is saved and committed, one line says so, and train() returns (the CLI exits
with status 0); rerunning the same command resumes exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp

from research import sampling
from research.data.tokenizer import Tokenizer
from research.models import count_params
from research.training import checkpoint as ckpt_lib
from research.training import divergence, init, resume
from research.training.dry_run import dry_run
from research.training.lock import WorkdirLock
from research.training.preemption import Preemption
from research.training.metrics import MetricWriter, log
from research.training.stage import Hook, Stage
from research.training.state import TrainState
from research.training.step import BASE, full_params, loss_views
from research.training.trainer import Trainer


@dataclasses.dataclass
class Run:
  """A run in progress: what hooks see and may change."""

  config: Any
  workdir: str
  stage: Stage
  trainer: Trainer
  tokenizer: Tokenizer
  source: Any            # the BatchSource
  eval_data: list
  ckpt: ckpt_lib.Checkpointer
  writer: MetricWriter
  state: TrainState
  frozen: dict
  metrics: dict = dataclasses.field(default_factory=dict)  # the last step's (on device)
  last: dict = dataclasses.field(default_factory=dict)     # every metric logged so far, latest value
  interval_start: float = 0.0  # for tokens/sec: hooks' time is not training time
  interval_steps: int = 0

  def policy(self) -> sampling.Policy:
    """The model with the current full parameters (valid until the next step donates them)."""
    return sampling.Policy(self.trainer.model, full_params(self.state.params, self.frozen),
                           functools.partial(loss_views, self.state.params, self.frozen, self.stage.frozen))


def _fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else f'{seconds // 60}m{seconds % 60:02d}s'


def _eval_summary(ev: dict) -> str:
  parts = [f'eval loss {ev["eval/loss"]:.4f}'] if 'eval/loss' in ev else []
  if 'eval/perplexity' in ev:
    parts.append(f'ppl {ev["eval/perplexity"]:.1f}')
  parts += [f'{k[5:]} {v:.3f}' for k, v in ev.items()
            if k.startswith('eval/') and k not in ('eval/loss', 'eval/perplexity')]
  return ' | '.join(parts)


def evaluate(run: Run) -> dict[str, float]:
  """Weighted means of the loss and its metrics over the fixed eval batches
  (eval/loss, eval/<metric>; none for a stage without eval batches, such as
  online RL), then the stage's evaluators (eval/<name>)."""
  trainer, totals, result = run.trainer, None, {}
  with trainer.mesh_context():
    for b in run.eval_data:
      out = trainer.eval_step(run.state.params, run.frozen, trainer.to_global(b))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    if totals is not None:
      totals = jax.device_get(totals)
      w = max(float(totals.pop('weight')), 1.0)
      result = {'eval/loss': float(totals.pop('loss_sum')) / w}
      result.update({f'eval/{k}': float(v) / w for k, v in totals.items()})
    policy = run.policy()
    for evaluator in run.stage.evaluators:
      result.update({f'eval/{k}': float(v) for k, v in evaluator(policy, run.tokenizer, result).items()})
  return result


def samples(run: Run) -> list[str]:
  """Greedy and temperature continuations of config.sample.prompts, in the
  stage's prompt format (e.g. the chat template)."""
  s, fmt, tok = run.config.sample, run.stage.prompt_format, run.tokenizer
  prompts = [fmt.encode(tok, p) for p in s.prompts]
  policy, lines = run.policy(), []
  with run.trainer.mesh_context():
    for temp in sorted({0.0, float(s.temperature)}):
      outs = sampling.generate(policy.model, policy.params, prompts, max_new_tokens=s.max_new_tokens,
                               rng=jax.random.PRNGKey(run.config.seed), temperature=temp, top_k=s.top_k,
                               top_p=s.top_p, stop_tokens=fmt.stop_tokens(tok), pad_id=tok.pad_id,
                               vocab_limit=tok.vocab_size)
      for p, o in zip(s.prompts, outs):
        lines.append(f'[T={temp:g}] {p!r} -> {tok.decode(o)!r}')
  return lines


def log_hook(run: Run, step: int) -> None:
  """Fetches the step's metrics (the only per-interval host sync), writes and prints them."""
  metrics = jax.device_get(run.metrics)
  elapsed = time.time() - run.interval_start
  c = run.config
  metrics['train/tokens_per_sec'] = run.interval_steps * c.batch_size * c.seq_len / max(elapsed, 1e-9)
  metrics.pop('train/weight', None)
  metrics.pop('train/skipped_in_row', None)  # for check_divergence; skipped_steps is the total
  run.writer.write(step, metrics)
  eta = (c.steps - step) * elapsed / run.interval_steps
  log(f'step {step}/{c.steps} | loss {metrics["train/loss"]:.4f} | lr {metrics["train/lr"]:.2e} | '
      f'gnorm {metrics["train/grad_norm"]:.2f} | {metrics["train/tokens_per_sec"]:,.0f} tok/s | '
      f'eta {_fmt_time(eta)}')
  run.last.update(metrics)
  run.interval_start, run.interval_steps = time.time(), 0


def checkpoint_hook(run: Run, step: int) -> None:
  """Saves the train state with the batch source's state (asynchronously);
  refuses a state with non-finite parameters (the step's guard skips non-finite
  updates, so only an update that overflows gets here)."""
  check_divergence(run, step, run.metrics)  # a diverged run's last state is not worth a checkpoint
  divergence.check_finite(run.state.params, step, run.ckpt.latest_step())
  run.ckpt.save(run.state, run.source.get_state())


def check_divergence(run: Run, step: int, metrics: dict) -> None:
  """Stops the run once optimizer.max_skipped_steps steps in a row up to `step`
  (whose `metrics` these are) were skipped as non-finite (divergence.check)."""
  divergence.check(step, int(jax.device_get(metrics['train/skipped_in_row'])),
                   int(run.config.optimizer.max_skipped_steps), run.ckpt.latest_step())


def eval_hook(run: Run, step: int) -> None:
  """Evaluates, writes and prints eval/ metrics."""
  ev = evaluate(run)
  run.writer.write(step, ev)
  run.last.update(ev)
  log(f'step {step} | {_eval_summary(ev)}')


def samples_hook(run: Run, step: int) -> None:
  """Prints samples (every process runs the sharded sampler; process 0 prints)."""
  del step
  for line in samples(run):
    log('  sample ' + line)


def hooks(config, stage: Stage) -> list[Hook]:
  """The loop's hooks, in the order they run after a step."""
  out = [Hook(config.log_every, log_hook), Hook(config.checkpoint_every, checkpoint_hook),
         Hook(config.eval_every, eval_hook)]
  if config.sample.prompts and stage.prompt_format is not None:
    out.append(Hook(config.eval_every, samples_hook))
  return out + list(stage.hooks)


def _after_preemption(run: Run, step: int, done: list[Hook]) -> None:
  """Logs `step`'s metrics and saves its checkpoint (unless `done`, the hooks
  that just ran, did), then waits until the checkpoint is committed."""
  if not any(h.fn is log_hook for h in done):
    log_hook(run, step)
  if not any(h.fn is checkpoint_hook for h in done):
    checkpoint_hook(run, step)
  run.ckpt.wait()


def _loop(run: Run, start: int, preemption: Preemption) -> int | None:
  """Steps start+1 .. config.steps with the hooks after each; returns the step
  a preemption stopped it at (saved), or None when every step ran."""
  config, trainer = run.config, run.trainer
  after_step = hooks(config, run.stage)
  run.interval_start = time.time()
  previous = None  # (step, metrics) of the step before, checked once this one is dispatched
  with trainer.mesh_context():
    for step in range(start + 1, config.steps + 1):
      batch = trainer.to_global(run.source.next(run.policy()), local=getattr(run.source, 'local_rows', False))
      run.state, run.metrics = trainer.train_step(run.state, batch, run.frozen)
      # One step behind, so that reading the skip counter never stalls the dispatch queue.
      if previous is not None:
        check_divergence(run, *previous)
      previous = (step, run.metrics)
      run.interval_steps += 1
      due = [hook for hook in after_step if hook.due(step, config.steps)]
      for hook in due:
        hook_start = time.time()
        hook.fn(run, step)
        if hook.fn is not log_hook:  # which restarts the interval itself
          run.interval_start += time.time() - hook_start  # hooks' time is not training throughput
      if step < config.steps and preemption.reached(step):
        check_divergence(run, step, run.metrics)
        _after_preemption(run, step, due)
        return step
    if previous is not None:
      check_divergence(run, *previous)
  return None


def train(config, workdir: str, stage: Stage, devices=None) -> dict[str, Any]:
  """Runs (or resumes) `stage` in `workdir`; returns the last metrics (or the dry-run report).

  `config` is resolved (init.resolve_config) and `stage` built from it, as
  research/main.py does. `devices` restricts the mesh to a subset of
  jax.devices() (tests use it to compare meshes in one process). Raises
  UserError if another run holds the workdir; a dry run neither locks nor
  creates it. After SIGTERM/SIGINT it returns early, with its last step saved.
  """
  if config.dry_run:
    return _train(config, workdir, stage, devices, None)
  # The lock comes first: nothing may touch a workdir another run owns.
  with WorkdirLock(workdir), Preemption() as preemption:
    return _train(config, workdir, stage, devices, preemption)


def _train(config, workdir: str, stage: Stage, devices, preemption) -> dict[str, Any]:
  """train() inside the workdir lock and the signal handlers."""
  trainer = Trainer(config, stage, devices)
  log(f'model: {count_params(trainer.layout.abstract) / 1e6:.2f}M parameters | mesh '
      f'{dict(trainer.mesh.shape)} | {jax.device_count()} devices, {jax.process_count()} processes')
  if config.dry_run:
    return dry_run(trainer)

  os.makedirs(workdir, exist_ok=True)
  # 0 keeps every checkpoint (orbax's max_to_keep=0 would delete each one as it is written).
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints or None)
  writer = None
  try:  # however it ends, saves in flight are committed and files closed
    writer = MetricWriter(workdir, config.get('logging'), config.to_dict())
    return _set_up_and_loop(config, workdir, stage, trainer, ckpt, writer, preemption)
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()


def _set_up_and_loop(config, workdir, stage, trainer, ckpt, writer, preemption) -> dict[str, Any]:
  """_train() once the workdir's checkpointer and metric writer exist."""
  latest = ckpt.latest_step()
  changes = resume.check_resume(config, workdir, latest) if latest is not None else {}
  tokenizer = init.load_tokenizer(config, workdir, resuming=latest is not None)
  source = stage.train_source(tokenizer)
  eval_data = stage.eval_batches(tokenizer)
  init_step = init.pinned_init_step(config, workdir, resuming=latest is not None)
  state, frozen, data_state = init.setup_state(trainer, ckpt, init_step)
  start = int(jax.device_get(state.step))
  # Set up: only now does the workdir get its tokenizer and config (a failed start leaves neither).
  init.save_tokenizer(tokenizer, workdir)
  init.record_init_step(config, workdir, init_step)
  resume.record_changes(workdir, start, changes)
  resume.write_config(config, workdir)
  writer.truncate_after(start)  # rows a killed run logged after its last checkpoint (or before any)
  if data_state is not None:
    source.set_state(data_state)
    log(f'resumed from {ckpt_lib.checkpoint_dir(workdir)}/{start}' +
        (f' with {resume.describe_changes(changes)}' if changes else ''))
    resume.warn_if_schedule_moves(config, changes, start)
  elif config.init_from:
    log(f'initialised parameters from {config.init_from}')
  n_train = count_params(state.params)
  n_all = n_train + count_params(frozen.get(BASE, {}))
  log(f'trainable parameters: {n_train:,} of {n_all:,} ({100 * n_train / n_all:.2f}%)')

  run = Run(config, workdir, stage, trainer, tokenizer, source, eval_data, ckpt, writer, state, frozen)
  if start == 0:
    run.last = evaluate(run)
    run.last['train/trainable_params'] = n_train
    writer.write(0, run.last)
    log(f'step 0 | {_eval_summary(run.last)}')

  t_start = time.time()
  stopped = _loop(run, start, preemption)
  ckpt.wait()  # the last save is committed, or its failure stops the run, before saying done
  if stopped is not None:
    log(f'preempted at step {stopped}: saved; rerun the same command to resume')
  else:
    log(f'done: {config.steps - start} steps in {_fmt_time(time.time() - t_start)}')
  return run.last
