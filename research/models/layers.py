"""Family-neutral layers: Linear with LoRA, RMSNorm, RoPE, attention, SwiGLU, remat.

A model family (llama.py, qwen3.py, ...) composes these into its block. Every
parameter carries logical axis names; the trainer maps them to mesh axes with
the rule table in the config.

Several choices here are about XLA:CPU speed (2-D matmuls, RoPE without
concatenate, hand-written backward rules for softmax and SwiGLU); each says
why where it is made, and each computes the same function as the plain form
(tests/test_model.py checks them against numpy and autodiff).

Shape suffixes: B batch, T query length, S key length (cache size), D model
width, H query heads, K kv heads, G = H // K, Dh head dim, F MLP width.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from research.models import blockwise, quant, splash

Array = jax.Array
# Large negative instead of -inf: a fully masked row (padding) gives a uniform
# softmax rather than NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
ATTENTION_IMPLS = ('auto', 'einsum', 'blockwise', 'xla', 'cudnn', 'splash')
BLOCKWISE_BLOCK = 512  # tile edge of the blockwise path; 'auto' uses it from 2 tiles up
_FUSED_DTYPES = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters (Hu et al., 2021) on kernels whose path
  ('layers_0/attn/q/kernel', ...) fully matches the regex `targets`."""

  rank: int
  alpha: float = 16.0
  dropout: float = 0.0
  targets: str = ''
  rslora: bool = False

  @property
  def scale(self) -> float:
    """alpha / rank, or alpha / sqrt(rank) with rsLoRA (Kalajdzievski, 2023)."""
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class Rope:
  """Rotary position embedding settings: base `theta`, and Llama-3.1 frequency
  scaling when scaling_factor > 0."""

  theta: float = 10000.0
  scaling_factor: float = 0.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 8192


