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


def init_state(run) -> TrainState:
  """The initial train state of `run` (funmatch.train.build.Run), placed on the mesh
  as config.sharding says.

  Keys: the student's params come from PRNGKey(seed) (build.build_models), the
  objective's state from PRNGKey(seed) too, its params and the step keys from
  split(PRNGKey(seed)).
  """
  student_out, teacher_outs = run.output_shapes

  # The params and the key are arguments, not constants of the program: baked in,
  # millions of floats would be compiled (slowly) into every run's own program.
  def initial(student_params, seed_key):
    aux_rng, state_rng = jax.random.split(seed_key)
    aux_params = run.objective.init_aux(aux_rng, student_out, teacher_outs)
    objective_state = run.objective.init_state(seed_key, student_out, teacher_outs)
    return create(student_params, aux_params, objective_state, run.optimizer, state_rng)

  # As host values: every process holds the same, which jit takes as replicated.
  args = jax.device_get((run.models.student_params, jax.random.PRNGKey(int(run.config.seed))))
  abstract_state = jax.eval_shape(initial, *args)
  return jax.jit(initial, out_shardings=shardings(run.config, abstract_state, run.mesh))(*args)
