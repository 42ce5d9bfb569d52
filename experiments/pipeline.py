"""The `make run` job: the stage pipeline on the embedded default data.

Today: pretrain the `tiny` preset on the Python standard library, then report
the validation loss at the start and the end and print samples. Each stage's
run directory lives under --runs; re-running resumes (or skips) finished work.

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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--runs', default='runs', help='parent directory of the run directories')
  args = parser.parse_args()
  rows = run_stage('configs/pretrain.py:size=tiny', os.path.join(args.runs, 'pretrain'))
  evals = [r for r in rows if 'eval/loss' in r]
  first, last = evals[0], evals[-1]
  ratio = last['eval/loss'] / first['eval/loss']
  print(f'\npretrain: validation loss {first["eval/loss"]:.3f} (step {first["step"]}) -> '
        f'{last["eval/loss"]:.3f} (step {last["step"]}), {100 * ratio:.0f}% of the start '
        f'(perplexity {first["eval/perplexity"]:.0f} -> {last["eval/perplexity"]:.1f})')


if __name__ == '__main__':
  main()
