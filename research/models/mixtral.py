"""The Mixtral family (HF model_type mixtral): the Llama decoder with each MLP
replaced by a Mixture of Experts (research/models/moe.py).

What differs from Llama:
  * the MLP is `n_experts` SwiGLU experts under a top-`experts_per_token`
    router (Mixtral 8x7B: 8 and 2); dropless by default (`capacity_factor=0`,
    what transformers computes), or GShard capacity dispatch (c > 0);
  * every layer's router sows the load-balancing loss, which
    models.with_router_losses adds, times `router_aux_coef`, to every stage's
    training loss (and logs as moe_aux_loss);
  * an optional sliding window on every layer (`sliding_window`, 0: none).
Expert weights carry the logical axis 'expert': `--config.mesh.expert=4` shards
them over four devices, with no code change. LoRA adapts attention (and the
router if targeted); expert weights have no adapters.

HF checkpoints store each expert apart (block_sparse_moe.experts.{e}.w1/w2/w3);
transformers 5 fuses them when it loads and splits them again when it saves, so
that layout is the one read and written here.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from research.errors import UserError
from research.models import llama, moe
from research.models.llama import TRANSPOSE, init_cache  # noqa: F401  (the family's exports)

__all__ = ['Config', 'Model', 'init_cache', 'hf_param_map', 'flops_per_token']


@dataclasses.dataclass(frozen=True)
class Config(llama.Config):
  """Architecture of a Mixtral decoder: Llama's fields plus the experts'."""

  family: ClassVar[str] = 'mixtral'
  hf_model_types: ClassVar[tuple[str, ...]] = ('mixtral',)

  n_experts: int = 8
  experts_per_token: int = 2
  # 0: dropless (every expert on every token); c > 0: at most ceil(c * T * k / E)
  # tokens per expert and row (research/models/moe.py).
  capacity_factor: float = 0.0
  router_aux_coef: float = 0.02  # Mixtral's router_aux_loss_coef
  sliding_window: int = 0  # 0: every layer attends to all earlier positions
  n_kv_heads: int = 8
  d_ff: int = 14336
  rope_theta: float = 1000000.0

  def layer_windows(self) -> tuple[int, ...]:
    return (self.sliding_window,) * self.n_layers

  def normalize_top_k(self) -> bool:
    """Whether a token's k expert weights are renormalised to sum to 1 (Mixtral: always)."""
    return True

  def validate(self) -> 'Config':
    """Llama's checks and the router's."""
    if not 1 <= self.experts_per_token <= self.n_experts:
      raise UserError(f'config.model.experts_per_token={self.experts_per_token} must be in 1..n_experts='
                      f'{self.n_experts}.')
    if self.capacity_factor < 0 or self.router_aux_coef < 0 or self.sliding_window < 0:
      raise UserError('config.model.capacity_factor, router_aux_coef and sliding_window must be >= 0.')
    if self.qkv_bias:
      raise UserError('config.model.qkv_bias=True: Mixtral has no attention biases.')
    return super().validate()

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> 'Config':
    """The Config of a Mixtral config.json dict; raises on what the model cannot honour."""
    if hf.get('model_type') not in cls.hf_model_types:
      raise UserError(f'HF model_type {hf.get("model_type")!r} is not in the mixtral family.')
    if hf.get('router_jitter_noise'):
      raise UserError(f'router_jitter_noise={hf["router_jitter_noise"]}: router input noise is not implemented.')
    fields = llama._common_hf_fields(hf)  # pylint: disable=protected-access
    fields.update(n_experts=hf.get('num_local_experts', 8), experts_per_token=hf.get('num_experts_per_tok', 2),
                  router_aux_coef=float(hf.get('router_aux_loss_coef', 0.001)),
                  sliding_window=int(hf.get('sliding_window') or 0))
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self, model_type: str = 'mixtral') -> dict:
    """config.json dict for this model, as transformers' Mixtral reads it (which
    routes dropless: a capacity factor is not part of the checkpoint)."""
    if model_type != 'mixtral':
      raise UserError(f'model_type={model_type!r}; the mixtral family exports as mixtral.')
    out = llama._common_hf_config(self, 'mixtral', 'Mixtral')  # pylint: disable=protected-access
    out.update(num_local_experts=self.n_experts, num_experts_per_tok=self.experts_per_token,
               router_aux_loss_coef=self.router_aux_coef, router_jitter_noise=0.0,
               sliding_window=self.sliding_window or None)
    return out


class Block(llama.Block):
  """Llama's block with the MLP replaced by a Mixture of Experts."""

  def feed_forward(self, h_BTD, mask_B1TS):
    cfg = self.cfg
    valid_BT = jnp.any(mask_B1TS[:, 0], axis=-1)  # a padding token attends to nothing
    return moe.MoE(cfg.n_experts, cfg.experts_per_token, cfg.d_model, cfg.d_ff, cfg.capacity_factor,
                   dtype=cfg.dtype, param_dtype=cfg.param_dtype, init_std=cfg.init_std, lora=self.lora,
                   normalize_top_k=cfg.normalize_top_k(), name='mlp')(h_BTD, valid_BT)


class Model(llama.Model):
  """The decoder (llama.Model) with Mixture-of-Experts blocks; cfg is a mixtral.Config."""

  block: ClassVar[type] = Block


def flops_per_token(cfg: Config, seq_len: int) -> float:
  """Training FLOPs per token counting the active experts only (the usual MFU
  convention; dropless dispatch computes all E, capacity about c * k of them),
  plus the router."""
  active = llama.flops_per_token(dataclasses.replace(cfg, d_ff=cfg.experts_per_token * cfg.d_ff), seq_len)
  return active + 6.0 * cfg.n_layers * cfg.d_model * cfg.n_experts


def hf_param_map(cfg: Config, *, router: str = 'block_sparse_moe.gate.weight',
                 experts: str = 'block_sparse_moe.experts.{e}',
                 gate_up_down: tuple[str, str, str] = ('w1', 'w3', 'w2')) -> tuple[list, list]:
  """Llama's attention and norm rows, the router, and per-expert rows ('{e}' in
  the HF name: stacked on axis 0 of ours). Mixtral names the gate w1, up w3 and
  down w2; another MoE family passes its own names (qwen3_moe.py)."""
  top, layer = llama.hf_param_map(cfg)
  layer = [row for row in layer if row[0][0] != 'mlp']
  layer += [(('mlp', 'router', 'kernel'), router, *TRANSPOSE)]
  layer += [(('mlp', ours), f'{experts}.{theirs}.weight', *TRANSPOSE)
            for ours, theirs in zip(('gate', 'up', 'down'), gate_up_down)]
  return top, layer
