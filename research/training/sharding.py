"""Device mesh and logical-axis sharding.

Mesh axes are ('data', 'fsdp', 'tensor'). Parameters and activations carry
logical axis names ('embed', 'heads', 'batch', ...); `config.sharding_rules`
maps them to mesh axes, so changing the parallelism is a config edit.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from research.errors import UserError

MESH_AXES = ('data', 'fsdp', 'tensor')


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, int, int]:
  """Resolves config.mesh (one axis may be -1) against the device count."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
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
  """A ('data', 'fsdp', 'tensor') mesh over all (or the given) devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


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


def logical_to_shardings(logical_specs: Any, mesh, rules) -> Any:
  """Tree of logical PartitionSpecs -> tree of NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh, rules, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, length, ...] input array."""
  spec = nn.logical_to_mesh_axes(('batch', 'length') + (None,) * (ndim - 2), rules)
  return NamedSharding(mesh, spec)


def data_parallel_size(mesh, rules) -> int:
  """Number of shards of the batch dimension."""
  axes = batch_sharding(mesh, rules).spec[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def check_divisible(abstract: Any, shardings: Any, what: str = 'parameter') -> None:
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
        raise UserError(f'{what} {name} of shape {leaf.shape} cannot be split {n} ways over mesh '
                        f'axes {axes}: change config.mesh or config.sharding_rules.')


def replicated(mesh) -> NamedSharding:
  """Fully replicated sharding on `mesh`."""
  return NamedSharding(mesh, P())
