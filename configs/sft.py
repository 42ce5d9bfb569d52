"""Supervised fine-tuning / instruction tuning, optionally with LoRA.

The CPU demo (after `configs/pretrain.py:size=tiny` wrote runs/pretrain):

    python -m research.main --config=configs/sft.py:size=tiny --workdir=runs/sft \
        --config.init_from=runs/pretrain

LoRA instead of full fine-tuning: --config.lora.rank=8 (targets: attention |
all_linear | a regex). From a HF checkpoint: --config.init_from=hf:/path/to/llama.
Presets: size=tiny|7b|8b, mode=full|lora|qlora (NF4 base, adapters on all linear layers),
family=llama|qwen3.

Data: data.name is one dataset or several joined by '+', mixed by
data.mix_weights: 'sft_tasks' (generated tasks with exact answers), 'sft_code'
(stdlib signature+docstring -> source), 'files' (data.files: JSONL rows with
messages, prompt/response or instruction/input/output) or a prepared TFDS name.
"""

import ml_collections

from configs import base


def get_config(arg=None):
  """Returns the SFT config for `arg` ('size=tiny,mode=full' by default)."""
  args = base.parse_arg(arg, size='tiny', mode='full', family='llama')
  c = base.base_config('sft', args['size'], args['family'])
  c.data.name = 'sft_tasks+sft_code'
  c.data.text_key = ''  # JSONL rows are kept whole and parsed as examples
  c.data.mix_weights = (0.9, 0.1)
  c.sft = ml_collections.ConfigDict(dict(
      loss_mask='assistant',  # assistant | completion | all
      packing=True,           # several examples per row (segment ids), else one padded
  ))
  c.task_eval = base.task_eval_config()
  c.sample.prompts = ('What is 12 + 30?', 'Reverse the letters: c o d e', 'Sort ascending: 9 4 7')
  c.sample.temperature = 0.0
  if args['size'] == 'tiny':
    # 1200 steps: the preference stages after it can only judge answers the model
    # can compute (experiments/results/sft_lora.md).
    c.steps = 1200
    c.eval_every = 600
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 30
    c.optimizer.weight_decay = 0.0
  else:
    c.steps = 2000
    c.optimizer.lr = 2e-5
    c.optimizer.warmup_steps = 100
    c.seq_len = 2048
    c.batch_size = 128
  base.apply_mode(c, args['mode'],
                  # qlora: rank 16 on every linear layer; over two seeds as good as
                  # the same on the float32 base (experiments/results/qlora.md).
                  tiny=dict(rank=8, alpha=16.0, targets='attention_up_down', lr=1e-2, qlora=dict(rank=16)),
                  large=dict(rank=16, alpha=32.0, targets='all_linear', lr=2e-4))
  return c
