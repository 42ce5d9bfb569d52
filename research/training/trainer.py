"""The Trainer: one run's mesh, model, optimizer, shardings and jitted steps.

    trainer = Trainer(config, stage)                  # validates, plans shardings; compiles lazily
    state, frozen, data_state = init.setup_state(trainer, ckpt)
    with trainer.mesh_context():
      state, metrics = trainer.train_step(state, trainer.to_global(batch), frozen)

Parameters come in two trees: `state.params`, the trainable ones (all of
them, or only the LoRA adapters), and `frozen`, a dict of named trees that
never train: 'base' (the LoRA base) and the frozen copies the stage's loss
reads ('reference' for DPO without LoRA). Only `state` has optimizer state and
goes into checkpoints; frozen trees are rebuilt from init_from (or the seed).

The steps themselves are the pure functions of training/step.py; this class
binds them to the stage and jits them with per-key batch shardings
(stage.batch_axes through the config's logical rules), so a [batch] field
such as a per-sequence advantage shards like the rows it belongs to.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from research import lora
from research.data import pipeline
from research.errors import UserError
from research.models import quant
from research.training import sharding
from research.training import step as step_lib
from research.training.optimizer import make_optimizer
from research.training.state import TrainState
from research.training.validate import build_model, validate_run


class Trainer:
  """Holds the mesh, the model, the optimizer, the shardings and the compiled steps.

  `stage` is a research.training.stage.Stage. `devices` restricts the mesh to
  a subset of jax.devices() (tests use it to compare meshes in one process).
  """

  def __init__(self, config, stage, devices=None):
    self.config, self.stage = config, stage
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = sharding.rules_from_config(config.sharding_rules)
    validate_run(config, self.mesh, self.rules)
    self.model = build_model(config)
    self.layout = sharding.param_layout(self.model, self.mesh, self.rules, uses_lora=self.uses_lora,
                                        seq_len=config.seq_len)
    self.tx, self.schedule = make_optimizer(config.optimizer, config.steps)
    self._setup_shardings()

  @property
  def uses_lora(self) -> bool:
    return self.model.lora is not None

  @property
  def held_frozen(self) -> tuple[str, ...]:
    """Names of the frozen trees this run keeps in memory: the LoRA base, or a
    copy per frozen tree the stage reads (with LoRA those are derived, not held)."""
    return (step_lib.BASE,) if self.uses_lora else tuple(self.stage.frozen)

  @property
  def quantize_base(self) -> str:
    """'nf4' or 'int8' when a LoRA run keeps its frozen base quantized (QLoRA), else ''."""
    return lora.quantize_kind(self.config.lora)

  def frozen_base(self, base):
    """The LoRA base as the run holds it: quantized on the mesh (config.lora.quantize_base), or as it is."""
    return self._quantize(base) if self.quantize_base else base

  @functools.cached_property
  def _quantize(self):
    return jax.jit(functools.partial(quant.quantize_tree, kind=self.quantize_base),
                   out_shardings=self.frozen_shardings[step_lib.BASE])

  def mesh_context(self) -> sharding.MeshContext:
    """`with trainer.mesh_context():` the mesh and logical rules, for tracing and running."""
    return sharding.MeshContext(self.mesh, self.rules)

  def _setup_shardings(self):
    trainable, base = self.layout.trainable, self.layout.base
    if self.quantize_base:
      base = quant.abstract_quantized(base, self.quantize_base)
    self.abstract_frozen = {name: base if name == step_lib.BASE else trainable for name in self.held_frozen}
    shardings_of = lambda tree: jax.tree.map(lambda a: a.sharding, tree)
    self.param_shardings, self.frozen_shardings = shardings_of(trainable), shardings_of(self.abstract_frozen)
    abstract_opt = jax.eval_shape(self.tx.init, trainable)
    repl = sharding.replicated(self.mesh)
    opt_shardings = optax.tree_map_params(self.tx, lambda _, s: s, abstract_opt, self.param_shardings,
                                          transform_non_params=lambda _: repl,
                                          is_leaf=lambda x: isinstance(x, NamedSharding))
    self.state_shardings = TrainState(step=repl, params=self.param_shardings,
                                      opt_state=opt_shardings, rng=repl, skipped=repl)
    abstract_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trainable,
                                opt_state=abstract_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
                                skipped=jax.ShapeDtypeStruct((2,), jnp.int32))
    self.abstract_state = sharding.with_shardings(abstract_state, self.state_shardings)
    self.batch_shardings = {k: sharding.logical_sharding(axes, self.mesh, self.rules)
                            for k, axes in self.stage.batch_axes.items()}
    self.rows = pipeline.process_rows(self.config.batch_size, jax.process_index(), jax.process_count())

  # ---- compiled steps -------------------------------------------------------

  def _step_kwargs(self) -> dict:
    return dict(model=self.model, loss_fn=self.stage.loss, frozen_names=tuple(self.stage.frozen))

  def _micro_kwargs(self) -> dict:
    """grad_accum_steps micro-batches, each kept on the devices of its rows."""
    micro = {k: NamedSharding(self.mesh, P(None, *s.spec)) for k, s in self.batch_shardings.items()}
    return dict(accum=int(self.config.optimizer.grad_accum_steps), micro_shardings=micro)

  @functools.cached_property
  def train_step(self):
    """jit(step.train_step): (state, batch, frozen) -> (state, metrics); donates the state."""
    fn = functools.partial(step_lib.train_step, tx=self.tx, schedule=self.schedule, **self._micro_kwargs(),
                           **self._step_kwargs())
    return jax.jit(fn, in_shardings=(self.state_shardings, self.batch_shardings, self.frozen_shardings),
                   out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                   donate_argnums=(0,))

  @functools.cached_property
  def eval_step(self):
    """jit(step.eval_step): (params, frozen, batch) -> weighted sums, in the
    train step's micro-batches (so evaluation fits wherever training does)."""
    fn = functools.partial(step_lib.eval_step, **self._micro_kwargs(), **self._step_kwargs())
    return jax.jit(fn, in_shardings=(self.param_shardings, self.frozen_shardings, self.batch_shardings),
                   out_shardings=sharding.replicated(self.mesh))

  # ---- data ---------------------------------------------------------------------

  def to_global(self, batch: dict[str, np.ndarray], local: bool = False) -> dict[str, jax.Array]:
    """Global jax.Arrays from a global numpy batch (this process keeps its rows),
    or with local=True from this process's rows alone (per-host input)."""
    if set(batch) != set(self.batch_shardings):
      raise UserError(f'stage {self.stage.name!r}: its batch has keys {sorted(batch)} but its '
                      f'batch_axes name {sorted(self.batch_shardings)}; make them the same.')
    if local:
      n_local = self.rows.stop - self.rows.start
      if any(v.shape[0] != n_local for v in batch.values()):
        raise ValueError(f'a local batch needs {n_local} rows per array; got {jax.tree.map(np.shape, batch)}')
      return {k: jax.make_array_from_process_local_data(self.batch_shardings[k], v,
                                                        (self.config.batch_size, *v.shape[1:]))
              for k, v in batch.items()}
    rows = pipeline.local_rows(batch, self.rows)
    return {k: jax.make_array_from_process_local_data(self.batch_shardings[k], v, batch[k].shape)
            for k, v in rows.items()}
