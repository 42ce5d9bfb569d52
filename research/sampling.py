"""Sampling with a KV cache: one prefill, then a jitted decode loop.

Two entry points over one code path:

* `rollout` (arrays in, arrays out; jitted; sharded over the batch when its
  inputs are): the generated tokens, the log-probability of each under the
  distribution it was sampled from, and a mask up to and including the first
  stop token. For code that keeps working on device (online RL).
* `generate` (Python lists in and out): left-pads prompts, calls `rollout`,
  brings the tokens to the host and cuts each after its first stop token. For
  evaluation and samples.

Prompts of different lengths are left-padded to a common length (rounded up
to a multiple of 16 to limit recompiles); padding has segment id 0 so no token
attends to it, and positions start at 0 at each prompt's first real token.
Decoding with the cache gives the same logits as a full forward pass.

`vocab_limit` (the tokenizer's size) keeps the sampler off the model's padded
vocabulary: ids at or past it get zero probability, greedy or sampled, and the
returned log-probabilities are those of that masked distribution (a trainer
recomputing them masks the same way: `mask_vocab`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from research import losses, models

_BUCKET = 16


class Policy(NamedTuple):
  """A model and the parameters to run it with: during training, the current
  (full: LoRA base and adapters) parameters, and `frozen_views()`, the frozen
  trees the stage's loss reads by name ({'reference': ...}). It is a function so
  that only a source that reads them pays for them (a LoRA run's reference is the
  base with zeroed adapters, built on call). Batch sources and evaluators get one."""

  model: Any
  params: Any
  frozen_views: Callable[[], dict] | None = None


def mask_vocab(logits_V: jax.Array, vocab_limit: int | jax.Array | None) -> jax.Array:
  """`logits_V` ([..., V]) with ids >= vocab_limit at -inf-ish: ids the tokenizer
  cannot decode (a model's vocabulary may be padded past it). `vocab_limit` is
  None (no mask), an int, or an int array over the leading axes (e.g. [B], one
  per row) of logits. Apply after any temperature scaling (-inf-ish / T overflows)."""
  V = logits_V.shape[-1]
  if vocab_limit is None or (isinstance(vocab_limit, int) and vocab_limit >= V):
    return logits_V
  limit = jnp.asarray(vocab_limit)
  limit = limit.reshape(limit.shape + (1,) * (logits_V.ndim - limit.ndim))
  return jnp.where(jnp.arange(V) < limit, logits_V, jnp.finfo(logits_V.dtype).min)


def _filtered_logits(logits_BV: jax.Array, temperature: float, top_k: int, top_p: float,
                     vocab_limit: int | None = None) -> jax.Array:
  """float32 logits of the distribution sampled from: greedy (temperature 0)
  reads the model's own logits; else scaled by 1/temperature, everything outside
  top-k and the top-p nucleus at -inf-ish. Ids >= vocab_limit are masked first,
  so top-k and top-p choose among decodable ids only."""
  logits = logits_BV.astype(jnp.float32)
  if temperature <= 0.0:
    return mask_vocab(logits, vocab_limit)
  logits = mask_vocab(logits / temperature, vocab_limit)
  neg = jnp.finfo(jnp.float32).min
  if top_k > 0:
    kth_BV = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth_BV, neg, logits)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep a token if the mass strictly before it is below top_p (the first is always kept).
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    n_keep_B = jnp.maximum(jnp.sum(mass_before_BV < top_p, axis=-1), 1)
    threshold_B1 = jnp.take_along_axis(sorted_BV, n_keep_B[:, None] - 1, axis=-1)
    logits = jnp.where(logits < threshold_B1, neg, logits)
  return logits


def sample_logits(logits_BV: jax.Array, rng: jax.Array, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, vocab_limit: int | None = None) -> jax.Array:
  """Next tokens [B] from logits: greedy if temperature == 0, else sampled
  from the temperature-scaled distribution restricted to the top-k tokens and
  to the smallest set whose probability reaches top_p (nucleus sampling).
  Never an id >= vocab_limit (None: any id)."""
  logits = _filtered_logits(logits_BV, temperature, top_k, top_p, vocab_limit)
  if temperature <= 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def sampled_logprobs(logits_BV: jax.Array, tokens_B: jax.Array, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, vocab_limit: int | None = None) -> jax.Array:
  """log p(token) [B] under the distribution `sample_logits` draws from with the
  same settings; for greedy decoding (temperature 0), under the model's own
  (unscaled, unfiltered) distribution over ids < vocab_limit."""
  logits = _filtered_logits(logits_BV, temperature, top_k, top_p, vocab_limit)
  logp_BV = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp_BV, tokens_B[:, None], axis=-1)[:, 0]


def _prefill(model, params, tokens_BP, positions_BP, segment_ids_BP, cache):
  """(float32 logits [B, V] after each prompt's last token, the filled cache).

  Only the last position's logits are formed (the output layer applied to one
  position per row, layers.Unembedding): the whole [B, P, V] would be 67 GB for
  64 prompts of 2048 tokens over Llama 3's vocabulary."""
  if model.cfg.head != 'lm':
    logits_BPV, cache = model.apply({'params': params}, tokens_BP, positions_BP, segment_ids_BP, cache=cache)
    return logits_BPV[:, -1], cache
  head, cache = model.apply({'params': params}, tokens_BP, positions_BP, segment_ids_BP, cache=cache,
                            unembedding=True)
  last = jax.tree.map(lambda f: f[:, -1:], head.features)
  return head.logits(last)[:, 0].astype(jnp.float32), cache


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'n', 'temperature', 'top_k',
                                             'top_p', 'pad_id', 'vocab_limit'))
