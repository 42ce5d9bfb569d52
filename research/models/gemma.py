"""The Gemma family: Gemma 2 and Gemma 3 text decoders (HF model_type gemma2,
gemma3_text).

What differs from Llama, each as transformers computes it:
  * RMSNorm weights multiply as (1 + w) (stored as w, initialised at 0);
  * token embeddings scaled by sqrt(d_model) (rounded to the compute dtype);
  * every block norms both before and after attention and the MLP (four norms);
  * GeGLU: down(gelu_tanh(gate) * up);
  * queries scaled by query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5;
  * sliding-window and global layers alternating (layer i slides when
    (i + 1) % sliding_pattern != 0: every 2nd layer global in Gemma 2, every 6th
    in Gemma 3); the KV cache keeps every position and the window is a mask, so
    decoding is exact but uses full-attention memory;
  * Gemma 2: attention scores and final logits soft-capped (cap * tanh(x / cap));
  * Gemma 3: per-head q/k norms, and separate RoPE bases for local (sliding) and
    global layers, with linear RoPE scaling on the global ones;
  * the output layer is always the embedding (tied).
The model is llama.Model with this family's Block; attention is the shared layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from research.errors import UserError
from research.models import llama
from research.models.layers import Attention, LoraConfig, RMSNorm, Rope, SwiGLU, rope_inv_freq
from research.models.llama import SAME, TRANSPOSE, init_cache  # noqa: F401  (the family's exports)

__all__ = ['Config', 'Model', 'init_cache', 'hf_param_map', 'flops_per_token']


@dataclasses.dataclass(frozen=True)
class Config(llama.Config):
  """Architecture of a Gemma 2 or Gemma 3 text decoder: Llama's fields plus these."""

  family: ClassVar[str] = 'gemma'
  hf_model_types: ClassVar[tuple[str, ...]] = ('gemma2', 'gemma3_text')
  norm_offset: ClassVar[float] = 1.0

  version: int = 2  # 2 | 3
  query_pre_attn_scalar: float = 0.0  # queries scale by its -1/2 power; 0: head_dim
  attn_softcap: float = 50.0  # 0: none (Gemma 3)
  final_softcap: float = 30.0  # 0: none (Gemma 3)
  sliding_window: int = 4096
  sliding_pattern: int = 2  # layer i is global when (i + 1) % sliding_pattern == 0
  rope_local_theta: float = 10000.0  # Gemma 3's sliding layers (Gemma 2: every layer uses rope_theta)
  rope_linear_factor: float = 1.0  # Gemma 3's global layers: positions / factor
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  d_ff: int = 9216

  def embed_scale(self) -> float:
    return math.sqrt(self.d_model)

  def layer_windows(self) -> tuple[int, ...]:
    return tuple(0 if (i + 1) % self.sliding_pattern == 0 else self.sliding_window for i in range(self.n_layers))

  def validate(self) -> 'Config':
    """Llama's checks and Gemma's own."""
    if self.version not in (2, 3):
      raise UserError(f'config.model.version={self.version}; Gemma 2 or 3.')
    if not self.tie_embeddings:
      raise UserError('config.model.tie_embeddings=False: Gemma always ties the output layer to the embedding.')
    if self.qkv_bias:
      raise UserError('config.model.qkv_bias=True: Gemma has no attention biases.')
    if self.sliding_pattern < 1 or self.sliding_window < 1:
      raise UserError('config.model.sliding_pattern and sliding_window must be positive.')
    if self.rope_scaling_factor:
      raise UserError('config.model.rope_scaling_factor: Gemma uses rope_linear_factor (Gemma 3), not Llama 3.1 '
                      'scaling.')
    return super().validate()

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> 'Config':
    """The Config of a Gemma 2 / Gemma 3 text config.json dict; raises on what the model cannot honour."""
    kind = hf.get('model_type')
    if kind not in cls.hf_model_types:
      raise UserError(f'HF model_type {kind!r} is not in the gemma family {cls.hf_model_types}.')
    act = hf.get('hidden_activation') or hf.get('hidden_act') or 'gelu_pytorch_tanh'
    if act not in ('gelu_pytorch_tanh', 'gelu_tanh'):
      raise UserError(f'hidden_activation={act!r}: Gemma here uses gelu_pytorch_tanh.')
    if hf.get('attention_bias'):
      raise UserError('attention_bias=True is not supported for Gemma.')
    if hf.get('use_bidirectional_attention'):
      raise UserError('use_bidirectional_attention=True (an embedding model) is not supported.')
    version = 2 if kind == 'gemma2' else 3
    n_layers = hf['num_hidden_layers']
    pattern = int(hf.get('sliding_window_pattern') or (2 if version == 2 else 6))
    types = hf.get('layer_types') or [
        'sliding_attention' if (i + 1) % pattern else 'full_attention' for i in range(n_layers)]
    pattern = next((i + 1 for i, t in enumerate(types) if t == 'full_attention'), n_layers + 1)
    if list(types) != ['sliding_attention' if (i + 1) % pattern else 'full_attention' for i in range(n_layers)]:
      raise UserError(f'layer_types {types} is not one global layer every N; not supported.')
    full, local = _rope_params(hf, version)
    heads = hf['num_attention_heads']
    fields = dict(
        version=version, vocab_size=hf['vocab_size'], d_model=hf['hidden_size'], n_layers=n_layers,
        n_heads=heads, n_kv_heads=hf.get('num_key_value_heads') or heads,
        head_dim=hf.get('head_dim') or hf['hidden_size'] // heads, d_ff=hf['intermediate_size'],
        norm_eps=float(hf.get('rms_norm_eps', 1e-6)), tie_embeddings=bool(hf.get('tie_word_embeddings', True)),
        query_pre_attn_scalar=float(hf.get('query_pre_attn_scalar') or hf.get('head_dim') or 256),
        attn_softcap=float(hf.get('attn_logit_softcapping') or 0.0),
        final_softcap=float(hf.get('final_logit_softcapping') or 0.0),
        sliding_window=int(hf.get('sliding_window') or hf.get('max_position_embeddings', 8192)),
        sliding_pattern=pattern, rope_theta=full[0], rope_linear_factor=full[1], rope_local_theta=local,
        head='score' if any(a.endswith('ForSequenceClassification') for a in hf.get('architectures') or ())
        else 'lm')
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self, model_type: str = '') -> dict:
    """config.json dict for this model, as transformers' Gemma2 / Gemma3 text models read it."""
    model_type = model_type or ('gemma2' if self.version == 2 else 'gemma3_text')
    if model_type != ('gemma2' if self.version == 2 else 'gemma3_text'):
      raise UserError(f'model_type={model_type!r} does not match Gemma {self.version}.')
    arch = 'Gemma2' if self.version == 2 else 'Gemma3'
    out = {
        'architectures': [arch + ('ForSequenceClassification' if self.head == 'score' else 'ForCausalLM')],
        'model_type': model_type, 'vocab_size': self.vocab_size, 'hidden_size': self.d_model,
        'num_hidden_layers': self.n_layers, 'num_attention_heads': self.n_heads,
        'num_key_value_heads': self.n_kv_heads, 'head_dim': self.head_dim, 'intermediate_size': self.d_ff,
        'rms_norm_eps': self.norm_eps, 'tie_word_embeddings': True, 'hidden_activation': 'gelu_pytorch_tanh',
        'query_pre_attn_scalar': _int_if_whole(self.query_pre_attn_scalar or self.head_dim),  # typed int there
        'attn_logit_softcapping': self.attn_softcap or None, 'final_logit_softcapping': self.final_softcap or None,
        'sliding_window': self.sliding_window, 'attention_bias': False, 'max_position_embeddings': 8192,
        'layer_types': ['full_attention' if w == 0 else 'sliding_attention' for w in self.layer_windows()],
        'torch_dtype': self.param_dtype,
    }
    if self.version == 2:
      out['rope_theta'] = self.rope_theta
    else:
      scaling = ({'rope_type': 'linear', 'factor': self.rope_linear_factor} if self.rope_linear_factor != 1.0
                 else {'rope_type': 'default'})
      out['rope_parameters'] = {'full_attention': {**scaling, 'rope_theta': self.rope_theta},
                                'sliding_attention': {'rope_type': 'default', 'rope_theta': self.rope_local_theta}}
    if self.head == 'score':
      out['num_labels'] = 1
    return out


