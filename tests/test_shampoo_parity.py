"""Parity of funmatch's Shampoo with Google's `distributed_shampoo`.

The reference is `precondition-opt==0.3.0` (module
`precondition.distributed_shampoo`), which needs three small shims on current
JAX, applied inside these tests only: the removed `jax.tree_map`,
`jax.tree_flatten`, `jax.tree_unflatten` aliases, and a stand-in `chex` module
when chex is not installed (the reference uses chex only for `chex.Array`
annotations).

Both optimizers see the same gradients and params each step (computed along
the reference's trajectory), so the comparison measures the optimizers, not the
chaotic growth of rounding differences through training. Configurations are
the ones both support: eigh roots, relative matrix epsilon, tiling with
remainders, merged small dims, graft types, momentum conventions, coupled
(through-momentum) weight decay, start step, recompute interval, a schedule.
"""

import importlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from funmatch.optim import shampoo as shampoo_lib

pytestmark = pytest.mark.filterwarnings(
    # The reference asks for float64 roots; without jax_enable_x64 it falls
    # back to float32 and warns.
    "ignore:Explicitly requested dtype:UserWarning")

_STEPS = 20


@pytest.fixture
def reference(monkeypatch):
  """The reference module, importable and runnable on current JAX."""
  monkeypatch.setattr(jax, "tree_map", jax.tree.map, raising=False)
  monkeypatch.setattr(jax, "tree_flatten", jax.tree_util.tree_flatten,
                      raising=False)
  monkeypatch.setattr(jax, "tree_unflatten", jax.tree_util.tree_unflatten,
                      raising=False)
  try:
    importlib.import_module("chex")
  except ImportError:
    chex_stub = types.ModuleType("chex")
    chex_stub.Array = jax.Array
    monkeypatch.setitem(sys.modules, "chex", chex_stub)
  return importlib.import_module("precondition.distributed_shampoo")


def _init_params():
  keys = jax.random.split(jax.random.key(0), 3)
  return {
      "conv": {"kernel": 0.3 * jax.random.normal(keys[0], (3, 3, 3, 4)),
               "bias": jnp.zeros((4,))},
      "dense": {"kernel": 0.2 * jax.random.normal(keys[1], (36, 10)),
                "bias": jnp.zeros((10,))},
      "head": {"kernel": 0.3 * jax.random.normal(keys[2], (10, 6))},
  }


def _loss(params, images, labels):
  """A tiny conv net: conv 3x3 -> tanh -> dense -> tanh -> head."""
  hidden = jax.lax.conv_general_dilated(
      images, params["conv"]["kernel"], (1, 1), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  hidden = jnp.tanh(hidden + params["conv"]["bias"])
  hidden = hidden.reshape(hidden.shape[0], -1)
  hidden = jnp.tanh(hidden @ params["dense"]["kernel"] +
                    params["dense"]["bias"])
  logits = hidden @ params["head"]["kernel"]
  return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         labels).mean()


def _batch(step):
  images = jax.random.normal(jax.random.key(100 + step), (16, 5, 5, 3))
  labels = jax.random.randint(jax.random.key(200 + step), (16,), 0, 6)
  return images, labels


def _max_relative_differences(reference_opt, our_opt):
  """Per step: max over leaves of |u_ref - u_ours| / |u_ref|."""
  params = _init_params()
  ref_state, our_state = reference_opt.init(params), our_opt.init(params)
  ref_update, our_update = jax.jit(reference_opt.update), jax.jit(
      our_opt.update)
  grad_fn = jax.jit(jax.grad(_loss))
  differences = []
  for step in range(_STEPS):
    grads = grad_fn(params, *_batch(step))
    ref_u, ref_state = ref_update(grads, ref_state, params)
    our_u, our_state = our_update(grads, our_state, params)
    differences.append(max(
        float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
        for a, b in zip(jax.tree.leaves(ref_u), jax.tree.leaves(our_u))))
    params = optax.apply_updates(params, ref_u)
  return np.array(differences)


