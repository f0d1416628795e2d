"""The train state: everything that changes during training and is checkpointed.

Teachers are not in it: they are frozen inputs, loaded from their init every run.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections

from funmatch import parallel


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
                    opt_state=optimizer.init({"student": params, "aux": aux_params}),
                    objective_state=objective_state, rng=rng,
                    nonfinite_step=jnp.full([], -1, jnp.int32))


def shardings(config: ml_collections.ConfigDict, abstract_state: TrainState,
              mesh) -> TrainState:
  """Where each part of the state lives, as config.sharding says.

  The optimizer state follows the student's strategy (it is mostly per-param
  moments of the student); the objective's params and state follow `aux`.
  """
  replicated = parallel.replicated(mesh)
  student = lambda tree: parallel.group_shardings(config, "student", tree, mesh)
  aux = lambda tree: parallel.group_shardings(config, "aux", tree, mesh)
  return TrainState(step=replicated, params=student(abstract_state.params),
                    aux_params=aux(abstract_state.aux_params),
                    opt_state=student(abstract_state.opt_state),
                    objective_state=aux(abstract_state.objective_state),
                    rng=replicated, nonfinite_step=replicated)
