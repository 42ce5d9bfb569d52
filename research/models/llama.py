"""Llama-family decoder (Llama 2/3, Mistral, Qwen2 shapes) in Flax Linen.

Used functionally::

    model = Transformer(ModelConfig(...))
    params = model.init(rng, tokens_BT)['params']
    logits_BTV, _ = model.apply({'params': params}, tokens_BT)

Packed rows pass ``segment_ids`` (0 = padding, 1, 2, ... = documents) and
``positions`` so that documents never attend to each other. Decoding passes a
KV cache (``init_cache``) and gets the updated cache back.

Every parameter and the main activations carry logical axis names; the
trainer maps them to mesh axes with the rule table in the config.

Shape suffixes: B batch, T query length, S key length (cache size), D model
width, H query heads, K kv heads, G = H // K, Dh head dim, F MLP width,
V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
# Large negative instead of -inf: a fully masked row (padding) gives a uniform
# softmax rather than NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


# Top-level modules a head adds that a language model lacks (head='score'): loading
# a language model's weights leaves them at their init, and LoRA trains them in full.
NEW_HEADS = ('score',)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a Llama-family decoder. See configs/base.py for presets."""

  vocab_size: int = 32000
  d_model: int = 4096
  n_layers: int = 32
  n_heads: int = 32
  n_kv_heads: int = 32
  head_dim: int = 0  # 0: d_model // n_heads
  d_ff: int = 11008
  rope_theta: float = 10000.0
  # Llama-3.1 frequency scaling; rope_scaling_factor 0 turns it off.
  rope_scaling_factor: float = 0.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False
  param_dtype: str = 'float32'
  dtype: str = 'float32'  # compute dtype; softmax, norms and logits stay float32
  remat: str = 'none'  # none | full | dots_saveable | dots_with_no_batch_dims
  scan_layers: bool = False
  # einsum: explicit matmuls + float32 softmax; xla / cudnn: jax.nn.dot_product_attention
  # with that implementation (cudnn needs a GPU and bf16/fp16 compute).
  attention_impl: str = 'einsum'
  init_std: float = 0.02
  # lm: next-token logits [B, T, V]; score: one scalar per position [B, T, 1]
  # (a reward model: `score` replaces the output layer, read at the last token).
  head: str = 'lm'
  # LoRA (set from config.lora by the trainer): adapters on kernels whose path
  # ('layers_0/attn/q/kernel', ...) fully matches lora_targets.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: str = ''
  lora_rslora: bool = False

  @property
  def dh(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def lora_scale(self) -> float:
    """alpha / rank, or alpha / sqrt(rank) with rsLoRA (Kalajdzievski, 2023)."""
    if self.lora_rank <= 0:
      return 0.0
    return self.lora_alpha / (math.sqrt(self.lora_rank) if self.lora_rslora else self.lora_rank)

  @classmethod
  def from_dict(cls, d: Any) -> 'ModelConfig':
    """Builds from a dict or ConfigDict, rejecting unknown fields."""
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f'unknown model fields {unknown}; known: {sorted(known)}')
    return cls(**d)


def rope_inv_freq(cfg: ModelConfig) -> jnp.ndarray:
  """Inverse frequencies [Dh/2], with Llama-3.1 scaling when enabled."""
  dh = cfg.dh
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  if cfg.rope_scaling_factor <= 0:
    return inv_freq
  factor, lo, hi = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  old_len = cfg.rope_original_max_len
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
  """RMSNorm computed in float32, output in the compute dtype."""

  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


