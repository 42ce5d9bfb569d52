"""Every attention implementation that runs on this backend against a numpy
reference, with packed segments and padding (values), and against autodiff of the
plain formula (gradients). On CPU (CI): einsum, blockwise (several tile sizes),
xla and auto; on a GPU (the GPU check, experiments/gpu/check.sh) cudnn too, in
bfloat16."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models import blockwise, layers, splash

B, T, H, K, Dh = 2, 40, 4, 2, 16
# Row 0: three packed documents and 6 padding slots; row 1: one document.
SEGMENTS = np.array([[1] * 10 + [2] * 17 + [3] * 7 + [0] * 6, [1] * T], np.int32)


def _inputs(dtype):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(kq, (B, T, H, Dh)).astype(dtype)
  k = jax.random.normal(kk, (B, T, K, Dh)).astype(dtype)
  v = jax.random.normal(kv, (B, T, K, Dh)).astype(dtype)
  slots = jnp.broadcast_to(jnp.arange(T), (B, T))
  seg = jnp.asarray(SEGMENTS)
  return q, k, v, layers.attention_mask(slots, seg, slots, seg)


def _numpy_attention(q, k, v):
  """float64 reference: causal within each non-padding segment (padding queries,
  whose outputs no loss reads, are left at 0)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  out = np.zeros(q.shape)
  for b in range(B):
    for t in range(T):
      for h in range(H):
        kh = h // (H // K)
        s = SEGMENTS[b]
        allowed = (np.arange(T) <= t) & (s == s[t]) & (s != 0)
        logits = k[b, :, kh] @ q[b, t, h] / np.sqrt(Dh)
        if s[t] == 0:
          continue
        w = np.where(allowed, np.exp(logits - logits[allowed].max()), 0)
        out[b, t, h] = (w / w.sum()) @ v[b, :, kh]
  return out


