"""The Qwen3-MoE family (HF model_type qwen3_moe): Mixtral's decoder with Qwen3's
attention (per-head q/k RMSNorm, no biases) and its router's option of not
renormalising the top-k weights (`norm_topk_prob`).

Every layer is a Mixture of Experts here: checkpoints with dense layers among
the sparse ones (decoder_sparse_step > 1 or mlp_only_layers) are refused, as
are sliding windows. Experts are named gate_proj / up_proj / down_proj, the
router mlp.gate; transformers 5 fuses the experts in memory and splits them
again on save, so that per-expert layout is the one read and written.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from research.errors import UserError
from research.models import llama, mixtral
from research.models.llama import SAME, TRANSPOSE, init_cache  # noqa: F401  (the family's exports)
from research.models.mixtral import flops_per_token  # noqa: F401

__all__ = ['Config', 'Model', 'init_cache', 'hf_param_map', 'flops_per_token']


@dataclasses.dataclass(frozen=True)
class Config(mixtral.Config):
  """Architecture of a Qwen3-MoE decoder: Mixtral's fields with q/k norms, and norm_topk_prob."""

  family: ClassVar[str] = 'qwen3_moe'
  hf_model_types: ClassVar[tuple[str, ...]] = ('qwen3_moe',)
  qk_norm: ClassVar[bool] = True

  norm_topk_prob: bool = True
  n_experts: int = 128
  experts_per_token: int = 8
  d_ff: int = 768  # each expert's width (HF moe_intermediate_size)
  router_aux_coef: float = 0.001
  norm_eps: float = 1e-6

  def normalize_top_k(self) -> bool:
    return self.norm_topk_prob

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> 'Config':
    """The Config of a Qwen3-MoE config.json dict; raises on what the model cannot honour."""
    if hf.get('model_type') not in cls.hf_model_types:
      raise UserError(f'HF model_type {hf.get("model_type")!r} is not in the qwen3_moe family.')
    if hf.get('decoder_sparse_step', 1) != 1 or hf.get('mlp_only_layers'):
      raise UserError('this Qwen3-MoE checkpoint has dense layers among its sparse ones (decoder_sparse_step / '
                      'mlp_only_layers); only all-MoE stacks are supported.')
    if hf.get('attention_bias'):
      raise UserError('qwen3_moe with attention_bias=True is not supported.')
    if hf.get('use_sliding_window'):
      raise UserError('qwen3_moe with use_sliding_window=True is not supported.')
    fields = llama._common_hf_fields(hf)  # pylint: disable=protected-access
    # Qwen's checkpoints say num_experts; transformers 5 writes num_local_experts.
    fields.update(d_ff=hf['moe_intermediate_size'], n_experts=hf.get('num_experts') or hf['num_local_experts'],
                  experts_per_token=hf['num_experts_per_tok'], norm_topk_prob=bool(hf.get('norm_topk_prob', False)),
                  router_aux_coef=float(hf.get('router_aux_loss_coef', 0.001)))
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self, model_type: str = 'qwen3_moe') -> dict:
    """config.json dict for this model, as transformers' Qwen3-MoE reads it."""
    if model_type != 'qwen3_moe':
      raise UserError(f'model_type={model_type!r}; the qwen3_moe family exports as qwen3_moe.')
    out = llama._common_hf_config(self, 'qwen3_moe', 'Qwen3Moe')  # pylint: disable=protected-access
    out.update(num_experts=self.n_experts, num_experts_per_tok=self.experts_per_token, moe_intermediate_size=self.d_ff,
               norm_topk_prob=self.norm_topk_prob, router_aux_loss_coef=self.router_aux_coef, decoder_sparse_step=1,
               mlp_only_layers=[], attention_bias=False, use_sliding_window=False, sliding_window=None)
    return out

  def validate(self) -> 'Config':
    if self.sliding_window:
      raise UserError('config.model.sliding_window: Qwen3-MoE here has no sliding window; set it to 0.')
    return super().validate()


class Model(mixtral.Model):
  """Mixtral's decoder (q/k norms on through the Config); cfg is a qwen3_moe.Config."""


def hf_param_map(cfg: Config) -> tuple[list, list]:
  """Mixtral's rows under Qwen3-MoE's names, plus each layer's q/k norms."""
  top, layer = mixtral.hf_param_map(cfg, router='mlp.gate.weight', experts='mlp.experts.{e}',
                                    gate_up_down=('gate_proj', 'up_proj', 'down_proj'))
  layer += [(('attn', 'q_norm', 'scale'), 'self_attn.q_norm.weight', *SAME),
            (('attn', 'k_norm', 'scale'), 'self_attn.k_norm.weight', *SAME)]
  return top, layer
