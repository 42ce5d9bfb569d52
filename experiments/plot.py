"""Curves of runs from their metrics.jsonl, one panel per metric, one line per run.

    python -m experiments.plot runs/sft runs/sft_lora --metric=eval/loss,eval/exact_match --out=sft.png

The functions are the sweep runner's (experiments/sweep.py) and `make run`'s
summary picture too.
"""

from __future__ import annotations

import argparse
import os

from research.training.metrics import read_metrics


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')  # files only: no display needed
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def curve(rows: list[dict], metric: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `metric` in metrics rows, in step order."""
  points = sorted((r['step'], r[metric]) for r in rows if metric in r and 'step' in r)
  return [s for s, _ in points], [v for _, v in points]


def plot_curves(runs: dict[str, list[dict]], metrics: list[str], out: str, title: str = '') -> int:
  """Draws `metrics` (one panel each) of every run (label -> metrics rows) into
  the PNG `out`; returns the number of curves drawn. A run without a metric is
  left out of that panel."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
  drawn = 0
  for ax, metric in zip(axes[0], metrics):
    for label, rows in runs.items():
      steps, values = curve(rows, metric)
      if steps:
        ax.plot(steps, values, marker='.' if len(steps) < 20 else None, label=label)
        drawn += 1
    ax.set_xlabel('step')
    ax.set_title(metric)
    ax.grid(alpha=0.3)
    if len(runs) > 1:
      ax.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return drawn


def plot_stages(panels, out: str) -> int:
  """One panel per (title, metrics rows, metric) into the PNG `out` (the pipeline's
  summary: each stage's held-out curve); returns the number of curves drawn."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
  drawn = 0
  for ax, (title, rows, metric) in zip(axes[0], panels):
    steps, values = curve(rows, metric)
    if steps:
      ax.plot(steps, values, marker='o')
      drawn += 1
    ax.set_title(f'{title}\n{metric}', fontsize=9)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return drawn


def plot_points(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, out: str) -> int:
  """One line per series (label -> [(x, y)]) into the PNG `out`, x on a log scale
  when it spans more than a factor of 10; returns the number of lines."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.6))
  xs = [x for pts in series.values() for x, _ in pts]
  for label, pts in series.items():
    pts = sorted(pts)
    ax.plot([x for x, _ in pts], [y for _, y in pts], marker='o', label=label)
  if xs and min(xs) > 0 and max(xs) / min(xs) > 10:
    ax.set_xscale('log')
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  if len(series) > 1:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return len(series)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('runs', nargs='+', help='run directories (each with metrics.jsonl)')
  parser.add_argument('--metric', default='eval/loss', help='comma-separated metrics, one panel each')
  parser.add_argument('--out', default='plot.png')
  args = parser.parse_args()
  runs = {os.path.basename(os.path.normpath(r)): read_metrics(r) for r in args.runs}
  n = plot_curves(runs, args.metric.split(','), args.out)
  print(f'{args.out}: {n} curves')


if __name__ == '__main__':
  main()
