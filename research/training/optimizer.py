"""optax AdamW with warmup + decay, global-norm clipping and a decay mask."""

from __future__ import annotations

import jax
import optax

from research.errors import UserError


def lr_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to opt_cfg.lr, then cosine, linear or constant decay."""
  peak, warmup = opt_cfg.lr, int(opt_cfg.warmup_steps)
  floor = peak * opt_cfg.min_lr_ratio
  decay_steps = max(1, total_steps - warmup)
  if opt_cfg.decay == 'cosine':
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt_cfg.min_lr_ratio)
  elif opt_cfg.decay == 'linear':
    decay = optax.linear_schedule(peak, floor, decay_steps)
  elif opt_cfg.decay == 'constant':
    decay = optax.constant_schedule(peak)
  else:
    raise UserError(f'optimizer.decay={opt_cfg.decay!r}; choose cosine, linear or constant.')
  if warmup <= 0:
    return decay
  warm = optax.linear_schedule(0.0, peak, warmup)
  return optax.join_schedules([warm, decay], [warmup])


def decay_mask(params):
  """True for weights that get weight decay: matrices, not norms or biases."""
  def wants_decay(path, leaf):
    name = jax.tree_util.keystr(path)
    return leaf.ndim >= 2 and 'norm' not in name and 'bias' not in name
  return jax.tree_util.tree_map_with_path(wants_decay, params)


def head_mask(params):
  """True for the leaves of new heads (models.NEW_HEADS: a reward model's score,
  PPO's value), False elsewhere."""
  from research.models import NEW_HEADS  # pylint: disable=import-outside-toplevel
  return {k: jax.tree.map(lambda _, new=k in NEW_HEADS: new, v) for k, v in params.items()}


def make_optimizer(opt_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(AdamW with clipping and decay mask, its learning-rate schedule).

  optimizer.head_lr_scale != 1 multiplies the updates of new heads (a randomly
  initialised score or value layer next to a trained trunk, which at the
  trunk's fine-tuning rate would take hundreds of steps to reach its targets).
  """
  schedule = lr_schedule(opt_cfg, total_steps)
  parts = []
  if opt_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip))
  parts.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                           weight_decay=opt_cfg.weight_decay, mask=decay_mask))
  scale = opt_cfg.get('head_lr_scale', 1.0)
  if scale != 1.0:  # only then: the optimizer state of runs without it keeps its structure
    parts.append(optax.masked(optax.scale(scale), head_mask))
  return optax.chain(*parts), schedule
