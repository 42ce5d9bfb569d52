"""The dry run: compile the train step on abstract inputs and report sizes,
memory and FLOPs, without allocating parameters or reading data.

    python -m research.main --config=configs/pretrain.py:size=8b --workdir=/tmp/plan \
        --config.dry_run=True --config.mesh.data=1 --config.mesh.fsdp=8
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp

from research import models
from research.errors import UserError
from research.models import count_params
from research.training import sharding
from research.training.metrics import log


def abstract_batch(trainer) -> dict[str, jax.ShapeDtypeStruct]:
  """The stage's batch as ShapeDtypeStructs: each field's logical axes sized by
  config.batch_size and config.seq_len, with its sharding."""
  c, stage = trainer.config, trainer.stage
  sizes = {'batch': c.batch_size, 'length': c.seq_len}
  for k, axes in stage.batch_axes.items():
    if not set(axes) <= set(sizes):
      raise UserError(f'stage {stage.name!r}: batch field {k!r} has axes {axes}; a dry run sizes only '
                      f'{sorted(sizes)} (batch_size, seq_len).')
  return {k: jax.ShapeDtypeStruct(tuple(sizes[a] for a in axes), stage.batch_dtypes.get(k, 'int32'),
                                  sharding=trainer.batch_shardings[k])
          for k, axes in stage.batch_axes.items()}


def per_device_bytes(tree) -> int:
  """Bytes of one device's shard of every leaf (ShapeDtypeStructs with shardings)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
  return total


def logits_bytes(trainer) -> tuple[int, int] | None:
  """(bytes per device of the float32 logits [batch_size, seq_len, V], of what the
  loss holds of them at once at config.model.logits_chunk: all of them at 0), or
  None for a model without a vocabulary head. Analytic, for batch_size rows (DPO's
  forward pass holds both replies of a pair: twice that); whether the logits are
  live at the compiled step's peak depends on the rest (attention scores, say)."""
  c, cfg = trainer.config, trainer.model.cfg
  if cfg.head != 'lm':
    return None
  shard = sharding.logical_sharding(('batch', 'length', 'vocab'), trainer.mesh, trainer.rules)
  rows, length, vocab = shard.shard_shape((c.batch_size, c.seq_len, cfg.vocab_size))
  chunk = min(cfg.logits_chunk or length, length)
  return 4 * rows * length * vocab, 4 * rows * chunk * vocab


def expert_bytes(tree) -> int:
  """Per-device bytes of a Mixture of Experts' expert weights in `tree` (the
  [E, ...] arrays mlp/gate, mlp/up, mlp/down; research/models/moe.py)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  keys = lambda path: [getattr(k, 'key', None) for k in path]
  return per_device_bytes([leaf for path, leaf in flat
                           if keys(path)[-2:] in (['mlp', 'gate'], ['mlp', 'up'], ['mlp', 'down'])])


def dry_run(trainer) -> dict[str, Any]:
  """Compiles the train step on abstract inputs; prints and returns the report."""
  c = trainer.config
  t0 = time.time()
  with trainer.mesh_context():
    frozen = trainer.abstract_frozen  # ShapeDtypeStructs that carry their shardings
    compiled = trainer.train_step.lower(trainer.abstract_state, abstract_batch(trainer), frozen).compile()
  compile_s = time.time() - t0

  n_params = count_params(trainer.layout.abstract)
  report = {
      'params': n_params,
      'param_bytes_per_device': per_device_bytes(trainer.abstract_state.params),
      'opt_state_bytes_per_device': per_device_bytes(trainer.abstract_state.opt_state),
      'frozen_bytes_per_device': per_device_bytes(frozen),
      'compile_seconds': compile_s,
  }
  mem = compiled.memory_analysis()
  if mem is not None:
    for name in ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
                 'generated_code_size_in_bytes'):
      report[name] = getattr(mem, name, None)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  if cost:  # XLA counts a scanned layer's body once, so this undercounts with scan_layers
    report['xla_flops_per_step_per_device'] = cost.get('flops')
  report['model_flops_per_step'] = models.flops_per_token(trainer.model.cfg, c.seq_len) * c.batch_size * c.seq_len
  gib = 2 ** 30
  log(f'dry run: {n_params / 1e9:.2f}B parameters')
  log(f'  parameters per device:      {report["param_bytes_per_device"] / gib:8.3f} GiB (trainable)')
  log(f'  optimizer state per device: {report["opt_state_bytes_per_device"] / gib:8.3f} GiB')
  if report['frozen_bytes_per_device']:
    log(f'  frozen trees per device:    {report["frozen_bytes_per_device"] / gib:8.3f} GiB '
        f'({", ".join(trainer.held_frozen)})')
  if mem is not None:
    log(f'  compiled temp per device:   {report["temp_size_in_bytes"] / gib:8.3f} GiB')
  if hasattr(trainer.model.cfg, 'n_experts'):  # held in the trainable tree, or frozen under LoRA
    report['expert_bytes_per_device'] = expert_bytes([trainer.abstract_state.params, frozen])
    log(f'  experts per device:         {report["expert_bytes_per_device"] / gib:8.3f} GiB '
        f'(parameters; {trainer.model.cfg.n_experts} experts over mesh.expert={trainer.mesh.shape["expert"]})')
  if logits := logits_bytes(trainer):
    report['logits_bytes_per_device'], report['logits_held_bytes_per_device'] = logits
    log(f'  float32 logits per device:  {logits[0] / gib:8.3f} GiB whole, {logits[1] / gib:.3f} GiB held at '
        f'once (model.logits_chunk={trainer.model.cfg.logits_chunk})')
  for name, size in (trainer.stage.plan(trainer) if trainer.stage.plan else {}).items():
    report[f'{name}_bytes_per_device'] = size
    log(f'  {name.replace("_", " ") + " per device:":28}{size / gib:8.3f} GiB')
  log(f'  model FLOPs per step:       {report["model_flops_per_step"]:.3e} (6N + 12LHQT, all devices)')
  if report.get('xla_flops_per_step_per_device'):
    log(f'  XLA FLOPs per step/device:  {report["xla_flops_per_step_per_device"]:.3e} '
        '(a scanned layer counts once)')
  log(f'  compile time:               {compile_s:8.1f} s')
  log(json.dumps(report))
  return report