def rope_inv_freq(head_dim: int, rope: Rope) -> Array:
  """Inverse frequencies [Dh/2], with Llama-3.1 scaling when enabled."""
  inv_freq = 1.0 / (rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if rope.scaling_factor <= 0:
    return inv_freq
  factor, lo, hi = rope.scaling_factor, rope.low_freq_factor, rope.high_freq_factor
  old_len = rope.original_max_len
  wavelen = 2 * math.pi / inv_freq
  # Long wavelengths are slowed by `factor`, short ones kept, the middle band
  # interpolated smoothly (Llama 3.1 report, section on long context).
  scaled = jnp.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - lo) / (hi - lo)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
  return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x_BTHD: Array, positions_BT: Array, inv_freq: Array) -> Array:
  """Rotary embedding, 'rotate half' layout (as in HF transformers)."""
  angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq
  sin = jnp.sin(angles_BTF)[:, :, None, None, :]
  cos = jnp.cos(angles_BTF)[:, :, None, None, :]
  # [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], written with the halves as an
  # axis of size 2 and a flip of it instead of split + concatenate: same values,
  # but XLA:CPU's concatenate fusions (forward and backward) are slow.
  *lead, Dh = x_BTHD.shape
  x = x_BTHD.astype(jnp.float32).reshape(*lead, 2, Dh // 2)
  sin_signed = jnp.concatenate([-sin, sin], axis=3)  # [B, T, 1, 2, Dh/2], small
  out = x * cos + jnp.flip(x, axis=3) * sin_signed
  return out.reshape(x_BTHD.shape).astype(x_BTHD.dtype)


def attention_mask(q_slots_BT: Array, q_seg_BT: Array, kv_slots_BS: Array, kv_seg_BS: Array) -> Array:
  """Boolean [B, 1, T, S]: causal over row slots, same non-padding segment."""
  causal = kv_slots_BS[:, None, :] <= q_slots_BT[:, :, None]
  same_seg = (kv_seg_BS[:, None, :] == q_seg_BT[:, :, None]) & (kv_seg_BS[:, None, :] != 0)
  return (causal & same_seg)[:, None, :, :]


class RMSNorm(nn.Module):
  """RMSNorm computed in float32, output in the compute dtype. With offset=1
  (Gemma) the weight multiplies as (1 + scale) and starts at 0."""

  eps: float
  dtype: Any
  param_dtype: Any
  offset: float = 0.0

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    scale = self.param('scale', nn.with_logical_partitioning(init, ('norm',)), (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * (self.offset + scale.astype(jnp.float32))).astype(self.dtype)


def softcap(x: Array, cap: float) -> Array:
  """cap * tanh(x / cap) (Gemma 2's attention and final logit soft-capping); x if cap is 0."""
  return cap * jnp.tanh(x / cap) if cap else x


def window_mask(q_slots_BT: Array, kv_slots_BS: Array, window: int) -> Array:
  """Boolean [B, 1, T, S]: the key is one of the `window` latest slots up to the
  query's (sliding-window attention, as transformers counts it)."""
  return ((q_slots_BT[:, :, None] - kv_slots_BS[:, None, :]) < window)[:, None, :, :]


class Linear(nn.Module):
  """y = x . W (+ b) (+ LoRA), contracting the last `n_in` dims of x with W's leading dims.

  With `lora` set and this kernel's path matching `lora.targets`, adds
  scale * dropout(x) . A . B: A [in..., r] random, B [r, out...] zero, so the
  model starts unchanged. Dropout is active only when the caller passes a
  'dropout' rng (training).

  Hand-written rather than nn.DenseGeneral because DenseGeneral initialises a
  flattened 2-D kernel, which breaks logical partitioning of N-D kernels.
  """

  features: tuple[int, ...]
  axes: tuple[str, ...]  # logical names of the kernel dims (inputs, then outputs)
  n_in: int = 1
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  init_std: float = 0.02
  lora: LoraConfig | None = None
  f32_output: bool = False  # accumulate and return float32 (the output layer's logits)

  @nn.compact
  def __call__(self, x, defer: bool = False):
    """x . W (+ b) (+ LoRA); with defer=True, an Unembedding instead: this layer's
    weights and per-token inputs, whose .logits(chunk of features) gives the same
    output a chunk at a time (an output layer with n_in=1 and no bias only)."""
    shape = tuple(x.shape[-self.n_in:]) + tuple(self.features)
    kernel = quant.param(self, 'kernel', nn.with_logical_partitioning(
        nn.initializers.normal(self.init_std), self.axes), shape, self.param_dtype)
    kernel = quant.materialize(kernel, self.param_dtype)  # a QLoRA base: dequantized here, per layer
    if defer:
      return self._deferred(x, kernel, shape)
    # As one 2-D matmul [rows, in] x [in, out] (reshapes are free): with the
    # leading dims (batch, length) kept apart, the kernel gradient contracts
    # two dims, which XLA:CPU lowers to a transposed copy of the output
    # gradient plus a slower matmul (about 2x the cost of the 2-D form).
    n_in, n_out = math.prod(shape[:self.n_in]), math.prod(self.features)
    y = jax.lax.dot_general(x.reshape(-1, n_in).astype(self.dtype),
                            kernel.reshape(n_in, n_out).astype(self.dtype), (((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32 if self.f32_output else None)
    y = y.reshape(x.shape[:x.ndim - self.n_in] + tuple(self.features))
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(
          nn.initializers.zeros, self.axes[self.n_in:]), tuple(self.features), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self._has_lora():
      y = y + self._lora_delta(x, shape)
    return y

  def _deferred(self, x, kernel, shape) -> 'Unembedding':
    if self.n_in != 1 or self.use_bias or len(self.features) != 1:
      raise ValueError('Linear(defer=True) is for an output layer: one input and one output dim, no bias.')
    features = {'hidden': x.astype(self.dtype)}
    lora_b, scale = None, 0.0
    if self._has_lora():  # A's side is per token and cheap ([..., r]); B's waits for each chunk
      features['lora'], lora_b = self._lora_in(x, shape)
      scale = self.lora.scale
    return Unembedding(features, kernel, lora_b_RV=lora_b, lora_scale=scale, dtype=self.dtype,
                       f32_output=self.f32_output)

  def _has_lora(self) -> bool:
    return (self.lora is not None and self.lora.rank > 0 and
            re.fullmatch(self.lora.targets, '/'.join(self.path) + '/kernel') is not None)

  def _lora_delta(self, x, shape):
    h, b = self._lora_in(x, shape)
    delta = jax.lax.dot_general(h, b.astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ())))
    return self.lora.scale * delta

  def _lora_in(self, x, shape):
    """(dropout(x) . A [..., r] in the compute dtype, B [r, out...])."""
    r = self.lora.rank
    in_shape = shape[:self.n_in]
    a = self.param('lora_a', nn.with_logical_partitioning(
        nn.initializers.normal(1.0 / math.sqrt(math.prod(in_shape))), self.axes[:self.n_in] + ('lora',)),
        in_shape + (r,), self.param_dtype)
    b = self.param('lora_b', nn.with_logical_partitioning(
        nn.initializers.zeros, ('lora',) + self.axes[self.n_in:]), (r,) + tuple(self.features),
        self.param_dtype)
    if self.lora.dropout > 0 and self.has_rng('dropout'):
      x = nn.Dropout(self.lora.dropout, deterministic=False)(x)
    contract = tuple(range(x.ndim - self.n_in, x.ndim))
    h = jax.lax.dot_general(x.astype(self.dtype), a.astype(self.dtype),
                            ((contract, tuple(range(self.n_in))), ((), ())))
    return h, b


@struct.dataclass
class Unembedding:
  """An output layer not yet applied: its per-token inputs and its weights, so a
  loss can form logits a chunk of positions at a time (losses.chunked_token_log_probs)
  instead of holding [B, T, V] at once. `logits` computes what the model's head
  computes, with the same operations.

  features: {'hidden': [B, T, D] final normed hidden states (compute dtype), and with
            LoRA on the head 'lora': [B, T, r] = dropout(hidden) . lora_a}
  kernel:   [D, V] (an lm_head), or [V, D] with transposed=True (tied: the embedding),
            in the parameter dtype: cast to `dtype` inside each chunk, so that the
            gradient summed over chunks stays in the parameter dtype (float32), not bfloat16
  """

  features: dict
  kernel: Array
  lora_b_RV: Array | None = None
  lora_scale: float = struct.field(pytree_node=False, default=0.0)
  transposed: bool = struct.field(pytree_node=False, default=False)
  dtype: Any = struct.field(pytree_node=False, default=jnp.float32)
  f32_output: bool = struct.field(pytree_node=False, default=True)
  final_softcap: float = struct.field(pytree_node=False, default=0.0)  # Gemma 2's, on the logits

  def logits(self, features: dict) -> Array:
    """Logits [B, C, V] of a chunk of `features` ([B, C, ...] each), float32 when
    the head accumulates in float32, vocab sharded like the full logits."""
    x_BCD = nn.with_logical_constraint(features['hidden'], ('batch', 'length', 'embed'))
    out = jnp.float32 if self.f32_output else None
    kernel = self.kernel.astype(self.dtype)
    if self.transposed:
      y_BCV = jnp.einsum('btd,vd->btv', x_BCD, kernel, preferred_element_type=out)
    else:  # 2-D, as Linear computes it (see there)
      D, V = kernel.shape
      y_BCV = jax.lax.dot_general(x_BCD.reshape(-1, D), kernel, (((1,), (0,)), ((), ())),
                                  preferred_element_type=out).reshape(x_BCD.shape[:-1] + (V,))
    if self.lora_b_RV is not None:
      h, b = features['lora'], self.lora_b_RV.astype(self.dtype)
      y_BCV = y_BCV + self.lora_scale * jax.lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())))
    return nn.with_logical_constraint(softcap(y_BCV, self.final_softcap), ('batch', 'length', 'vocab'))