def rollout(model, params, tokens_BP, segment_ids_BP, positions_BP, rng, stop_ids, *,
            max_new_tokens: int, n: int = 1, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
            pad_id: int = 0, vocab_limit: int | None = None) -> dict[str, jax.Array]:
  """Continues left-padded prompts [P0, P] (see `left_pad`) `n` times each, for
  up to max_new_tokens. Prompts are prefilled once; their caches are copied n
  times, so rows i*n .. i*n + n-1 of the outputs (B = P0 * n rows) continue prompt i.
  Only ids < vocab_limit (the tokenizer's size; None: all) are sampled.

  `stop_ids` is an int32 array of stop tokens (may be empty). Returns
    tokens       int32 [B, N]      sampled tokens, pad_id after a row's first stop token
    logps        f32   [B, N]      log-prob of each token (sampled_logprobs); 0 where mask is 0
    mask         int32 [B, N]      1 up to and including the first stop token
    truncated    bool  [B]         the row never produced a stop token
    sequences    int32 [B, P + N]  prompt and completion, for a training forward pass:
    segment_ids  int32 [B, P + N]  1 on prompt and completion tokens, 0 on padding
    positions    int32 [B, P + N]  RoPE positions (0 on padding)
  The loop ends early once every row has stopped.
  """
  P0, P = tokens_BP.shape
  B = P0 * n
  cache = models.init_cache(model.cfg, P0, P + max_new_tokens)
  logits_BV, cache = _prefill(model, params, tokens_BP, positions_BP, segment_ids_BP, cache)
  next_pos_B = positions_BP[:, -1] + 1
  if n > 1:  # n samples per prompt share one prefill
    logits_BV, next_pos_B = jnp.repeat(logits_BV, n, axis=0), jnp.repeat(next_pos_B, n, axis=0)
    cache = models.repeat_cache(cache, n)
  stops = jnp.concatenate([jnp.asarray(stop_ids, jnp.int32).reshape(-1), jnp.full((1,), -1, jnp.int32)])

  def body(carry):
    i, logits_BV, cache, pos_B, done_B, out_BN, logp_BN, mask_BN, rng = carry
    rng, step_rng = jax.random.split(rng)
    tok_B = sample_logits(logits_BV, step_rng, temperature, top_k, top_p, vocab_limit)
    logp_B = sampled_logprobs(logits_BV, tok_B, temperature, top_k, top_p, vocab_limit)
    tok_B = jnp.where(done_B, pad_id, tok_B)
    out_BN = out_BN.at[:, i].set(tok_B)
    logp_BN = logp_BN.at[:, i].set(jnp.where(done_B, 0.0, logp_B))
    mask_BN = mask_BN.at[:, i].set((~done_B).astype(jnp.int32))
    done_B = done_B | jnp.isin(tok_B, stops)
    logits_B1V, cache = model.apply({'params': params}, tok_B[:, None], pos_B[:, None],
                                    jnp.ones((B, 1), jnp.int32), cache=cache)
    return i + 1, logits_B1V[:, 0], cache, pos_B + 1, done_B, out_BN, logp_BN, mask_BN, rng

  def cond(carry):
    i, done_B = carry[0], carry[4]
    return (i < max_new_tokens) & ~jnp.all(done_B)

  init = (jnp.int32(0), logits_BV, cache, next_pos_B, jnp.zeros((B,), bool),
          jnp.full((B, max_new_tokens), pad_id, jnp.int32), jnp.zeros((B, max_new_tokens), jnp.float32),
          jnp.zeros((B, max_new_tokens), jnp.int32), rng)
  out = jax.lax.while_loop(cond, body, init)
  tokens_BN, mask_BN = out[5], out[7]
  rows = lambda x: jnp.repeat(x, n, axis=0) if n > 1 else x
  completion_pos_BN = (next_pos_B[:, None] + jnp.arange(max_new_tokens, dtype=jnp.int32)) * mask_BN
  return {'tokens': tokens_BN, 'logps': out[6], 'mask': mask_BN, 'truncated': ~out[4],
          'sequences': jnp.concatenate([rows(tokens_BP), tokens_BN], axis=1),
          'segment_ids': jnp.concatenate([rows(segment_ids_BP), mask_BN], axis=1),
          'positions': jnp.concatenate([rows(positions_BP), completion_pos_BN], axis=1)}


