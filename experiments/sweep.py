"""Sweeps: a grid of config overrides, each point an ordinary run directory.

    python -m experiments.sweep --config=configs/sft.py:size=tiny \
        --grid lora.rank=4,8,16 --grid optimizer.lr=1e-3,3e-3 [--set key=value ...] \
        --out=sweeps/NAME [--metric=eval/loss] [--list | --report]

Every point (the cartesian product of the --grid values) runs
`python -m research.main --config=... --workdir=OUT/<point> --config.<key>=<value> ...`
with the --set overrides too. Re-running the same command skips finished points
(OUT/<point>/sweep_point.json) and resumes an interrupted one from its
checkpoint, so a killed sweep finishes with the same results. `--list` prints
the commands of the unfinished points (for a scheduler or a job array) instead
of running them. A `seed` grid axis gives the mean and spread over seeds.

At the end, and with `--report` at any time, OUT holds:
  results.md             one row per point: varied keys, final metrics, wall time, tokens/s
                         (and, with several seeds, mean +- std over them)
  <metric>_vs_<key>.png  the final metric against each varied key, a line per other setting
  curves.png             the metric's curve of every point
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

from experiments import plot
from research.training.metrics import read_metrics

MARKER = 'sweep_point.json'


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
  """['lora.rank=4,8', 'seed=0,1'] -> {'lora.rank': ['4', '8'], 'seed': ['0', '1']}."""
  grid = {}
  for spec in specs:
    key, sep, values = spec.partition('=')
    if not sep or not values:
      raise SystemExit(f'--grid {spec!r}: write key=value1,value2,...')
    grid[key.removeprefix('config.')] = values.split(',')
  return grid


def points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
  """Every combination of the grid's values, in the order given (last key fastest)."""
  keys = list(grid)
  return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def point_name(point: dict[str, str]) -> str:
  """A directory name for a point: 'lora.rank=4,optimizer.lr=1e-3'."""
  return re.sub(r'[^A-Za-z0-9._=,+-]', '-', ','.join(f'{k}={v}' for k, v in point.items())) or 'default'


def command(config: str, workdir: str, overrides: dict[str, str]) -> list[str]:
  """The research.main command line of one point."""
  return [sys.executable, '-m', 'research.main', f'--config={config}', f'--workdir={workdir}',
          *(f'--config.{k}={v}' for k, v in overrides.items())]


def run_point(cmd: list[str], workdir: str) -> None:
  """Runs (or resumes) one point; marks it finished with its wall time."""
  print('$ ' + shlex.join(cmd), flush=True)
  t0 = time.time()
  rc = subprocess.call(cmd)
  if rc:
    sys.exit(f'{workdir}: exit status {rc}; re-run the sweep to resume it')
  with open(os.path.join(workdir, MARKER), 'w') as f:
    json.dump({'command': cmd, 'wall_s': time.time() - t0}, f)


def final_metrics(rows: list[dict], metric: str) -> dict[str, float]:
  """The chosen metric and the top-level eval/* metrics of the last row holding
  `metric`, and the final train/loss."""
  hits = [r for r in rows if metric in r]
  out = {}
  if hits:
    out.update({k: v for k, v in hits[-1].items() if k == metric or (k.startswith('eval/') and k.count('/') == 1)})
  losses = [r['train/loss'] for r in rows if 'train/loss' in r]
  if losses:
    out['train/loss'] = losses[-1]
  return out


def _number(value: str) -> float | None:
  try:
    return float(value)
  except ValueError:
    return None


