"""Tests for funmatch.optim.shampoo against numpy re-implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from funmatch.errors import UserError
from funmatch.optim import shampoo as shampoo_lib
from funmatch.optim.shampoo import scale_by_shampoo, shampoo

# ---------------------------------------------------------------------------
# Numpy references (float64), written from the algorithm's definition.
# ---------------------------------------------------------------------------


def np_inverse_root(matrix, p, epsilon):
  """(A + epsilon * lambda_max * I)^(-1/p) by float64 eigh."""
  values, vectors = np.linalg.eigh(np.asarray(matrix, np.float64))
  ridge = epsilon * max(values.max(), 1e-30)
  return (vectors * (np.maximum(values, 0.0) + ridge) ** (-1.0 / p)) @ vectors.T


def np_adam_graft(grad, second_moment, t, beta2, eps):
  """The 'adam' graft step at 1-based step t: RMSProp, bias-corrected."""
  second_moment = beta2 * second_moment + (1 - beta2) * grad**2
  return grad / (np.sqrt(second_moment / (1 - beta2**t)) + eps), second_moment


def _random_grads(key, params):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten(
      [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _close(a, b, rtol):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) <= rtol * np.linalg.norm(b)


# ---------------------------------------------------------------------------
# Shapes: merging, tiling.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape, max_dim, expected", [
    ((1, 2, 512, 1, 2048, 1, 3, 4), 1024, (1024, 2048, 12)),
    ((1, 2, 768, 1, 2048), 1024, (2, 768, 2048)),
    ((3, 3, 64, 256), 4096, (576, 256)),
    ((1, 1, 64, 64), 4096, (4096,)),
    ((2048, 1000), 4096, (2048, 1000)),
    ((1, 1, 1), 4096, (1,)),
    ((), 4096, ()),
])
def test_merge_small_dims(shape, max_dim, expected):
  assert shampoo_lib.merge_small_dims(shape, max_dim) == expected


def test_layout_of_a_conv_kernel_tiles_both_axes():
  layout = shampoo_lib.make_layout((3, 3, 64, 256), block_size=128)
  assert layout.merged_shape == (576, 256)
  assert layout.num_blocks == (5, 2)  # 576 = 4 x 128 + 64 (zero padded)
  assert layout.block_shape == (128, 128)
  assert layout.statistic_sizes == (128, 128)


def test_layout_skips_long_axes_and_low_rank_tensors():
  long_axis = shampoo_lib.make_layout((6000, 3), block_size=128)
  assert long_axis.preconditioned == (False, True)
  assert long_axis.num_blocks == (1, 1)  # unpreconditioned axes are not cut
  assert long_axis.statistic_sizes == (3,)
  assert shampoo_lib.make_layout((10,), 128).statistic_sizes == ()
  assert shampoo_lib.make_layout((), 128).statistic_sizes == ()
  vector_too = shampoo_lib.make_layout((10,), 4, skip_preconditioning_rank_lt=1)
  assert vector_too.statistic_sizes == (4,) and vector_too.total_blocks == 3


@pytest.mark.parametrize("shape, block_size", [
    ((10, 6), 4), ((3, 3, 5, 7), 4), ((9,), 4), ((8, 8), 4), ((5, 3), 128)])
def test_partition_matches_numpy_slices_and_merge_inverts_it(shape, block_size):
  layout = shampoo_lib.make_layout(shape, block_size,
                                   merge_small_dims_block_size=1,
                                   skip_preconditioning_rank_lt=1)
  x = np.random.RandomState(0).randn(*shape).astype(np.float32)
  blocks = np.asarray(layout.partition(jnp.asarray(x)))

  merged = x.reshape(layout.merged_shape)
  padded = np.zeros([n * s for n, s in
                     zip(layout.num_blocks, layout.block_shape)], np.float32)
  padded[tuple(slice(0, d) for d in merged.shape)] = merged
  for index, grid in enumerate(np.ndindex(*layout.num_blocks)):
    window = tuple(slice(g * s, (g + 1) * s)
                   for g, s in zip(grid, layout.block_shape))
    np.testing.assert_array_equal(blocks[index], padded[window])
  np.testing.assert_array_equal(np.asarray(layout.merge(jnp.asarray(blocks))),
                                x)


def test_precondition_applies_each_tile_its_own_matrices():
  layout = shampoo_lib.make_layout((10, 6), 4, merge_small_dims_block_size=1)
  rng = np.random.RandomState(1)
  grad = rng.randn(10, 6).astype(np.float32)
  left = rng.randn(layout.total_blocks, 4, 4).astype(np.float32)
  right = rng.randn(layout.total_blocks, 4, 4).astype(np.float32)
  left = left + left.transpose(0, 2, 1)  # preconditioners are symmetric
  right = right + right.transpose(0, 2, 1)

  out = shampoo_lib.precondition(layout, jnp.asarray(grad),
                                 [jnp.asarray(left), jnp.asarray(right)])

  expected = np.zeros((12, 8))
  padded = np.zeros((12, 8))
  padded[:10, :6] = grad
  for index, (i, j) in enumerate(np.ndindex(3, 2)):
    tile = padded[4 * i:4 * i + 4, 4 * j:4 * j + 4]
    expected[4 * i:4 * i + 4, 4 * j:4 * j + 4] = (
        left[index] @ tile @ right[index])
  np.testing.assert_allclose(out, expected[:10, :6], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Inverse p-th roots.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_inverse_root_of_a_diagonal_matrix(method):
  root, ok = shampoo_lib.inverse_pth_root(jnp.diag(jnp.array([1., 4., 16.])),
                                          2, epsilon=0.0, method=method)
  assert bool(ok)
  np.testing.assert_allclose(root, np.diag([1.0, 0.5, 0.25]), atol=1e-5)


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_ridge_is_relative_to_the_largest_eigenvalue(method):
  # ridge = 0.01 * 16 = 0.16 is added to every eigenvalue.
  root, _ = shampoo_lib.inverse_pth_root(jnp.diag(jnp.array([1., 4., 16.])),
                                         4, epsilon=0.01, method=method)
  expected = np.diag(np.array([1.16, 4.16, 16.16]) ** -0.25)
  np.testing.assert_allclose(root, expected, rtol=1e-5, atol=1e-6)
  scaled, _ = shampoo_lib.inverse_pth_root(
      1e-6 * jnp.diag(jnp.array([1., 4., 16.])), 4, epsilon=0.01,
      method=method)
  # Scale invariance: (cA + eps c lambda I)^(-1/4) = c^(-1/4) (...)^(-1/4).
  np.testing.assert_allclose(scaled, expected * 1e-6 ** -0.25, rtol=1e-4)


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_inverse_root_of_a_2x2_spd_matrix(method):
  matrix = np.array([[2.0, 1.0], [1.0, 3.0]])
  values, vectors = np.linalg.eigh(matrix)
  expected = vectors @ np.diag(values ** -0.25) @ vectors.T
  root, ok = shampoo_lib.inverse_pth_root(jnp.asarray(matrix, jnp.float32), 4,
                                          epsilon=0.0, method=method)
  assert bool(ok)
  np.testing.assert_allclose(root, expected, rtol=1e-5)
  # and it is a root: (root^4) A = I.
  fourth_power = np.linalg.matrix_power(np.asarray(root, np.float64), 4)
  np.testing.assert_allclose(fourth_power @ matrix, np.eye(2), atol=1e-4)


@pytest.mark.parametrize("size, p, rank", [(8, 2, 8), (8, 4, 3), (32, 6, 32),
                                           (32, 4, 10)])
def test_eigh_and_newton_agree_with_float64(size, p, rank):
  rng = np.random.RandomState(size + p + rank)
  factor = rng.randn(size, rank) * rng.lognormal(0.0, 1.0, rank)
  matrix = (factor @ factor.T).astype(np.float32)
  expected = np_inverse_root(matrix, p, 1e-6)
  # Compare where gradients live: the range of the statistic.
  values, vectors = np.linalg.eigh(matrix.astype(np.float64))
  basis = vectors[:, values > 1e-3 * values.max()]
  for method in ("eigh", "newton"):
    root, ok = shampoo_lib.inverse_pth_root(jnp.asarray(matrix), p, 1e-6,
                                            method=method)
    assert bool(ok), method
    assert _close(basis.T @ np.asarray(root, np.float64) @ basis,
                  basis.T @ expected @ basis, 1e-3), method


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_non_finite_matrix_is_reported_as_failed(method):
  bad = jnp.full((4, 4), jnp.nan)
  _, ok = shampoo_lib.inverse_pth_root(bad, 4, 1e-6, method=method)
  assert not bool(ok)
  zero_root, ok = shampoo_lib.inverse_pth_root(jnp.zeros((4, 4)), 4, 1e-6,
                                               method=method)
  assert bool(ok) and bool(jnp.all(jnp.isfinite(zero_root)))


# ---------------------------------------------------------------------------
# The optimizer.
# ---------------------------------------------------------------------------


def test_state_is_arrays_with_static_shapes():
  params = {"w": jnp.zeros((300, 20)), "b": jnp.zeros((20,)),
            "s": jnp.zeros(())}
  opt = scale_by_shampoo(block_size=128, merge_small_dims_block_size=1)
  state = opt.init(params)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
  assert state.count.dtype == jnp.int32 and state.count.shape == ()
  # [300, 20]: tiles of 128 rows (3, the last zero padded) x 20 columns.
  assert [s.shape for s in state.statistics["w"]] == [(3, 128, 128),
                                                       (3, 20, 20)]
  assert state.statistics["b"] == () and state.statistics["s"] == ()
  abstract = jax.eval_shape(opt.init, params)
  assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(
      lambda x: x.shape, state)
  # statistics start at matrix_epsilon * I, preconditioners at I.
  np.testing.assert_allclose(state.statistics["w"][1][0], 1e-6 * np.eye(20))
  np.testing.assert_array_equal(state.preconditioners["w"][0][2],
                                np.eye(128))


def test_statistics_are_blockwise_ema_of_gram_matrices():
  beta2, eps = 0.9, 1e-6
  opt = scale_by_shampoo(block_size=4, beta2=beta2, matrix_epsilon=eps,
                         merge_small_dims_block_size=1)
  grad = np.random.RandomState(2).randn(6, 3).astype(np.float32)
  params = {"w": jnp.zeros((6, 3))}
  _, state = opt.update({"w": jnp.asarray(grad)}, opt.init(params), params)
  left, right = state.statistics["w"]
  padded = np.zeros((8, 3))
  padded[:6] = grad
  for i in range(2):
    tile = padded[4 * i:4 * i + 4]
    np.testing.assert_allclose(
        left[i], beta2 * eps * np.eye(4) + (1 - beta2) * tile @ tile.T,
        rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(
        right[i], beta2 * eps * np.eye(3) + (1 - beta2) * tile.T @ tile,
        rtol=1e-5, atol=1e-9)


def test_before_start_the_update_is_the_adam_graft():
  lr, beta1, beta2, eps = 0.01, 0.9, 0.99, 1e-8
  params = {"w": jnp.ones((5, 4)), "b": jnp.ones((4,))}
  opt = shampoo(lr, beta1=beta1, beta2=beta2, diagonal_epsilon=eps,
                start_preconditioning_step=100)
  adam = optax.adam(lr, b1=beta1, b2=beta2, eps=eps)
  state, adam_state = opt.init(params), adam.init(params)
  update = jax.jit(opt.update)
  second = {k: np.zeros(v.shape) for k, v in params.items()}
  momentum = {k: np.zeros(v.shape) for k, v in params.items()}
  for t in range(1, 6):
    grads = _random_grads(jax.random.key(t), params)
    updates, state = update(grads, state, params)
    if t == 1:  # Adam's first step is the same in both conventions.
      adam_updates, _ = adam.update(grads, adam_state, params)
      for k in params:
        np.testing.assert_allclose(updates[k], adam_updates[k], rtol=1e-6)
    for k in params:
      graft, second[k] = np_adam_graft(np.asarray(grads[k], np.float64),
                                       second[k], t, beta2, eps)
      momentum[k] = beta1 * momentum[k] + (1 - beta1) * graft
      expected = -lr * momentum[k] / (1 - beta1**t)
      np.testing.assert_allclose(updates[k], expected, rtol=1e-5, atol=1e-7)


def test_full_algorithm_matches_numpy_reimplementation():
  """Adam graft, EMA momentum, Nesterov, decoupled decay (optax), a schedule."""
  beta1, beta2, eps_d, eps_m, wd, p = 0.9, 0.95, 1e-8, 1e-6, 0.1, 4
  schedule = optax.linear_schedule(0.01, 0.03, 4)
  opt = optax.chain(
      shampoo_lib.direction(block_size=16, beta1=beta1, beta2=beta2,
                            diagonal_epsilon=eps_d, matrix_epsilon=eps_m,
                            start_preconditioning_step=0,
                            preconditioning_compute_steps=1, nesterov=True,
                            merge_small_dims_block_size=1),
      optax.add_decayed_weights(wd),
      optax.scale_by_learning_rate(schedule))
  rng = np.random.RandomState(3)
  params = {"w": rng.randn(6, 4), "b": rng.randn(4)}
  state = opt.init(jax.tree.map(jnp.asarray, params))
  stats_l, stats_r = eps_m * np.eye(6), eps_m * np.eye(4)
  second = {k: np.zeros(v.shape) for k, v in params.items()}
  momentum = {k: np.zeros(v.shape) for k, v in params.items()}
  for t in range(1, 7):
    grads = {k: rng.randn(*v.shape) for k, v in params.items()}
    updates, state = opt.update(
        jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads), state,
        jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params))
    g = grads["w"]
    stats_l = beta2 * stats_l + (1 - beta2) * g @ g.T
    stats_r = beta2 * stats_r + (1 - beta2) * g.T @ g
    direction = (np_inverse_root(stats_l, p, eps_m) @ g @
                 np_inverse_root(stats_r, p, eps_m))
    for k in params:
      graft, second[k] = np_adam_graft(grads[k], second[k], t, beta2, eps_d)
      step = graft
      if k == "w":  # biases (1-D) take the pure graft step
        step = direction * np.linalg.norm(graft) / np.linalg.norm(direction)
      momentum[k] = beta1 * momentum[k] + (1 - beta1) * step
      expected = (1 - beta1) * step + beta1 * momentum[k] / (1 - beta1**t)
      expected = -float(schedule(t - 1)) * (expected + wd * params[k])
      assert _close(updates[k], expected, 1e-4), (t, k)
      params[k] = params[k] + expected


def test_preconditioners_change_only_on_recompute_steps():
  start, every = 2, 3
  params = {"w": jnp.zeros((6, 5))}
  opt = scale_by_shampoo(start_preconditioning_step=start,
                         preconditioning_compute_steps=every,
                         merge_small_dims_block_size=1)
  state = opt.init(params)
  update = jax.jit(opt.update)
  for count in range(12):
    before = state.preconditioners["w"]
    _, state = update(_random_grads(jax.random.key(count), params), state,
                      params)
    changed = any(not np.array_equal(a, b)
                  for a, b in zip(before, state.preconditioners["w"]))
    assert changed == (count >= start and (count - start) % every == 0), count
  assert int(state.count) == 12


def test_recomputed_preconditioner_is_the_root_of_the_statistics():
  params = {"w": jnp.zeros((5, 3))}
  opt = scale_by_shampoo(start_preconditioning_step=0,
                         preconditioning_compute_steps=1, exponent_override=3,
                         merge_small_dims_block_size=1)
  state = opt.init(params)
  for t in range(3):
    _, state = opt.update(_random_grads(jax.random.key(t), params), state,
                          params)
  for stats, root in zip(state.statistics["w"], state.preconditioners["w"]):
    np.testing.assert_allclose(root[0], np_inverse_root(stats[0], 3, 1e-6),
                               rtol=2e-4, atol=1e-4)


def test_failed_root_keeps_the_previous_preconditioner():
  params = {"w": jnp.zeros((4, 3))}
  opt = scale_by_shampoo(start_preconditioning_step=0,
                         preconditioning_compute_steps=1,
                         merge_small_dims_block_size=1)
  state = opt.init(params)
  _, state = opt.update(_random_grads(jax.random.key(0), params), state,
                        params)
  poisoned = state._replace(statistics={"w": tuple(
      s.at[:, 0, 0].set(jnp.nan) for s in state.statistics["w"])})

  updates, new_state = jax.jit(opt.update)(
      _random_grads(jax.random.key(1), params), poisoned, params)

  for old, new in zip(state.preconditioners["w"],
                      new_state.preconditioners["w"]):
    np.testing.assert_array_equal(old, new)
  assert bool(jnp.all(jnp.isfinite(updates["w"])))


def test_long_axes_fall_back_to_one_sided_preconditioning():
  params = {"w": jnp.zeros((50, 3))}
  opt = scale_by_shampoo(start_preconditioning_step=0,
                         preconditioning_compute_steps=1, graft_type="sgd",
                         skip_preconditioning_dim_size_gt=40,
                         merge_small_dims_block_size=1)
  grad = np.random.RandomState(4).randn(50, 3)
  updates, state = opt.update({"w": jnp.asarray(grad, jnp.float32)},
                              opt.init(params), params)
  assert [s.shape for s in state.statistics["w"]] == [(1, 3, 3)]
  stats = 0.999 * 1e-6 * np.eye(3) + 0.001 * grad.T @ grad
  direction = grad @ np_inverse_root(stats, 2, 1e-6)  # p = 2: one axis
  expected = direction * np.linalg.norm(grad) / np.linalg.norm(direction)
  assert _close(updates["w"], expected, 1e-5)


def test_orbax_round_trip_restores_state_and_next_update(tmp_path):
  params = {"conv": jnp.ones((3, 3, 4, 8)), "bias": jnp.ones((8,))}
  opt = shampoo(0.01, block_size=8, start_preconditioning_step=1,
                preconditioning_compute_steps=2)
  update = jax.jit(opt.update)
  state = opt.init(params)
  for t in range(3):
    _, state = update(_random_grads(jax.random.key(t), params), state, params)

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "opt_state", state)
  checkpointer.wait_until_finished()
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        state)
  restored = checkpointer.restore(tmp_path / "opt_state", target)

  assert isinstance(restored[0][0], shampoo_lib.ShampooState)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  grads = _random_grads(jax.random.key(9), params)
  next_a, _ = update(grads, state, params)
  next_b, _ = update(grads, restored, params)
  for a, b in zip(jax.tree.leaves(next_a), jax.tree.leaves(next_b)):
    np.testing.assert_array_equal(a, b)


def test_beats_adam_on_an_ill_conditioned_quadratic():
  """f(W) = 0.5 ||A W B - C||^2 with condition-30 A and B (Hessian 1e6)."""
  rng = np.random.RandomState(0)

  def skewed(k):
    q1, _ = np.linalg.qr(rng.randn(k, k))
    q2, _ = np.linalg.qr(rng.randn(k, k))
    return jnp.asarray((q1 * np.logspace(0, np.log10(30.0), k)) @ q2,
                       jnp.float32)

  a, b = skewed(12), skewed(8)
  c = a @ jnp.asarray(rng.randn(12, 8), jnp.float32) @ b
  loss = lambda w: 0.5 * jnp.sum((a @ w @ b - c) ** 2)
  w0 = jnp.zeros((12, 8))
  target = 1e-4 * float(loss(w0))
  learning_rates = jnp.array([0.01, 0.03, 0.1, 0.3, 1.0])
  max_steps = 400

  def steps_to_target(opt):
    """Fewest steps to reach the target over the learning-rate grid."""
    def run(lr):  # opt is built with lr 1; updates are linear in lr
      def body(carry, _):
        w, state = carry
        updates, state = opt.update(jax.grad(loss)(w), state, w)
        w = w + lr * updates
        return (w, state), loss(w)
      return jax.lax.scan(body, (w0, opt.init(w0)), None, length=max_steps)[1]
    # lax.map, not vmap: under vmap lax.cond would compute every root.
    losses = np.asarray(jax.jit(lambda lrs: jax.lax.map(run, lrs))(
        learning_rates))
    hits = [np.nonzero(curve <= target)[0] for curve in losses]
    return min((int(h[0]) + 1 for h in hits if len(h)), default=None)

  shampoo_steps = steps_to_target(
      shampoo(1.0, start_preconditioning_step=5,
              preconditioning_compute_steps=5))
  adam_steps = steps_to_target(optax.adam(1.0))
  graft_only_steps = steps_to_target(
      shampoo(1.0, start_preconditioning_step=10**6))

  assert shampoo_steps is not None and shampoo_steps < max_steps // 2
  # Neither Adam nor the same optimizer without preconditioners gets there.
  assert adam_steps is None and graft_only_steps is None


@pytest.mark.parametrize("kwargs, culprit", [
    (dict(block_size=0), "block_size"),
    (dict(block_size=2.5), "block_size"),
    (dict(matrix_epsilon=-1e-6), "matrix_epsilon"),
    (dict(diagonal_epsilon=-1.0), "diagonal_epsilon"),
    (dict(graft_type="lion"), "graft_type"),
    (dict(inverse_root_method="svd"), "inverse_root_method"),
    (dict(beta2=0.0), "beta2"),
    (dict(preconditioning_compute_steps=0), "preconditioning_compute_steps"),
    (dict(learning_rate="fast"), "learning_rate"),
])
def test_bad_arguments_raise_user_error_at_construction(kwargs, culprit):
  arguments = dict(learning_rate=0.1)
  arguments.update(kwargs)
  with pytest.raises(UserError, match=culprit) as error:
    shampoo(**arguments)
  if culprit == "graft_type":
    assert "'adam'" in str(error.value) and "'sgd'" in str(error.value)
  if culprit == "inverse_root_method":
    assert "'eigh'" in str(error.value) and "'newton'" in str(error.value)
