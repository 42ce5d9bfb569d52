"""Every attention implementation that runs on this backend against a numpy
reference, with packed segments and padding (values), and against autodiff of the
plain formula (gradients). On CPU (CI): einsum, xla and auto; on a GPU (the GPU
check, experiments/gpu/check.sh) cudnn too, in bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models import layers

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
  """(impl, compute dtype, tolerance) for the implementations this backend runs."""
  cases = [('einsum', jnp.float32, 1e-5), ('xla', jnp.float32, 1e-5), ('auto', jnp.float32, 1e-5)]
  if jax.default_backend() == 'gpu':
    cases += [('cudnn', jnp.bfloat16, 2e-2), ('auto', jnp.bfloat16, 2e-2)]
  return cases


@pytest.mark.parametrize('impl,dtype,tol', _impls())
def test_attention_matches_numpy_with_packed_segments(impl, dtype, tol):
  q, k, v, mask = _inputs(dtype)
  out = layers.attend(q, k, v, mask, impl, dtype, causal=True)
  want = _numpy_attention(q, k, v)
  real = SEGMENTS[:, :, None, None] != 0  # padding queries' outputs are never used
  got = np.asarray(out, np.float64)
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=tol, rtol=tol)


@pytest.mark.parametrize('impl,dtype,tol', _impls())
def test_attention_gradients_match_the_plain_formula(impl, dtype, tol):
  q, k, v, mask = _inputs(dtype)
  real = jnp.asarray(SEGMENTS != 0)[:, :, None, None]
  cot = jax.random.normal(jax.random.PRNGKey(1), (B, T, H, Dh)) * real  # padding rows carry no loss

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cot)

  got = jax.grad(loss(lambda q, k, v: layers.attend(q, k, v, mask, impl, dtype, causal=True)), (0, 1, 2))(q, k, v)
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
  assert pick('auto', jnp.bfloat16, True, 'cpu') == 'einsum'
  assert pick('xla', jnp.float32, True, 'cpu') == 'xla'