def report(out: str, grid: dict[str, list[str]], metric: str) -> str:
  """Writes results.md and the plots of the finished points; returns the table."""
  finished = []
  for point in points(grid):
    workdir = os.path.join(out, point_name(point))
    if os.path.exists(os.path.join(workdir, MARKER)):
      with open(os.path.join(workdir, MARKER)) as f:
        mark = json.load(f)
      rows = read_metrics(workdir)
      speeds = [r['train/tokens_per_sec'] for r in rows if 'train/tokens_per_sec' in r][1:]  # skip compile
      finished.append((point, rows, final_metrics(rows, metric), mark['wall_s'],
                       statistics.mean(speeds) if speeds else float('nan')))
  if not finished:
    return ''
  keys = list(grid)
  columns = sorted({k for _, _, m, _, _ in finished for k in m}, key=lambda k: (k != metric, k))
  lines = ['| ' + ' | '.join(keys + columns + ['wall (s)', 'tokens/s']) + ' |',
           '|' + ' --- |' * (len(keys) + len(columns) + 2)]
  for point, _, m, wall, tps in finished:
    cells = [point[k] for k in keys] + [f'{m[c]:.4f}' if c in m else '-' for c in columns]
    lines.append('| ' + ' | '.join(cells + [f'{wall:.0f}', f'{tps:,.0f}']) + ' |')
  table = '\n'.join(lines)
  if len(grid.get('seed', [])) > 1:
    table += '\n\n' + _over_seeds(finished, [k for k in keys if k != 'seed'], columns)
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write(f'# Sweep {os.path.basename(os.path.normpath(out))}\n\n{table}\n')

  label = lambda point, skip: ','.join(f'{k}={v}' for k, v in point.items() if k != skip) or 'all'
  safe = metric.replace('/', '_')
  for key in (k for k in keys if k != 'seed' and len(grid[k]) > 1):
    order = {v: i for i, v in enumerate(grid[key])}
    series: dict[str, list[tuple[float, float]]] = {}
    for point, _, m, _, _ in finished:
      if metric in m:
        x = _number(point[key]) if all(_number(v) is not None for v in grid[key]) else order[point[key]]
        series.setdefault(label(point, key), []).append((x, m[metric]))
    plot.plot_points(series, key, metric, os.path.join(out, f'{safe}_vs_{key}.png'))
  plot.plot_curves({label(p, ''): rows for p, rows, _, _, _ in finished}, [metric],
                   os.path.join(out, 'curves.png'))
  return table


def _over_seeds(finished, keys: list[str], columns: list[str]) -> str:
  """Mean +- std (over seeds) of each metric, one row per setting of `keys`."""
  groups: dict[tuple, list[dict]] = {}
  for point, _, m, _, _ in finished:
    groups.setdefault(tuple(point[k] for k in keys), []).append(m)
  lines = ['| ' + ' | '.join(keys + columns + ['seeds']) + ' |', '|' + ' --- |' * (len(keys) + len(columns) + 1)]
  for setting, ms in groups.items():
    cells = []
    for c in columns:
      vals = [m[c] for m in ms if c in m]
      spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
      cells.append(f'{statistics.mean(vals):.4f} +- {spread:.4f}' if vals else '-')
    lines.append('| ' + ' | '.join(list(setting) + cells + [str(len(ms))]) + ' |')
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help="config file and argument, e.g. 'configs/sft.py:size=tiny'")
  parser.add_argument('--grid', action='append', default=[], help='key=v1,v2,... (repeatable)')
  parser.add_argument('--set', action='append', default=[], help='key=value for every point (repeatable)')
  parser.add_argument('--out', required=True, help='the sweep directory')
  parser.add_argument('--metric', default='eval/loss', help='the metric of the table and plots')
  parser.add_argument('--list', action='store_true', help='print the unfinished points\' commands and stop')
  parser.add_argument('--report', action='store_true', help='write the table and plots of finished points')
  args = parser.parse_args()
  grid = parse_grid(args.grid)
  fixed = dict(s.partition('=')[::2] for s in args.set)
  os.makedirs(args.out, exist_ok=True)
  if not args.report:
    for point in points(grid):
      workdir = os.path.join(args.out, point_name(point))
      if os.path.exists(os.path.join(workdir, MARKER)):
        continue
      cmd = command(args.config, workdir, {**fixed, **point})
      if args.list:
        print(shlex.join(cmd))
      else:
        run_point(cmd, workdir)
    if args.list:
      return
  table = report(args.out, grid, args.metric)
  print(f'\n{table}\n\n{args.out}/results.md and plots written' if table else 'no finished points yet')


if __name__ == '__main__':
  main()
