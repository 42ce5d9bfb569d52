"""The train state: everything a step reads and writes, as one pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  """step: updates done; params; opt_state (optax); rng: raw uint32[2] key."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
