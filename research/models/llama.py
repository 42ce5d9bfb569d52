"""The Llama family (Llama 2/3/3.1, Mistral, Qwen2 shapes) in Flax Linen.

Used functionally::

    model = Model(Config(...))
    params = model.init(rng, tokens_BT)['params']
    logits_BTV, _ = model.apply({'params': params}, tokens_BT)

Packed rows pass ``segment_ids`` (0 = padding, 1, 2, ... = documents) and
``positions`` so that documents never attend to each other. Decoding passes a
KV cache (``init_cache``) and gets the updated cache back.

A family module exports Config (with from_hf / to_hf), Model, init_cache,
hf_param_map and flops_per_token; research/models/__init__.py registers it.
The layers themselves are family-neutral (research/models/layers.py).

Shape suffixes: B batch, T query length, S key length (cache size), D model
width, H query heads, K kv heads, Dh head dim, F MLP width, V vocabulary,
L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.errors import UserError
from research.models import moe
from research.models.layers import (ATTENTION_IMPLS, REMAT_POLICIES, Attention, Linear, LoraConfig, RMSNorm,
                                    Rope, SwiGLU, Unembedding, attention_mask, remat_block, softcap, window_mask)

_DTYPES = ('float32', 'bfloat16', 'float16')


@dataclasses.dataclass(frozen=True)
class Config:
  """Architecture and numerics of a Llama-family decoder. See configs/base.py for presets."""

  family: ClassVar[str] = 'llama'
  hf_model_types: ClassVar[tuple[str, ...]] = ('llama', 'mistral', 'qwen2')
  qk_norm: ClassVar[bool] = False  # per-head RMSNorm of q and k: a trait of Qwen3, not a Llama field
  # Traits Gemma changes (research/models/gemma.py); Llama has none of them.
  norm_offset: ClassVar[float] = 0.0  # RMSNorm weights multiply as (offset + w)
  final_softcap: ClassVar[float] = 0.0  # logits -> cap * tanh(logits / cap)

  vocab_size: int = 32000
  d_model: int = 4096
  n_layers: int = 32
  n_heads: int = 32
  n_kv_heads: int = 32
  head_dim: int = 0  # 0: d_model // n_heads (resolved on construction)
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
  # auto: the fastest correct one for the backend (layers.resolve_attention_impl);
  # einsum: explicit matmuls + float32 softmax; xla / cudnn: jax.nn.dot_product_attention
  # with that implementation (cudnn needs a GPU and bf16/fp16 compute); blockwise: flash
  # attention's loops in JAX; splash: the Pallas TPU kernel (interpreted, slowly, elsewhere).
  attention_impl: str = 'auto'
  init_std: float = 0.02
  # lm: next-token logits [B, T, V]; score: one scalar per position [B, T, 1]
  # (a reward model: `score` replaces the output layer, read at the last token).
  head: str = 'lm'
  # PPO's critic on the policy's trunk: a `value` layer [D, 1] next to the head, its
  # output [B, T] read by models.forward_with_values (other callers never see it).
  # none | shared (the value loss trains the trunk too) | detached (only the layer).
  value_head: str = 'none'
  # Cross-entropy and log-probs over this many positions at a time (models.target_log_probs):
  # the loss then never holds the float32 logits [B, T, V], only [B, chunk, V], and the
  # backward recomputes each chunk's. 0: the plain path (whole logits). Does not change
  # the parameters or the values (to float rounding); the score head ignores it.
  logits_chunk: int = 0

  def __post_init__(self):
    if self.head_dim == 0 and self.n_heads > 0:
      object.__setattr__(self, 'head_dim', self.d_model // self.n_heads)

  @classmethod
  def from_dict(cls, d: Any) -> 'Config':
    """Builds from a dict or ConfigDict, rejecting unknown fields."""
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise UserError(f'config.model: unknown fields {unknown} for family {cls.family!r}; '
                      f'known: {sorted(known)}')
    return cls(**d)

  def embed_scale(self) -> float:
    """Multiplier of the token embeddings (Gemma: sqrt(d_model))."""
    return 1.0

  def layer_windows(self) -> tuple[int, ...]:
    """Each layer's sliding attention window (0: every earlier position)."""
    return (0,) * self.n_layers

  @property
  def rope(self) -> Rope:
    return Rope(self.rope_theta, self.rope_scaling_factor, self.rope_low_freq_factor,
                self.rope_high_freq_factor, self.rope_original_max_len)

  def validate(self) -> 'Config':
    """Raises a UserError naming the first field that cannot work; returns self."""
    for field in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff'):
      if getattr(self, field) <= 0:
        raise UserError(f'config.model.{field}={getattr(self, field)} must be positive.')
    if self.n_heads % self.n_kv_heads:
      raise UserError(f'config.model.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}.')
    if self.head_dim % 2:
      raise UserError(f'config.model head dim {self.head_dim} must be even for rotary embeddings.')
    if self.head not in ('lm', 'score'):
      raise UserError(f"config.model.head={self.head!r}; choose 'lm' (next-token logits) or 'score' "
                      '(a scalar per position, for reward models).')
    if self.value_head not in ('none', 'shared', 'detached'):
      raise UserError(f"config.model.value_head={self.value_head!r}; choose 'none', 'shared' (a critic "
                      "trained with the trunk) or 'detached' (only its own layer trains).")
    if self.logits_chunk < 0:
      raise UserError(f'config.model.logits_chunk={self.logits_chunk}; use 0 (whole logits) or a number '
                      'of positions per chunk (e.g. 1024).')
    if self.attention_impl not in ATTENTION_IMPLS:
      raise UserError(f'config.model.attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLS}.')
    if self.remat not in REMAT_POLICIES:
      raise UserError(f'config.model.remat={self.remat!r}; choose one of {tuple(REMAT_POLICIES)}.')
    for field in ('dtype', 'param_dtype'):
      if getattr(self, field) not in _DTYPES:
        raise UserError(f'config.model.{field}={getattr(self, field)!r}; choose one of {_DTYPES}.')
    return self

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> 'Config':
    """The Config of an HF config.json dict; raises on fields the model cannot honour."""
    kind = hf.get('model_type')
    if kind not in cls.hf_model_types:
      raise UserError(f'HF model_type {kind!r} is not in the {cls.family} family {cls.hf_model_types}.')
    fields = _common_hf_fields(hf)
    fields['qkv_bias'] = kind == 'qwen2' or bool(hf.get('attention_bias', False))
    if kind in ('llama', 'mistral') and hf.get('attention_bias'):
      raise UserError(f'{kind} with attention_bias=True also has an o_proj bias, which this model '
                      'does not implement.')
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self, model_type: str = 'llama') -> dict:
    """config.json dict for this model (Llama, Mistral, or Qwen2 when q/k/v have biases)."""
    if self.qkv_bias and model_type in ('llama', 'mistral'):
      model_type = 'qwen2'  # the family whose attention has q/k/v (and no o) biases
    if model_type not in self.hf_model_types:
      raise UserError(f'model_type={model_type!r}; the {self.family} family exports as {self.hf_model_types}.')
    if model_type == 'qwen2' and not self.qkv_bias:
      raise UserError('model_type=qwen2: Qwen2 always has q/k/v biases and this model has none; '
                      'export it as llama or mistral.')
    out = _common_hf_config(self, model_type, {'llama': 'Llama', 'mistral': 'Mistral', 'qwen2': 'Qwen2'}[model_type])
    if model_type == 'llama':
      out['attention_bias'] = False
    if model_type in ('mistral', 'qwen2'):
      out['sliding_window'] = None
      out['use_sliding_window'] = False
    return out


