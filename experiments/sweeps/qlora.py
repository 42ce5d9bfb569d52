"""# QLoRA: LoRA on an NF4 base against LoRA on the float32 base (tiny preset, 2-core CPU)

LoRA rank 8 (the `configs/sft.py:size=tiny,mode=lora` preset: targets
`attention_up_down`, alpha 16, lr 1e-2) from `make run`'s tiny pretraining run
(runs/pretrain, 1000 steps), for the same 1200 SFT steps on the same data, with
the frozen base kept in float32 or NF4 (4.5 bits per layer weight; embeddings
and norms stay float32, research/models/quant.py), and NF4 at rank 16 (LoRA r16
on the float32 base: 80.3%, experiments/results/sft_lora.md, the same config).
The metric is greedy exact match on the 300 held-out generated tasks; wall time
is the whole stage (dequantizing each layer's weights costs time on the CPU).

    python -m experiments.sweep --sweep=experiments/sweeps/qlora.py [--set init_from=OTHER]

Measured 2026-12-01 on the 2-core VM (wall times while `make run` shared the cores).
The float32 row reproduces experiments/results/sft_lora.md's r8 row exactly (73.7%,
eval loss 2.1087). NF4 costs 0.0076 nats of held-out response loss at step 0 (4.6145
against 4.6069; int8, in a run stopped early: 4.6074) and 0.014 (r8) / 0.028 (r16,
against 1.9565) at step 1200, but 10 points of exact match at both ranks (r8 73.7 ->
63.7, r16 80.3 -> 70.0); at r8 nearly all of it in `add` (38% -> 10%), whose
accuracy is still climbing steeply at step 1200. Issue 16 asks for within 3 points: not met on this preset.
"""

CONFIG = 'configs/sft.py:size=tiny,mode=lora'
POINTS = [{}, {'lora.quantize_base': 'nf4'}, {'lora.rank': 16, 'lora.quantize_base': 'nf4'}]
SET = {'init_from': 'runs/pretrain'}
METRIC = 'eval/exact_match'
OUT = 'runs/qlora'
TABLE = 'experiments/results/qlora.md'
