"""The train state: everything that changes during training and is checkpointed.

Teachers are not in it: they are frozen inputs, loaded from their init every run.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 scalar: number of updates applied
  params: Any                # student params (exported)
  aux_params: Any            # the objective's training-only params (never exported)
  opt_state: Any             # optimizer state over (params, aux_params)
  objective_state: Any       # the objective's non-trainable state (e.g. SEED's queue)
  rng: jax.Array             # base key; step keys are fold_in(rng, step)
  nonfinite_step: jax.Array  # int32: first step whose loss was not finite, or -1


def create(params, aux_params, objective_state, optimizer, rng: jax.Array) -> TrainState:
  return TrainState(step=jnp.zeros([], jnp.int32), params=params, aux_params=aux_params,
                    opt_state=optimizer.init((params, aux_params)),
                    objective_state=objective_state, rng=rng,
                    nonfinite_step=jnp.full([], -1, jnp.int32))
