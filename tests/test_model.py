"""Model correctness against independent references (numpy, closed forms)."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models import layers
from research.models.llama import Config, Model, init_cache

CFG = Config(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  qkv_bias=True)


def _init(cfg, T=12, seed=0):
  model = Model(cfg)
  tokens = jnp.zeros((1, T), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), tokens))['params']
  # Random (not tiny) norm scales and biases so every parameter matters.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return model, jax.tree.unflatten(tree, leaves)


def _tokens(B, T, seed=0, vocab=97):
  return jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, vocab)


def test_causal():
  model, params = _init(CFG)
  tok = _tokens(2, 12)
  base, _ = model.apply({'params': params}, tok)
  changed = tok.at[:, 7].set((tok[:, 7] + 1) % 97)
  out, _ = model.apply({'params': params}, changed)
  np.testing.assert_array_equal(np.asarray(out[:, :7]), np.asarray(base[:, :7]))
  assert np.abs(np.asarray(out[:, 7:] - base[:, 7:])).max() > 1e-4


def test_packed_segments_do_not_attend_to_each_other():
  model, params = _init(CFG)
  tok = _tokens(1, 12)
  seg = jnp.asarray([[1] * 5 + [2] * 7])
  pos = jnp.asarray([list(range(5)) + list(range(7))])
  base, _ = model.apply({'params': params}, tok, pos, seg)
  # Perturb every token of segment 1: segment 2's logits must not move.
  changed = tok.at[:, :5].set((tok[:, :5] + 3) % 97)
  out, _ = model.apply({'params': params}, changed, pos, seg)
  np.testing.assert_array_equal(np.asarray(out[:, 5:]), np.asarray(base[:, 5:]))
  # And segment 2 alone, from position 0, gives the same logits as in the pack.
  alone, _ = model.apply({'params': params}, tok[:, 5:])
  np.testing.assert_allclose(np.asarray(alone), np.asarray(base[:, 5:]), rtol=1e-5, atol=1e-5)


def _numpy_inv_freq(dim, theta, factor=0.0, lo=1.0, hi=4.0, old=8192):
  inv = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
  if not factor:
    return inv
  out = []
  for f in inv:  # Llama 3.1 rule, written per frequency
    wavelen = 2 * math.pi / f
    if wavelen < old / hi:
      out.append(f)
    elif wavelen > old / lo:
      out.append(f / factor)
    else:
      s = (old / wavelen - lo) / (hi - lo)
      out.append((1 - s) * f / factor + s * f)
  return np.asarray(out)


def _numpy_rope(x, pos, inv):  # x [T, D]; rotate pairs (i, i + D/2)
  half = x.shape[-1] // 2
  out = np.empty_like(x)
  for t in range(x.shape[0]):
    for i in range(half):
      a = pos[t] * inv[i]
      x1, x2 = x[t, i], x[t, i + half]
      out[t, i] = x1 * math.cos(a) - x2 * math.sin(a)
      out[t, i + half] = x2 * math.cos(a) + x1 * math.sin(a)
  return out


@pytest.mark.parametrize('theta,factor', [(10000.0, 0.0), (500000.0, 8.0)])
def test_rope_against_numpy(theta, factor):
  cfg = Config(d_model=64, n_heads=1, head_dim=64, rope_theta=theta, rope_scaling_factor=factor,
                    rope_original_max_len=8192)
  inv = np.asarray(layers.rope_inv_freq(cfg.head_dim, cfg.rope))
  np.testing.assert_allclose(inv, _numpy_inv_freq(64, theta, factor), rtol=1e-5)
  x = np.random.RandomState(0).randn(6, 64).astype(np.float32)
  # Angles are float32 (as in HF); beyond ~1000 rad their rounding alone exceeds 1e-4.
  pos = np.asarray([0, 1, 5, 100, 517, 1000])
  got = layers.apply_rope(jnp.asarray(x)[None, :, None, :], jnp.asarray(pos)[None], jnp.asarray(inv))
  np.testing.assert_allclose(np.asarray(got)[0, :, 0], _numpy_rope(x, pos, inv), rtol=1e-4, atol=1e-4)


def _numpy_forward(params, cfg, tokens):
  """Independent float64 numpy implementation of the whole decoder."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = p['embed']['embedding'][tokens]
  T = tokens.shape[0]
  inv = _numpy_inv_freq(cfg.head_dim, cfg.rope_theta)
  pos = np.arange(T)

  def norm(v, scale):
    return v / np.sqrt(np.mean(v * v, -1, keepdims=True) + cfg.norm_eps) * scale

  for i in range(cfg.n_layers):
    lp = p[f'layers_{i}']
    a = lp['attn']
    h = norm(x, lp['attn_norm']['scale'])
    q = np.einsum('td,dhk->thk', h, a['q']['kernel']) + a['q']['bias']
    k = np.einsum('td,dhk->thk', h, a['k']['kernel']) + a['k']['bias']
    v = np.einsum('td,dhk->thk', h, a['v']['kernel']) + a['v']['bias']
    q = np.stack([_numpy_rope(q[:, j], pos, inv) for j in range(cfg.n_heads)], 1)
    k = np.stack([_numpy_rope(k[:, j], pos, inv) for j in range(cfg.n_kv_heads)], 1)
    group = cfg.n_heads // cfg.n_kv_heads
    heads = []
    for j in range(cfg.n_heads):
      kj, vj = k[:, j // group], v[:, j // group]
      s = q[:, j] @ kj.T / math.sqrt(cfg.head_dim)
      s = np.where(np.tril(np.ones((T, T))) > 0, s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      heads.append((w / w.sum(-1, keepdims=True)) @ vj)
    o = np.einsum('thk,hkd->td', np.stack(heads, 1), a['o']['kernel'])
    x = x + o
    h = norm(x, lp['mlp_norm']['scale'])
    g = h @ lp['mlp']['gate']['kernel']
    x = x + ((g / (1 + np.exp(-g))) * (h @ lp['mlp']['up']['kernel'])) @ lp['mlp']['down']['kernel']
  x = norm(x, p['final_norm']['scale'])
  return x @ p['lm_head']['kernel']


@pytest.mark.parametrize('cfg', [CFG, dataclasses.replace(CFG, n_kv_heads=4)],
                         ids=['gqa', 'mha'])  # attention takes a different einsum path when H == K
def test_forward_matches_numpy_reference(cfg):
  model, params = _init(cfg)
  tok = np.asarray(_tokens(1, 10))
  got, _ = model.apply({'params': params}, jnp.asarray(tok))
  want = _numpy_forward(params, cfg, tok[0])
  scale = np.abs(want).max()
  np.testing.assert_allclose(np.asarray(got[0]), want, atol=1e-4 * scale)


def test_kv_cache_decode_matches_full_forward():
  model, params = _init(CFG)
  tok = _tokens(2, 16)
  full, _ = model.apply({'params': params}, tok)
  cache = init_cache(CFG, 2, 24)
  logits, cache = model.apply({'params': params}, tok[:, :9], cache=cache)
  outs = [logits]
  for t in range(9, 16):
    logits, cache = model.apply({'params': params}, tok[:, t:t + 1], cache=cache)
    outs.append(logits)
  np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_scan_layers_matches_loop():
  model, params = _init(CFG)
  scan_cfg = dataclasses.replace(CFG, scan_layers=True, remat='full')
  stacked = {k: v for k, v in params.items() if not k.startswith('layers_')}
  stacked['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f'layers_{i}'] for i in range(2)])
  tok = _tokens(2, 12)
  a, _ = model.apply({'params': params}, tok)
  b, _ = Model(scan_cfg).apply({'params': stacked}, tok)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_tied_embeddings_and_bf16_compute_run():
  cfg = dataclasses.replace(CFG, tie_embeddings=True, dtype='bfloat16')
  model, params = _init(cfg)
  assert 'lm_head' not in params
  logits, _ = model.apply({'params': params}, _tokens(1, 8))
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_scan_layers_gives_same_loss_and_grads_in_training():
  from research.stages import pretrain
  model, params = _init(CFG)
  scan_model = Model(dataclasses.replace(CFG, scan_layers=True, remat='dots_saveable'))
  stacked = {k: v for k, v in params.items() if not k.startswith('layers_')}
  stacked['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f'layers_{i}'] for i in range(2)])
  tok = _tokens(2, 13)
  batch = {'inputs': tok[:, :-1], 'targets': tok[:, 1:], 'segment_ids': jnp.ones((2, 12), jnp.int32),
           'positions': jnp.broadcast_to(jnp.arange(12), (2, 12))}
  f = lambda m: jax.value_and_grad(lambda p: pretrain.loss(m, p, batch, {}, None)[0])
  loss_a, grads_a = f(model)(params)
  loss_b, grads_b = f(scan_model)(stacked)
  np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
  for i in range(2):
    for a, b in zip(jax.tree.leaves(grads_a[f'layers_{i}']),
                    jax.tree.leaves(jax.tree.map(lambda x: x[i], grads_b['layers']))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_dot_product_attention_impl_matches_einsum():
  model, params = _init(CFG)
  xla = Model(dataclasses.replace(CFG, attention_impl='xla'))
  tok = _tokens(2, 12)
  seg = jnp.asarray([[1] * 5 + [2] * 7, [1] * 12])
  a, _ = model.apply({'params': params}, tok, None, seg)
  b, _ = xla.apply({'params': params}, tok, None, seg)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_splash_impl_matches_einsum_through_the_scanned_model():
  """attention_impl='splash' (the Pallas TPU kernel, interpreted on CPU): the model's
  segment ids reach it through the scanned blocks; on every non-padding position of
  packed rows its logits are as close to a float64 reference as einsum's are."""
  cfg = dataclasses.replace(CFG, scan_layers=True, attention_impl='einsum')
  model, params = _init(cfg)
  splash = Model(dataclasses.replace(cfg, attention_impl='splash'))
  tok = _tokens(2, 128)
  seg = jnp.asarray([[1] * 50 + [2] * 60 + [0] * 18, [1] * 128])
  real = np.asarray(seg != 0)[:, :, None]
  a, _ = model.apply({'params': params}, tok, None, seg)
  b, _ = splash.apply({'params': params}, tok, None, seg)
  # Why a float64 reference and not a tolerance between the two: einsum (one softmax)
  # and splash (online softmax over blocks) are two float32 algorithms; their logits
  # (up to 7 here) differ by rounding, 0.8-1.6e-5 depending on the CPU and the thread
  # count, and each is 1.4-2.1e-5 from the float64 answer. A masking or segment bug
  # moves logits by O(1) (ignoring the segment ids: 9.8). The reference is float64
  # between the parts that stay float32 by design (softmax, norms, logits).
  with jax.enable_x64(True):
    model64 = Model(dataclasses.replace(cfg, dtype='float64', param_dtype='float64'))
    params64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    ref = np.asarray(model64.apply({'params': params64}, tok, None, seg)[0], np.float64)
  err_einsum, err_splash = (np.abs(np.where(real, np.asarray(x, np.float64) - ref, 0)).max() for x in (a, b))
  assert 0 < err_einsum < 1e-4, err_einsum  # the reference is more precise than float32
  assert err_splash <= 2 * err_einsum, (err_splash, err_einsum)


@pytest.mark.parametrize('heads,kv_heads', [(4, 4), (4, 2), (6, 1)])
def test_einsum_attention_matches_plain_softmax_attention_and_its_gradients(heads, kv_heads):
  """einsum_attention (grouped layouts, hand-written softmax backward) against
  autodiff of plain softmax attention with repeated kv heads, with two packed
  segments, a padding query row (fully masked) and causality."""
  B, T, Dh = 2, 9, 8
  ks = jax.random.split(jax.random.PRNGKey(3), 4)
  q = jax.random.normal(ks[0], (B, T, heads, Dh))
  k, v = (jax.random.normal(kk, (B, T, kv_heads, Dh)) for kk in ks[1:3])
  g = jax.random.normal(ks[3], (B, T, heads, Dh))
  seg = np.array([[1] * 5 + [2] * 3 + [0], [1] * 9])
  mask = jnp.asarray((seg[:, :, None] == seg[:, None, :]) & np.tril(np.ones((T, T), bool))
                     & (seg[:, :, None] > 0))[:, None]

  def plain(q, k, v):
    k, v = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k, v))
    s = jnp.where(mask, jnp.einsum('bthd,bshd->bhts', q, k) / np.sqrt(Dh), layers.MASK_VALUE)
    return jnp.einsum('bhts,bshd->bthd', jax.nn.softmax(s, axis=-1), v)

  got, got_vjp = jax.vjp(lambda *a: layers.einsum_attention(*a, mask, jnp.float32), q, k, v)
  want, want_vjp = jax.vjp(plain, q, k, v)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  for a, b in zip(got_vjp(g), want_vjp(g)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6)


def test_hand_written_backward_rules_match_autodiff():
  """The custom VJPs (softmax, SwiGLU: written for XLA:CPU speed) against
  autodiff of the plain formulas, on random inputs and cotangents."""
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  x, g = 3 * jax.random.normal(k1, (3, 5, 7)), jax.random.normal(k2, (3, 5, 7))
  x = x.at[0, 0, :3].set(layers.MASK_VALUE)  # masked scores, as attention feeds them
  want = jax.vjp(lambda v: jax.nn.softmax(v, axis=-1), x)[1](g)[0]
  got = jax.vjp(layers.softmax, x)[1](g)[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  gate, up = 3 * jax.random.normal(k3, (4, 6)), jax.random.normal(k4, (4, 6))
  want = jax.vjp(lambda a, b: jax.nn.silu(a) * b, gate, up)[1](g[0, :4, :6])
  got = jax.vjp(layers.swiglu, gate, up)[1](g[0, :4, :6])
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
