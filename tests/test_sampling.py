"""Sampler: filtering rules against numpy, and cached decoding against full forwards."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import full_forward
from research import sampling
from research.models.llama import Config, Model

CFG = Config(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


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
  model = Model(CFG)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))['params']
  params = jax.tree.map(lambda x: x * 10, params)  # sharper distributions: fewer near-ties
  prompts = [[5, 9, 2], [7, 1, 3, 3, 8, 4, 2]]  # different lengths: left padding at work
  out = sampling.generate(model, params, prompts, max_new_tokens=8)
  # Full forwards of the growing sequence, right-padded to one length (causal: the
  # padding after position t cannot change t's logits), so one compile serves all.
  forward = jax.jit(lambda t: model.apply({'params': params}, t)[0])
  for prompt, got in zip(prompts, out):
    seq = list(prompt)
    for _ in range(8):
      logits = forward(jnp.asarray([seq + [0] * (16 - len(seq))]))
      seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    assert got == seq[len(prompt):]


def test_stop_token_ends_generation():
  model = Model(CFG)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))['params']
  first = sampling.generate(model, params, [[1, 2, 3]], max_new_tokens=6)[0]
  stop = first[2]
  out = sampling.generate(model, params, [[1, 2, 3]], max_new_tokens=6, stop_tokens=(stop,))[0]
  assert out == first[:first.index(stop) + 1]


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_rollout_logprobs_and_mask_against_full_forwards():
  """Each sampled token's log-prob is the one of the distribution it was drawn
  from (temperature 1.5, top-k 5, recomputed in numpy from full forwards); the
  mask covers tokens up to and including the first stop token."""
  model = Model(CFG)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))['params']
  prompts = [[5, 9, 2], [7, 1, 3, 3, 8, 4, 2]]
  tokens, segs, pos = sampling.left_pad(prompts)
  T, K = 1.5, 5
  free = sampling.rollout(model, params, tokens, segs, pos, jax.random.PRNGKey(3), np.zeros((0,), np.int32),
                          max_new_tokens=6, temperature=T, top_k=K)
  out, logps = np.asarray(free['tokens']), np.asarray(free['logps'])
  assert np.asarray(free['mask']).all() and np.asarray(free['truncated']).all()  # no stop token
  for b, prompt in enumerate(prompts):
    seq = list(prompt) + out[b].tolist()
    logits = np.asarray(full_forward(model, params, [seq])[0], np.float64)
    for i in range(6):
      row = logits[len(prompt) - 1 + i] / T
      kth = np.sort(row)[-K]
      want = _log_softmax(np.where(row < kth, -1e30, row))[out[b, i]]
      np.testing.assert_allclose(logps[b, i], want, rtol=1e-4, atol=1e-4)

  stop = int(out[0, 2])  # stop on row 0's third token, with the same random stream
  stopped = sampling.rollout(model, params, tokens, segs, pos, jax.random.PRNGKey(3),
                             np.asarray([stop], np.int32), max_new_tokens=6, temperature=T, top_k=K)
  first = [int(np.argmax(out[b] == stop)) if (out[b] == stop).any() else 6 for b in range(2)]
  for b in range(2):
    n = min(first[b] + 1, 6)
    assert np.asarray(stopped['mask'])[b].tolist() == [1] * n + [0] * (6 - n)
    np.testing.assert_array_equal(np.asarray(stopped['tokens'])[b, :n], out[b, :n])
    assert (np.asarray(stopped['tokens'])[b, n:] == 0).all() and (np.asarray(stopped['logps'])[b, n:] == 0).all()
    assert bool(np.asarray(stopped['truncated'])[b]) == (first[b] == 6)


def test_greedy_rollout_logprobs_are_the_models():
  model = Model(CFG)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32)))['params']
  tokens, segs, pos = sampling.left_pad([[4, 4, 8]])
  r = sampling.rollout(model, params, tokens, segs, pos, jax.random.PRNGKey(0), np.zeros((0,), np.int32),
                       max_new_tokens=4)
  seq = [4, 4, 8] + np.asarray(r['tokens'])[0].tolist()
  logits = np.asarray(full_forward(model, params, [seq])[0], np.float64)
  want = [_log_softmax(logits[2 + i])[seq[3 + i]] for i in range(4)]
  np.testing.assert_allclose(np.asarray(r['logps'])[0], want, rtol=1e-4, atol=1e-5)


def test_rollout_on_a_mesh_matches_one_device():
  """Parameters sharded over fsdp x tensor and prompts over data: the same tokens
  and log-probs as on one device."""
  from configs.base import DEFAULT_RULES
  from research.training import sharding
  cfg = Config(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
  model = Model(cfg)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(2), jnp.zeros((1, 4), jnp.int32)))['params']
  prompts = [[5, 9, 2], [7, 1, 3, 3, 8], [4], [6, 6, 6, 1]]
  tokens, segs, pos = sampling.left_pad(prompts)
  kw = dict(max_new_tokens=5, temperature=0.7, top_p=0.9)
  stops = np.asarray([3], np.int32)
  want = sampling.rollout(model, params, tokens, segs, pos, jax.random.PRNGKey(5), stops, **kw)

  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  rules = sharding.rules_from_config(DEFAULT_RULES)
  layout = sharding.param_layout(model, mesh, rules, uses_lora=False, seq_len=8)
  placed = jax.device_put(params, layout.shardings)
  rows = sharding.batch_sharding(mesh, rules)
  with sharding.MeshContext(mesh, rules):
    got = sampling.rollout(model, placed, *(jax.device_put(x, rows) for x in (tokens, segs, pos)),
                           jax.random.PRNGKey(5), stops, **kw)
  assert got['tokens'].sharding.spec[0] is not None  # the output stays sharded over the batch
  np.testing.assert_array_equal(np.asarray(got['tokens']), np.asarray(want['tokens']))
  np.testing.assert_array_equal(np.asarray(got['mask']), np.asarray(want['mask']))
  np.testing.assert_allclose(np.asarray(got['logps']), np.asarray(want['logps']), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('temperature', [1.0, 0.7])
def test_n_samples_per_prompt_and_sampler_logprobs_equal_the_training_forward(temperature):
  """n continuations of each prompt from one prefill; the sampler's log-probs equal
  a training forward pass over the returned sequences (to 1e-5 in float32)."""
  model = Model(CFG)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(4), jnp.zeros((1, 4), jnp.int32)))['params']
  prompts = [[5, 9, 2], [7, 1, 3, 3, 8]]
  tokens, segs, pos = sampling.left_pad(prompts)
  out = sampling.rollout(model, params, tokens, segs, pos, jax.random.PRNGKey(1), np.asarray([7], np.int32),
                         max_new_tokens=10, n=3, temperature=temperature)
  assert out['tokens'].shape == (6, 10) and out['sequences'].shape == (6, tokens.shape[1] + 10)
  seqs = np.asarray(out['sequences'])
  for i in range(6):  # rows i*3 .. i*3+2 continue prompt i
    np.testing.assert_array_equal(seqs[i, :tokens.shape[1]], tokens[i // 3])
  assert len({tuple(r) for r in np.asarray(out['tokens'])[:3]}) > 1  # the samples differ
  want = sampling.completion_logprobs(model, params, out, tokens.shape[1], temperature)
  mask = np.asarray(out['mask'])
  assert mask.sum() > 12 and (mask[:, 0] == 1).all()
  np.testing.assert_allclose(np.asarray(out['logps']) * mask, np.asarray(want), rtol=1e-5, atol=1e-5)
  # Positions continue each prompt and the completion's segment is the mask.
  P = tokens.shape[1]
  last = pos[np.arange(6) // 3, -1]
  np.testing.assert_array_equal(np.asarray(out['positions'])[:, P:], (last[:, None] + 1 + np.arange(10)) * mask)
  np.testing.assert_array_equal(np.asarray(out['segment_ids'])[:, P:], mask)


# -- the padded vocabulary: ids >= vocab_limit (the tokenizer's size) are never sampled --

def _np_logprobs(row, limit, temperature, top_k=0, top_p=1.0):
  """numpy log-probs [V] of the sampling distribution over ids < limit (the rest
  -inf): temperature scaling, then top-k and the top-p nucleus among those ids."""
  x = np.asarray(row[:limit], np.float64)
  if temperature > 0:
    x = x / temperature
    if top_k:
      x = np.where(x < np.sort(x)[-top_k], -np.inf, x)
    if top_p < 1.0:
      desc = np.sort(x)[::-1]
      probs = np.exp(desc - desc.max()) / np.exp(desc - desc.max()).sum()
      n_keep = max(int(np.sum(np.cumsum(probs) - probs < top_p)), 1)
      x = np.where(x < desc[n_keep - 1], -np.inf, x)
  out = np.full(len(row), -np.inf)
  out[:limit] = _log_softmax(x)
  return out


@pytest.mark.parametrize('temperature,top_k,top_p', [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0),
                                                     (1.3, 0, 0.6), (0.7, 5, 0.8)])
def test_vocab_limit_masks_padded_ids_when_sampling_from_logits(temperature, top_k, top_p):
  """The padded ids hold the highest logits, yet neither greedy nor sampled
  tokens reach them, and the log-probs are those of a softmax over the valid ids
  only (with temperature, top-k and top-p applied among them)."""
  limit = 8
  valid = np.log([0.3, 0.2, 0.15, 0.12, 0.1, 0.07, 0.04, 0.02])
  logits_V = jnp.asarray(np.concatenate([valid, [5.0, 6.0, 4.0, 7.0]]), jnp.float32)
  kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, vocab_limit=limit)
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  draws = np.asarray(jax.vmap(lambda k: sampling.sample_logits(logits_V[None], k, **kw)[0])(keys))
  want = _np_logprobs(np.asarray(logits_V), limit, temperature, top_k, top_p)
  support = {int(np.argmax(want))} if temperature == 0 else set(np.flatnonzero(np.isfinite(want)).tolist())
  assert set(draws.tolist()) == support  # never an id >= limit
  ids = jnp.arange(12, dtype=jnp.int32)
  got = np.asarray(sampling.sampled_logprobs(jnp.tile(logits_V, (12, 1)), ids, **kw))
  finite = np.isfinite(want)
  np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-6)
  assert (got[~finite] < -1e30).all()


def _boosted_params(model, limit, seed=0, boost=50.0):
  """Random parameters with the output columns of ids >= limit scaled up, so
  that unmasked, the padded ids dominate (the tests check that they would win)."""
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32)))['params']
  head = params['lm_head']['kernel']
  return {**params, 'lm_head': {'kernel': head.at[:, limit:].multiply(boost)}}


def test_rollout_vocab_limit_logprobs_match_numpy_and_the_trainer():
  """With vocab_limit the rollout samples only valid ids, its log-probs are those
  of the softmax over valid ids (numpy, from a full forward), and the RL trainer's
  log-probs of the same batch (rl.token_logps, batch['vocab_limit']) equal them."""
  from research import rl
  model, limit, T = Model(CFG), 48, 0.7
  params = _boosted_params(model, limit)
  tokens, segs, pos = sampling.left_pad([[5, 9, 2], [7, 1, 3, 3, 8, 4, 2]])
  P = tokens.shape[1]
  out = sampling.rollout(model, params, tokens, segs, pos, jax.random.PRNGKey(1), np.zeros((0,), np.int32),
                         max_new_tokens=8, n=2, temperature=T, vocab_limit=limit)
  toks, logps = np.asarray(out['tokens']), np.asarray(out['logps'])
  assert (toks < limit).all() and np.asarray(out['mask']).all()
  seq = np.asarray(out['sequences'])
  batch = {'inputs': seq[:, :-1], 'targets': seq[:, 1:], 'positions': np.asarray(out['positions'])[:, :-1],
           'segment_ids': np.asarray(out['segment_ids'])[:, :-1]}
  scaled = np.asarray(rl.scaled_logits(model, params, batch, T), np.float64)[:, P - 1:]  # no limit: no mask
  probs = np.exp(scaled - scaled.max(-1, keepdims=True))
  assert (probs[..., limit:].sum(-1) / probs.sum(-1)).min() > 0.5  # unmasked, the padded ids would win
  want = np.take_along_axis(_log_softmax(scaled[..., :limit]), toks[..., None], -1)[..., 0]
  np.testing.assert_allclose(logps, want, rtol=1e-4, atol=1e-4)
  trainer = np.asarray(rl.token_logps(model, params, {**batch, 'vocab_limit': np.full((4,), limit, np.int32)}, T))
  np.testing.assert_allclose(trainer[:, P - 1:], logps, rtol=1e-5, atol=1e-5)


def test_generate_with_a_smaller_tokenizer_gives_decodable_ids():
  """End to end: a tokenizer smaller than the model's (padded) vocabulary; with
  vocab_limit=tokenizer.vocab_size, greedy and sampled replies decode with the
  raw SentencePiece processor (which raises on an id past its vocabulary)."""
  from research.data.tokenizer import train_tokenizer
  tok = train_tokenizer(['the quick brown fox jumps over the lazy dog. ' * 20, 'def f(x):\n  return x + 1\n' * 10],
                        300)
  model = Model(Config(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64))
  assert tok.vocab_size < model.cfg.vocab_size
  params = _boosted_params(model, tok.vocab_size, seed=3)
  prompts = [tok.encode('the quick', add_bos=True), tok.encode('def f', add_bos=True)]
  free = sampling.generate(model, params, prompts, max_new_tokens=8)
  with pytest.raises(IndexError):  # the crash at evaluation this guards against
    tok.sp.decode(free[0] + free[1])
  for temperature in (0.0, 1.0):
    outs = sampling.generate(model, params, prompts, max_new_tokens=8, temperature=temperature,
                             rng=jax.random.PRNGKey(2), vocab_limit=tok.vocab_size)
    for out in outs:
      assert len(out) == 8 and max(out) < tok.vocab_size
      assert isinstance(tok.sp.decode(out), str)


def test_prefill_forms_only_the_last_positions_logits():
  """The rollout's prefill applies the output layer to each prompt's last token:
  its compiled temporaries stay far below the [B, P, V] float32 logits (64 MiB
  here), which a forward pass that slices the last position afterwards holds;
  and its logits equal the full forward's last position."""
  from research import models  # pylint: disable=import-outside-toplevel
  cfg = Config(vocab_size=32768, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
  model = Model(cfg)
  B, P = 2, 256
  tokens = jax.random.randint(jax.random.PRNGKey(0), (B, P), 0, cfg.vocab_size)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), tokens[:, :8]))['params']
  pos, seg = jnp.broadcast_to(jnp.arange(P), (B, P)), jnp.ones((B, P), jnp.int32)
  cache = models.init_cache(cfg, B, P + 8)
  prefill = jax.jit(lambda p, t, c: sampling._prefill(model, p, t, pos, seg, c))  # pylint: disable=protected-access
  sliced = jax.jit(lambda p, t, c: model.apply({'params': p}, t, pos, seg, cache=c)[0][:, -1])
  temp = lambda f: f.lower(params, tokens, cache).compile().memory_analysis().temp_size_in_bytes
  full = B * P * cfg.vocab_size * 4
  assert temp(sliced) >= full
  assert temp(prefill) < full / 4
  logits_BV, _ = prefill(params, tokens, cache)
  want, _ = model.apply({'params': params}, tokens, pos, seg)
  np.testing.assert_allclose(np.asarray(logits_BV), np.asarray(want[:, -1]), rtol=1e-5, atol=1e-5)