@jax.custom_vjp
def softmax(x):
  """Softmax over the last axis whose backward uses only the probabilities.

  Autodiff of jax.nn.softmax goes through its exp / sum / divide, and XLA:CPU then
  keeps (materialises) several [B, H, T, S] intermediates; the closed form
  p * (g - sum(g * p)) needs only p.
  """
  return jax.nn.softmax(x, axis=-1)


def _softmax_fwd(x):
  p = softmax(x)
  return p, p


def _softmax_bwd(p, g):
  return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def einsum_attention(q_BTHD, k_BSKD, v_BSKD, mask_B1TS, dtype, logit_softcap: float = 0.0):
  """Grouped-query attention with explicit matmuls; softmax in float32; scores
  soft-capped (Gemma 2) when logit_softcap > 0."""
  B, T, H, Dh = q_BTHD.shape
  K = k_BSKD.shape[2]
  # Scores in the matmul's natural output order (batch dims b k, then q's free
  # dims, then s): with another order, or a unit g axis when H == K, XLA:CPU
  # adds transposing copies of the [B, H, T, S] scores, forward and backward.
  if H == K:
    q, q_dims, s_dims, mask = q_BTHD, 'btkd', 'bkts', mask_B1TS
  else:
    q, q_dims, s_dims, mask = q_BTHD.reshape(B, T, K, H // K, Dh), 'btkgd', 'bktgs', mask_B1TS[:, :, :, None]
  logits = jnp.einsum(f'{q_dims},bskd->{s_dims}', q, k_BSKD,
                      preferred_element_type=jnp.float32) / math.sqrt(Dh)
  logits = jnp.where(mask, softcap(logits, logit_softcap), MASK_VALUE)
  probs = softmax(logits).astype(dtype)
  out = jnp.einsum(f'{s_dims},bskd->{q_dims}', probs, v_BSKD)
  return out.reshape(B, T, H, Dh)


def resolve_attention_impl(impl: str, q_BTHD, causal: bool, backend: str | None = None) -> str:
  """The implementation `attend` runs for config.model.attention_impl=`impl`.

  'auto' picks, for a causal call over one sequence (training and scoring):
  cuDNN's fused flash attention on a GPU when the queries are bfloat16 or
  float16 and cuDNN takes the shape (head dim a multiple of 8 up to 128, an even
  length; it skips the masked upper triangle); on a TPU the Pallas splash kernel
  (splash.py) for lengths in multiples of 128 (`attend` falls back when the model
  gives no segment ids, e.g. sliding windows); otherwise the blockwise path
  (blockwise.py: no [T, T] scores, causal blocks skipped) from 2 tiles of
  BLOCKWISE_BLOCK up, when the length divides into them; otherwise, and for
  decoding against a KV cache, the einsum path. Other values pass through.
  `q_BTHD` may be an array or a jax.ShapeDtypeStruct.
  """
  if impl != 'auto':
    return impl
  _, T, _, Dh = q_BTHD.shape
  backend = backend or jax.default_backend()
  half = jnp.dtype(q_BTHD.dtype) in map(jnp.dtype, _FUSED_DTYPES)
  if causal and half and Dh % 8 == 0 and Dh <= 128 and T % 2 == 0 and backend == 'gpu':
    return 'cudnn'
  if causal and backend == 'tpu' and T % 128 == 0:
    return 'splash'
  if causal and T >= 2 * BLOCKWISE_BLOCK and T % BLOCKWISE_BLOCK == 0:
    return 'blockwise'
  return 'einsum'


def attend(q_BTHD, k_BSKD, v_BSKD, mask_B1TS, impl: str, dtype, causal: bool = False,
           logit_softcap: float = 0.0, segment_ids_BT=None):
  """Attention output [B, T, H, Dh] with the configured implementation:
  einsum (explicit matmuls, float32 softmax), blockwise (blockwise.py: the same
  numbers without [T, T] scores) or jax.nn.dot_product_attention's xla / cudnn
  (cudnn needs a GPU and bf16/fp16 compute); 'auto' as `resolve_attention_impl` says.

  `causal`: query i and key i are the same slot (no KV cache), so everything above
  the diagonal is masked anyway; cuDNN then skips those blocks. `mask_B1TS` (the
  segments, padding and the causal mask itself) is applied in every case.
  Soft-capped scores (logit_softcap > 0, Gemma 2) take the einsum path, the only
  one that caps them. 'splash' (Pallas; interpret mode off TPU) needs
  `segment_ids_BT` (the only mask it reads: causal within segments, so no
  sliding window) and a shape splash.supports; else 'auto' decides without it.
  """
  impl = 'einsum' if logit_softcap else resolve_attention_impl(impl, q_BTHD, causal)
  if impl == 'splash':
    mesh = jax.sharding.get_abstract_mesh()
    sizes = {} if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes))
    B, T, H, _ = q_BTHD.shape
    if causal and segment_ids_BT is not None and splash.supports(B, T, H, k_BSKD.shape[2], sizes):
      return splash.splash_attention(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT, dtype)
    impl = resolve_attention_impl('auto', q_BTHD, causal, backend='cpu')  # the blockwise or einsum path
  if impl == 'blockwise' and (q_BTHD.shape[1] % BLOCKWISE_BLOCK or k_BSKD.shape[1] % BLOCKWISE_BLOCK):
    impl = 'einsum'  # a short prompt or one decoded token: no tiles to skip
  if impl == 'einsum':
    return einsum_attention(q_BTHD, k_BSKD, v_BSKD, mask_B1TS, dtype, logit_softcap)
  if impl == 'blockwise':
    return blockwise.blockwise_attention(q_BTHD, k_BSKD, v_BSKD, mask_B1TS, block=BLOCKWISE_BLOCK, causal=causal)
  return jax.nn.dot_product_attention(
      q_BTHD, k_BSKD.astype(q_BTHD.dtype), v_BSKD.astype(q_BTHD.dtype), mask=mask_B1TS,
      is_causal=causal and impl == 'cudnn', implementation=None if impl == 'xla' else impl)


