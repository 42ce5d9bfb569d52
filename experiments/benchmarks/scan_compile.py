"""Compile time of the train step with and without `model.scan_layers`.

    python -m experiments.benchmarks.scan_compile [--layers=16]

Builds the tiny preset with --layers layers and compiles its train step on
abstract inputs (nothing is trained), once with the layers unrolled and once
stacked under nn.scan, and prints a table.
"""

from __future__ import annotations

import argparse
import time

import jax

from configs import pretrain
from research.stages import pretrain as pretrain_stage
from research.training.dry_run import abstract_batch
from research.training.trainer import Trainer


def compile_seconds(layers: int, scan: bool) -> float:
  """Seconds to lower and compile the tiny train step."""
  c = pretrain.get_config('size=tiny')
  c.model.n_layers = layers
  c.model.scan_layers = scan
  c.mesh.data = 1
  trainer = Trainer(c, pretrain_stage.stage(c), devices=jax.devices()[:1])
  t0 = time.time()
  with trainer.mesh_context():
    trainer.train_step.lower(trainer.abstract_state, abstract_batch(trainer), {}).compile()
  return time.time() - t0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--layers', type=int, default=16)
  args = parser.parse_args()
  rows = [(scan, compile_seconds(args.layers, scan)) for scan in (False, True)]
  print(f'| tiny preset, {args.layers} layers | compile time (s) |')
  print('| --- | --- |')
  for scan, sec in rows:
    print(f'| scan_layers={scan} | {sec:.1f} |')
  print(f'ratio unrolled / scan: {rows[0][1] / rows[1][1]:.2f}')


if __name__ == '__main__':
  main()