def _plain_attention(q, k, v, mask):
  """The textbook formula (jax.nn.softmax, no custom backward), float32."""
  k = jnp.repeat(k, H // K, axis=2).astype(jnp.float32)
  v = jnp.repeat(v, H // K, axis=2).astype(jnp.float32)
  logits = jnp.einsum('bthd,bshd->bhts', q.astype(jnp.float32), k) / np.sqrt(Dh)
  probs = jax.nn.softmax(jnp.where(mask, logits, layers.MASK_VALUE), axis=-1)
  return jnp.einsum('bhts,bshd->bthd', probs, v)


def _impls():
  """(name, attention fn(q, k, v, mask), compute dtype, tolerance) for the
  implementations this backend runs."""
  via = lambda impl: lambda q, k, v, mask, dtype: layers.attend(q, k, v, mask, impl, dtype, causal=True)
  tiles = lambda block: lambda q, k, v, mask, dtype: blockwise.blockwise_attention(q, k, v, mask, block=block)
  cases = [('einsum', via('einsum'), jnp.float32, 1e-5), ('xla', via('xla'), jnp.float32, 1e-5),
           ('auto', via('auto'), jnp.float32, 1e-5),
           ('blockwise 8', tiles(8), jnp.float32, 1e-5), ('blockwise 20', tiles(20), jnp.float32, 1e-5),
           ('blockwise 8 bf16', tiles(8), jnp.bfloat16, 2e-2)]
  if jax.default_backend() == 'gpu':
    cases += [('cudnn', via('cudnn'), jnp.bfloat16, 2e-2), ('auto bf16', via('auto'), jnp.bfloat16, 2e-2)]
  return [pytest.param(fn, dtype, tol, id=name) for name, fn, dtype, tol in cases]


@pytest.mark.parametrize('fn,dtype,tol', _impls())
def test_attention_matches_numpy_with_packed_segments(fn, dtype, tol):
  q, k, v, mask = _inputs(dtype)
  out = fn(q, k, v, mask, dtype)
  want = _numpy_attention(q, k, v)
  real = SEGMENTS[:, :, None, None] != 0  # padding queries' outputs are never used
  got = np.asarray(out, np.float64)
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=tol, rtol=tol)


@pytest.mark.parametrize('fn,dtype,tol', _impls())
def test_attention_gradients_match_the_plain_formula(fn, dtype, tol):
  q, k, v, mask = _inputs(dtype)
  real = jnp.asarray(SEGMENTS != 0)[:, :, None, None]
  cot = jax.random.normal(jax.random.PRNGKey(1), (B, T, H, Dh)) * real  # padding rows carry no loss

  def loss(attention):
    return lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32) * cot)

  got = jax.grad(loss(lambda q, k, v: fn(q, k, v, mask, dtype)), (0, 1, 2))(q, k, v)
  want = jax.grad(loss(lambda q, k, v: _plain_attention(q, k, v, mask)), (0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    scale = float(jnp.max(jnp.abs(w)))
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=tol * scale, rtol=tol)


def test_auto_picks_cudnn_only_where_it_applies():
  def pick(impl, dtype, causal, backend, T=64, Dh=64):
    return layers.resolve_attention_impl(impl, jax.ShapeDtypeStruct((2, T, 4, Dh), dtype), causal, backend)
  assert pick('auto', jnp.bfloat16, True, 'gpu') == 'cudnn'
  assert pick('auto', jnp.float16, True, 'gpu') == 'cudnn'
  assert pick('auto', jnp.float32, True, 'gpu') == 'einsum'
  assert pick('auto', jnp.bfloat16, False, 'gpu') == 'einsum'  # KV-cache decoding
  assert pick('auto', jnp.bfloat16, True, 'gpu', T=63) == 'einsum'  # cuDNN wants an even length
  assert pick('auto', jnp.bfloat16, True, 'gpu', Dh=20) == 'einsum'  # ... and head dim 8k <= 128
  assert pick('auto', jnp.bfloat16, True, 'cpu') == 'einsum'  # one tile: nothing to skip
  assert pick('auto', jnp.float32, True, 'cpu', T=2048) == 'blockwise'
  assert pick('auto', jnp.float32, True, 'gpu', T=2048) == 'blockwise'
  assert pick('auto', jnp.float32, True, 'cpu', T=1000) == 'einsum'  # not whole tiles
  assert pick('auto', jnp.float32, False, 'cpu', T=2048) == 'einsum'
  assert pick('xla', jnp.float32, True, 'cpu') == 'xla'
  assert pick('auto', jnp.bfloat16, True, 'tpu', T=1024) == 'splash'
  assert pick('auto', jnp.float32, True, 'tpu', T=128) == 'splash'
  assert pick('auto', jnp.bfloat16, True, 'tpu', T=100) == 'einsum'  # not whole 128-tiles
  assert pick('auto', jnp.bfloat16, False, 'tpu', T=1024) == 'einsum'  # KV-cache decoding


def test_splash_matches_the_plain_formula_with_packed_segments_on_a_mesh():
  """The Pallas splash kernel (interpreted on CPU, as it runs nowhere else in CI)
  through `attend`: values and gradients against autodiff of the textbook formula,
  GQA, three packed documents and padding, T = 128 (its smallest tile); once on
  one device and once under shard_map on a data 2 x fsdp 2 x tensor 2 mesh."""
  from jax.sharding import AxisType
  from configs.base import DEFAULT_RULES
  from research.training import sharding
  Bs, Ts = 4, 128
  ks = jax.random.split(jax.random.PRNGKey(5), 4)
  q = jax.random.normal(ks[0], (Bs, Ts, H, Dh))
  k, v = (jax.random.normal(kk, (Bs, Ts, K, Dh)) for kk in ks[1:3])
  seg = jnp.asarray(np.array([[1] * 40 + [2] * 70 + [0] * 18, [1] * Ts, [3] * 64 + [4] * 64, [1] * 5 + [0] * 123]),
                    jnp.int32)
  slots = jnp.broadcast_to(jnp.arange(Ts), (Bs, Ts))
  mask = layers.attention_mask(slots, seg, slots, seg)
  real = (seg != 0)[:, :, None, None]
  cot = jax.random.normal(ks[3], (Bs, Ts, H, Dh)) * real

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * cot)

  def splash_fn(q, k, v):
    return layers.attend(q, k, v, mask, 'splash', jnp.float32, causal=True, segment_ids_BT=seg)

  plain = lambda q, k, v: _plain_attention_with(q, k, v, mask)
  want, want_grads = plain(q, k, v), jax.grad(loss(plain), (0, 1, 2))(q, k, v)
  mesh = jax.make_mesh((2, 2, 1, 2), ('data', 'fsdp', 'expert', 'tensor'), axis_types=(AxisType.Auto,) * 4)
  for context in (None, sharding.MeshContext(mesh, DEFAULT_RULES)):
    with context or contextlib.nullcontext():
      got = jax.jit(splash_fn)(q, k, v)
      grads = jax.jit(jax.grad(loss(splash_fn), (0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=1e-5, rtol=1e-5)
    for g, w in zip(grads, want_grads):
      np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.max(jnp.abs(w))), rtol=1e-5)
  with sharding.MeshContext(mesh, DEFAULT_RULES):  # shapes shard_map cannot split evenly fall back
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    assert splash.supports(4, 128, H, K, sizes) and not splash.supports(2, 128, H, K, sizes)  # 4 batch shards
    assert not splash.supports(4, 128, H, 1, sizes) and not splash.supports(4, 100, H, K, sizes)


def _plain_attention_with(q, k, v, mask):
  """_plain_attention for any length (the textbook formula, jax.nn.softmax)."""
  groups = q.shape[2] // k.shape[2]
  k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))
  logits = jnp.einsum('bthd,bshd->bhts', q, k) / np.sqrt(q.shape[-1])
  probs = jax.nn.softmax(jnp.where(mask, logits, layers.MASK_VALUE), axis=-1)
  return jnp.einsum('bhts,bshd->bthd', probs, v)


def test_blockwise_never_holds_the_square_of_scores():
  """Compiled temporaries of forward + backward at T = 2048: the einsum path holds
  float32 [B, H, T, T] scores (64 MiB here); the blockwise one a few [B, H, 512,
  512] tiles (scores, probabilities and their gradients: 4 MiB each), whatever T."""
  Tl = 2048
  q = jax.ShapeDtypeStruct((1, Tl, H, Dh), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, Tl, K, Dh), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, 1, Tl, Tl), jnp.bool_)

  def temp_bytes(impl):
    f = lambda q, k, v, m: jnp.sum(layers.attend(q, k, v, m, impl, jnp.float32, causal=True))
    return jax.jit(jax.grad(f, (0, 1, 2))).lower(q, kv, kv, mask).compile().memory_analysis().temp_size_in_bytes

  square, tile = H * Tl * Tl * 4, H * layers.BLOCKWISE_BLOCK ** 2 * 4
  assert temp_bytes('einsum') >= square
  assert temp_bytes('blockwise') < 6 * tile
