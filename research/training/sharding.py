"""Device mesh, logical-axis sharding, and where a model's parameters live.

Mesh axes are ('data', 'fsdp', 'expert', 'tensor'). Parameters and activations carry
logical axis names ('embed', 'heads', 'batch', ...); `config.sharding_rules`
maps them to mesh axes, so changing the parallelism is a config edit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from research import lora
from research.errors import UserError

# `expert` holds a Mixture of Experts' experts (elsewhere it splits the batch like
# `data`); `tensor` is last so that its heavy collectives stay between nearest devices.
MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, ...]:
  """Resolves config.mesh (one axis may be -1; `expert` defaults to 1) against the device count."""
  sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise UserError(f'config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}.')
  for name, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise UserError(f'config.mesh.{name}={s}: an axis size must be positive or -1.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % known:
      raise UserError(f'config.mesh: the fixed axes {dict(zip(MESH_AXES, sizes))} (product {known}) '
                      f'do not divide the {n_devices} devices.')
    sizes[sizes.index(-1)] = n_devices // known
  if math.prod(sizes) != n_devices:
    bad = next((a for a, s in zip(MESH_AXES, sizes) if s != 1), 'data')
    raise UserError(f'config.mesh.{bad}: the mesh {dict(zip(MESH_AXES, sizes))} needs '
                    f'{math.prod(sizes)} devices but there are {n_devices}; make the axis '
                    'sizes multiply to the device count (one may be -1).')
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A ('data', 'fsdp', 'expert', 'tensor') mesh over all (or the given) devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def rules_from_config(rules_cfg) -> tuple[tuple[str, Any], ...]:
  """config.sharding_rules as flax logical rules, mesh axes checked."""
  rules = []
  for rule in rules_cfg:
    name, axes = rule[0], rule[1]
    axes_t = axes if isinstance(axes, (tuple, list)) else (axes,)
    for a in axes_t:
      if a is not None and a not in MESH_AXES:
        raise UserError(f'config.sharding_rules: {name!r} maps to unknown mesh axis {a!r}; '
                        f'mesh axes are {MESH_AXES}.')
    rules.append((name, tuple(axes) if isinstance(axes, list) else axes))
  return tuple(rules)


def logical_sharding(axes: Sequence[str | None], mesh, rules) -> NamedSharding:
  """The sharding of an array whose dims have logical names `axes`, e.g. ('batch', 'length')."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(axes), rules))


def batch_sharding(mesh, rules) -> NamedSharding:
  """Sharding of a [batch, length] input array."""
  return logical_sharding(('batch', 'length'), mesh, rules)


def data_parallel_size(mesh, rules) -> int:
  """Number of shards of the batch dimension."""
  axes = batch_sharding(mesh, rules).spec[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def check_divisible(abstract: Any, shardings: Any) -> None:
  """Raises a UserError naming the first array whose dims do not split evenly."""
  flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
  flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sharding in zip(flat, flat_s):
    for dim, axes in zip(leaf.shape, sharding.spec):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else axes
      n = math.prod(sharding.mesh.shape[a] for a in axes)
      if dim % n:
        name = jax.tree_util.keystr(path)
        raise UserError(f'parameter {name} of shape {leaf.shape} cannot be split {n} ways over mesh '
                        f'axes {axes}: change config.mesh or config.sharding_rules.')


def replicated(mesh) -> NamedSharding:
  """Fully replicated sharding on `mesh`."""
  return NamedSharding(mesh, P())


class MeshContext:
  """`with MeshContext(mesh, rules):` the mesh and logical axis rules that
  sharded code is traced under (jit, init, sampling)."""

  def __init__(self, mesh, rules):
    self.mesh, self.rules = mesh, rules

  def __enter__(self):
    self._mesh_cm = jax.set_mesh(self.mesh)
    self._rules_cm = nn.logical_axis_rules(self.rules)
    self._mesh_cm.__enter__()
    self._rules_cm.__enter__()
    return self

  def __exit__(self, *exc):
    self._rules_cm.__exit__(*exc)
    self._mesh_cm.__exit__(*exc)


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs of `abstract` carrying `shardings` (restore and lowering targets)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


@dataclasses.dataclass(frozen=True)
class ParamLayout:
  """A model's parameters on a mesh: abstract shapes and shardings of the full
  tree, and its split into the trainable tree and (with LoRA) the frozen base."""

  model: Any
  mesh: Any
  rules: Any
  uses_lora: bool
  abstract: Any    # full tree of ShapeDtypeStructs
  shardings: Any   # full tree of NamedShardings

  def split(self, tree) -> tuple[Any, Any]:
    """(trainable, frozen base) of a full parameter-shaped tree; base {} without LoRA."""
    return lora.split(tree) if self.uses_lora else (tree, {})

  @property
  def trainable(self):
    """Abstract trainable tree, carrying its shardings."""
    return with_shardings(*(self.split(t)[0] for t in (self.abstract, self.shardings)))

  @property
  def base(self):
    """Abstract frozen base (LoRA), carrying its shardings; {} without LoRA."""
    return with_shardings(*(self.split(t)[1] for t in (self.abstract, self.shardings)))

  def init_boxed(self, rng, seq_len: int):
    """model.init's boxed (logically annotated) parameters for `rng`."""
    dummy = jnp.zeros((1, min(8, seq_len)), jnp.int32)
    return self.model.init(rng, dummy)['params']


def param_layout(model, mesh, rules, *, uses_lora: bool, seq_len: int) -> ParamLayout:
  """The ParamLayout of `model` on `mesh`; a UserError if a parameter does not
  split over its mesh axes or LoRA targets match no parameter."""
  layout = ParamLayout(model, mesh, rules, uses_lora, None, None)
  with MeshContext(mesh, rules):
    boxed = jax.eval_shape(lambda rng: layout.init_boxed(rng, seq_len), jax.random.PRNGKey(0))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  abstract = nn.meta.unbox(boxed)
  check_divisible(abstract, shardings)
  layout = dataclasses.replace(layout, abstract=abstract, shardings=shardings)
  if uses_lora and not layout.split(abstract)[0]:
    raise UserError(f'config.lora.targets ({model.lora.targets!r}) matches no parameter; use a preset '
                    "(attention, attention_up_down, all_linear) or a regex over paths like "
                    "'layers_0/attn/q/kernel'.")
  return layout
