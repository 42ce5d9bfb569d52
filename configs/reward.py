"""Reward model: a scalar `score` head on the transformer, Bradley-Terry loss on
preference pairs, optionally with LoRA.

The CPU demo (after SFT wrote runs/sft):

    python -m research.main --config=configs/reward.py:size=tiny --workdir=runs/reward \
        --config.init_from=runs/sft

The backbone comes from init_from (its output layer is dropped), the score head
starts random. Data as in configs/dpo.py: 'pref_tasks' + 'pref_code',
'pref_tasks_ranked', or JSONL rows {"prompt", "chosen", "rejected"} or
{"prompt", "ranked": [best, ..., worst]} via data.name=files (a ranked row
trains all its K(K-1)/2 pairs in one batch, as InstructGPT's reward model).
reward.pairs_per_row > 1 packs rows (the tiny preset does). Logs eval/accuracy.
Load the result for online RL with research.rewards.load_reward_model.
Presets: size=tiny|7b|8b, mode=full|lora|qlora, family=llama|qwen3.
"""

import ml_collections

from configs import base


def get_config(arg=None):
  """Returns the reward-model config for `arg` ('size=tiny,mode=full' by default)."""
  args = base.parse_arg(arg, size='tiny', mode='full', family='llama')
  c = base.base_config('reward', args['size'], args['family'])
  c.model.head = 'score'
  base.use_preference_data(c)
  c.reward = ml_collections.ConfigDict(dict(
      margin=0.0,         # subtracted from r_chosen - r_rejected inside the sigmoid
      center_coef=0.01,  # + coef * mean((r_chosen + r_rejected)^2) keeps rewards near 0
      pairs_per_row=1))  # 1: one pair per row, padded; > 1: rows packed with up to that many pairs
  c.sample.prompts = ()  # a reward model does not generate
  c.optimizer.weight_decay = 0.0
  if args['size'] == 'tiny':
    # The variants tried: experiments/results/preference.md.
    # Packed as configs/dpo.py's tiny preset: 5 rows of 128 tokens, about 16 pairs.
    c.steps, c.seq_len, c.batch_size = 1200, 128, 5
    c.reward.pairs_per_row = 8
    c.eval_every, c.eval_batches = 600, 8
    c.optimizer.lr, c.optimizer.warmup_steps = 3e-4, 20
  else:
    c.steps, c.seq_len, c.batch_size = 1000, 2048, 64
    c.optimizer.lr, c.optimizer.warmup_steps = 9e-6, 50
  base.apply_mode(c, args['mode'],
                  tiny=dict(rank=8, alpha=16.0, targets='attention_up_down', lr=3e-3),
                  large=dict(rank=16, alpha=32.0, targets='all_linear', lr=1e-4))
  return c
