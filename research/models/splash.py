"""Splash attention: the Pallas TPU flash-attention kernel of jax.experimental,
as MaxText, Levanter and Tunix use it on TPUs.

The kernel skips key blocks its static mask (causal) rules out and takes the
packed documents as segment ids (equal ids attend to each other; padding,
segment 0, only to padding, whose outputs no loss reads). Grouped-query
attention runs the kernel's single-KV-head form once per KV head over that
head's group of query heads.

A Pallas kernel is one custom call that XLA's partitioner cannot split, so on a
mesh it runs under `shard_map`: batch over the axes the logical rules give
'batch', heads over those of 'heads' (the length is never split). Off TPU the
same kernel runs in Pallas' interpret mode (plain XLA ops, slow): that is how
CI checks it, on CPU; `layers.resolve_attention_impl` picks it only on TPU.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

BLOCK = 512  # query and key tile edge (TPU: a multiple of 128), cut to T when T is smaller


def supports(B: int, T: int, H: int, K: int, mesh_axis_sizes: dict | None = None) -> bool:
  """Whether splash_attention takes this shape: whole tiles (the kernel wants
  multiples of 128, interpreted too), rows that divide over the mesh axes of
  'batch' and query and KV heads over those of 'heads' (shard_map splits evenly)."""
  if T % 128 or T % min(BLOCK, T):
    return False
  batch_axes, heads_axes = mesh_axes()
  split = lambda axes: math.prod((mesh_axis_sizes or {}).get(a, 1) for a in axes)
  return B % split(batch_axes) == 0 and H % split(heads_axes) == 0 and K % split(heads_axes) == 0


def _kernel(T: int, group: int, logit_softcap: float, interpret: bool):
  """The single-KV-head causal kernel for `group` query heads of length T. Built
  inside each trace, not cached: it holds its block tables as arrays."""
  mask = sm.MultiHeadMask([sm.CausalMask((T, T)) for _ in range(group)])
  b = min(BLOCK, T)
  blocks = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                         block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  return sk.make_splash_mqa_single_device(mask, block_sizes=blocks, attn_logits_soft_cap=logit_softcap or None,
                                          interpret=interpret)


def _local_attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, logit_softcap: float, interpret: bool):
  """Splash on one device's shard: [B, T, H, Dh] out, float32 math inside the kernel."""
  B, T, H, Dh = q_BTHD.shape
  K = k_BTKD.shape[2]
  kernel = _kernel(T, H // K, float(logit_softcap), interpret)
  # The kernel neither scales the queries nor takes a batch: [K, G, T, Dh] per row.
  q_BKGTD = (q_BTHD / math.sqrt(Dh)).reshape(B, T, K, H // K, Dh).transpose(0, 2, 3, 1, 4)
  k_BKTD, v_BKTD = k_BTKD.transpose(0, 2, 1, 3), v_BTKD.transpose(0, 2, 1, 3)

  def row(q_KGTD, k_KTD, v_KTD, seg_T):
    ids = sk.SegmentIds(q=seg_T, kv=seg_T)
    return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q_KGTD, k_KTD, v_KTD)

  out_BKGTD = jax.vmap(row)(q_BKGTD, k_BKTD, v_BKTD, segment_ids_BT.astype(jnp.int32))
  return out_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh)


def mesh_axes() -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(mesh axes of 'batch', mesh axes of 'heads') under the current logical rules."""
  spec = nn.logical_to_mesh_axes(('batch', 'heads'))

  def names(entry):
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)

  return names(spec[0]), names(spec[1])


def splash_attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, dtype, logit_softcap: float = 0.0):
  """Causal self-attention [B, T, H, Dh] (query i and key i the same slot) within
  the segments of `segment_ids_BT` (0 = padding), with the Pallas splash kernel;
  shard_map over the current mesh when there is one. Same numbers as
  `layers.einsum_attention` with the causal, same-segment mask for every
  non-padding query."""
  interpret = jax.default_backend() != 'tpu'
  k_BTKD, v_BTKD = k_BTKD.astype(q_BTHD.dtype), v_BTKD.astype(q_BTHD.dtype)
  local = functools.partial(_local_attention, logit_softcap=logit_softcap, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT).astype(dtype)
  batch, heads = mesh_axes()
  P = jax.sharding.PartitionSpec
  qkv = P(batch or None, None, heads or None, None)
  out = jax.shard_map(local, in_specs=(qkv, qkv, qkv, P(batch or None, None)), out_specs=qkv,
                      check_vma=False)(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT)
  return out.astype(dtype)