def _common_hf_fields(hf: dict) -> dict:
  """Config fields every Llama-shaped HF config.json spells the same way."""
  if hf.get('hidden_act', 'silu') != 'silu':
    raise UserError(f'hidden_act={hf["hidden_act"]!r}: only silu (SwiGLU) is supported.')
  window = hf.get('sliding_window')
  uses_window = hf.get('use_sliding_window', hf.get('model_type') == 'mistral')
  if window is not None and uses_window and window < hf.get('max_position_embeddings', 0):
    raise UserError(f'sliding_window={window} is shorter than max_position_embeddings='
                    f'{hf.get("max_position_embeddings")}; sliding-window attention is not '
                    'implemented, so logits would differ beyond the window.')
  scaling = hf.get('rope_scaling') or hf.get('rope_parameters') or {}
  rope_type = scaling.get('rope_type', scaling.get('type', 'default'))
  if rope_type not in ('default', 'llama3'):
    raise UserError(f'rope_scaling type {rope_type!r} is not supported (default or llama3 only).')
  if hf.get('mlp_bias'):
    raise UserError('mlp_bias=True is not supported.')
  heads = hf['num_attention_heads']
  fields = dict(
      vocab_size=hf['vocab_size'], d_model=hf['hidden_size'], n_layers=hf['num_hidden_layers'],
      n_heads=heads, n_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads, d_ff=hf['intermediate_size'],
      rope_theta=float(hf.get('rope_theta', scaling.get('rope_theta', 10000.0))),
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      head='score' if any(a.endswith('ForSequenceClassification') for a in hf.get('architectures') or ())
      else 'lm')
  n_labels = hf.get('num_labels') or len(hf.get('id2label') or {}) or 1
  if fields['head'] == 'score' and n_labels != 1:
    raise UserError(f'a sequence classifier with {n_labels} labels: only scalar reward models '
                    '(num_labels=1) are supported.')
  if rope_type == 'llama3':
    fields.update(rope_scaling_factor=float(scaling['factor']),
                  rope_low_freq_factor=float(scaling['low_freq_factor']),
                  rope_high_freq_factor=float(scaling['high_freq_factor']),
                  rope_original_max_len=int(scaling['original_max_position_embeddings']))
  return fields


