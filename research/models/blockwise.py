"""Blockwise causal attention: the flash-attention algorithm in plain JAX.

The einsum path holds float32 scores [B, H, T, T] (8.6 GB per sequence at
T = 8192 with 32 heads), forward and backward. This path walks query blocks and,
for each, the key blocks at or before it (the causal skip: about half the work
of the full square), keeping a running max and sum (online softmax), so the
largest temporary is one [B, H, block, block] tile. The backward pass recomputes
each tile from the saved log-sum-exp instead of storing probabilities (Dao et
al., 2022, FlashAttention-2's loop order); `jax.custom_vjp` keeps autodiff from
saving every tile of the loops.

It runs anywhere XLA does; `layers.resolve_attention_impl` picks it on CPU for
long causal sequences. The mask is the same [B, 1, T, S] boolean as the other
paths (segments, padding, causality), sliced per tile.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# Finite, as in layers.MASK_VALUE: a fully masked (padding) query row stays finite.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _tile(x, i, size, axis):
  return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def _scores(q_tile, k_tile, mask_tile, scale):
  """Masked float32 scores [B, K, G, bq, bk] of one tile."""
  s = jnp.einsum('btkgd,bskd->bkgts', q_tile, k_tile, preferred_element_type=jnp.float32) * scale
  return jnp.where(mask_tile[:, :, None], s, _MASK_VALUE)


def _kv_blocks(i, n_kv, causal):
  """Key blocks that query block i visits: 0..i when causal (square tiles), else all."""
  return i + 1 if causal else n_kv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q_BTKGD, k_BSKD, v_BSKD, mask_B1TS, block: int, causal: bool):
  return _forward(q_BTKGD, k_BSKD, v_BSKD, mask_B1TS, block, causal)[0]


def _forward(q, k, v, mask, block, causal):
  B, T, K, G, D = q.shape
  scale = 1.0 / math.sqrt(D)
  n_q, n_kv = T // block, k.shape[1] // block

  def q_block(i, carry):
    out, lse = carry
    q_i = _tile(q, i, block, 1)

    def kv_block(j, state):
      m, l, acc = state
      s = _scores(q_i, _tile(k, j, block, 1), _tile(_tile(mask, i, block, 2), j, block, 3), scale)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      correction = jnp.exp(m - m_new)
      l = l * correction + p.sum(-1)
      pv = jnp.einsum('bkgts,bskd->bkgtd', p.astype(v.dtype), _tile(v, j, block, 1),
                      preferred_element_type=jnp.float32)
      return m_new, l, acc * correction[..., None] + pv

    m0 = jnp.full((B, K, G, block), _MASK_VALUE, jnp.float32)
    state = (m0, jnp.zeros((B, K, G, block), jnp.float32), jnp.zeros((B, K, G, block, D), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, _kv_blocks(i, n_kv, causal), kv_block, state)
    out_i = (acc / l[..., None]).transpose(0, 3, 1, 2, 4)  # [B, bq, K, G, D]
    out = jax.lax.dynamic_update_slice_in_dim(out, out_i.astype(out.dtype), i * block, axis=1)
    lse = jax.lax.dynamic_update_slice_in_dim(lse, m + jnp.log(l), i * block, axis=3)
    return out, lse

  init = (jnp.zeros(q.shape, q.dtype), jnp.zeros((B, K, G, T), jnp.float32))
  out, lse = jax.lax.fori_loop(0, n_q, q_block, init)
  return out, (q, k, v, mask, out, lse)


def _backward(block, causal, res, d_out):
  q, k, v, mask, out, lse = res
  D = q.shape[-1]
  scale = 1.0 / math.sqrt(D)
  n_q, n_kv = q.shape[1] // block, k.shape[1] // block
  # delta_t = sum_d dO * O: the softmax backward's row term, once per query.
  delta = jnp.einsum('btkgd,btkgd->bkgt', d_out.astype(jnp.float32), out.astype(jnp.float32))

  def q_block(i, carry):
    dq, dk, dv = carry
    q_i, do_i = _tile(q, i, block, 1), _tile(d_out, i, block, 1)
    lse_i, delta_i = _tile(lse, i, block, 3), _tile(delta, i, block, 3)

    def kv_block(j, inner):
      dq_i, dk, dv = inner
      k_j, v_j = _tile(k, j, block, 1), _tile(v, j, block, 1)
      s = _scores(q_i, k_j, _tile(_tile(mask, i, block, 2), j, block, 3), scale)
      p = jnp.exp(s - lse_i[..., None])  # the forward's probabilities, recomputed
      dv_j = jnp.einsum('bkgts,btkgd->bskd', p.astype(do_i.dtype), do_i, preferred_element_type=jnp.float32)
      dp = jnp.einsum('btkgd,bskd->bkgts', do_i, v_j, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_i[..., None]) * scale
      dq_i = dq_i + jnp.einsum('bkgts,bskd->btkgd', ds, k_j.astype(jnp.float32))
      dk_j = jnp.einsum('bkgts,btkgd->bskd', ds, q_i.astype(jnp.float32))
      dk = jax.lax.dynamic_update_slice_in_dim(dk, _tile(dk, j, block, 1) + dk_j, j * block, axis=1)
      dv = jax.lax.dynamic_update_slice_in_dim(dv, _tile(dv, j, block, 1) + dv_j, j * block, axis=1)
      return dq_i, dk, dv

    dq_i = jnp.zeros(q_i.shape, jnp.float32)
    dq_i, dk, dv = jax.lax.fori_loop(0, _kv_blocks(i, n_kv, causal), kv_block, (dq_i, dk, dv))
    return jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * block, axis=1), dk, dv

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  dq, dk, dv = jax.lax.fori_loop(0, n_q, q_block, (zeros(q), zeros(k), zeros(v)))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_forward, _backward)


def blockwise_attention(q_BTHD, k_BSKD, v_BSKD, mask_B1TS, *, block: int = 512, causal: bool = True):
  """Attention output [B, T, H, Dh], equal to `layers.einsum_attention` (float32
  softmax statistics, probabilities in the compute dtype for the value matmul).

  T and S must be multiples of `block`; `causal` (query block i and key block i
  cover the same slots) skips the key blocks after each query block.
  """
  B, T, H, Dh = q_BTHD.shape
  K = k_BSKD.shape[2]
  if T % block or k_BSKD.shape[1] % block:
    raise ValueError(f'blockwise attention needs lengths divisible by block={block}; got {T}, {k_BSKD.shape[1]}')
  q = q_BTHD.reshape(B, T, K, H // K, Dh)
  out = _attention(q, k_BSKD.astype(q.dtype), v_BSKD.astype(q.dtype), mask_B1TS, block, causal)
  return out.reshape(B, T, H, Dh)