class Attention(nn.Module):
  """Grouped-query attention with RoPE, optional q/k/v biases (Qwen2), optional
  per-head RMSNorm of q and k before RoPE (Qwen3; Gemma 3 with norm_offset=1),
  and an optional KV cache. Gemma: `query_scale` replaces 1/sqrt(head_dim) and
  `logit_softcap` caps the scores; a call may pass the RoPE frequencies (layers
  of one model that use different bases)."""

  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_model: int
  rope: Rope
  qkv_bias: bool = False
  qk_norm: bool = False
  norm_eps: float = 1e-6
  impl: str = 'auto'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  init_std: float = 0.02
  lora: LoraConfig | None = None
  norm_offset: float = 0.0
  query_scale: float = 0.0  # 0: 1 / sqrt(head_dim)
  logit_softcap: float = 0.0

  def _dense(self, features, axes, name, n_in=1, use_bias=False):
    return Linear(features, axes, n_in=n_in, use_bias=use_bias, dtype=self.dtype,
                  param_dtype=self.param_dtype, init_std=self.init_std, lora=self.lora, name=name)

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask_B1TS, cache=None, cache_index=None, inv_freq=None,
               segment_ids_BT=None):
    H, K, Dh = self.n_heads, self.n_kv_heads, self.head_dim
    q_BTHD = self._dense((H, Dh), ('embed', 'heads', 'head_dim'), 'q', use_bias=self.qkv_bias)(x_BTD)
    k_BTKD = self._dense((K, Dh), ('embed', 'kv_heads', 'head_dim'), 'k', use_bias=self.qkv_bias)(x_BTD)
    v_BTKD = self._dense((K, Dh), ('embed', 'kv_heads', 'head_dim'), 'v', use_bias=self.qkv_bias)(x_BTD)
    if self.qk_norm:
      q_BTHD = RMSNorm(self.norm_eps, self.dtype, self.param_dtype, self.norm_offset, name='q_norm')(q_BTHD)
      k_BTKD = RMSNorm(self.norm_eps, self.dtype, self.param_dtype, self.norm_offset, name='k_norm')(k_BTKD)
    inv_freq = rope_inv_freq(Dh, self.rope) if inv_freq is None else inv_freq
    q_BTHD = apply_rope(q_BTHD, positions_BT, inv_freq)
    k_BTKD = apply_rope(k_BTKD, positions_BT, inv_freq)
    if self.query_scale:  # attend divides by sqrt(Dh): scale q so that the product is query_scale
      q_BTHD = (q_BTHD * (self.query_scale * math.sqrt(Dh))).astype(q_BTHD.dtype)
    q_BTHD = nn.with_logical_constraint(q_BTHD, ('batch', 'length', 'heads', 'head_dim'))

    new_cache = None
    if cache is not None:
      # Write this call's keys/values at slots [cache_index, cache_index + T).
      k_BSKD = jax.lax.dynamic_update_slice_in_dim(cache['k'], k_BTKD.astype(cache['k'].dtype), cache_index, axis=1)
      v_BSKD = jax.lax.dynamic_update_slice_in_dim(cache['v'], v_BTKD.astype(cache['v'].dtype), cache_index, axis=1)
      new_cache = {'k': k_BSKD, 'v': v_BSKD}
      k_BTKD, v_BTKD = k_BSKD.astype(self.dtype), v_BSKD.astype(self.dtype)

    out_BTHD = attend(q_BTHD, k_BTKD, v_BTKD, mask_B1TS, self.impl, self.dtype, causal=cache is None,
                      logit_softcap=self.logit_softcap, segment_ids_BT=segment_ids_BT)
    out_BTHD = nn.with_logical_constraint(out_BTHD, ('batch', 'length', 'heads', 'head_dim'))
    out_BTD = self._dense((self.d_model,), ('heads', 'head_dim', 'embed'), 'o', n_in=2)(out_BTHD)
    return out_BTD, new_cache