class Linear(nn.Module):
  """y = x . W (+ b) (+ LoRA), contracting the last `n_in` dims of x with W's leading dims.

  With `lora.rank > 0` and this kernel's path matching `lora.targets`, adds
  scale * dropout(x) . A . B (Hu et al., 2021): A [in..., r] random, B [r, out...]
  zero, so the model starts unchanged. Dropout is active only when the caller
  passes a 'dropout' rng (training).

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
  lora: ModelConfig | None = None
  f32_output: bool = False  # accumulate and return float32 (the output layer's logits)

  @nn.compact
  def __call__(self, x):
    shape = tuple(x.shape[-self.n_in:]) + tuple(self.features)
    kernel = self.param('kernel', nn.with_logical_partitioning(
        nn.initializers.normal(self.init_std), self.axes), shape, self.param_dtype)
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

  def _has_lora(self) -> bool:
    cfg = self.lora
    return (cfg is not None and cfg.lora_rank > 0 and
            re.fullmatch(cfg.lora_targets, '/'.join(self.path) + '/kernel') is not None)

  def _lora_delta(self, x, shape):
    cfg, r = self.lora, self.lora.lora_rank
    in_shape = shape[:self.n_in]
    a = self.param('lora_a', nn.with_logical_partitioning(
        nn.initializers.normal(1.0 / math.sqrt(math.prod(in_shape))), self.axes[:self.n_in] + ('lora',)),
        in_shape + (r,), self.param_dtype)
    b = self.param('lora_b', nn.with_logical_partitioning(
        nn.initializers.zeros, ('lora',) + self.axes[self.n_in:]), (r,) + tuple(self.features),
        self.param_dtype)
    if cfg.lora_dropout > 0 and self.has_rng('dropout'):
      x = nn.Dropout(cfg.lora_dropout, deterministic=False)(x)
    contract = tuple(range(x.ndim - self.n_in, x.ndim))
    h = jax.lax.dot_general(x.astype(self.dtype), a.astype(self.dtype),
                            ((contract, tuple(range(self.n_in))), ((), ())))
    delta = jax.lax.dot_general(h, b.astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ())))
    return cfg.lora_scale * delta


def _dense(cfg: ModelConfig, features, axes, name, *, n_in=1, use_bias=False, f32_output=False):
  features = (features,) if isinstance(features, int) else tuple(features)
  return Linear(features, axes, n_in=n_in, use_bias=use_bias, dtype=cfg.dtype,
                param_dtype=cfg.param_dtype, init_std=cfg.init_std,
                lora=cfg if cfg.lora_rank > 0 else None, f32_output=f32_output, name=name)


@jax.custom_vjp
def _softmax(x):
  """Softmax over the last axis whose backward uses only the probabilities.

  Autodiff of jax.nn.softmax goes through its exp / sum / divide, and XLA:CPU then
  keeps (materialises) several [B, H, T, S] intermediates; the closed form
  p * (g - sum(g * p)) needs only p.
  """
  return jax.nn.softmax(x, axis=-1)


def _softmax_fwd(x):
  p = _softmax(x)
  return p, p


def _softmax_bwd(p, g):
  return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def _einsum_attention(q_BTHD, k_BSKD, v_BSKD, mask_B1TS, dtype):
  """Grouped-query attention with explicit matmuls; softmax in float32."""
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
  logits = jnp.where(mask, logits, _MASK_VALUE)
  probs = _softmax(logits).astype(dtype)
  out = jnp.einsum(f'{s_dims},bskd->{q_dims}', probs, v_BSKD)
  return out.reshape(B, T, H, Dh)


class Attention(nn.Module):
  """Grouped-query attention with RoPE and an optional KV cache."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask_B1TS, cache=None, cache_index=None):
    cfg = self.cfg
    H, K, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.dh
    q_BTHD = _dense(cfg, (H, Dh), ('embed', 'heads', 'head_dim'), 'q', use_bias=cfg.qkv_bias)(x_BTD)
    k_BTKD = _dense(cfg, (K, Dh), ('embed', 'kv_heads', 'head_dim'), 'k', use_bias=cfg.qkv_bias)(x_BTD)
    v_BTKD = _dense(cfg, (K, Dh), ('embed', 'kv_heads', 'head_dim'), 'v', use_bias=cfg.qkv_bias)(x_BTD)
    inv_freq = rope_inv_freq(cfg)
    q_BTHD = apply_rope(q_BTHD, positions_BT, inv_freq)
    k_BTKD = apply_rope(k_BTKD, positions_BT, inv_freq)
    q_BTHD = nn.with_logical_constraint(q_BTHD, ('batch', 'length', 'heads', 'head_dim'))

    new_cache = None
    if cache is not None:
      # Write this call's keys/values at slots [cache_index, cache_index + T).
      k_BSKD = jax.lax.dynamic_update_slice_in_dim(cache['k'], k_BTKD.astype(cache['k'].dtype), cache_index, axis=1)
      v_BSKD = jax.lax.dynamic_update_slice_in_dim(cache['v'], v_BTKD.astype(cache['v'].dtype), cache_index, axis=1)
      new_cache = {'k': k_BSKD, 'v': v_BSKD}
      k_BTKD, v_BTKD = k_BSKD.astype(cfg.dtype), v_BSKD.astype(cfg.dtype)

    if cfg.attention_impl == 'einsum':
      out_BTHD = _einsum_attention(q_BTHD, k_BTKD, v_BTKD, mask_B1TS, cfg.dtype)
    else:
      out_BTHD = jax.nn.dot_product_attention(
          q_BTHD, k_BTKD.astype(q_BTHD.dtype), v_BTKD.astype(q_BTHD.dtype), mask=mask_B1TS,
          implementation=None if cfg.attention_impl == 'xla' else cfg.attention_impl)
    out_BTHD = nn.with_logical_constraint(out_BTHD, ('batch', 'length', 'heads', 'head_dim'))
    out_BTD = _dense(cfg, cfg.d_model, ('heads', 'head_dim', 'embed'), 'o', n_in=2)(out_BTHD)
    return out_BTD, new_cache


