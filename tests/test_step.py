"""The train step, called directly on a fixed batch (no run directory, no mesh):
its update against one computed by hand from jax.grad and the optax transformation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import init_params
from research import lora
from research.models import LoraConfig
from research.models.llama import Config, Model
from research.stages import pretrain
from research.training import step
from research.training.state import TrainState, no_skips

CFG = Config(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


def _jit_step(**kw):
  return jax.jit(functools.partial(step.train_step, **kw))


def _batch(B=4, T=16, seed=0):
  tok = np.random.RandomState(seed).randint(0, 512, (B, T + 1)).astype(np.int32)
  seg = np.ones((B, T), np.int32)
  seg[1, 10:] = 2  # two documents in row 1
  seg[2, 12:] = 0  # padding at the end of row 2
  pos = np.where(seg == 2, np.arange(T) - 10, np.arange(T)) * (seg > 0)
  return {'inputs': jnp.asarray(tok[:, :-1]), 'targets': jnp.asarray(tok[:, 1:]),
          'segment_ids': jnp.asarray(seg), 'positions': jnp.asarray(pos.astype(np.int32))}


def _tx():
  # Adam's first update is g / (|g| + eps): with the usual eps = 1e-8 it turns
  # float32 rounding of near-zero gradients into O(1) changes, so the check uses
  # an eps at which the update is a smooth function of the gradient.
  schedule = optax.linear_schedule(1e-2, 1e-3, 10)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, eps=1e-3, weight_decay=0.1)), schedule


def _state(params, tx):
  return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=jax.random.PRNGKey(7),
                    skipped=no_skips())


def test_train_step_matches_a_hand_computed_update():
  model = Model(CFG)
  params, batch, (tx, schedule) = init_params(model), _batch(), _tx()
  train_step = _jit_step(model=model, loss_fn=pretrain.loss, tx=tx, schedule=schedule)
  new_state, metrics = train_step(_state(params, tx), batch, {})

  # By hand: the mean token cross-entropy over non-padding positions, computed
  # here from the logits, its gradient, then the optimizer.
  def loss(p):
    logits = model.apply({'params': p}, batch['inputs'], batch['positions'], batch['segment_ids'])[0]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch['targets'][..., None], axis=-1)[..., 0]
    mask = batch['segment_ids'] > 0
    return jnp.sum(nll * mask) / jnp.sum(mask)
  want_loss, grads = jax.jit(jax.value_and_grad(loss))(params)
  want = jax.jit(lambda g, p: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))(grads, params)

  for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(metrics['train/loss']), float(want_loss), rtol=1e-6)
  np.testing.assert_allclose(float(metrics['train/grad_norm']), float(optax.tree.norm(grads)), rtol=1e-5)
  assert float(metrics['train/weight']) == 4 * 16 - 4  # the padded positions do not count
  assert float(metrics['train/lr']) == float(schedule(0)) and int(new_state.step) == 1
  assert not np.array_equal(np.asarray(new_state.rng), np.asarray(jax.random.PRNGKey(7)))


def test_accumulation_gives_the_same_update():
  model = Model(CFG)
  params, batch, (tx, schedule) = init_params(model), _batch(), _tx()
  kw = dict(model=model, loss_fn=pretrain.loss, tx=tx, schedule=schedule)
  one, m1 = _jit_step(**kw)(_state(params, tx), batch, {})
  two, m2 = _jit_step(accum=2, **kw)(_state(params, tx), batch, {})
  np.testing.assert_allclose(float(m1['train/loss']), float(m2['train/loss']), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_lora_step_trains_adapters_and_reads_the_base_as_reference():
  """With frozen={'base': ...}, only adapters move, and a loss asking for
  'reference' gets the base with adapters off (no copy held)."""
  model = Model(CFG, lora=LoraConfig(rank=2, alpha=4.0, targets=lora.TARGET_PRESETS['attention']))
  adapters, base = lora.split(init_params(model))
  adapters = jax.tree.map(lambda x: x + 0.05, adapters)  # B != 0: the adapted model differs from the base
  batch, (tx, schedule) = _batch(), _tx()

  def loss_fn(m, params, b, frozen, rng):
    ce, n, _ = pretrain.loss(m, params, b, frozen, rng)
    ref_ce, _, _ = pretrain.loss(m, frozen['reference'], b, frozen, None)
    return ce, n, {'ref_loss': ref_ce}

  train_step = _jit_step(model=model, loss_fn=loss_fn, tx=tx, schedule=schedule, frozen_names=('reference',))
  new_state, metrics = train_step(_state(adapters, tx), batch, {'base': base})
  base_loss = jax.jit(lambda p: pretrain.loss(Model(CFG), p, batch, {}, None)[0])(base)
  np.testing.assert_allclose(float(metrics['train/ref_loss']), float(base_loss), rtol=1e-6)
  assert jax.tree.structure(new_state.params) == jax.tree.structure(adapters)
  moved = [not np.array_equal(np.asarray(a), np.asarray(b))
           for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(adapters))]
  assert all(moved)


def test_eval_step_returns_weighted_sums():
  model = Model(CFG)
  params, batch = init_params(model), _batch()
  out = jax.jit(functools.partial(step.eval_step, model=model, loss_fn=pretrain.loss))(params, {}, batch)
  loss, n, _ = jax.jit(lambda p: pretrain.loss(model, p, batch, {}, None))(params)
  assert float(out['weight']) == float(n) == 60
  np.testing.assert_allclose(float(out['loss_sum']), float(loss) * 60, rtol=1e-6)


@pytest.mark.parametrize('accum', [2, 4])
def test_eval_in_micro_batches_sums_the_rows_of_the_whole_batch(accum):
  """Evaluation split like training: the sums equal those of each row evaluated
  alone, added up (the rows each micro-batch takes do not matter to a sum)."""
  model = Model(CFG)
  params, batch = init_params(model), _batch()
  got = jax.jit(functools.partial(step.eval_step, model=model, loss_fn=pretrain.loss, accum=accum))(params, {}, batch)
  one = jax.jit(lambda row: pretrain.loss(model, params, row, {}, None))
  per_row = [one(jax.tree.map(lambda x, i=i: x[i:i + 1], batch)) for i in range(4)]
  assert float(got['weight']) == sum(float(n) for _, n, _ in per_row) == 60
  np.testing.assert_allclose(float(got['loss_sum']), sum(float(l) * float(n) for l, n, _ in per_row), rtol=1e-6)


def _poisoned(model, params, batch, frozen, rng):
  """pretrain.loss times batch['poison'] (1, or NaN / inf to make the step non-finite)."""
  rest = {k: v for k, v in batch.items() if k != 'poison'}
  loss, weight, metrics = pretrain.loss(model, params, rest, frozen, rng)
  return loss * batch['poison'], weight, metrics


@pytest.mark.parametrize('poison', [np.nan, np.inf])
def test_a_non_finite_step_is_skipped_and_training_continues_as_if_it_never_updated(poison):
  """Steps on b1, poisoned b2, b3 against a run that takes b1, then only advances
  the step counter and rng (what skipping b2's update means), then b3: bitwise equal."""
  model, (tx, schedule) = Model(CFG), _tx()
  train_step = _jit_step(model=model, loss_fn=_poisoned, tx=tx, schedule=schedule)
  b1, b2, b3 = ({**_batch(seed=i), 'poison': jnp.float32(1.0)} for i in range(3))
  s1, _ = train_step(_state(init_params(model), tx), b1, {})
  s2, m2 = train_step(s1, {**b2, 'poison': jnp.float32(poison)}, {})
  s3, m3 = train_step(s2, b3, {})

  assert not np.isfinite(float(m2['train/loss'])) and int(s2.step) == 2
  for a, b in zip(jax.tree.leaves((s2.params, s2.opt_state)), jax.tree.leaves((s1.params, s1.opt_state))):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert [int(m2['train/skipped_steps']), int(m2['train/skipped_in_row'])] == [1, 1]
  assert [int(m3['train/skipped_steps']), int(m3['train/skipped_in_row'])] == [1, 0]
  assert float(m3['train/lr']) == float(schedule(1))  # optax's count skipped step 2: the lr it applied
  never_updated = TrainState(step=s1.step + 1, params=s1.params, opt_state=s1.opt_state,
                             rng=jax.random.split(s1.rng)[0], skipped=s1.skipped)
  want, want_m = train_step(never_updated, b3, {})
  assert float(m3['train/loss']) == float(want_m['train/loss'])
  for a, b in zip(jax.tree.leaves((s3.params, s3.opt_state, s3.rng)),
                  jax.tree.leaves((want.params, want.opt_state, want.rng))):
    assert np.array_equal(np.asarray(a), np.asarray(b))
