"""# Full SFT vs LoRA on the embedded tasks (tiny preset, 2-core CPU)

Full SFT against LoRA ranks 4, 8 and 16, each from the same tiny pretraining run
(`make run`'s runs/pretrain, 1000 steps) for the same 1200 steps on the same data.
LoRA preset (`configs/sft.py:size=tiny,mode=lora`): targets `attention_up_down`
(q, k, v, o and the MLP's up and down projections), alpha 16, lr 1e-2. The metric is
greedy exact match on the 300 held-out generated tasks (add, reverse, sort);
wall time is the whole stage (data, compile, training, evaluation).

    python -m experiments.sweep --sweep=experiments/sweeps/sft_lora.py [--set init_from=OTHER]
"""

CONFIG = 'configs/sft.py:size=tiny'
POINTS = [{'config:mode': 'full'},
          {'config:mode': 'lora', 'lora.rank': 4},
          {'config:mode': 'lora', 'lora.rank': 8},
          {'config:mode': 'lora', 'lora.rank': 16}]
SET = {'init_from': 'runs/pretrain'}
METRIC = 'eval/exact_match'
OUT = 'runs/sft_lora'
TABLE = 'experiments/results/sft_lora.md'
