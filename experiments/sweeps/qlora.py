"""# QLoRA: LoRA on an NF4 base against LoRA on the float32 base (tiny preset, 2-core CPU)

From `make run`'s tiny pretraining run (runs/pretrain, 1000 steps), the same 1200
SFT steps on the same data (`configs/sft.py:size=tiny,mode=lora`: alpha 16, lr
1e-2), with the frozen base kept in float32 or NF4 (4.5 bits per layer weight;
embeddings and norms stay float32, research/models/quant.py). Two LoRA layouts:
the LoRA preset's (rank 8 on q, k, v, o, up and down: `attention_up_down`) and
QLoRA's recipe (Dettmers et al., 2023: adapters on every linear layer,
`all_linear`, here at rank 16; this is `mode=qlora`). The metric is greedy exact
match on the 300 held-out generated tasks; wall time is the whole stage
(dequantizing each layer's weights costs time on the CPU).

    python -m experiments.sweep --sweep=experiments/sweeps/qlora.py [--set init_from=OTHER]

Measured 2026-12-01 on the 2-core VM; one seed per row. **With QLoRA's recipe the
NF4 base costs 2.0 points** (88.7% -> 86.7%, eval loss +0.007; issue 16 asks for at
most 3). With the LoRA preset's layout it costs 10 points at rank 8 (73.7 -> 63.7)
and at rank 16 (80.3 on float32, experiments/results/sft_lora.md -> 70.0), nearly
all in `add`, whose accuracy is still climbing steeply at step 1200, although the
loss cost is as small (0.0076 nats at step 0, 0.014 at step 1200): adapters on
every matrix, the gate included, can absorb the quantization error of each; on
fewer matrices the error of the others stays. Per family (float32 -> NF4,
all_linear r16): add 78 -> 67, reverse 100 -> 100, sort 88 -> 93; a second seed
was not run, so the 2-point gap carries the run-to-run spread of single runs.
The first three rows' wall times were measured while `make run` shared the cores.
"""

CONFIG = 'configs/sft.py:size=tiny,mode=lora'
POINTS = [{}, {'lora.quantize_base': 'nf4'}, {'lora.rank': 16, 'lora.quantize_base': 'nf4'},
          {'lora.rank': 16, 'lora.targets': 'all_linear'},
          {'lora.rank': 16, 'lora.targets': 'all_linear', 'lora.quantize_base': 'nf4'}]
SET = {'init_from': 'runs/pretrain'}
METRIC = 'eval/exact_match'
OUT = 'runs/qlora'
TABLE = 'experiments/results/qlora.md'
