"""Preference optimization (DPO, IPO, robust DPO, SimPO, ORPO), optionally with LoRA.

The CPU demo (after SFT wrote runs/sft):

    python -m research.main --config=configs/dpo.py:size=tiny --workdir=runs/dpo \
        --config.init_from=runs/sft

The reference model is the frozen init_from parameters (with LoRA: the base with
adapters off). Data: 'pref_tasks' (correct vs plausible wrong task answers) and
'pref_code' (stdlib function vs a corrupted copy), 'pref_tasks_ranked' (the task
answers ranked, every pair of a ranking trained in one batch), or JSONL rows
{"prompt", "chosen", "rejected"} or {"prompt", "ranked": [best, ..., worst]}
(strings or message lists) via data.name=files. dpo.pairs_per_row > 1 packs
rows with up to that many pairs (batch_size then counts rows of seq_len tokens);
the tiny preset packs.
Presets: size=tiny|7b|8b, mode=full|lora|qlora, family=llama|qwen3.
"""

import ml_collections

from configs import base


def get_config(arg=None):
  """Returns the DPO config for `arg` ('size=tiny,mode=full' by default)."""
  args = base.parse_arg(arg, size='tiny', mode='full', family='llama')
  c = base.base_config('dpo', args['size'], args['family'])
  base.use_preference_data(c)
  c.dpo = ml_collections.ConfigDict(dict(
      loss_type='sigmoid',  # sigmoid | ipo | robust | simpo | orpo
      beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, orpo_lambda=0.1,
      rpo_alpha=0.0,  # > 0: add alpha x NLL of the chosen reply (RPO), per token, averaged per pair
      # ipo only. False: h from summed reply log-probs (as before); True: from per-token
      # averages, as TRL's ipo (1 / (2 beta) is then a margin per token: retune beta).
      ipo_normalize=False,
      pairs_per_row=1))  # 1: one pair per row, padded; > 1: rows packed with up to that many pairs
  c.task_eval = base.task_eval_config()
  c.sample.prompts = ('What is 12 + 30?', 'Reverse the letters: c o d e')
  c.sample.temperature = 0.0
  c.optimizer.weight_decay = 0.0
  if args['size'] == 'tiny':
    # Packed: 5 rows of 128 tokens per side hold about 16 pairs (15.7 on average, 12 to 20;
    # the embedded pairs are mostly ~20 tokens a side), a third of the tokens of 16
    # padded rows. 8 eval batches hold the first 129 held-out pairs (8 x 16 padded: the first 128).
    c.steps, c.seq_len, c.batch_size = 500, 128, 5
    c.dpo.pairs_per_row = 8
    c.eval_every, c.eval_batches = 250, 8
    c.optimizer.lr, c.optimizer.warmup_steps = 1e-4, 20
    c.dpo.rpo_alpha = 1.0  # the tiny model otherwise forgets how to answer
  else:
    c.steps, c.seq_len, c.batch_size = 1000, 2048, 64
    c.optimizer.lr, c.optimizer.warmup_steps = 5e-7, 50
  base.apply_mode(c, args['mode'], tiny=dict(rank=8, alpha=16.0, lr=2e-3),
                  large=dict(rank=16, alpha=32.0, lr=5e-6))
  return c
