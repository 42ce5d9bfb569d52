"""Model families and the one way the rest of the code reaches them.

A family is a module exporting the same five names:

    Config           frozen dataclass of the architecture (from_hf / to_hf / validate)
    Model            the Flax module: model.apply({'params': p}, tokens, positions,
                     segment_ids, cache) -> (logits_BTV, cache); with unembedding=True
                     the first output is a layers.Unembedding instead (chunked losses)
    init_cache       (cfg, batch, max_len) -> an empty KV cache
    hf_param_map     cfg -> (global rows, per-layer rows) to and from HF tensor names
    flops_per_token  (cfg, seq_len) -> training FLOPs per token

`config.model.family` picks one; every other field of `config.model` is a
field of that family's Config. To add a family, write the module (reuse
research/models/layers.py) and add it to FAMILIES.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp

from research import losses
from research.errors import UserError
from research.models import gemma, llama, mixtral, moe, qwen3, qwen3_moe
from research.models.layers import LoraConfig, count_params

FAMILIES: dict[str, ModuleType] = {
    'llama': llama,  # Llama 2/3/3.1, Mistral, Qwen2
    'qwen3': qwen3,
    'gemma': gemma,  # Gemma 2, Gemma 3 (text)
    'mixtral': mixtral,  # Mixture of Experts
    'qwen3_moe': qwen3_moe,  # Mixture of Experts with Qwen3's attention
}
# Top-level modules a head adds that a language model lacks (head='score', value_head):
# loading a language model's weights leaves them at their init, and LoRA trains them in full.
NEW_HEADS = ('score', 'value')

__all__ = ['FAMILIES', 'NEW_HEADS', 'LoraConfig', 'count_params', 'family', 'family_for_hf', 'model_config',
           'build', 'init_cache', 'repeat_cache', 'flops_per_token', 'forward', 'forward_with_values',
           'target_log_probs', 'with_router_losses']


def family(name: str) -> ModuleType:
  """The module of family `name`."""
  if name not in FAMILIES:
    raise UserError(f'config.model.family={name!r}; choose one of {sorted(FAMILIES)}.')
  return FAMILIES[name]


def family_for_hf(model_type: str) -> ModuleType:
  """The family that reads an HF checkpoint of `model_type` (config.json's)."""
  for name in FAMILIES:
    module = family(name)
    if model_type in module.Config.hf_model_types:
      return module
  supported = sorted(t for name in FAMILIES for t in family(name).Config.hf_model_types)
  raise UserError(f'HF model_type {model_type!r} is not supported; supported: {supported}.')


def model_config(model_section: Any):
  """The family's Config from a config.model section ({'family': ..., fields...}), validated."""
  fields = dict(model_section)
  return family(fields.pop('family', 'llama')).Config.from_dict(fields).validate()


def build(model_section: Any, lora: LoraConfig | None = None):
  """The Model described by a config.model section, with LoRA adapters when `lora` is given."""
  cfg = model_config(model_section)
  return family(cfg.family).Model(cfg, lora=lora)


def init_cache(cfg, batch_size: int, max_len: int, dtype=None) -> dict:
  """An empty KV cache for a model of config `cfg` (any family). Every family's
  cache is {'layers': leaves [L, B, ...], 'segment_ids': [B, S], 'index': []}."""
  return family(cfg.family).init_cache(cfg, batch_size, max_len, dtype)


def repeat_cache(cache: dict, n: int) -> dict:
  """The cache with each row repeated n times (rows b*n .. b*n + n-1 copy row b):
  n samples continue one prefilled prompt."""
  return {'layers': jax.tree.map(lambda x: jnp.repeat(x, n, axis=1), cache['layers']),
          'segment_ids': jnp.repeat(cache['segment_ids'], n, axis=0), 'index': cache['index']}


def flops_per_token(cfg, seq_len: int) -> float:
  """Training FLOPs per token of a model of config `cfg` (any family)."""
  return family(cfg.family).flops_per_token(cfg, seq_len)


def forward(model, params, tokens_BT, positions_BT=None, segment_ids_BT=None, rng=None):
  """Logits (or scores) of a training forward pass; `rng` turns on dropout (LoRA)."""
  out, _ = model.apply({'params': params}, tokens_BT, positions_BT, segment_ids_BT,
                       rngs={} if rng is None else {'dropout': rng})
  return out


def forward_with_values(model, params, tokens_BT, positions_BT=None, segment_ids_BT=None, rng=None):
  """(logits [B, T, V], values [B, T]) of a model with a config.model.value_head (PPO's critic)."""
  (out, _), state = model.apply({'params': params}, tokens_BT, positions_BT, segment_ids_BT,
                                rngs={} if rng is None else {'dropout': rng}, mutable=['intermediates'])
  return out, state['intermediates']['values'][0]


def target_log_probs(model, params, batch, rng=None, *, logits_fn=None, with_entropy=False,
                     with_values=False):
  """log p [B, T] of batch['targets'] under a training forward pass of batch['inputs']
  (with its 'positions' and 'segment_ids'); `rng` turns on dropout (LoRA).

  `logits_fn` transforms the logits [B, ..., V] first (RL: the sampling temperature
  and vocabulary mask; rows stay rows). With config.model.logits_chunk = 0 the
  logits [B, T, V] are formed whole; with C > 0 they are formed C positions at a
  time (losses.chunked_token_log_probs): the same values to float rounding, in
  [B, C, V] memory. Returns logps_BT, then entropy_BT (nats, at the transformed
  logits, no gradient) with with_entropy, then values_BT (the critic,
  config.model.value_head) with with_values.
  """
  logits_fn = logits_fn or (lambda logits: logits)
  chunk = model.cfg.logits_chunk
  apply = functools.partial(model.apply, {'params': params}, batch['inputs'], batch['positions'],
                            batch['segment_ids'], unembedding=chunk > 0, rngs={} if rng is None else {'dropout': rng})
  if with_values:
    (out, _), state = apply(mutable=['intermediates'])
  else:
    out, _ = apply()
  if chunk > 0:  # out: the model's layers.Unembedding
    result = losses.chunked_token_log_probs(lambda f: logits_fn(out.logits(f)), out.features, batch['targets'],
                                            chunk, with_entropy=with_entropy)
  else:
    logits = logits_fn(out)
    logps = losses.token_log_probs(logits, batch['targets'])
    result = (logps, losses.token_entropy(jax.lax.stop_gradient(logits))) if with_entropy else logps
  result = result if isinstance(result, tuple) else (result,)
  if with_values:
    result += (state['intermediates']['values'][0],)
  return result if len(result) > 1 else result[0]


class _RouterLossTap:
  """The model, except that its forwards on `params` (not a frozen reference's)
  also collect what the MoE routers sow (research/models/moe.py)."""

  def __init__(self, model, params):
    self._model, self._params, self.sown = model, params, []

  def __getattr__(self, name):
    return getattr(self._model, name)

  def apply(self, variables, *args, mutable=False, **kwargs):
    if variables.get('params') is not self._params:
      return self._model.apply(variables, *args, mutable=mutable, **kwargs)
    if mutable is True:  # every collection: the routers' among them
      out, state = self._model.apply(variables, *args, mutable=True, **kwargs)
      self.sown.append(state.get(moe.COLLECTION, {}))
      return out, state
    asked = [] if mutable is False else [mutable] if isinstance(mutable, str) else list(mutable)
    out, state = self._model.apply(variables, *args, mutable=asked + [moe.COLLECTION], **kwargs)
    state = dict(state)
    self.sown.append(state.pop(moe.COLLECTION, {}))
    return (out, state) if asked else out


def _sown_mean(sown: list, name: str):
  """The mean over forwards and layers of a value every MoE layer sows as `name`
  (scanned layers sow one [L] array, unrolled ones a scalar each)."""
  per_forward = []
  for tree in sown:
    leaves = [x for path, x in jax.tree_util.tree_leaves_with_path(tree)
              if any(getattr(k, 'key', None) == name for k in path)]
    if leaves:
      per_forward.append(jnp.mean(jnp.concatenate([jnp.ravel(x) for x in leaves])))
  return jnp.mean(jnp.stack(per_forward)) if per_forward else None


def with_router_losses(loss_fn, *, train: bool = True):
  """A stage loss (model, params, batch, frozen, rng) -> (loss, weight, metrics)
  that also reports the MoE routers' load-balancing loss as `moe_aux_loss`
  (mean over layers of moe.load_balancing_loss, on the forwards of `params`)
  and, with `train`, adds config.model.router_aux_coef times it to the loss.
  Evaluation (train=False) reports it and leaves the loss the stage's own, so
  eval/loss stays a cross-entropy. A family without routers: `loss_fn` itself."""
  def loss_with_aux(model, params, batch, frozen, rng):
    if not hasattr(model.cfg, 'router_aux_coef'):
      return loss_fn(model, params, batch, frozen, rng)
    tap = _RouterLossTap(model, params)
    loss, weight, metrics = loss_fn(tap, params, batch, frozen, rng)
    aux, dropped = _sown_mean(tap.sown, 'aux_loss'), _sown_mean(tap.sown, 'dropped')
    metrics = dict(metrics)
    if aux is not None:
      metrics['moe_aux_loss'] = aux
      loss = loss + model.cfg.router_aux_coef * aux if train else loss
    if dropped is not None:
      metrics['moe_dropped'] = dropped
    return loss, weight, metrics
  return loss_with_aux
