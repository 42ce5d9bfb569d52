"""PPO for RLHF: the policy against a learned reward model, with a KL penalty
to the reference in the reward and a value head on the policy's trunk.

The CPU demo (after `make run` wrote runs/sft and runs/reward):

    python -m research.main --config=configs/ppo.py:size=tiny --workdir=runs/ppo \
        --config.init_from=runs/sft --config.ppo.rewards="('reward_model:runs/reward',)"

Presets: size=tiny|7b|8b, mode=full|lora|qlora, family=llama|qwen3.
Rewards: ppo.rewards as in configs/grpo.py (the default is the reward model of
runs/reward); batch_size counts replies (num_generations per prompt).
"""

from configs import base


def get_config(arg=None):
  """Returns the PPO config for `arg` ('size=tiny,mode=full' by default)."""
  args = base.parse_arg(arg, size='tiny', mode='full', family='llama')
  c = base.online_rl_config('ppo', args, dict(
      num_generations=1,      # replies per prompt (they share one prefill)
      num_iterations=1,       # optimizer steps per rollout (> 1: the rollout is the old policy)
      max_new_tokens=24, temperature=1.0,
      clip_eps=0.2,
      kl_coef=0.5,            # -kl_coef (log pi - log ref) per reply token in the reward; 0: no reference held
      gamma=1.0, lam=0.95,    # GAE
      whiten=True,            # advantages to mean 0, std 1 over the batch's reply tokens
      vf_coef=0.1, value_clip=0.2,
      rewards=('reward_model:runs/reward',), reward_weights=(1.0,),
      prompt_families=(),     # prompts only from rows of these task families (row['family']; empty: all)
      eval_samples=0, eval_k=4,  # pass@k and mean@k on the held-out tasks (0 samples: off)
  ))
  # The critic: a [D, 1] layer reading the policy's last hidden states without training
  # them ('shared' lets the value loss train the trunk too), at 100x the learning rate
  # (a random layer next to a trained trunk); experiments/results/rl.md compares them.
  c.model.value_head = 'detached'
  c.optimizer.head_lr_scale = 100.0
  if args['size'] in ('tiny', 'test'):
    c.steps, c.eval_every, c.checkpoint_every = 200, 100, 100
  return c
