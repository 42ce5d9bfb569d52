"""# QLoRA: LoRA on an NF4 or int8 base against LoRA on the float32 base (tiny preset, 2-core CPU)

LoRA rank 8 (the `configs/sft.py:size=tiny,mode=lora` preset: targets
`attention_up_down`, alpha 16, lr 1e-2) from `make run`'s tiny pretraining run
(runs/pretrain, 1000 steps), for the same 1200 SFT steps on the same data, with
the frozen base kept in float32, NF4 (4.5 bits per layer weight) or int8 (8.5
bits); embeddings and norms stay float32 (research/models/quant.py). The metric
is greedy exact match on the 300 held-out generated tasks; wall time is the
whole stage (dequantizing each layer's weights costs time on the CPU).

    python -m experiments.sweep --sweep=experiments/sweeps/qlora.py [--set init_from=OTHER]
"""

CONFIG = 'configs/sft.py:size=tiny,mode=lora'
POINTS = [{}, {'lora.quantize_base': 'nf4'}, {'lora.quantize_base': 'int8'}]
SET = {'init_from': 'runs/pretrain'}
METRIC = 'eval/exact_match'
OUT = 'runs/qlora'
TABLE = 'experiments/results/qlora.md'
