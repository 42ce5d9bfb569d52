"""The `make run` job: the stage pipeline on the embedded default data.

1. pretrain the `tiny` preset on the Python standard library; report the
   validation loss at the start and the end, and print samples;
2. supervised fine-tuning from it on the embedded SFT mixture (generated tasks
   and stdlib code); report held-out exact match before and after;
3. DPO from the SFT model on the embedded preference pairs; report held-out
   preference accuracy (eval/rewards/accuracies) and exact match before and after;
4. a reward model (score head, Bradley-Terry) from the SFT model on the same
   pairs; report held-out pairwise accuracy (eval/accuracy) before and after.

Each stage's run directory lives under --runs; re-running resumes (or skips)
finished work.

    python -m experiments.pipeline --runs=runs
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from research.training.metrics import read_metrics


def run_stage(config: str, workdir: str, *overrides: str) -> list[dict]:
  """Runs `python -m research.main` for one stage; returns its metrics rows."""
  cmd = [sys.executable, '-m', 'research.main', f'--config={config}', f'--workdir={workdir}', *overrides]
  print('$ ' + ' '.join(cmd), flush=True)
  rc = subprocess.call(cmd)
  if rc:
    sys.exit(rc)
  return read_metrics(workdir)


def first_and_last(rows: list[dict], key: str) -> tuple[dict, dict]:
  """The first and last metrics rows that hold `key`."""
  hits = [r for r in rows if key in r]
  return hits[0], hits[-1]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--runs', default='runs', help='parent directory of the run directories')
  args = parser.parse_args()
  pre_dir, sft_dir, dpo_dir, rm_dir = (os.path.join(args.runs, s)
                                       for s in ('pretrain', 'sft', 'dpo', 'reward'))

  pre = run_stage('configs/pretrain.py:size=tiny', pre_dir)
  sft = run_stage('configs/sft.py:size=tiny', sft_dir, f'--config.init_from={pre_dir}')
  dpo = run_stage('configs/dpo.py:size=tiny', dpo_dir, f'--config.init_from={sft_dir}')
  rm = run_stage('configs/reward.py:size=tiny', rm_dir, f'--config.init_from={sft_dir}')

  a, b = first_and_last(pre, 'eval/loss')
  print(f'\npretrain: validation loss {a["eval/loss"]:.3f} (step {a["step"]}) -> '
        f'{b["eval/loss"]:.3f} (step {b["step"]}), {100 * b["eval/loss"] / a["eval/loss"]:.0f}% '
        f'of the start (perplexity {a["eval/perplexity"]:.0f} -> {b["eval/perplexity"]:.1f})')
  a, b = first_and_last(sft, 'eval/exact_match')
  families = sorted(k.split('/')[-1] for k in b if k.startswith('eval/exact_match/'))
  per = ', '.join(f'{f} {100 * a["eval/exact_match/" + f]:.0f} -> {100 * b["eval/exact_match/" + f]:.0f}'
                  for f in families)
  print(f'sft: held-out exact match {100 * a["eval/exact_match"]:.1f}% -> '
        f'{100 * b["eval/exact_match"]:.1f}% ({per}); response loss '
        f'{a["eval/loss"]:.3f} -> {b["eval/loss"]:.3f}')
  a, b = first_and_last(dpo, 'eval/rewards/accuracies')
  print(f'dpo: held-out preference accuracy {a["eval/rewards/accuracies"]:.3f} -> '
        f'{b["eval/rewards/accuracies"]:.3f} (reward margin {b["eval/rewards/margins"]:.2f}); '
        f'task exact match {100 * a["eval/exact_match"]:.1f}% -> {100 * b["eval/exact_match"]:.1f}%')
  a, b = first_and_last(rm, 'eval/accuracy')
  print(f'reward model: held-out pairwise accuracy {a["eval/accuracy"]:.3f} -> {b["eval/accuracy"]:.3f} '
        f'(margin {b["eval/margin"]:.2f})')


if __name__ == '__main__':
  main()
