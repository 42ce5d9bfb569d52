"""Full SFT against LoRA ranks 4, 8, 16 on the embedded tasks (tiny preset).

    python -m experiments.sft_lora_sweep --runs=runs [--pretrain=runs/pretrain]

Every variant starts from the same pretraining run and trains for the same
steps; the table (written to experiments/results/sft_lora.md) gives held-out
exact match before and after, trainable parameters and wall-clock time.
"""

from __future__ import annotations

import argparse
import os
import time

from experiments.pipeline import first_and_last, run_stage

VARIANTS = (('full', 'mode=full', ()), ('lora r4', 'mode=lora', ('--config.lora.rank=4',)),
            ('lora r8', 'mode=lora', ('--config.lora.rank=8',)),
            ('lora r16', 'mode=lora', ('--config.lora.rank=16',)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--runs', default='runs')
  parser.add_argument('--pretrain', default='', help='pretraining workdir (default: RUNS/pretrain)')
  parser.add_argument('--out', default='experiments/results/sft_lora.md')
  args = parser.parse_args()
  pre = args.pretrain
  if not pre:  # the pipeline's pretraining run (resumed or skipped when already done)
    pre = os.path.join(args.runs, 'pretrain')
    run_stage('configs/pretrain.py:size=tiny', pre)

  rows = []
  for name, mode, extra in VARIANTS:
    workdir = os.path.join(args.runs, 'sft_sweep', name.replace(' ', '_'))
    t0 = time.time()
    metrics = run_stage(f'configs/sft.py:size=tiny,{mode}', workdir, f'--config.init_from={pre}', *extra)
    seconds = time.time() - t0
    a, b = first_and_last(metrics, 'eval/exact_match')
    trainable = next(r['train/trainable_params'] for r in metrics if 'train/trainable_params' in r)
    rows.append((name, int(trainable), a['eval/exact_match'], b['eval/exact_match'], seconds))

  full_gain = rows[0][3] - rows[0][2]
  lines = ['| variant | trainable params | exact match before | after | gain | gain / full gain | time (s) |',
           '| --- | --- | --- | --- | --- | --- | --- |']
  for name, n, before, after, sec in rows:
    rel = (after - before) / full_gain if full_gain else float('nan')
    lines.append(f'| {name} | {n:,} | {100 * before:.1f}% | {100 * after:.1f}% | '
                 f'{100 * (after - before):+.1f} | {rel:.2f} | {sec:.0f} |')
  table = '\n'.join(lines)
  print('\n' + table)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    f.write('# Full SFT vs LoRA on the embedded tasks (tiny preset, 2-core CPU)\n\n'
            'Command: `python -m experiments.sft_lora_sweep --runs=runs`\n\n'
            'Held-out exact match on the generated tasks (add, reverse, sort; 300 questions), '
            'greedy decoding. Time is wall-clock for the whole stage (data, compile, training, '
            'evaluation).\n\n' + table + '\n')


if __name__ == '__main__':
  main()