def _common_hf_config(cfg: Config, model_type: str, arch: str) -> dict:
  """The config.json fields every Llama-shaped HF family spells the same way."""
  out = {
      'architectures': [arch + ('ForSequenceClassification' if cfg.head == 'score' else 'ForCausalLM')],
      'model_type': model_type, 'vocab_size': cfg.vocab_size, 'hidden_size': cfg.d_model,
      'num_hidden_layers': cfg.n_layers, 'num_attention_heads': cfg.n_heads,
      'num_key_value_heads': cfg.n_kv_heads, 'head_dim': cfg.head_dim, 'intermediate_size': cfg.d_ff,
      'rope_theta': cfg.rope_theta, 'rms_norm_eps': cfg.norm_eps,
      'tie_word_embeddings': cfg.tie_embeddings, 'hidden_act': 'silu',
      'max_position_embeddings': max(cfg.rope_original_max_len, 8192), 'torch_dtype': cfg.param_dtype,
  }
  if cfg.head == 'score':
    out['num_labels'] = 1  # a scalar reward, read at the last non-padding token
  if cfg.rope_scaling_factor > 0:
    out['rope_scaling'] = {'rope_type': 'llama3', 'factor': cfg.rope_scaling_factor,
                           'low_freq_factor': cfg.rope_low_freq_factor,
                           'high_freq_factor': cfg.rope_high_freq_factor,
                           'original_max_position_embeddings': cfg.rope_original_max_len}
  return out


