"""Mixture-of-Experts feed-forward: a top-k router over E gated experts, and
the router's load-balancing loss.

    y_BTD = MoE(n_experts=8, experts_per_token=2, d_model=D, d_ff=F)(x_BTD, valid_BT)

Routing is Mixtral's: softmax over the router's logits (float32), the top k
experts per token, their probabilities renormalised to sum to 1, and the output
sum_k p_k * down_k(act(gate_k(x)) * up_k(x)).

Dispatch (`capacity_factor`):
  * 0 (default): dropless. Every expert runs on every token and the gates, zero
    outside a token's top k, weigh the outputs. Exactly what transformers
    computes, at E / k times the active MLP FLOPs: right for few experts, small
    models and tests.
  * c > 0: GShard's capacity dispatch. Each expert takes at most
    C = ceil(c * T * k / E) tokens of each row, first choices before second
    choices and in order of position within each; a token past an expert's
    capacity skips it (the residual carries the token on). About c * k / E of the
    dropless FLOPs; the share of dropped assignments is sown as `dropped`.
    Capacity counts the tokens of one forward pass, so a prompt prefilled at once
    and the same tokens decoded one by one can route differently: RL stages, which
    compare sampler and trainer log-probabilities, want the dropless dispatch.
Both are einsums that GSPMD partitions. Expert weights [E, ...] carry the
logical axis 'expert' (config.sharding_rules maps it to the mesh's `expert`
axis), so each device holds and runs E / n of them; inside the layer the
tokens are laid out by 'expert_batch' (the data axes without `expert`), so XLA
gathers them over the expert axis before the experts and reduces the outputs
after. A grouped matmul (jax.lax.ragged_dot: dropless at active FLOPs) would
need an explicit all-to-all under shard_map; it is not written.

The layer sows, per forward, into the 'moe' collection: `aux_loss`, the
Switch Transformer load-balancing loss of this layer (`load_balancing_loss`),
which models.with_router_losses adds to every stage's training loss.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models import quant
from research.models.layers import Linear, LoraConfig, swiglu

COLLECTION = 'moe'  # the sown collection models.with_router_losses reads


def route(router_logits_BTE: jax.Array, k: int, normalize: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(probs_BTE, top-k expert ids [B, T, k], their weights [B, T, k]): the top-k
  probabilities, renormalised to sum to 1 unless `normalize` is False (Qwen3-MoE's
  norm_topk_prob=False)."""
  probs_BTE = jax.nn.softmax(router_logits_BTE.astype(jnp.float32), axis=-1)
  top_p, top_i = jax.lax.top_k(probs_BTE, k)
  return probs_BTE, top_i, top_p / jnp.sum(top_p, axis=-1, keepdims=True) if normalize else top_p


def load_balancing_loss(probs_BTE: jax.Array, experts_BTK: jax.Array, valid_BT: jax.Array) -> jax.Array:
  """Switch Transformer's auxiliary loss (Fedus et al. 2021, eq. 4) with top-k
  routing: E * sum_e f_e * P_e over the valid tokens, where f_e is the share of
  tokens routed to e (counting each of a token's k choices, so sum_e f_e = k)
  and P_e the mean router probability of e. Balanced routing gives k; all
  tokens on k experts with certainty gives E. transformers' Mixtral pools f and
  P over every layer before the product; this is one layer's (the model
  averages it over layers), which also penalises imbalance that other layers
  happen to offset."""
  E = probs_BTE.shape[-1]
  v_BT = valid_BT.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(v_BT), 1.0)
  f_E = jnp.einsum('btke,bt->e', jax.nn.one_hot(experts_BTK, E, dtype=jnp.float32), v_BT) / n
  p_E = jnp.einsum('bte,bt->e', probs_BTE, v_BT) / n
  return E * jnp.sum(f_E * p_E)


def capacity(capacity_factor: float, tokens_per_row: int, k: int, n_experts: int) -> int:
  """Slots per expert per row of the capacity dispatch: ceil(c * T * k / E)."""
  return max(1, math.ceil(capacity_factor * tokens_per_row * k / n_experts))


