"""Held-out preference accuracy of a DPO or reward run, per family and kind of error.

    python -m experiments.preference_breakdown --workdir=runs/dpo     # or runs/reward

Scores every validation pair of the embedded 'pref_tasks' and 'pref_code'
datasets (not just the few eval batches the trainer logs) and prints a table:
for a reward run, the share of pairs whose chosen reply gets the higher reward;
for a DPO run, the share whose implicit reward beta * log(pi / pi_ref) is
higher for the chosen reply (TRL's rewards/accuracies), with pi_ref the
run's reference (its init_from, or with LoRA the base with adapters off). A tie
counts one half, as in research.losses.pairwise_accuracy.
"""

from __future__ import annotations

import argparse
import collections
import json

import jax
import numpy as np

from research import rewards
from research.data import pairs, pref_sources
from research.stages import dpo
from research.training.init import load_params


def validation_rows() -> list[dict]:
  """Every held-out preference pair of the embedded datasets, with family and kind."""
  return ([r for _, r in pref_sources.task_pairs('validation', 100)] +
          [r for _, r in pref_sources.code_pairs(split_validation=True)])


def dpo_margins(workdir: str, rows: list[dict]) -> np.ndarray:
  """log(pi/pi_ref)(chosen) - log(pi/pi_ref)(rejected) for each row (0, a tie, for a
  pair the DPO pipeline skips because its replies differ only beyond seq_len)."""
  run = load_params(workdir)
  reference = run.initial_params()  # as in training: init_from's, or with LoRA the base, adapters off
  logps = jax.jit(lambda p, b: dpo.pair_logps(run.model, p, b)[:2])
  render = pairs.RenderPair(run.tokenizer, run.config.seq_len)
  out = []
  for row in rows:  # one pair per batch: no padding beyond the pair itself
    arrays = render.map({'json': json.dumps(row)})
    if arrays is None:
      out.append(0.0)
      continue
    batch = {k: v[None] for k, v in arrays.items()}
    pc, pr = logps(run.params, batch)
    rc, rr = logps(reference, batch)
    out.append(float((pc - rc)[0] - (pr - rr)[0]))
  return np.asarray(out)


def reward_margins(workdir: str, rows: list[dict]) -> np.ndarray:
  """r(chosen) - r(rejected) for each row."""
  rm = rewards.load_reward_model(workdir)
  convos = [m for row in rows for m in pairs.pair_messages({'json': json.dumps(row)})]
  r = rm.score(convos).reshape(-1, 2)
  return r[:, 0] - r[:, 1]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--workdir', required=True, help='a dpo or reward run')
  args = parser.parse_args()
  with open(f'{args.workdir}/config.json') as f:
    stage = json.load(f)['stage']
  rows = validation_rows()
  margins = (reward_margins if stage == 'reward' else dpo_margins)(args.workdir, rows)
  hits = np.where(margins > 0, 1.0, np.where(margins == 0, 0.5, 0.0))  # a tie is half right
  groups = collections.defaultdict(list)
  for row, h in zip(rows, hits):
    groups[(row['family'], row['kind'])].append(h)
  print(f'{stage} run {args.workdir}: held-out pairs ranked correctly\n')
  print('| family | kind of error | pairs | accuracy |\n| --- | --- | --- | --- |')
  for family in ('add', 'reverse', 'sort', 'code'):
    in_family = [h for (f, _), v in groups.items() if f == family for h in v]
    for (f, kind), v in sorted(groups.items()):
      if f == family:
        print(f'| {family} | {kind} | {len(v)} | {np.mean(v):.3f} |')
    print(f'| **{family}** | all | {len(in_family)} | **{np.mean(in_family):.3f}** |')
  print(f'| **all** | | {len(hits)} | **{np.mean(hits):.3f}** |')


if __name__ == '__main__':
  main()
