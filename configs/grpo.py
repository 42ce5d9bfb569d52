"""Online RL: GRPO and its relatives, optionally with LoRA.

The CPU demo (after SFT wrote runs/sft):

    python -m research.main --config=configs/grpo.py:size=tiny --workdir=runs/grpo \
        --config.init_from=runs/sft

Presets: size=tiny|7b|8b, mode=full|lora|qlora, family=llama|qwen3, and algo:
  grpo    std-normalised group advantages, per-sequence mean, KL 0.04 (Shao et al., 2024)
  drgrpo  no std division, sum over tokens / (batch x max_new_tokens), no KL (Liu et al., 2025)
  dapo    clip-higher 0.28, token mean, dynamic sampling, soft overlong penalty, no KL (Yu et al., 2025)
  gspo    sequence-level ratio, clip 3e-4 / 4e-4, per-sequence mean, no KL (Zheng et al., 2025)
  rloo    leave-one-out baseline, token mean, KL 0.04 (Ahmadian et al., 2024)
Prompts: data.name (SFT-format rows; the embedded 'sft_tasks' by default).
Rewards: grpo.rewards, built-ins (exact_match, partial_credit, format, overlong,
reward_model:<workdir>) or 'package.module:function', with grpo.reward_weights.
batch_size counts replies: batch_size / num_generations prompts per step.
"""

from configs import base

ALGOS = {
    'grpo': dict(advantage='grpo', scale='group', aggregation='sequence_mean', beta=0.04),
    'drgrpo': dict(advantage='drgrpo', scale='none', aggregation='fixed_length', beta=0.0),
    'dapo': dict(advantage='grpo', scale='group', aggregation='token_mean', beta=0.0, clip_eps_high=0.28,
                 oversample=3, rewards=('exact_match', 'overlong'), reward_weights=(1.0, 1.0), overlong_buffer=8),
    'gspo': dict(advantage='grpo', scale='group', aggregation='sequence_mean', beta=0.0, importance='sequence',
                 clip_eps=3e-4, clip_eps_high=4e-4),
    'rloo': dict(advantage='rloo', scale='none', aggregation='token_mean', beta=0.04),
}


def get_config(arg=None):
  """Returns the GRPO config for `arg` ('size=tiny,mode=full,algo=grpo' by default)."""
  args = base.parse_arg(arg, size='tiny', mode='full', algo='grpo', family='llama')
  if args['algo'] not in ALGOS:
    raise ValueError(f"algo={args['algo']!r}; choose one of {sorted(ALGOS)}")
  c = base.online_rl_config('grpo', args, dict(
      algo=args['algo'],
      num_generations=8,      # replies per prompt (a group): tiny, 8 prompts x 8 replies
      num_iterations=1,       # optimizer steps per rollout (> 1: the rollout is the old policy)
      max_new_tokens=24, temperature=1.0,
      advantage='grpo',       # grpo | drgrpo | rloo
      scale='group',          # group | batch | none: the std grpo divides by
      clip_eps=0.2, clip_eps_high=0.0,  # 0: = clip_eps
      beta=0.0, kl='k3',      # KL to the frozen reference (k1 | k3); 0: no reference held
      importance='token',     # token | sequence (GSPO)
      aggregation='token_mean',  # token_mean | sequence_mean | fixed_length
      mask_truncated=False,   # zero weight for replies that hit max_new_tokens
      oversample=1,           # > 1: DAPO dynamic sampling over this many times the prompts
      rewards=('exact_match',), reward_weights=(1.0,), overlong_buffer=0,
      prompt_families=(),     # prompts only from rows of these task families (row['family']; empty: all)
      eval_samples=4, eval_k=4,  # pass@k and mean@k on the held-out tasks (0 samples: off)
  ))
  c.grpo.update(ALGOS[args['algo']])
  return c