def dispatch_slots(experts_BTK: jax.Array, weights_BTK: jax.Array, valid_BT: jax.Array, n_experts: int,
                   slots: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """GShard dispatch of each row into `slots` places per expert: (dispatch_BTEC
  0/1, combine_BTEC = dispatch * the token's gate, dropped share of the valid
  assignments). Places fill with every token's first choice in order of
  position, then the second choices, ...; padding tokens take none."""
  B, T, K = experts_BTK.shape
  choice_BKTE = jnp.swapaxes(jax.nn.one_hot(experts_BTK, n_experts, dtype=jnp.int32), 1, 2)
  choice_BKTE = choice_BKTE * valid_BT.astype(jnp.int32)[:, None, :, None]
  place_BKTE = jnp.cumsum(choice_BKTE.reshape(B, K * T, n_experts), axis=1).reshape(B, K, T, n_experts) - 1
  kept_BKTE = choice_BKTE * (place_BKTE < slots)
  # A token picks an expert at most once, so at most one k holds each (t, e).
  kept_BTE = jnp.sum(kept_BKTE, axis=1)
  place_BTE = jnp.sum(kept_BKTE * place_BKTE, axis=1)
  gate_BTE = jnp.einsum('bkte,btk->bte', kept_BKTE.astype(jnp.float32), weights_BTK)
  dispatch_BTEC = jax.nn.one_hot(place_BTE, slots, dtype=jnp.float32) * kept_BTE[..., None]
  dropped = 1.0 - jnp.sum(kept_BKTE) / jnp.maximum(jnp.sum(choice_BKTE), 1)
  return dispatch_BTEC, dispatch_BTEC * gate_BTE[..., None], dropped


class MoE(nn.Module):
  """Top-k routed gated experts (SwiGLU, or GeGLU with activation='gelu_tanh').
  Parameters: router/kernel [D, E], gate and up [E, D, F], down [E, F, D]."""

  n_experts: int
  experts_per_token: int
  d_model: int
  d_ff: int
  capacity_factor: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  init_std: float = 0.02
  lora: LoraConfig | None = None  # reaches the router only (expert weights have no adapters)
  activation: str = 'silu'
  normalize_top_k: bool = True  # the k weights renormalised to sum to 1 (route)

  def _experts(self, name, shape, axes):
    w = quant.param(self, name, nn.with_logical_partitioning(nn.initializers.normal(self.init_std), axes), shape,
                   self.param_dtype)
    return quant.materialize(w, self.dtype)  # a QLoRA base: dequantized here, per layer

  def _act(self, g, u):
    return swiglu(g, u) if self.activation == 'silu' else jax.nn.gelu(g, approximate=True) * u

  @nn.compact
  def __call__(self, x_BTD, valid_BT):
    """x_BTD: the normed hidden states; valid_BT: False at padding (no routing
    statistics, no capacity)."""
    E, K, D, F = self.n_experts, self.experts_per_token, self.d_model, self.d_ff
    logits_BTE = Linear((E,), ('embed', None), dtype=self.dtype, param_dtype=self.param_dtype,
                        init_std=self.init_std, lora=self.lora, f32_output=True, name='router')(x_BTD)
    probs_BTE, experts_BTK, weights_BTK = route(logits_BTE, K, self.normalize_top_k)
    self.sow(COLLECTION, 'aux_loss', load_balancing_loss(probs_BTE, experts_BTK, valid_BT))
    gate_EDF = self._experts('gate', (E, D, F), ('expert', 'embed', 'mlp'))
    up_EDF = self._experts('up', (E, D, F), ('expert', 'embed', 'mlp'))
    down_EFD = self._experts('down', (E, F, D), ('expert', 'mlp', 'embed'))
    x_BTD = x_BTD.astype(self.dtype)

    if self.capacity_factor <= 0:  # dropless: every expert on every token, gates zero the rest
      gates_BTE = jnp.einsum('btke,btk->bte', jax.nn.one_hot(experts_BTK, E, dtype=jnp.float32), weights_BTK)
      g_BTEF = jnp.einsum('btd,edf->btef', x_BTD, gate_EDF)
      u_BTEF = jnp.einsum('btd,edf->btef', x_BTD, up_EDF)
      h_BTEF = self._act(g_BTEF, u_BTEF) * gates_BTE[..., None].astype(self.dtype)
      h_BTEF = nn.with_logical_constraint(h_BTEF, ('expert_batch', 'length', 'expert', 'mlp'))
      return jnp.einsum('btef,efd->btd', h_BTEF, down_EFD)

    C = capacity(self.capacity_factor, x_BTD.shape[1], K, E)
    dispatch_BTEC, combine_BTEC, dropped = dispatch_slots(experts_BTK, weights_BTK, valid_BT, E, C)
    self.sow(COLLECTION, 'dropped', dropped)
    x_EBCD = jnp.einsum('btd,btec->ebcd', x_BTD, dispatch_BTEC.astype(self.dtype))
    x_EBCD = nn.with_logical_constraint(x_EBCD, ('expert', 'expert_batch', None, 'embed'))
    h_EBCF = self._act(jnp.einsum('ebcd,edf->ebcf', x_EBCD, gate_EDF), jnp.einsum('ebcd,edf->ebcf', x_EBCD, up_EDF))
    y_EBCD = jnp.einsum('ebcf,efd->ebcd', h_EBCF, down_EFD)
    return jnp.einsum('ebcd,btec->btd', y_EBCD, combine_BTEC.astype(self.dtype))
