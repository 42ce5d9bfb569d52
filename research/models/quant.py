"""A quantized frozen base for QLoRA (Dettmers et al., 2023): NF4 or int8
weights in blocks of 64, each block scaled by its absolute maximum.

    base_q = quantize_tree(base, 'nf4')       # the LoRA run's frozen tree
    model.apply({'params': lora.combine(base_q, adapters)}, tokens)

A quantized kernel is a `Quantized` pytree (codes, absmax) in place of the
array; `Linear` and the MoE experts call `materialize` on what they read, so
each layer is dequantized where it is used (inside the scan over layers, one
layer at a time) and the float weights never exist all at once. The adapters,
norms, embeddings and output heads stay float32.

NF4: 16 levels at quantiles of a standard normal (the QLoRA paper's table),
two codes packed per byte: 4.5 bits per weight with the float32 absmax (no
double quantization of the absmax, which would save another 0.37 bits).
int8: round(127 * w / absmax), 8.5 bits per weight.

Written in the project rather than taken from `qwix` (which has NF4 and a
QLoRA path): qwix's LoRA and quantization work by intercepting the Flax model's
operations (qwix.quantize_model / apply_lora_to_model) with its own adapter
parameters, which would replace this project's LoRA (Linear's adapters, the
split trainable / frozen trees, merge and export). What is needed here is only
a storage format for the frozen tree and a dequantize at the point of use; a
short module that tests check against a numpy reference. qwix's QArray could
become that storage format later, at the price of a dependency.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

KINDS = ('nf4', 'int8')
BLOCK = 64
# NF4 levels: QLoRA, appendix E (normal quantiles, exact 0, asymmetric so 0 and +-1 are representable).
NF4_LEVELS = np.asarray([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                         -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                         0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                         0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
# Layer weights that stay float: the router decides which experts run, so its
# few parameters keep full precision.
_KEEP_FLOAT = ('router',)


@struct.dataclass
class Quantized:
  """A weight of `shape` (per layer) in blocks: codes [*lead, blocks, 32] uint8 (NF4,
  two per byte) or [*lead, blocks, 64] int8, absmax [*lead, blocks] float32; `lead`
  is the stacked-layers axis of scanned parameters (nn.scan slices it off)."""

  codes: jax.Array
  absmax: jax.Array
  shape: tuple[int, ...] = struct.field(pytree_node=False)
  kind: str = struct.field(pytree_node=False)

  @property
  def size(self) -> int:
    return math.prod(self.codes.shape[:-2]) * math.prod(self.shape)


def quantize(w: jax.Array, kind: str, lead: int = 0) -> Quantized:
  """`w` quantized blockwise; its first `lead` dims are kept apart (stacked layers),
  the rest flattened into blocks of BLOCK (zero-padded)."""
  if kind not in KINDS:
    raise ValueError(f'quantization {kind!r}; choose one of {KINDS}')
  lead_shape, shape = w.shape[:lead], w.shape[lead:]
  n = math.prod(shape)
  flat = w.astype(jnp.float32).reshape(lead_shape + (n,))
  flat = jnp.pad(flat, [(0, 0)] * lead + [(0, -n % BLOCK)])
  blocks = flat.reshape(lead_shape + (-1, BLOCK))
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  scaled = blocks / jnp.where(absmax > 0, absmax, 1.0)[..., None]
  if kind == 'int8':
    codes = jnp.round(127.0 * scaled).astype(jnp.int8)
  else:  # the nearest level: its index among the midpoints between levels
    idx = jnp.searchsorted(jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2), scaled).astype(jnp.uint8)
    codes = idx[..., 0::2] | (idx[..., 1::2] << 4)
  return Quantized(codes, absmax, tuple(shape), kind)


def dequantize(q: Quantized, dtype=jnp.float32) -> jax.Array:
  """The float weight [*lead, *shape] that `q` stands for."""
  lead = q.codes.shape[:-2]
  if q.kind == 'int8':
    scaled = q.codes.astype(jnp.float32) / 127.0
  else:
    idx = jnp.stack([q.codes & 0xF, q.codes >> 4], axis=-1).reshape(q.codes.shape[:-1] + (BLOCK,))
    scaled = jnp.asarray(NF4_LEVELS)[idx]
  flat = (scaled * q.absmax[..., None]).reshape(lead + (-1,))[..., :math.prod(q.shape)]
  return flat.reshape(lead + q.shape).astype(dtype)


def materialize(w: Any, dtype=None) -> jax.Array:
  """A weight as an array: dequantized if it is Quantized, else itself (in `dtype` if given)."""
  if isinstance(w, Quantized):
    return dequantize(w, dtype or jnp.float32)
  return w if dtype is None else w.astype(dtype)


def param(module, name: str, init, shape, dtype):
  """module.param(name, init, shape, dtype), except that a Quantized value (a QLoRA
  base) comes back as it is: flax would compare its codes' shape with `shape`."""
  if module.has_variable('params', name) and is_quantized(value := module.get_variable('params', name)):
    return value
  return module.param(name, init, shape, dtype)


def _quantizes(path: tuple[str, ...], leaf) -> bool:
  """A layer's weight matrix (per-layer rank >= 2), not a norm, bias or router."""
  stacked = path[0] == 'layers'
  return (path[0].startswith('layers') and leaf.ndim - stacked >= 2 and path[-1] not in ('bias', 'scale')
          and not any(p in _KEEP_FLOAT for p in path))


def quantize_tree(params: dict, kind: str) -> dict:
  """`params` with every layer weight matrix Quantized (embeddings, heads, norms,
  biases and routers stay as they are)."""
  def walk(tree, path):
    out = {}
    for k, v in tree.items():
      p = path + (k,)
      if isinstance(v, dict):
        out[k] = walk(v, p)
      else:
        out[k] = quantize(v, kind, lead=int(p[0] == 'layers')) if _quantizes(p, v) else v
    return out
  return walk(params, ())


def dequantize_tree(params: dict) -> dict:
  """`params` with every Quantized leaf turned back into its float32 array."""
  return jax.tree.map(materialize, params, is_leaf=lambda x: isinstance(x, Quantized))


def is_quantized(x) -> bool:
  return isinstance(x, Quantized)


def abstract_quantized(abstract_base: dict, kind: str) -> dict:
  """The quantized tree of an abstract float tree (ShapeDtypeStructs carrying
  shardings), each leaf with a sharding: a Quantized weight's blocks split over
  the mesh axes its float weight used (when they divide), the rest unchanged."""
  q_tree = jax.eval_shape(lambda t: quantize_tree(t, kind), abstract_base)

  def place(q, f):
    if not isinstance(q, Quantized):
      return jax.ShapeDtypeStruct(q.shape, q.dtype, sharding=f.sharding)
    mesh = f.sharding.mesh
    axes = tuple(a for entry in f.sharding.spec if entry is not None
                 for a in ((entry,) if isinstance(entry, str) else entry))
    lead = (None,) * (q.codes.ndim - 2)
    blocks = q.codes.shape[-2]
    split = axes if axes and blocks % math.prod(mesh.shape[a] for a in axes) == 0 else None
    leaf = lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P(*spec)))
    return q.replace(codes=leaf(q.codes, lead + (split, None)), absmax=leaf(q.absmax, lead + (split,)))
  return jax.tree.map(place, q_tree, abstract_base, is_leaf=is_quantized)
