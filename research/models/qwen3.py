"""The Qwen3 family (dense models): the Llama decoder with a per-head RMSNorm
on queries and keys before RoPE, and no q/k/v biases.

It differs from Llama only in attention, so it reuses the Llama model with the
`qk_norm` trait on (the shared Attention layer has it for Qwen3 and Gemma 3)
and adds the two norm weights per layer to the HF parameter map. A family that
differs more (post-norms, another MLP, a router) brings its own Block.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from research.errors import UserError
from research.models import llama
from research.models.llama import SAME, Model, flops_per_token, init_cache  # noqa: F401  (the family's exports)

__all__ = ['Config', 'Model', 'init_cache', 'hf_param_map', 'flops_per_token']


@dataclasses.dataclass(frozen=True)
class Config(llama.Config):
  """Architecture of a Qwen3 decoder: Llama's fields, with q/k norms always on."""

  family: ClassVar[str] = 'qwen3'
  hf_model_types: ClassVar[tuple[str, ...]] = ('qwen3',)
  qk_norm: ClassVar[bool] = True

  rope_theta: float = 1000000.0
  norm_eps: float = 1e-6

  def validate(self) -> 'Config':
    """Llama's checks, and no q/k/v biases (Qwen3's attention_bias also biases o_proj)."""
    if self.qkv_bias:
      raise UserError('config.model.qkv_bias=True: Qwen3 has no q/k/v-only biases; set it to False.')
    return super().validate()

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> 'Config':
    """The Config of a Qwen3 config.json dict; raises on fields the model cannot honour."""
    if hf.get('model_type') not in cls.hf_model_types:
      raise UserError(f'HF model_type {hf.get("model_type")!r} is not in the qwen3 family.')
    if hf.get('attention_bias'):
      raise UserError('qwen3 with attention_bias=True also has an o_proj bias, which this model '
                      'does not implement.')
    if any(t != 'full_attention' for t in hf.get('layer_types') or ()):
      raise UserError('this Qwen3 checkpoint has sliding-window layers (layer_types); sliding-window '
                      'attention is not implemented, so logits would differ beyond the window.')
    fields = llama._common_hf_fields(hf)  # pylint: disable=protected-access
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self, model_type: str = 'qwen3') -> dict:
    """config.json dict for this model, as transformers' Qwen3 reads it."""
    if model_type != 'qwen3':
      raise UserError(f'model_type={model_type!r}; the qwen3 family exports as qwen3.')
    out = llama._common_hf_config(self, 'qwen3', 'Qwen3')  # pylint: disable=protected-access
    out.update(attention_bias=False, use_sliding_window=False, sliding_window=None)
    return out


def hf_param_map(cfg: Config):
  """Llama's map plus each layer's q_norm / k_norm weights [Dh]."""
  top, layer = llama.hf_param_map(cfg)
  layer = layer + [(('attn', 'q_norm', 'scale'), 'self_attn.q_norm.weight', *SAME),
                   (('attn', 'k_norm', 'scale'), 'self_attn.k_norm.weight', *SAME)]
  return top, layer
