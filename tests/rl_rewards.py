"""A custom reward for the RL tests (named 'rl_rewards:even_tokens' in configs;
tests/ is on the path): it has spread even for a random model."""


def even_tokens(samples):
  """The share of the reply's tokens with an even id."""
  return [sum(t % 2 == 0 for t in s.completion_ids) / max(len(s.completion_ids), 1) for s in samples]