# (beta1, nesterov, moving_average_for_momentum, start step, compute steps,
#  skip_preconditioning_rank_lt).
# - The second config uses beta1=0 because the reference keeps a separate
#   graft momentum for the steps before the start (we keep one buffer), which
#   only matters when momentum carries across the switch.
# - The start step is a multiple of the interval: the reference recomputes at
#   multiples of it from step 0 (also before the start), we from the start.
# - Roots are recomputed only when every statistic is well conditioned (from
#   step 0 only with a recompute every step; else after enough steps). A root
#   of a rank-deficient statistic, applied to a later gradient with components
#   in its null space, amplifies directions fixed only to float32 rounding
#   (the degenerate eigenvalues eps * lambda_max +- 1e-7 * lambda_max); both
#   implementations are then right to ~1e-4, not 1e-5.
_CONFIGS = {
    "heavy_ball_nesterov_start0_every1_no1d": (0.9, True, False, 0, 1, 2),
    "ema_start9_every3_with1d": (0.0, False, True, 9, 3, 1),
}


@pytest.mark.parametrize("config", sorted(_CONFIGS))
@pytest.mark.parametrize("graft",
                         ["rmsprop", "sgd", "adagrad", "rmsprop_normalized"])
def test_updates_match_distributed_shampoo(reference, graft, config):
  beta1, nesterov, moving_average, start, every, rank_lt = _CONFIGS[config]
  schedule = optax.linear_schedule(0.01, 0.05, 10)
  common = dict(
      learning_rate=schedule, block_size=8, beta1=beta1, beta2=0.99,
      diagonal_epsilon=1e-10, matrix_epsilon=1e-6, weight_decay=1e-3,
      start_preconditioning_step=start, preconditioning_compute_steps=every,
      nesterov=nesterov, moving_average_for_momentum=moving_average,
      exponent_override=0,
      # 16 keeps the tensors 2-D (conv [3,3,3,4] -> [9, 12]), not flattened.
      merge_small_dims_block_size=16, skip_preconditioning_dim_size_gt=4096,
      skip_preconditioning_rank_lt=rank_lt)
  graft_enum = {
      "rmsprop": reference.GraftingType.RMSPROP,
      "sgd": reference.GraftingType.SGD,
      "adagrad": reference.GraftingType.ADAGRAD,
      "rmsprop_normalized": reference.GraftingType.RMSPROP_NORMALIZED,
  }[graft]
  reference_opt = reference.distributed_shampoo(
      graft_type=graft_enum, eigh=True, relative_matrix_epsilon=True,
      generate_training_metrics=False, **common)
  common = dict(common)
  # distributed_shampoo adds the decay to the grafted step before the momentum.
  decay = common.pop("weight_decay")
  schedule = common.pop("learning_rate")
  momentum = dict(beta1=common.pop("beta1"), nesterov=common.pop("nesterov"),
                  moving_average=common.pop("moving_average_for_momentum"))
  our_opt = optax.chain(
      shampoo_lib.scale_by_shampoo(graft_type=graft, inverse_root_method="eigh",
                                   **common),
      optax.add_decayed_weights(decay),
      shampoo_lib.momentum(**momentum),
      optax.scale_by_learning_rate(schedule))

  differences = _max_relative_differences(reference_opt, our_opt)

  assert differences.max() < 1e-5, differences


def test_parity_harness_detects_a_different_optimizer(reference):
  """Control: a real difference (beta2) is far above the parity tolerance."""
  common = dict(learning_rate=0.02, block_size=8, beta1=0.9,
                start_preconditioning_step=0, preconditioning_compute_steps=1,
                merge_small_dims_block_size=16, skip_preconditioning_rank_lt=2)
  reference_opt = reference.distributed_shampoo(
      graft_type=reference.GraftingType.RMSPROP, eigh=True, beta2=0.99,
      generate_training_metrics=False, **common)
  our_opt = shampoo_lib.shampoo(graft_type="rmsprop", beta2=0.9,
                                moving_average_for_momentum=False, **common)

  assert _max_relative_differences(reference_opt, our_opt).max() > 1e-2