@jax.custom_vjp
def _swiglu(gate, up):
  """silu(gate) * up, with a backward that recomputes sigmoid(gate): autodiff
  makes XLA:CPU save silu's intermediates, three [B, T, F] passes forward
  instead of one."""
  return nn.silu(gate) * up


def _swiglu_fwd(gate, up):
  return _swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, g):
  gate, up = res
  sig = jax.nn.sigmoid(gate)
  return g * up * (sig * (1 + gate * (1 - sig))), g * gate * sig


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    gate_BTF = _dense(cfg, cfg.d_ff, ('embed', 'mlp'), 'gate')(x_BTD)
    up_BTF = _dense(cfg, cfg.d_ff, ('embed', 'mlp'), 'up')(x_BTD)
    h_BTF = nn.with_logical_constraint(_swiglu(gate_BTF, up_BTF), ('batch', 'length', 'mlp'))
    return _dense(cfg, cfg.d_model, ('mlp', 'embed'), 'down')(h_BTF)


class Block(nn.Module):
  """Pre-norm decoder block. Signature fits nn.scan: (x, xs) -> (x, ys)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, cache, positions_BT, mask_B1TS, cache_index):
    cfg = self.cfg
    h = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name='attn_norm')(x_BTD)
    h, new_cache = Attention(cfg, name='attn')(h, positions_BT, mask_B1TS, cache, cache_index)
    x_BTD = x_BTD + h
    h = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name='mlp_norm')(x_BTD)
    x_BTD = x_BTD + MLP(cfg, name='mlp')(h)
    x_BTD = nn.with_logical_constraint(x_BTD, ('batch', 'length', 'embed'))
    return x_BTD, new_cache


_REMAT_POLICIES = {
    'full': None,  # save nothing: recompute the whole block in the backward pass
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _block_class(cfg: ModelConfig):
  if cfg.remat == 'none':
    return Block
  if cfg.remat not in _REMAT_POLICIES:
    raise ValueError(f'model.remat={cfg.remat!r}; choose none, {", ".join(_REMAT_POLICIES)}')
  return nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


class Transformer(nn.Module):
  """Decoder-only transformer returning float32 logits [B, T, V] (or scores [B, T, 1])."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None):
    """Forward pass.

    Args:
      tokens_BT: int token ids.
      positions_BT: RoPE positions; default 0..T-1 (plus the cache index).
      segment_ids_BT: 0 marks padding, equal ids form one document; default 1.
      cache: None for training, or the dict from `init_cache` when decoding:
        this call's tokens go to cache slots [cache['index'], +T).

    Returns:
      (logits_BTV in float32, the updated cache or None). With cfg.head='score'
      the first output is the per-position scalar score [B, T, 1] instead.
    """
    cfg = self.cfg
    B, T = tokens_BT.shape
    start = 0 if cache is None else cache['index']
    slots_BT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
    if positions_BT is None:
      positions_BT = slots_BT
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones((B, T), jnp.int32)

    if cache is None:
      mask_B1TS = attention_mask(slots_BT, segment_ids_BT, slots_BT, segment_ids_BT)
      layer_caches = None
    else:
      kv_seg_BS = jax.lax.dynamic_update_slice_in_dim(cache['segment_ids'], segment_ids_BT.astype(jnp.int32), start, axis=1)
      S = kv_seg_BS.shape[1]
      kv_slots_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
      mask_B1TS = attention_mask(slots_BT, segment_ids_BT, kv_slots_BS, kv_seg_BS)
      layer_caches = cache['layers']

    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                                 ('vocab', 'embed')),
                     name='embed')
    x_BTD = embed(tokens_BT)
    x_BTD = nn.with_logical_constraint(x_BTD, ('batch', 'length', 'embed'))

    block_cls = _block_class(cfg)
    if cfg.scan_layers:
      stack = nn.scan(block_cls, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.n_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BTD, new_layer_caches = stack(cfg, name='layers')(x_BTD, layer_caches, positions_BT, mask_B1TS, start)
    else:
      new_layer_caches = []
      for i in range(cfg.n_layers):
        layer_cache = None if layer_caches is None else jax.tree.map(lambda c: c[i], layer_caches)
        x_BTD, c = block_cls(cfg, name=f'layers_{i}')(x_BTD, layer_cache, positions_BT, mask_B1TS, start)
        new_layer_caches.append(c)
      if cache is not None:
        new_layer_caches = jax.tree.map(lambda *cs: jnp.stack(cs), *new_layer_caches)

    x_BTD = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name='final_norm')(x_BTD)
    # Logits accumulate in float32 even with bfloat16 compute: the loss needs them exact.
    if cfg.head == 'score':
      logits_BTV = _dense(cfg, 1, ('embed', None), 'score', f32_output=True)(x_BTD)
    elif cfg.tie_embeddings:
      logits_BTV = jnp.einsum('btd,vd->btv', x_BTD, embed.embedding.astype(cfg.dtype),
                              preferred_element_type=jnp.float32)
    else:
      logits_BTV = _dense(cfg, cfg.vocab_size, ('embed', 'vocab'), 'lm_head', f32_output=True)(x_BTD)
    out_axis = None if cfg.head == 'score' else 'vocab'
    logits_BTV = nn.with_logical_constraint(logits_BTV.astype(jnp.float32), ('batch', 'length', out_axis))

    new_cache = None
    if cache is not None:
      new_cache = {'layers': new_layer_caches, 'segment_ids': kv_seg_BS, 'index': start + T}
    return logits_BTV, new_cache


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> dict:
  """Empty KV cache: k/v [L, B, S, K, Dh], segment ids [B, S] (0 = empty), index."""
  dtype = dtype or cfg.dtype
  shape = (cfg.n_layers, batch_size, max_len, cfg.n_kv_heads, cfg.dh)
  return {
      'layers': {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)},
      'segment_ids': jnp.zeros((batch_size, max_len), jnp.int32),
      'index': jnp.zeros((), jnp.int32),
  }


def count_params(params) -> int:
  """Number of scalars in a parameter pytree (works on ShapeDtypeStructs)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token, PaLM appendix B: 6 N + 12 L H Dh T.

  N counts the parameters used in matmuls (the embedding table only when it is
  tied, i.e. doubles as the output layer); the attention term is for the full
  (not causally halved) score and value matmuls, as in PaLM.
  """
  d, f, h, k, dh = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.dh
  per_layer = d * dh * (h + 2 * k) + h * dh * d + 3 * d * f
  n_matmul = cfg.n_layers * per_layer + cfg.vocab_size * d
  return 6.0 * n_matmul + 12.0 * cfg.n_layers * h * dh * seq_len
