"""Sampler: filtering rules against numpy, and cached decoding against full forwards."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research import sampling
from research.models.llama import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


def _support(logits, **kw):
  """Set of tokens ever sampled from `logits` over many draws."""
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  draws = jax.vmap(lambda k: sampling.sample_logits(logits[None], k, **kw)[0])(keys)
  return set(np.asarray(draws).tolist())


def test_top_k_and_top_p_supports_match_numpy():
  logits = jnp.log(jnp.asarray([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
  assert _support(logits, temperature=1.0, top_k=3) == {0, 1, 2}
  # Nucleus: smallest prefix of the sorted probabilities with mass >= 0.75.
  probs = np.asarray([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
  n = int(np.argmax(np.cumsum(probs) >= 0.75)) + 1
  assert _support(logits, temperature=1.0, top_p=0.75) == set(range(n))
  assert _support(logits, temperature=0.0) == {0}
  assert _support(logits, temperature=1.0, top_p=1e-6) == {0}  # at least one token survives


def test_sampling_frequencies_follow_temperature():
  logits = jnp.log(jnp.asarray([0.5, 0.3, 0.2]))
  keys = jax.random.split(jax.random.PRNGKey(1), 20000)
  draws = np.asarray(jax.vmap(lambda k: sampling.sample_logits(logits[None], k, temperature=2.0)[0])(keys))
  want = np.asarray([0.5, 0.3, 0.2]) ** 0.5
  want /= want.sum()
  np.testing.assert_allclose(np.bincount(draws, minlength=3) / len(draws), want, atol=0.015)


def test_greedy_generate_matches_repeated_full_forward():
  model = Transformer(CFG)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))['params']
  params = jax.tree.map(lambda x: x * 10, params)  # sharper distributions: fewer near-ties
  prompts = [[5, 9, 2], [7, 1, 3, 3, 8, 4, 2]]  # different lengths: left padding at work
  out = sampling.generate(model, params, prompts, max_new_tokens=8)
  for prompt, got in zip(prompts, out):
    seq = list(prompt)
    for _ in range(8):
      logits, _ = model.apply({'params': params}, jnp.asarray([seq]))
      seq.append(int(jnp.argmax(logits[0, -1])))
    assert got == seq[len(prompt):]


def test_stop_token_ends_generation():
  model = Transformer(CFG)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))['params']
  first = sampling.generate(model, params, [[1, 2, 3]], max_new_tokens=6)[0]
  stop = first[2]
  out = sampling.generate(model, params, [[1, 2, 3]], max_new_tokens=6, stop_tokens=(stop,))[0]
  assert out == first[:first.index(stop) + 1]