def _int_if_whole(x: float) -> float | int:
  return int(x) if float(x).is_integer() else x


def _rope_params(hf: dict, version: int) -> tuple[tuple[float, float], float]:
  """((global theta, global linear factor), local theta) of a Gemma config.json,
  in transformers' old (rope_theta, rope_scaling, rope_local_base_freq) or new
  (rope_parameters, per layer type for Gemma 3) spelling."""
  params = hf.get('rope_parameters') or {}
  if version == 2:
    theta = float(params.get('rope_theta', hf.get('rope_theta', 10000.0)))
    if params.get('rope_type', 'default') != 'default' or hf.get('rope_scaling'):
      raise UserError('Gemma 2 with rope scaling is not supported.')
    return (theta, 1.0), theta
  full = dict(params.get('full_attention') or {})
  full.update(hf.get('rope_scaling') or {})
  local = params.get('sliding_attention') or {}
  kind = full.get('rope_type', full.get('type', 'default'))
  if kind not in ('default', 'linear') or local.get('rope_type', 'default') != 'default':
    raise UserError(f'Gemma 3 rope type {kind!r}: only default and linear are supported.')
  factor = float(full.get('factor', 1.0)) if kind == 'linear' else 1.0
  theta = float(full.get('rope_theta', hf.get('rope_theta', 1_000_000.0)))
  return (theta, factor), float(local.get('rope_theta', hf.get('rope_local_base_freq', 10000.0)))


