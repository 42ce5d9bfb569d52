"""LoRA helpers: pure functions over parameter pytrees.

The adapters live inside the model (`Linear` in models/layers.py adds
`lora_a`/`lora_b` next to each targeted kernel when the model is built with a
LoraConfig). These functions build that LoraConfig from `config.lora` (the one
place LoRA is configured), split a parameter tree into trainable adapters and
the frozen base, put them back together, give the frozen reference (the base
with adapters off), and merge adapters into the base weights for export or
fast sampling.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from research.errors import UserError
from research.models import NEW_HEADS, LoraConfig, quant

TARGET_PRESETS = {
    'attention': r'.*attn/(q|k|v|o)/kernel',
    'all_linear': r'.*(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel',
    # Attention plus the MLP's up and down projections (not the gate): on the tiny
    # preset at rank 8 this stays under 5% of the parameters.
    'attention_up_down': r'.*(attn/(q|k|v|o)|mlp/(up|down))/kernel',
}
_ADAPTER_NAMES = ('lora_a', 'lora_b')


def resolve_targets(targets: str) -> str:
  """A preset name or a regex -> the regex."""
  return TARGET_PRESETS.get(targets, targets)


def from_config(lora_section) -> LoraConfig | None:
  """The LoraConfig of a config.lora section; None when rank is 0 (LoRA off)."""
  rank, dropout = int(lora_section.rank), float(lora_section.dropout)
  if rank < 0 or not 0 <= dropout < 1:
    raise UserError(f'config.lora: rank must be >= 0 and dropout in [0, 1) (got {rank}, {dropout}).')
  if rank == 0:
    return None
  targets = resolve_targets(lora_section.targets)
  try:
    re.compile(targets)
  except re.error as e:
    raise UserError(f'config.lora.targets={lora_section.targets!r} is not a preset nor a valid regex ({e}).') from None
  return LoraConfig(rank=rank, alpha=float(lora_section.alpha), dropout=dropout, targets=targets,
                    rslora=bool(lora_section.rslora))


def quantize_kind(lora_section) -> str:
  """config.lora.quantize_base checked: '' (a float base), 'nf4' or 'int8' (QLoRA:
  research/models/quant.py); only a LoRA run has a frozen base to quantize."""
  kind = lora_section.get('quantize_base', '') or ''
  if kind not in ('',) + quant.KINDS:
    raise UserError(f"config.lora.quantize_base={kind!r}; choose '' (float), 'nf4' or 'int8'.")
  if kind and int(lora_section.rank) == 0:
    raise UserError(f'config.lora.quantize_base={kind!r} quantizes the frozen base of a LoRA run; '
                    'set config.lora.rank > 0 (or quantize_base to \'\').')
  return kind


def _split(tree, keep_adapters: bool):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      sub = _split(v, keep_adapters)
      if sub:
        out[k] = sub
    elif (k in _ADAPTER_NAMES) == keep_adapters:
      out[k] = v
  return out


def split(params) -> tuple[dict, dict]:
  """(trainable, base): the lora_a/lora_b leaves and any new head (NEW_HEADS: no
  pretrained weights to adapt, so they train in full, as PEFT's modules_to_save),
  and everything else."""
  heads = {k: v for k, v in params.items() if k in NEW_HEADS}
  rest = {k: v for k, v in params.items() if k not in NEW_HEADS}
  return {**_split(rest, True), **heads}, _split(rest, False)


def combine(base, adapters) -> dict:
  """The full parameter tree from base and adapters (either may be empty)."""
  if not adapters:
    return base
  if not base:
    return adapters
  out = dict(base)
  for k, v in adapters.items():
    out[k] = combine(base.get(k, {}), v) if isinstance(v, dict) else v
  return out


def reference_params(adapters, base) -> dict:
  """The model a LoRA run started from: the base with every adapter zeroed
  (B = 0 makes each adapter's contribution exactly zero), without a copy of the
  base. DPO uses it as the frozen reference."""
  return combine(base, jax.tree.map(jnp.zeros_like, adapters))


def _merge_module(module: dict, scale: float, stacked: bool) -> dict:
  out = {k: v for k, v in module.items() if k not in _ADAPTER_NAMES}
  a, b = module['lora_a'], module['lora_b']
  def delta(a, b):
    return jnp.tensordot(a, b, axes=1)  # [in..., r] x [r, out...] -> [in..., out...]
  d = jax.vmap(delta)(a, b) if stacked else delta(a, b)
  out['kernel'] = (module['kernel'] + scale * d).astype(module['kernel'].dtype)
  return out


def merge(params, lora: LoraConfig) -> dict:
  """Folds every adapter into its kernel: W + scale * A.B. Pure; the result
  has the base model's structure (use it with a model built without LoRA)."""
  def walk(tree, stacked):
    if 'lora_a' in tree:
      return _merge_module(tree, lora.scale, stacked)
    return {k: walk(v, stacked or k == 'layers') if isinstance(v, dict) else v for k, v in tree.items()}
  return walk(params, False)
