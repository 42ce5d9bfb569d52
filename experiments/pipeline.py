"""The `make run` job: the stage pipeline on the embedded default data.

1. pretrain the `tiny` preset on the Python standard library; report the
   validation loss at the start and the end, and print samples;
2. supervised fine-tuning from it on the embedded SFT mixture (generated tasks
   and stdlib code); report held-out exact match before and after, and that
   `research.evaluate` on the finished checkpoint gives the same number;
3. DPO from the SFT model on the embedded preference pairs; report held-out
   preference accuracy (eval/rewards/accuracies) and exact match before and after;
4. a reward model (score head, Bradley-Terry) from the SFT model on the same
   pairs; report held-out pairwise accuracy (eval/accuracy) before and after;
5. GRPO from the SFT model, rewarded by exact match and partial credit; report
   held-out greedy exact match per family and pass@4 before and after;
6. PPO from the SFT model against the reward model of 4, with a KL penalty;
   report the reward model's held-out score, exact match and the KL.

Each stage's run directory lives under --runs; re-running resumes (or skips)
finished work; <runs>/summary.png shows each stage's held-out curve. --parallel
runs 3, 4 and 5 at once, each logging to <runs>/<stage>.log (on an accelerator
the tiny stages leave it and the CPU cores mostly idle; on a 2-core CPU it gains
nothing).

    python -m experiments.pipeline --runs=runs [--parallel]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

from experiments import plot
from experiments.benchmarks import train_step
from research.training.metrics import read_metrics

# Seconds per stage of `make run` alone on a 2-core AMD EPYC VM (family 25, model
# 17, AVX-512) whose float32 matmul peak (`make bench`'s) was REF_PEAK_GFLOPS;
# the estimate printed at the start scales them by that peak against this
# machine's. A rough guide (the stages are not pure matmul: on an AVX2-only VM
# with 0.82x the peak, pretraining took 1.45x as long), not a promise.
STAGE_SECONDS = {'pretrain': 493, 'sft': 592, 'evaluate': 10, 'dpo': 104, 'reward': 129, 'grpo': 173,
                 'ppo': 241}
REF_PEAK_GFLOPS = 201.7


def estimate_seconds(peak_gflops: float) -> float:
  """Estimated wall seconds of the whole pipeline, stage after stage, on a machine
  whose float32 matmul peak is `peak_gflops` (--parallel gains only where cores
  are spare, so it is not counted)."""
  return sum(STAGE_SECONDS.values()) * REF_PEAK_GFLOPS / peak_gflops


def run_stage(config: str, workdir: str, *overrides: str, log: str = '') -> list[dict]:
  """Runs `python -m research.main` for one stage (its output to the file `log`
  if given); returns its metrics rows."""
  cmd = [sys.executable, '-m', 'research.main', f'--config={config}', f'--workdir={workdir}', *overrides]
  print('$ ' + ' '.join(cmd) + (f' > {log}' if log else ''), flush=True)
  t0 = time.time()
  if log:
    with open(log, 'a') as f:
      rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
  else:
    rc = subprocess.call(cmd)
  if rc:
    if log:
      with open(log) as f:
        print(''.join(f.readlines()[-20:]), file=sys.stderr)
    sys.exit(f'{workdir}: exit status {rc}')
  print(f'[{workdir} done in {time.time() - t0:.0f} s]', flush=True)
  return read_metrics(workdir)


def first_and_last(rows: list[dict], key: str) -> tuple[dict, dict]:
  """The first and last metrics rows that hold `key`."""
  hits = [r for r in rows if key in r]
  return hits[0], hits[-1]


def per_family(a: dict, b: dict, prefix: str) -> str:
  """'add 90 -> 97, ...' for the metrics `prefix`/<family> of rows a and b (in %)."""
  families = sorted(k.split('/')[-1] for k in b if k.startswith(prefix + '/'))
  return ', '.join(f'{f} {100 * a[prefix + "/" + f]:.0f} -> {100 * b[prefix + "/" + f]:.0f}' for f in families)


def evaluate_run(workdir: str, *tasks: str) -> dict:
  """`python -m research.evaluate` on a finished run; returns its results."""
  cmd = [sys.executable, '-m', 'research.evaluate', f'--workdir={workdir}', *(f'--task={t}' for t in tasks)]
  print('$ ' + ' '.join(cmd), flush=True)
  if subprocess.call(cmd, stdout=subprocess.DEVNULL):
    sys.exit(f'{workdir}: research.evaluate failed')
  with open(os.path.join(workdir, 'eval', 'results.json')) as f:
    return json.load(f)['results']


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--runs', default='runs', help='parent directory of the run directories')
  parser.add_argument('--parallel', action='store_true', help='run DPO, the reward model and GRPO at once')
  args = parser.parse_args()
  pre_dir, sft_dir, dpo_dir, rm_dir, grpo_dir, ppo_dir = (
      os.path.join(args.runs, s) for s in ('pretrain', 'sft', 'dpo', 'reward', 'grpo', 'ppo'))

  peak = train_step.measure_peak_gflops()
  print(f'estimated total: {estimate_seconds(peak) / 60:.0f} min on this machine (float32 matmul '
        f'peak {peak:.0f} GFLOP/s; {sum(STAGE_SECONDS.values()) / 60:.0f} min measured at {REF_PEAK_GFLOPS:.0f}); '
        're-running resumes finished stages', flush=True)
  pre = run_stage('configs/pretrain.py:size=tiny', pre_dir)
  sft = run_stage('configs/sft.py:size=tiny', sft_dir, f'--config.init_from={pre_dir}')
  # The evaluation command on the finished checkpoint: it must give the stage's own number.
  sft_eval = evaluate_run(sft_dir, 'heldout')['heldout']
  # The best GRPO variant of experiments/results/rl.md within the time budget.
  grpo_overrides = ('--config.steps=200', '--config.eval_every=100', '--config.checkpoint_every=100',
                    "--config.grpo.rewards=('exact_match','partial_credit')", '--config.grpo.reward_weights=(1.0,0.5)')
  after_sft = (('configs/dpo.py:size=tiny', dpo_dir), ('configs/reward.py:size=tiny', rm_dir),
               ('configs/grpo.py:size=tiny', grpo_dir, *grpo_overrides))
  if args.parallel:
    os.makedirs(args.runs, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(len(after_sft)) as pool:
      futures = [pool.submit(run_stage, cfg, wd, f'--config.init_from={sft_dir}', *rest, log=f'{wd}.log')
                 for cfg, wd, *rest in after_sft]
      dpo, rm, grpo = (f.result() for f in futures)
  else:
    dpo, rm, grpo = (run_stage(cfg, wd, f'--config.init_from={sft_dir}', *rest) for cfg, wd, *rest in after_sft)
  ppo = run_stage('configs/ppo.py:size=tiny', ppo_dir, f'--config.init_from={sft_dir}',
                  f"--config.ppo.rewards=('reward_model:{rm_dir}',)")

  summary = os.path.join(args.runs, 'summary.png')
  panels = (('pretrain', pre, 'eval/loss'), ('sft', sft, 'eval/exact_match'),
            ('dpo', dpo, 'eval/rewards/accuracies'), ('reward model', rm, 'eval/accuracy'),
            ('grpo', grpo, 'eval/exact_match'), ('ppo', ppo, 'eval/reward_model/score'))
  plot.plot_stages(panels, summary)

  a, b = first_and_last(pre, 'eval/loss')
  print(f'\npretrain: validation loss {a["eval/loss"]:.3f} (step {a["step"]}) -> '
        f'{b["eval/loss"]:.3f} (step {b["step"]}), {100 * b["eval/loss"] / a["eval/loss"]:.0f}% '
        f'of the start (perplexity {a["eval/perplexity"]:.0f} -> {b["eval/perplexity"]:.1f})')
  a, b = first_and_last(sft, 'eval/exact_match')
  print(f'sft: held-out exact match {100 * a["eval/exact_match"]:.1f}% -> '
        f'{100 * b["eval/exact_match"]:.1f}% ({per_family(a, b, "eval/exact_match")}); response loss '
        f'{a["eval/loss"]:.3f} -> {b["eval/loss"]:.3f}; research.evaluate on its checkpoint: '
        f'{100 * sft_eval["exact_match"]:.1f}%' + ('' if sft_eval['exact_match'] == b['eval/exact_match'] else
                                                 ' (DIFFERS from the stage\'s own number)'))
  a, b = first_and_last(dpo, 'eval/rewards/accuracies')
  print(f'dpo: held-out preference accuracy {a["eval/rewards/accuracies"]:.3f} -> '
        f'{b["eval/rewards/accuracies"]:.3f} (reward margin {b["eval/rewards/margins"]:.2f}); '
        f'task exact match {100 * a["eval/exact_match"]:.1f}% -> {100 * b["eval/exact_match"]:.1f}%')
  a, b = first_and_last(rm, 'eval/accuracy')
  print(f'reward model: held-out pairwise accuracy {a["eval/accuracy"]:.3f} -> {b["eval/accuracy"]:.3f} '
        f'(margin {b["eval/margin"]:.2f})')

  a, b = first_and_last(grpo, 'eval/exact_match')
  print(f'grpo: held-out exact match {100 * a["eval/exact_match"]:.1f}% -> '
        f'{100 * b["eval/exact_match"]:.1f}% ({per_family(a, b, "eval/exact_match")}); pass@4 '
        f'{a["eval/pass@4"]:.3f} -> {b["eval/pass@4"]:.3f}; error rate x{(1 - b["eval/exact_match"]) / max(1 - a["eval/exact_match"], 1e-9):.2f}')
  a, b = first_and_last(ppo, 'eval/reward_model/score')
  kl = [r['rollout/kl/sequence'] for r in ppo if 'rollout/kl/sequence' in r]
  print(f'ppo: held-out reward-model score {a["eval/reward_model/score"]:.3f} -> {b["eval/reward_model/score"]:.3f}; '
        f'exact match {100 * a["eval/exact_match"]:.1f}% -> {100 * b["eval/exact_match"]:.1f}% '
        f'({per_family(a, b, "eval/exact_match")}); KL to the SFT model {kl[-1]:.3f} nats per reply (last rollout)')


if __name__ == '__main__':
  main()