class Block(nn.Module):
  """Gemma block: norms before and after attention and the MLP. Same signature
  as llama.Block; `sliding` picks the window mask and the local RoPE base."""

  cfg: Config
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x_BTD, cache, sliding, positions_BT, masks, cache_index):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, offset=1.0, name=name)
    global_freq = rope_inv_freq(cfg.head_dim, Rope(cfg.rope_theta)) / cfg.rope_linear_factor
    local_freq = rope_inv_freq(cfg.head_dim, Rope(cfg.rope_local_theta if cfg.version == 3 else cfg.rope_theta))
    h, new_cache = Attention(
        cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model, cfg.rope, qk_norm=cfg.version == 3,
        norm_eps=cfg.norm_eps, impl=cfg.attention_impl, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        init_std=cfg.init_std, lora=self.lora, norm_offset=1.0,
        query_scale=(cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5,
        logit_softcap=cfg.attn_softcap, name='attn')(
            norm('attn_norm')(x_BTD), positions_BT, jnp.where(sliding, masks[1], masks[0]), cache, cache_index,
            inv_freq=jnp.where(sliding, local_freq, global_freq))
    x_BTD = x_BTD + norm('post_attn_norm')(h)
    h = SwiGLU(cfg.d_model, cfg.d_ff, cfg.dtype, cfg.param_dtype, cfg.init_std, self.lora, activation='gelu_tanh',
               name='mlp')(norm('mlp_norm')(x_BTD))
    x_BTD = x_BTD + norm('post_mlp_norm')(h)
    x_BTD = nn.with_logical_constraint(x_BTD, ('batch', 'length', 'embed'))
    return x_BTD, new_cache


class Model(llama.Model):
  """The decoder (llama.Model) with Gemma blocks; cfg is a gemma.Config."""

  block: ClassVar[type] = Block


def flops_per_token(cfg: Config, seq_len: int) -> float:
  """Training FLOPs per token (llama.flops_per_token's formula; sliding layers
  counted at full length, an upper bound beyond the window)."""
  return llama.flops_per_token(cfg, seq_len)


def hf_param_map(cfg: Config) -> tuple[list, list]:
  """Llama's map with Gemma's four norms per layer (and Gemma 3's q/k norms); no lm_head."""
  top, layer = llama.hf_param_map(dataclasses.replace(cfg, tie_embeddings=True))
  layer = [row for row in layer if row[0][0] not in ('attn_norm', 'mlp_norm')]
  layer += [(('attn_norm', 'scale'), 'input_layernorm.weight', *SAME),
            (('post_attn_norm', 'scale'), 'post_attention_layernorm.weight', *SAME),
            (('mlp_norm', 'scale'), 'pre_feedforward_layernorm.weight', *SAME),
            (('post_mlp_norm', 'scale'), 'post_feedforward_layernorm.weight', *SAME)]
  if cfg.version == 3:
    layer += [(('attn', 'q_norm', 'scale'), 'self_attn.q_norm.weight', *SAME),
              (('attn', 'k_norm', 'scale'), 'self_attn.k_norm.weight', *SAME)]
  return top, layer
