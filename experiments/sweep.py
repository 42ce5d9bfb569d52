"""Sweeps: a grid of config overrides, each point an ordinary run directory.

    python -m experiments.sweep --config=configs/sft.py:size=tiny \
        --grid lora.rank=4,8,16 --grid optimizer.lr=1e-3,3e-3 [--set key=value ...] \
        --out=sweeps/NAME [--metric=eval/loss] [--list | --report]

Every point (the cartesian product of the --grid values) runs
`python -m research.main --config=... --workdir=OUT/<point> --config.<key>=<value> ...`
with the --set overrides too. A key `config:<arg>` varies the config file's own
argument instead (`--grid config:mode=full,lora` runs configs/sft.py:size=tiny,mode=lora).

A sweep may also be a Python file (experiments/sweeps/*.py), run with
`python -m experiments.sweep --sweep=experiments/sweeps/sft_lora.py`: it names
CONFIG, and GRID ({key: [values]}) or POINTS (a list of {key: value}, for sweeps
that are not a product), and optionally SET ({key: value}), METRIC, OUT, and
TABLE (a results file written with the file's docstring, the command and the table).
Command-line flags override the file's values. Re-running the same command skips finished points
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


def values_of(pts: list[dict[str, str]]) -> dict[str, list[str]]:
  """{key: its distinct values in order of first appearance} over the points
  (a grid again, for a grid's points)."""
  grid: dict[str, list[str]] = {}
  for point in pts:
    for k, v in point.items():
      if v not in grid.setdefault(k, []):
        grid[k].append(v)
  return grid


def load_sweep_file(path: str) -> dict:
  """The sweep a Python file defines: config, points, set, metric, out, table."""
  import runpy  # pylint: disable=import-outside-toplevel
  if not os.path.exists(path):
    raise SystemExit(f'--sweep={path}: no such file')
  ns = runpy.run_path(path)
  if 'CONFIG' not in ns or ('GRID' in ns) == ('POINTS' in ns):
    raise SystemExit(f'{path}: define CONFIG, and one of GRID ({{key: [values]}}) or POINTS ([{{key: value}}])')
  as_str = lambda d: {k: str(v) for k, v in d.items()}
  pts = ([as_str(p) for p in ns['POINTS']] if 'POINTS' in ns
         else points({k: [str(v) for v in vs] for k, vs in ns['GRID'].items()}))
  return dict(config=ns['CONFIG'], points=pts, set=as_str(ns.get('SET', {})), metric=ns.get('METRIC', ''),
              out=ns.get('OUT', ''), table=ns.get('TABLE', ''), doc=(ns.get('__doc__') or '').strip())


def point_name(point: dict[str, str]) -> str:
  """A directory name for a point: 'lora.rank=4,optimizer.lr=1e-3' ('mode=lora' for 'config:mode')."""
  name = ','.join(f'{k.removeprefix("config:")}={v}' for k, v in point.items())
  return re.sub(r'[^A-Za-z0-9._=,+-]', '-', name) or 'default'


CONFIG_ARG = 'config:'  # a key naming an argument of the config file, not a config field


def command(config: str, workdir: str, overrides: dict[str, str]) -> list[str]:
  """The research.main command line of one point (`config:<arg>` keys join the
  config file's argument)."""
  args = [f'{k[len(CONFIG_ARG):]}={v}' for k, v in overrides.items() if k.startswith(CONFIG_ARG)]
  if args:
    config += (',' if ':' in config else ':') + ','.join(args)
  return [sys.executable, '-m', 'research.main', f'--config={config}', f'--workdir={workdir}',
          *(f'--config.{k}={v}' for k, v in overrides.items() if not k.startswith(CONFIG_ARG))]


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
  `metric`, the final train/loss, and the trainable parameter count."""
  hits = [r for r in rows if metric in r]
  out = {}
  if hits:
    out.update({k: v for k, v in hits[-1].items() if k == metric or (k.startswith('eval/') and k.count('/') == 1)})
  losses = [r['train/loss'] for r in rows if 'train/loss' in r]
  if losses:
    out['train/loss'] = losses[-1]
  counts = [r['train/trainable_params'] for r in rows if 'train/trainable_params' in r]
  if counts:
    out['train/trainable_params'] = counts[0]
  return out


def _number(value: str) -> float | None:
  try:
    return float(value)
  except ValueError:
    return None


def report(out: str, pts: list[dict[str, str]], metric: str) -> str:
  """Writes results.md and the plots of the finished points; returns the table."""
  grid = values_of(pts)
  finished = []
  for point in pts:
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
    cells = [point.get(k, '-') for k in keys] + [_cell(m[c]) if c in m else '-' for c in columns]
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
      if metric in m and key in point:
        x = _number(point[key]) if all(_number(v) is not None for v in grid[key]) else order[point[key]]
        series.setdefault(label(point, key), []).append((x, m[metric]))
    plot.plot_points(series, key, metric, os.path.join(out, f'{safe}_vs_{key.replace(CONFIG_ARG, "")}.png'))
  plot.plot_curves({label(p, ''): rows for p, rows, _, _, _ in finished}, [metric],
                   os.path.join(out, 'curves.png'))
  return table


def _cell(value: float) -> str:
  """A table cell: integers (parameter counts) with thousands separators, else 4 decimals."""
  return f'{int(value):,}' if float(value).is_integer() and abs(value) >= 1000 else f'{value:.4f}'


def _over_seeds(finished, keys: list[str], columns: list[str]) -> str:
  """Mean +- std (over seeds) of each metric, one row per setting of `keys`."""
  groups: dict[tuple, list[dict]] = {}
  for point, _, m, _, _ in finished:
    groups.setdefault(tuple(point.get(k, '-') for k in keys), []).append(m)
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
  parser.add_argument('--sweep', default='', help='a sweep file (experiments/sweeps/*.py) instead of --config/--grid')
  parser.add_argument('--config', default='', help="config file and argument, e.g. 'configs/sft.py:size=tiny'")
  parser.add_argument('--grid', action='append', default=[], help='key=v1,v2,... (repeatable)')
  parser.add_argument('--set', action='append', default=[], help='key=value for every point (repeatable)')
  parser.add_argument('--out', default='', help='the sweep directory')
  parser.add_argument('--metric', default='', help='the metric of the table and plots (default eval/loss)')
  parser.add_argument('--list', action='store_true', help='print the unfinished points\' commands and stop')
  parser.add_argument('--report', action='store_true', help='write the table and plots of finished points')
  args = parser.parse_args()
  spec = load_sweep_file(args.sweep) if args.sweep else dict(config='', points=[{}], set={}, metric='', out='',
                                                                 table='')
  config = args.config or spec['config']
  pts = points(parse_grid(args.grid)) if args.grid else spec['points']
  fixed = {**spec['set'], **{k.removeprefix('config.'): v for k, v in (s.partition('=')[::2] for s in args.set)}}
  out, metric = args.out or spec['out'], args.metric or spec['metric'] or 'eval/loss'
  if not config or not out:
    raise SystemExit('give --config and --out (or a --sweep file that names them)')
  os.makedirs(out, exist_ok=True)
  if not args.report:
    for point in pts:
      workdir = os.path.join(out, point_name(point))
      if os.path.exists(os.path.join(workdir, MARKER)):
        continue
      cmd = command(config, workdir, {**fixed, **point})
      if args.list:
        print(shlex.join(cmd))
      else:
        run_point(cmd, workdir)
    if args.list:
      return
  table = report(out, pts, metric)
  if table and spec['table']:  # the published copy: the sweep file's docstring, the command, the table
    with open(spec['table'], 'w') as f:
      f.write(f"{spec['doc']}\n\nCommand: `python -m experiments.sweep --sweep={args.sweep}`\n\n{table}\n")
  print(f'\n{table}\n\n{out}/results.md and plots written' if table else 'no finished points yet')


if __name__ == '__main__':
  main()
