"""The train state: everything a step reads and writes, as one pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """step: updates attempted; params; opt_state (optax); rng: raw uint32[2] key;
  skipped: int32[2], (steps skipped because the loss or gradient norm was not
  finite, how many of them in a row up to now)."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  skipped: jax.Array


def no_skips() -> jax.Array:
  """The `skipped` counters of a run that has skipped nothing."""
  return jnp.zeros((2,), jnp.int32)