class Block(nn.Module):
  """Pre-norm decoder block. Signature fits nn.scan: (x, cache, sliding) per layer,
  then what every layer shares: positions, (full mask, window mask, segment ids
  or None), cache index."""

  cfg: Config
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x_BTD, cache, sliding, positions_BT, masks, cache_index):
    cfg = self.cfg
    # masks: (full, sliding-window) [B, 1, T, S]; a family without windows skips the select.
    mask_B1TS = jnp.where(sliding, masks[1], masks[0]) if any(cfg.layer_windows()) else masks[0]
    h = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name='attn_norm')(x_BTD)
    h, new_cache = Attention(
        cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model, cfg.rope, qkv_bias=cfg.qkv_bias,
        qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps, impl=cfg.attention_impl, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, init_std=cfg.init_std, lora=self.lora,
        name='attn')(h, positions_BT, mask_B1TS, cache, cache_index, segment_ids_BT=masks[2])
    x_BTD = x_BTD + h
    h = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name='mlp_norm')(x_BTD)
    x_BTD = x_BTD + self.feed_forward(h, mask_B1TS)
    x_BTD = nn.with_logical_constraint(x_BTD, ('batch', 'length', 'embed'))
    return x_BTD, new_cache

  def feed_forward(self, h_BTD, mask_B1TS):
    """The block's MLP on the normed hidden states (a Mixture-of-Experts family
    overrides it; the attention mask tells padding apart)."""
    del mask_B1TS
    cfg = self.cfg
    return SwiGLU(cfg.d_model, cfg.d_ff, cfg.dtype, cfg.param_dtype, cfg.init_std, self.lora, name='mlp')(h_BTD)


