"""The train and eval steps: pure functions of (state, batch, frozen).

    new_state, metrics = train_step(state, batch, frozen, model=..., loss_fn=..., tx=..., schedule=...)

`frozen` is one dict of named parameter trees that never train: 'base' (a
LoRA run's base weights; `state.params` then holds only the adapters) and any
frozen copy a stage's loss reads, such as DPO's 'reference'. A stage loss is

    loss_fn(model, params, batch, frozen_views, rng) -> (loss, weight, metrics)

with `params` the full tree (base and adapters combined), `frozen_views` the
trees named in `frozen_names`, `loss` a mean over `weight` items (tokens,
pairs, ...) and rng None in evaluation. Micro-batches (gradient accumulation)
and devices combine as sum(loss * weight) / sum(weight), so accumulation is
exact. The Trainer jits these with shardings; a test or notebook can call
them directly on one device.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from research import lora, models
from research.training.stage import LossFn
from research.training.state import TrainState

BASE = 'base'  # frozen name of a LoRA run's base weights


def full_params(params, frozen: dict):
  """The model's parameter tree from the trainable tree and the frozen ones."""
  return lora.combine(frozen.get(BASE, {}), params)


def loss_views(params, frozen: dict, names: Sequence[str]) -> dict:
  """The frozen trees a loss reads, by name. Each is a frozen copy of the
  initial parameters; a LoRA run holds none, since that is exactly the base
  with adapters off (lora.reference_params)."""
  views = {}
  for name in names:
    if name in frozen:
      views[name] = frozen[name]
    elif BASE in frozen:
      views[name] = lora.reference_params(params, frozen[BASE])
    else:
      raise ValueError(f'frozen tree {name!r} is neither held nor derivable (no LoRA base)')
  return views


def loss_and_grads(params, frozen, batch, rng, *, model, loss_fn: LossFn, frozen_names=()):
  """(loss, weight, metrics, gradient of loss * weight) at `params` (the trainable tree)."""
  loss_fn = models.with_router_losses(loss_fn)  # a Mixture of Experts adds its routers' balancing loss

  def f(p):
    loss, weight, metrics = loss_fn(model, full_params(p, frozen), batch,
                                    loss_views(p, frozen, frozen_names), rng)
    return loss * weight, (loss, weight, metrics)
  (_, (loss, weight, metrics)), grads_sum = jax.value_and_grad(f, has_aux=True)(params)
  return loss, weight, metrics, grads_sum


def train_step(state: TrainState, batch: dict, frozen: dict, *, model, loss_fn: LossFn,
               tx: optax.GradientTransformation, schedule: optax.Schedule, accum: int = 1,
               frozen_names: Sequence[str] = (), micro_shardings: dict | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on `batch` (split into `accum` micro-batches).

  Returns the new state and metrics: train/loss (weighted over the batch),
  train/grad_norm, train/lr (of this update), train/weight, train/skipped_steps
  and train/skipped_in_row (the state's counters) and the loss's own metrics as
  train/<name> (means over micro-batches). A step whose loss or gradient norm is
  not finite changes neither the parameters nor the optimizer state. `micro_shardings`
  (per batch key, for the [accum, rows, ...] micro-batch stack) keeps each
  device on its own rows; None on one device.
  """
  rng, step_rng = jax.random.split(state.rng)
  grad_fn = lambda p, mb, r: loss_and_grads(p, frozen, mb, r, model=model, loss_fn=loss_fn,
                                            frozen_names=frozen_names)
  if accum == 1:
    loss, weight, metrics, grads_sum = grad_fn(state.params, batch, step_rng)
    loss_sum = loss * weight
  else:
    micro = micro_batches(batch, accum, micro_shardings)

    def body(carry, xs):
      g_acc, l_acc, w_acc = carry
      mb, i = xs
      loss, weight, metrics, g = grad_fn(state.params, mb, jax.random.fold_in(step_rng, i))
      g_acc = jax.tree.map(jnp.add, g_acc, g)
      return (g_acc, l_acc + loss * weight, w_acc + weight), metrics

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads_sum, loss_sum, weight), metrics = jax.lax.scan(
        body, (zeros, jnp.float32(0), jnp.float32(0)), (micro, jnp.arange(accum)))
    metrics = jax.tree.map(jnp.mean, metrics)
  grads = jax.tree.map(lambda g: g / jnp.maximum(weight, 1.0), grads_sum)
  loss, grad_norm = loss_sum / jnp.maximum(weight, 1.0), optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # The non-finite guard: a NaN/inf loss or gradient leaves parameters and
  # optimizer state as they were, optax's step counts included, so the schedule
  # applied (and logged as train/lr) is at step - skipped; the step counter,
  # data and rng advance. Written here rather than with optax.apply_if_finite, which
  # checks only the gradients and lets updates through after N failures; the
  # loop stops the run instead (optimizer.max_skipped_steps).
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep_if_skipped = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  params, opt_state = keep_if_skipped(params, state.params), keep_if_skipped(opt_state, state.opt_state)
  total, in_row = state.skipped[0], state.skipped[1]
  skipped = jnp.where(finite, jnp.stack([total, 0]), jnp.stack([total + 1, in_row + 1]))
  out = {'train/loss': loss, 'train/grad_norm': grad_norm, 'train/lr': schedule(state.step - state.skipped[0]),
         'train/weight': weight, 'train/skipped_steps': skipped[0], 'train/skipped_in_row': skipped[1]}
  out.update({f'train/{k}': v for k, v in metrics.items()})
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng, skipped=skipped), out


def micro_batches(batch: dict, accum: int, micro_shardings: dict | None = None) -> dict:
  """`batch` as [accum, rows / accum, ...]: micro-batch a takes rows a, a + accum,
  ... so each device splits its own rows, with no reshuffle between devices."""
  micro = jax.tree.map(lambda x: x.reshape((-1, accum) + x.shape[1:]).swapaxes(0, 1), batch)
  if micro_shardings is not None:
    micro = {k: jax.lax.with_sharding_constraint(v, micro_shardings[k]) for k, v in micro.items()}
  return micro


def eval_step(params, frozen: dict, batch: dict, *, model, loss_fn: LossFn, frozen_names: Sequence[str] = (),
              accum: int = 1, micro_shardings: dict | None = None) -> dict[str, Any]:
  """Weighted sums over one eval batch: loss_sum, weight and each metric * weight.
  With `accum` > 1 the batch is evaluated in that many micro-batches, as the
  train step splits it, so evaluation never needs more memory than training."""
  loss_fn = models.with_router_losses(loss_fn, train=False)  # reported, not added

  def sums(mb):
    loss, weight, metrics = loss_fn(model, full_params(params, frozen), mb,
                                    loss_views(params, frozen, frozen_names), None)
    return {'loss_sum': loss * weight, 'weight': weight, **{k: v * weight for k, v in metrics.items()}}
  if accum == 1:
    return sums(batch)
  per_micro = jax.lax.map(sums, micro_batches(batch, accum, micro_shardings))
  return jax.tree.map(lambda x: jnp.sum(x, axis=0), per_micro)
