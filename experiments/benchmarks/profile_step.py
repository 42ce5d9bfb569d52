"""Per-op profile of the train step: XLA (JAX) against PyTorch eager, same model and batch.

    python -m experiments.benchmarks.profile_step                 # both, reference CPU model
    python -m experiments.benchmarks.profile_step --no-torch      # JAX only
    python -m experiments.benchmarks.profile_step --top=30 --steps=5 --dump=/tmp/step_prof

JAX side: the jitted `Trainer.train_step` on the benchmark's reference model
(experiments/benchmarks/train_step.py: d256 L4 H4 V8000, batch 16 x 256, float32,
AdamW) runs `--steps` times under `jax.profiler.trace`; the XPlane is read
back with `jax.profiler.ProfileData`. On CPU every executed HLO instruction
(thunk) is one event carrying the `hlo_op` stat; durations are summed per
instruction and joined with the optimized HLO text (`compiled.as_text()`) for
its kind (dot / YNN library fusion, loop fusion, copy/transpose, reduce, ...),
output shape and source op (the `op_name` metadata: jvp(...) = forward,
transpose(jvp(...)) = backward). Printed:

  1. the top HLO instructions by time,
  2. the same grouped by source op with the layer index dropped
     (`layers_*/attn/q/dot_general`, forward and backward separately),
  3. totals per kind.

Thunks may run concurrently on the two cores (XLA's thunk executor runs
independent instructions in parallel, e.g. the gate and up matmuls, each
fanning out to the thread pool): an op's "ms/step" is its share of wall time
(each instant split evenly among the ops running then; these sum to the busy
wall time), "busy ms" its own summed duration. Caveat: matmuls left to Eigen
(kind "dot", not "ynn dot") run asynchronously on the thread pool, so their
event is mostly the dispatch and their compute shows up in whatever op runs
alongside (e.g. the output layer's kernel gradient inside the output layer's
input-gradient matmul).

PyTorch side (unless --no-torch): torch.profiler over the eager step of
experiments/benchmarks/torch_reference.py; the table is self CPU time per aten op.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile
import time

from experiments.benchmarks.train_step import (REF_BATCH, REF_SEQ, REFERENCE, compiled_step,
                                                 time_steps, torch_step)
from research.training import host_memory

_INSTR = re.compile(r'^\s*(?:ROOT )?%(\S+) = (\S+?) ([a-z][a-z0-9-]*)\((.*)$')
_COMP = re.compile(r'^(?:ENTRY )?%(\S+) .*\{\s*$')


def parse_hlo(text: str):
  """Instructions of optimized HLO text: name -> dict(opcode, shape, kind, calls, op_name),
  and computation name -> list of opcodes in it."""
  instrs, comps, current = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m:
      current = m.group(1)
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, opcode, rest = m.groups()
    get = lambda key, r=rest: (re.search(key + r'=([^,\s}]+)', r) or [None, None])[1]
    op_name = re.search(r'op_name="([^"]*)"', rest)
    instrs[name] = dict(opcode=opcode, shape=shape.split('{')[0], kind=get('kind'),
                        calls=(get('calls') or '').lstrip('%'), op_name=op_name.group(1) if op_name else '',
                        library='__ynn_fusion' in rest and 'ynn' or ('__xnn_fusion' in rest and 'xnn') or '')
    if current:
      comps[current].append(opcode)
  return instrs, comps


def classify(instr, comps) -> str:
  """Coarse kind of one executed HLO instruction."""
  if instr is None:
    return '?'
  op = instr['opcode']
  if op != 'fusion':
    return {'transpose': 'copy/transpose', 'copy': 'copy/transpose'}.get(op, op)
  inner = set(comps.get(instr['calls'], ()))
  lib = f"{instr['library']} " if instr['library'] else ''
  if 'dot' in inner or 'convolution' in inner:
    return f'{lib}dot'
  for k in ('scatter', 'gather', 'reduce', 'reduce-window', 'dynamic-update-slice', 'concatenate'):
    if k in inner:
      return f'{lib}{k}'
  if inner and inner <= {'parameter', 'copy', 'transpose', 'bitcast', 'reshape', 'broadcast', 'constant'}:
    return 'copy/transpose' if inner & {'copy', 'transpose'} else 'broadcast'
  if 'transpose' in inner or 'copy' in inner:
    return f'{lib}elementwise+transpose'
  return f'{lib}elementwise'


def source(op_name: str) -> str:
  """'jit(train_step)/transpose(jvp(Transformer))/layers_0/attn/q/dot_general' ->
  'bwd layers_*/attn/q/dot_general'."""
  s = op_name.replace('jit(train_step)/', '')
  phase = 'bwd' if s.startswith('transpose(') else ('fwd' if s.startswith('jvp(') else 'opt')
  s = re.sub(r'^(transpose\()?jvp\([^)]*\)\)?/?', '', s)
  s = re.sub(r'layers_\d+', 'layers_*', s)
  return f'{phase} {s or "(top)"}'


def profile_jax(steps: int, dump: str, attention: str):
  import jax  # pylint: disable=import-outside-toplevel
  t, state, frozen, b, compiled, _ = compiled_step(dict(REFERENCE, attention_impl=attention),
                                                   REF_BATCH, REF_SEQ)
  with t.mesh_context():
    state, wall = time_steps(compiled, state, b, frozen, steps, warmup=3)
    with jax.profiler.trace(dump):
      for _ in range(steps):
        state, _ = compiled(state, b, frozen)
      jax.block_until_ready(state)
  hlo = compiled.as_text()
  with open(f'{dump}/train_step.hlo.txt', 'w') as f:
    f.write(hlo)
  instrs, comps = parse_hlo(hlo)
  xplane = sorted(glob.glob(f'{dump}/**/*.xplane.pb', recursive=True))[-1]
  events = []  # (start, end, hlo op)
  for plane in jax.profiler.ProfileData.from_file(xplane).planes:
    for line in plane.lines:
      for ev in line.events:
        stats = dict(ev.stats)
        if stats.get('hlo_module') == 'jit_train_step' and 'hlo_op' in stats:
          events.append((ev.start_ns, ev.start_ns + ev.duration_ns, stats['hlo_op']))
  own, busy, calls = attribute_wall_time(events)
  rows = []
  for name, ns in own.items():
    ins = instrs.get(name)
    rows.append(dict(name=name, ms=ns / 1e6 / steps, busy_ms=busy[name] / 1e6 / steps, calls=calls[name] / steps,
                     kind=classify(ins, comps), shape=ins['shape'] if ins else '?',
                     src=source(ins['op_name']) if ins else '?'))
  return rows, wall


def attribute_wall_time(events):
  """Per op: wall time shared out among the ops running at each instant (sums to
  the busy wall time), its own summed duration, and its number of runs."""
  own, busy, calls = collections.Counter(), collections.Counter(), collections.Counter()
  points = []
  for start, end, name in events:
    points += [(start, 1, name), (end, -1, name)]
    busy[name] += end - start
    calls[name] += 1
  points.sort(key=lambda p: (p[0], p[1]))
  active, last = collections.Counter(), None
  for t, delta, name in points:
    n = sum(active.values())
    if n and last is not None:
      for op, k in active.items():
        own[op] += (t - last) * k / n
    active[name] += delta
    if not active[name]:
      del active[name]
    last = t
  return own, busy, calls


def profile_torch(steps: int):
  import torch  # pylint: disable=import-outside-toplevel
  step, _, inputs, targets = torch_step()
  for _ in range(3):
    step(inputs, targets)
  t0 = time.perf_counter()
  for _ in range(steps):
    step(inputs, targets)
  wall = (time.perf_counter() - t0) / steps
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
    for _ in range(steps):
      step(inputs, targets)
  rows = []
  for e in prof.key_averages(group_by_input_shape=True):
    if e.self_cpu_time_total > 0:
      shapes = ' '.join('x'.join(map(str, s)) for s in e.input_shapes if s)[:60]
      rows.append(dict(name=e.key, ms=e.self_cpu_time_total / 1e3 / steps, calls=e.count / steps, shape=shapes))
  return rows, wall


def _print_table(title, rows, cols, top, total):
  print(f'\n{title}')
  print('| ' + ' | '.join(c for c, _ in cols) + ' | ms/step | share |')
  print('|' + ' --- |' * (len(cols) + 2))
  for r in sorted(rows, key=lambda r: -r['ms'])[:top]:
    print('| ' + ' | '.join(fmt(r) for _, fmt in cols) + f' | {r["ms"]:.1f} | {100 * r["ms"] / total:.1f}% |')


def _group(rows, key):
  out = collections.defaultdict(lambda: dict(ms=0.0, calls=0.0, kinds=set(), shapes=set()))
  for r in rows:
    g = out[key(r)]
    g['ms'] += r['ms']
    g['calls'] += r['calls']
    g['kinds'].add(r.get('kind', ''))
    g['shapes'].add(r.get('shape', ''))
  return [dict(v, key=k) for k, v in out.items()]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--top', type=int, default=20)
  parser.add_argument('--attention', default='einsum')
  parser.add_argument('--dump', default='', help='trace directory (default: a temp dir)')
  parser.add_argument('--no-torch', dest='torch', action='store_false')
  args = parser.parse_args()
  host_memory.reexec_with_huge_pages()  # as research.main runs (both sides then have them)
  dump = args.dump or tempfile.mkdtemp(prefix='profile_step_')

  rows, wall = profile_jax(args.steps, dump, args.attention)
  total = sum(r['ms'] for r in rows)
  print(f'JAX train step: wall {1000 * wall:.0f} ms/step ({REF_BATCH * REF_SEQ / wall:,.0f} tokens/s); '
        f'HLO ops busy {total:.0f} ms/step ({len(rows)} instructions); trace + HLO in {dump}')
  _print_table(f'Top {args.top} HLO instructions', rows,
               [('instruction', lambda r: r['name']), ('kind', lambda r: r['kind']),
                ('busy ms', lambda r: f'{r["busy_ms"]:.1f}'),
                ('shape', lambda r: r['shape']), ('source op', lambda r: r['src'])], args.top, total)
  _print_table(f'Top {args.top} source ops (all layers together)', _group(rows, lambda r: r['src']),
               [('source op', lambda r: r['key']), ('kinds', lambda r: ', '.join(sorted(r['kinds']))),
                ('calls', lambda r: f'{r["calls"]:.0f}')], args.top, total)
  _print_table('By kind', _group(rows, lambda r: r['kind']),
               [('kind', lambda r: r['key']), ('calls', lambda r: f'{r["calls"]:.0f}')], 100, total)
  phase = _group(rows, lambda r: r['src'].split(' ')[0])
  _print_table('By phase (fwd = forward, bwd = backward, opt = loss scaling, clipping, AdamW)', phase,
               [('phase', lambda r: r['key'])], 10, total)

  if args.torch:
    trows, twall = profile_torch(args.steps)
    ttotal = sum(r['ms'] for r in trows)
    print(f'\nPyTorch eager step: wall {1000 * twall:.0f} ms/step ({REF_BATCH * REF_SEQ / twall:,.0f} tokens/s); '
          f'summed self CPU time {ttotal:.0f} ms/step')
    _print_table(f'Top {args.top} aten ops (self CPU time, by input shapes)', trows,
                 [('op', lambda r: r['name']), ('input shapes', lambda r: r['shape']),
                  ('calls', lambda r: f'{r["calls"]:.0f}')], args.top, ttotal)
    _print_table(f'Top {args.top} aten ops (self CPU time)', _group(trows, lambda r: r['name']),
                 [('op', lambda r: r['key']), ('calls', lambda r: f'{r["calls"]:.0f}')], args.top, ttotal)
    print(f'\nwall ratio JAX / torch eager tokens/s: {twall / wall:.2f}')


if __name__ == '__main__':
  main()