def completion_logprobs(model, params, rollout_out: dict, prompt_len: int, temperature: float = 1.0,
                        rng=None, *, vocab_limit: int | None = None) -> jax.Array:
  """log p [B, N] of each completion token under a training forward pass of the
  whole sequence at `temperature` (0 or 1: the model's own distribution) over
  ids < vocab_limit, 0 where the rollout's mask is 0: what a policy loss
  differentiates. Equals rollout's `logps` when it sampled at that temperature
  and vocab_limit without top-k / top-p."""
  seq = rollout_out['sequences']
  logits = models.forward(model, params, seq[:, :-1], rollout_out['positions'][:, :-1],
                          rollout_out['segment_ids'][:, :-1], rng)[:, prompt_len - 1:]
  logits = mask_vocab(logits / temperature if temperature > 0 else logits, vocab_limit)
  return losses.token_log_probs(logits, seq[:, prompt_len:]) * rollout_out['mask']


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, bucket: int = _BUCKET):
  """(tokens, segment_ids, positions) int32 [B, P] for left-padded prompts."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('every prompt needs at least one token (e.g. bos)')
  P = -(-max(len(p) for p in prompts) // bucket) * bucket
  tokens = np.full((len(prompts), P), pad_id, np.int32)
  segs = np.zeros((len(prompts), P), np.int32)
  pos = np.zeros((len(prompts), P), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, P - len(p):] = p
    segs[i, P - len(p):] = 1
    pos[i, P - len(p):] = np.arange(len(p))
  return tokens, segs, pos


def generate(model, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             rng: jax.Array | None = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_tokens: Sequence[int] = (), pad_id: int = 0,
             vocab_limit: int | None = None) -> list[list[int]]:
  """Continues each prompt; returns the new tokens of each, cut after the first
  stop token. Pass vocab_limit=tokenizer.vocab_size to sample only decodable ids."""
  tokens, segs, pos = left_pad(prompts, pad_id)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  out = rollout(model, params, tokens, segs, pos, rng, np.asarray(stop_tokens, np.int32),
                max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                top_p=float(top_p), pad_id=int(pad_id),
                vocab_limit=None if vocab_limit is None else int(vocab_limit))['tokens']
  if not out.is_fully_addressable:  # multi-process: every process gets all rows
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    out = multihost_utils.process_allgather(out, tiled=True)
  out = np.asarray(out)
  stops = {int(t) for t in stop_tokens}
  results = []
  for row in out:
    seq = []
    for t in row:
      seq.append(int(t))
      if int(t) in stops:
        break
    results.append(seq)
  return results