@jax.custom_vjp
def swiglu(gate, up):
  """silu(gate) * up, with a backward that recomputes sigmoid(gate): autodiff
  makes XLA:CPU save silu's intermediates, three [B, T, F] passes forward
  instead of one."""
  return nn.silu(gate) * up


def _swiglu_fwd(gate, up):
  return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, g):
  gate, up = res
  sig = jax.nn.sigmoid(gate)
  return g * up * (sig * (1 + gate * (1 - sig))), g * gate * sig


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class SwiGLU(nn.Module):
  """Gated feed-forward: down(silu(gate(x)) * up(x)); with activation='gelu_tanh'
  GeGLU (Gemma): down(gelu(gate(x), tanh approximation) * up(x))."""

  d_model: int
  d_ff: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  init_std: float = 0.02
  lora: LoraConfig | None = None
  activation: str = 'silu'

  def _dense(self, features, axes, name):
    return Linear((features,), axes, dtype=self.dtype, param_dtype=self.param_dtype,
                  init_std=self.init_std, lora=self.lora, name=name)

  @nn.compact
  def __call__(self, x_BTD):
    gate_BTF = self._dense(self.d_ff, ('embed', 'mlp'), 'gate')(x_BTD)
    up_BTF = self._dense(self.d_ff, ('embed', 'mlp'), 'up')(x_BTD)
    gated = (swiglu(gate_BTF, up_BTF) if self.activation == 'silu'
             else jax.nn.gelu(gate_BTF, approximate=True) * up_BTF)
    h_BTF = nn.with_logical_constraint(gated, ('batch', 'length', 'mlp'))
    return self._dense(self.d_model, ('mlp', 'embed'), 'down')(h_BTF)


REMAT_POLICIES = {
    'none': None,  # keep every activation
    'full': None,  # save nothing: recompute the whole block in the backward pass
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_block(block_cls, remat: str, scan_layers: bool):
  """`block_cls` under the named rematerialisation policy (REMAT_POLICIES)."""
  if remat == 'none':
    return block_cls
  if remat not in REMAT_POLICIES:
    raise ValueError(f'model.remat={remat!r}; choose one of {", ".join(REMAT_POLICIES)}')
  return nn.remat(block_cls, policy=REMAT_POLICIES[remat], prevent_cse=not scan_layers)


def count_params(params) -> int:
  """Number of scalars in a parameter pytree (works on ShapeDtypeStructs; a
  quantized weight counts the weights it holds)."""
  leaves = jax.tree.leaves(params, is_leaf=quant.is_quantized)
  return sum(x.size if quant.is_quantized(x) else math.prod(x.shape) for x in leaves)