class Model(nn.Module):
  """Decoder-only transformer returning float32 logits [B, T, V] (or scores [B, T, 1]).
  A family with another block subclasses it and sets `block`."""

  cfg: Config
  lora: LoraConfig | None = None
  block: ClassVar[type] = Block

  @nn.compact
  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None, unembedding=False):
    """Forward pass.

    Args:
      tokens_BT: int token ids.
      positions_BT: RoPE positions; default 0..T-1 (plus the cache index).
      segment_ids_BT: 0 marks padding, equal ids form one document; default 1.
      cache: None for training, or the dict from `init_cache` when decoding:
        this call's tokens go to cache slots [cache['index'], +T).
      unembedding: return the output layer unapplied (layers.Unembedding: the
        final normed hidden states and the head's weights) instead of the logits,
        for a loss that forms them a chunk at a time. head='lm' only.

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
      kv_slots_BS, mask_B1TS = slots_BT, attention_mask(slots_BT, segment_ids_BT, slots_BT, segment_ids_BT)
      layer_caches = None
    else:
      kv_seg_BS = jax.lax.dynamic_update_slice_in_dim(cache['segment_ids'], segment_ids_BT.astype(jnp.int32), start, axis=1)
      S = kv_seg_BS.shape[1]
      kv_slots_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
      mask_B1TS = attention_mask(slots_BT, segment_ids_BT, kv_slots_BS, kv_seg_BS)
      layer_caches = cache['layers']
    # Sliding-window layers (Gemma, Mixtral) see the full mask cut to the window; the KV
    # cache keeps every position, so decoding is exact (not smaller).
    windows = cfg.layer_windows()
    window = max(windows)
    # Segment ids for attention kernels that take them instead of the mask (splash):
    # only without a KV cache or sliding windows, where they say all the mask does.
    masks = (mask_B1TS, mask_B1TS & window_mask(slots_BT, kv_slots_BS, window) if window else mask_B1TS,
             segment_ids_BT if cache is None and not window else None)
    sliding_L = np.asarray([w > 0 for w in windows])

    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                                 ('vocab', 'embed')),
                     name='embed')
    x_BTD = embed(tokens_BT)
    if cfg.embed_scale() != 1.0:  # in the compute dtype, as transformers rounds it
      x_BTD = x_BTD * jnp.asarray(cfg.embed_scale(), x_BTD.dtype)
    x_BTD = nn.with_logical_constraint(x_BTD, ('batch', 'length', 'embed'))

    block_cls = remat_block(self.block, cfg.remat, cfg.scan_layers)
    if cfg.scan_layers:
      # A layer's sown values (an MoE router's losses, models.with_router_losses) stack on axis 0 too.
      stack = nn.scan(block_cls, variable_axes={'params': 0, moe.COLLECTION: 0}, split_rngs={'params': True, 'dropout': True},
                      in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.n_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BTD, new_layer_caches = stack(cfg, self.lora, name='layers')(x_BTD, layer_caches, jnp.asarray(sliding_L),
                                                                     positions_BT, masks, start)
    else:
      new_layer_caches = []
      for i in range(cfg.n_layers):
        layer_cache = None if layer_caches is None else jax.tree.map(lambda c: c[i], layer_caches)
        x_BTD, c = block_cls(cfg, self.lora, name=f'layers_{i}')(x_BTD, layer_cache, bool(sliding_L[i]),
                                                                  positions_BT, masks, start)
        new_layer_caches.append(c)
      if cache is not None:
        new_layer_caches = jax.tree.map(lambda *cs: jnp.stack(cs), *new_layer_caches)

    x_BTD = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, cfg.norm_offset, name='final_norm')(x_BTD)
    # Logits accumulate in float32 even with bfloat16 compute: the loss needs them exact.
    head = lambda features, axes, name: Linear((features,), axes, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                               init_std=cfg.init_std, lora=self.lora, f32_output=True,
                                               name=name)
    if unembedding:  # the output layer unapplied; a value head below still applies
      if cfg.head != 'lm':
        raise ValueError(f"unembedding=True needs head='lm', not {cfg.head!r}")
      out = (Unembedding({'hidden': x_BTD}, embed.embedding, transposed=True, dtype=cfg.dtype)
             if cfg.tie_embeddings else head(cfg.vocab_size, ('embed', 'vocab'), 'lm_head')(x_BTD, defer=True))
      out = out.replace(final_softcap=cfg.final_softcap)
    elif cfg.head == 'score':
      out = head(1, ('embed', None), 'score')(x_BTD)
    elif cfg.tie_embeddings:
      out = jnp.einsum('btd,vd->btv', x_BTD, embed.embedding.astype(cfg.dtype), preferred_element_type=jnp.float32)
    else:
      out = head(cfg.vocab_size, ('embed', 'vocab'), 'lm_head')(x_BTD)
    if cfg.value_head != 'none':  # sown: the sampler and plain forwards pay one [D, 1] matmul, outputs unchanged
      features = jax.lax.stop_gradient(x_BTD) if cfg.value_head == 'detached' else x_BTD
      values_BT = head(1, ('embed', None), 'value')(features)[..., 0].astype(jnp.float32)
      self.sow('intermediates', 'values', nn.with_logical_constraint(values_BT, ('batch', 'length')))
    if not unembedding:  # logits_BTV (or scores_BT1)
      out_axis = None if cfg.head == 'score' else 'vocab'
      out = out.astype(jnp.float32)
      out = out if cfg.head == 'score' else softcap(out, cfg.final_softcap)
      out = nn.with_logical_constraint(out, ('batch', 'length', out_axis))

    new_cache = None
    if cache is not None:
      new_cache = {'layers': new_layer_caches, 'segment_ids': kv_seg_BS, 'index': start + T}
    return out, new_cache


def init_cache(cfg: Config, batch_size: int, max_len: int, dtype=None) -> dict:
  """Empty KV cache: k/v [L, B, S, K, Dh], segment ids [B, S] (0 = empty), index."""
  dtype = dtype or cfg.dtype
  shape = (cfg.n_layers, batch_size, max_len, cfg.n_kv_heads, cfg.head_dim)
  return {
      'layers': {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)},
      'segment_ids': jnp.zeros((batch_size, max_len), jnp.int32),
      'index': jnp.zeros((), jnp.int32),
  }


def flops_per_token(cfg: Config, seq_len: int) -> float:
  """Training FLOPs per token, PaLM appendix B: 6 N + 12 L H Dh T.

  N counts the parameters used in matmuls (the embedding table only when it is
  tied, i.e. doubles as the output layer); the attention term is for the full
  (not causally halved) score and value matmuls, as in PaLM.
  """
  d, f, h, k, dh = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  per_layer = d * dh * (h + 2 * k) + h * dh * d + 3 * d * f
  n_matmul = cfg.n_layers * per_layer + cfg.vocab_size * d
  return 6.0 * n_matmul + 12.0 * cfg.n_layers * h * dh * seq_len


# One row of a parameter map: (our path, HF tensor name, HF -> ours, ours -> HF).
# Layer rows hold paths and names within one layer ('model.layers.{i}.' is added).
ParamRow = tuple[tuple[str, ...], str, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]
SAME = (lambda x: x, lambda x: x)
TRANSPOSE = (lambda w: w.T, lambda k: k.T)


def hf_param_map(cfg: Config) -> tuple[list[ParamRow], list[ParamRow]]:
  """(global rows, per-layer rows) mapping our parameters to HF tensor names.

  HF stores torch Linear weights as [out, in]:
      q_proj.weight [H*Dh, D]  -> attn/q/kernel [D, H, Dh]     (k, v with K heads)
      o_proj.weight [D, H*Dh]  -> attn/o/kernel [H, Dh, D]
      gate/up_proj  [F, D]     -> mlp/gate|up/kernel [D, F];   down_proj [D, F] -> [F, D]
      lm_head.weight [V, D]    -> lm_head/kernel [D, V]
      score.weight [1, D]      -> score/kernel [D, 1]    (head='score': *ForSequenceClassification)
  HF checkpoints use the same "rotate half" RoPE layout, so no permutation is needed.
  """
  D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  def proj_in(heads):  # [heads*Dh, D] <-> [D, heads, Dh]
    return (lambda w: w.T.reshape(D, heads, Dh), lambda k: k.reshape(D, heads * Dh).T)
  def bias(heads):
    return (lambda b: b.reshape(heads, Dh), lambda b: b.reshape(heads * Dh))
  layer = [
      (('attn', 'q', 'kernel'), 'self_attn.q_proj.weight', *proj_in(H)),
      (('attn', 'k', 'kernel'), 'self_attn.k_proj.weight', *proj_in(K)),
      (('attn', 'v', 'kernel'), 'self_attn.v_proj.weight', *proj_in(K)),
      (('attn', 'o', 'kernel'), 'self_attn.o_proj.weight',
       lambda w: w.T.reshape(H, Dh, D), lambda k: k.reshape(H * Dh, D).T),
      (('mlp', 'gate', 'kernel'), 'mlp.gate_proj.weight', *TRANSPOSE),
      (('mlp', 'up', 'kernel'), 'mlp.up_proj.weight', *TRANSPOSE),
      (('mlp', 'down', 'kernel'), 'mlp.down_proj.weight', *TRANSPOSE),
      (('attn_norm', 'scale'), 'input_layernorm.weight', *SAME),
      (('mlp_norm', 'scale'), 'post_attention_layernorm.weight', *SAME),
  ]
  if cfg.qkv_bias:
    layer += [(('attn', n, 'bias'), f'self_attn.{n}_proj.bias', *bias(h)) for n, h in (('q', H), ('k', K), ('v', K))]
  top = [(('embed', 'embedding'), 'model.embed_tokens.weight', *SAME),
         (('final_norm', 'scale'), 'model.norm.weight', *SAME)]
  if cfg.head == 'score':
    top.append((('score', 'kernel'), 'score.weight', *TRANSPOSE))
  elif not cfg.tie_embeddings:
    top.append((('lm_head', 'kernel'), 'lm_head.weight', *TRANSPOSE))
  return top, layer
