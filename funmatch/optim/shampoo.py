"""Shampoo: Kronecker-factored preconditioning with layer-wise grafting (optax).

The algorithm of Gupta et al. 2018 in the "scalable" form of Anil et al. 2020
(`distributed_shampoo`), written small. Per step and per parameter `W`:

1. Reshape `W`'s gradient `G` (merging small dims, `merge_small_dims`), pad it
   to whole blocks and cut it into `block_size` tiles. For every tile and every
   preconditioned axis `a` accumulate the Gram matrix of `G` along `a`
   (`L += G G^T`, `R += G^T G` for a matrix; an EMA when `beta2 < 1`).
2. Every `preconditioning_compute_steps` steps from `start_preconditioning_step`
   on (other steps skip it with `lax.cond`), replace the preconditioners by
   the inverse p-th roots `(S + eps * lambda_max(S) * I)^(-1/p)` with
   `p = 2 x number of preconditioned axes`, in float32, by `eigh` or a coupled
   Newton iteration. A root that fails (non-finite, or Newton not converged)
   keeps the previous preconditioner.
3. Shampoo direction `D = G x_a P_a` (each preconditioner applied along its
   axis). Grafting: `D` is rescaled to the norm of the graft optimizer's step
   (Adam by default) for the whole parameter, so the layer-wise step size is the
   graft's and only the direction is Shampoo's.
4. Momentum over the grafted step (one buffer; the graft step is used alone
   before `start_preconditioning_step`), optional Nesterov, then `-lr`.

Steps 1-3 are the optax transform `scale_by_shampoo`; step 4 is `momentum`
(optax.trace / optax.ema); `shampoo(lr)` chains them with the learning rate.
Weight decay is not Shampoo's business: funmatch/optim chains
`optax.add_decayed_weights` before the momentum (distributed_shampoo's
default) or after it (decoupled, the trainer's default).

Which parameters get preconditioners: scalars never; tensors of rank below
`skip_preconditioning_rank_lt` (default 2: biases, norm scales) take the pure
graft step; merged axes longer than `skip_preconditioning_dim_size_gt` get no
preconditioner (identity along that axis, and it is not cut into tiles) while
the tensor's other axes are still preconditioned.

Differences from `distributed_shampoo` (all outside the parity-tested subset,
`tests/test_shampoo_parity.py`): one momentum buffer instead of two (the
reference keeps a separate momentum of the graft steps for the warm-up); the
first recompute happens at `start_preconditioning_step`; an `adam` graft
(bias-corrected RMSProp) and bias-corrected moving-average momentum; tiles are zero padded (the root
of a zero-padded matrix is the padded root, so this is exact); per-axis rather
than per-tensor fallback for very long axes; the Newton root normalises by
lambda_max and tolerates a transient growth of its error where the reference
retries with a 10x larger ridge; no quantisation, sharded or low-rank modes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from funmatch.errors import UserError

GRAFT_TYPES = ("adam", "rmsprop", "rmsprop_normalized", "adagrad", "sgd")
INVERSE_ROOT_METHODS = ("eigh", "newton")

_HIGHEST = lax.Precision.HIGHEST
# Guards divisions by a norm that may be zero (zero gradient).
_NORM_EPSILON = 1e-25
# Floor for lambda_max so that the relative ridge stays > 0 for an all-zero
# statistic; far below any real statistic, so the ridge stays relative.
_TINY_EIGENVALUE = 1e-30
# Newton iterations stop (keeping the previous iterate) when max |M - I| grows
# by this factor from below _SMALL_ERROR: the float32 rounding floor.
_MAX_ERROR_RATIO = 1.2
_SMALL_ERROR = 1e-2

ScalarOrSchedule = Union[float, Callable[[jax.Array], jax.Array]]


class ShampooState(NamedTuple):
  """State of `scale_by_shampoo`: jnp arrays only, shapes fixed by the params.

  `graft_second_moment` is a tree like the params (`()` for graft types without
  a second moment). `statistics` and
  `preconditioners` are trees like the params whose leaves are tuples with one
  `[num_blocks, s, s]` float32 array per preconditioned axis (empty tuples for
  parameters without preconditioners).
  """
  count: jax.Array
  graft_second_moment: Any
  statistics: Any
  preconditioners: Any


def merge_small_dims(shape: Sequence[int], max_dim: int) -> tuple[int, ...]:
  """Merges consecutive dims while their product stays <= max_dim.

  E.g. (1, 2, 512, 1, 2048, 1, 3, 4) -> (1024, 2048, 12) for max_dim 1024.
  A shape of only ones becomes (1,); a scalar stays ().
  """
  shape = tuple(int(d) for d in shape)
  if shape and all(d == 1 for d in shape):
    return (1,)
  merged = []
  product = 1
  for d in shape:
    if product * d <= max_dim:
      product *= d
    else:
      if product > 1:
        merged.append(product)
      product = d
  if product > 1:
    merged.append(product)
  return tuple(merged)


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """How one tensor is merged, zero padded and cut into tiles (all static).

  Axis i of the merged tensor is cut into `num_blocks[i]` tiles of
  `block_shape[i]` (only preconditioned axes longer than the block size are
  cut). Tiles are enumerated in row-major order of the tile grid.
  """
  shape: tuple[int, ...]
  merged_shape: tuple[int, ...]
  preconditioned: tuple[bool, ...]
  num_blocks: tuple[int, ...]
  block_shape: tuple[int, ...]

  @property
  def total_blocks(self) -> int:
    return math.prod(self.num_blocks)

  @property
  def preconditioned_axes(self) -> tuple[int, ...]:
    return tuple(i for i, p in enumerate(self.preconditioned) if p)

  @property
  def statistic_sizes(self) -> tuple[int, ...]:
    """Side of the statistics matrices, one per preconditioned axis."""
    return tuple(self.block_shape[i] for i in self.preconditioned_axes)

  def partition(self, x: jax.Array) -> jax.Array:
    """[*shape] -> [total_blocks, *block_shape] (zero padded)."""
    x = jnp.reshape(x, self.merged_shape)
    padding = [(0, n * s - d) for n, s, d in
               zip(self.num_blocks, self.block_shape, self.merged_shape)]
    x = jnp.pad(x, padding)
    interleaved = [v for n, s in zip(self.num_blocks, self.block_shape)
                   for v in (n, s)]
    x = jnp.reshape(x, interleaved)
    rank = len(self.merged_shape)
    grid_first = [2 * i for i in range(rank)] + [2 * i + 1 for i in range(rank)]
    x = jnp.transpose(x, grid_first)
    return jnp.reshape(x, (self.total_blocks,) + self.block_shape)

  def merge(self, blocks: jax.Array) -> jax.Array:
    """Inverse of `partition`: [total_blocks, *block_shape] -> [*shape]."""
    rank = len(self.merged_shape)
    x = jnp.reshape(blocks, self.num_blocks + self.block_shape)
    interleave = [v for i in range(rank) for v in (i, rank + i)]
    x = jnp.transpose(x, interleave)
    padded = tuple(n * s for n, s in zip(self.num_blocks, self.block_shape))
    x = jnp.reshape(x, padded)
    x = x[tuple(slice(0, d) for d in self.merged_shape)]
    return jnp.reshape(x, self.shape)


def make_layout(shape: Sequence[int], block_size: int,
                merge_small_dims_block_size: int = 4096,
                skip_preconditioning_dim_size_gt: int = 4096,
                skip_preconditioning_rank_lt: int = 2) -> BlockLayout:
  """The static tiling of a parameter of this shape (see `BlockLayout`)."""
  shape = tuple(int(d) for d in shape)
  merged = merge_small_dims(shape, merge_small_dims_block_size)
  eligible = len(shape) >= max(skip_preconditioning_rank_lt, 1)
  preconditioned = tuple(
      eligible and d <= skip_preconditioning_dim_size_gt for d in merged)
  num_blocks, block_shape = [], []
  for d, p in zip(merged, preconditioned):
    if p and d > block_size:
      num_blocks.append(-(-d // block_size))
      block_shape.append(block_size)
    else:
      num_blocks.append(1)
      block_shape.append(d)
  return BlockLayout(shape, merged, preconditioned, tuple(num_blocks),
                     tuple(block_shape))


def _gram(blocks: jax.Array, axis: int) -> jax.Array:
  """[N, *block] -> [N, s, s]: per tile, the Gram matrix along `axis`."""
  rows = jnp.moveaxis(blocks, 1 + axis, 1)
  rows = jnp.reshape(rows, rows.shape[:2] + (-1,))
  return jnp.einsum("nij,nkj->nik", rows, rows, precision=_HIGHEST)


def _apply_along(blocks: jax.Array, matrices: jax.Array,
                 axis: int) -> jax.Array:
  """Multiplies every tile by its (symmetric) matrix along `axis`."""
  moved = jnp.moveaxis(blocks, 1 + axis, 1)
  moved = jnp.einsum("nij,nj...->ni...", matrices, moved, precision=_HIGHEST)
  return jnp.moveaxis(moved, 1, 1 + axis)


def precondition(layout: BlockLayout, grad: jax.Array,
                 preconditioners: Sequence[jax.Array]) -> jax.Array:
  """Applies one preconditioner per preconditioned axis, tile by tile."""
  blocks = layout.partition(grad)
  for axis, matrices in zip(layout.preconditioned_axes, preconditioners):
    blocks = _apply_along(blocks, matrices, axis)
  return layout.merge(blocks)


def _power_iteration(matrix: jax.Array, num_iters: int = 100,
                     tolerance: float = 1e-6) -> jax.Array:
  """Largest eigenvalue of a symmetric PSD matrix (for the relative ridge)."""
  n = matrix.shape[-1]
  # A fixed generic start vector: deterministic and almost surely not
  # orthogonal to the top eigenvector (a constant vector can be).
  start = jnp.asarray(
      np.random.RandomState(0).uniform(-1.0, 1.0, n), matrix.dtype)

  def cond(state):
    i, _, _, changing = state
    return jnp.logical_and(i < num_iters, changing)

  def body(state):
    i, v, value, _ = state
    v = v / jnp.maximum(jnp.linalg.norm(v), _TINY_EIGENVALUE)
    image = jnp.matmul(matrix, v, precision=_HIGHEST)
    new_value = jnp.dot(v, image, precision=_HIGHEST)
    changing = jnp.abs(new_value - value) > tolerance * jnp.abs(new_value)
    return i + 1, image, new_value, changing

  init = (0, start, jnp.zeros([], matrix.dtype), jnp.array(True))
  return lax.while_loop(cond, body, init)[2]


def _matrix_power(matrix: jax.Array, p: jax.Array) -> jax.Array:
  """matrix^p for a traced integer p >= 1 (binary exponentiation)."""
  def body(state):
    k, result, base = state
    result = jnp.where(k % 2 == 1,
                       jnp.matmul(result, base, precision=_HIGHEST), result)
    return k // 2, result, jnp.matmul(base, base, precision=_HIGHEST)

  init = (p, jnp.eye(matrix.shape[-1], dtype=matrix.dtype), matrix)
  return lax.while_loop(lambda s: s[0] > 0, body, init)[1]


def _eigh_inverse_root(matrix, p, epsilon):
  """(matrix + epsilon * lambda_max * I)^(-1/p) by eigendecomposition."""
  eigenvalues, vectors = jnp.linalg.eigh(matrix)
  ridge = epsilon * jnp.maximum(jnp.max(eigenvalues), _TINY_EIGENVALUE)
  # max(., 0): rounding can make eigenvalues of a PSD matrix slightly negative.
  scales = jnp.power(jnp.maximum(eigenvalues, 0.0) + ridge, -1.0 / p)
  root = jnp.matmul(vectors * scales, vectors.T, precision=_HIGHEST)
  return root, jnp.all(jnp.isfinite(root))


def _newton_inverse_root(matrix, p, epsilon, failure_threshold,
                         num_iters=100, tolerance=1e-6):
  """(matrix + epsilon * lambda_max * I)^(-1/p) by coupled Newton iterations.

  Iterates M <- ((1 - a) I + a M)^p M, H <- H ((1 - a) I + a M), a = -1/p,
  from M = zA, H = z^(1/p) I (Higham, Functions of Matrices, eq. 7.18), so
  that M -> I and H -> A^(-1/p).
  """
  n = matrix.shape[-1]
  identity = jnp.eye(n, dtype=matrix.dtype)
  # Work on A / lambda_max (spectrum in [eps, 1 + eps]) and scale back: the
  # iteration then never squares tiny or huge numbers.
  scale = jnp.maximum(_power_iteration(matrix), _TINY_EIGENVALUE)
  damped = matrix / scale + epsilon * identity
  alpha = -1.0 / p
  # z = (1 + p) / (2 ||A||) puts the spectrum of zA inside the region where
  # the iteration converges; the Frobenius norm bounds the spectral norm.
  z = (1.0 + p) / (2.0 * jnp.linalg.norm(damped))
  m0 = damped * z
  h0 = identity * jnp.power(z, 1.0 / p)
  error0 = jnp.max(jnp.abs(m0 - identity))

  def cond(state):
    i, _, _, error, _, prev_error, ratio = state
    # The error may grow in the first iterations; once it is small, growth
    # means the float32 rounding floor is reached: stop there.
    floor_reached = (ratio >= _MAX_ERROR_RATIO) & (prev_error < _SMALL_ERROR)
    return (i < num_iters) & (error > tolerance) & ~floor_reached

  def body(state):
    i, m, h, error, _, _, _ = state
    step = (1.0 - alpha) * identity + alpha * m
    new_m = jnp.matmul(_matrix_power(step, p), m, precision=_HIGHEST)
    new_h = jnp.matmul(h, step, precision=_HIGHEST)
    new_error = jnp.max(jnp.abs(new_m - identity))
    return i + 1, new_m, new_h, new_error, h, error, new_error / error

  init = (0, m0, h0, error0, h0, error0, jnp.zeros([], matrix.dtype))
  _, _, h, error, prev_h, prev_error, ratio = lax.while_loop(cond, body, init)
  diverged = error > prev_error  # at the floor: the previous iterate
  root = jnp.where(diverged, prev_h, h) * jnp.power(scale, alpha)
  error = jnp.where(diverged, prev_error, error)
  ok = jnp.all(jnp.isfinite(root)) & (error < failure_threshold)
  return root, ok


def inverse_pth_root(matrix: jax.Array, p: Union[int, jax.Array],
                     epsilon: float = 1e-6, method: str = "eigh",
                     failure_threshold: float = 0.1
                     ) -> tuple[jax.Array, jax.Array]:
  """Returns `((A + epsilon * lambda_max(A) * I)^(-1/p), ok)` in float32.

  `A` is a symmetric PSD matrix; `ok` is False when the result is not usable
  (non-finite, or the Newton iteration ended with error >= failure_threshold).
  """
  _check_choice("inverse_root_method", method, INVERSE_ROOT_METHODS)
  matrix = jnp.asarray(matrix, jnp.float32)
  # Symmetrise: accumulated rounding makes G G^T sums slightly asymmetric.
  matrix = 0.5 * (matrix + matrix.T)
  if method == "eigh":
    return _eigh_inverse_root(matrix, p, epsilon)
  return _newton_inverse_root(matrix, p, epsilon, failure_threshold)


def _zero_after(x: jax.Array) -> jax.Array:
  """A 0.0 that XLA can only compute once `x` is ready.

  jaxlib's CPU eigh splits its batch over XLA's thread pool and blocks until
  the pieces finish; several eigh calls running at once can hold every pool
  thread and deadlock (seen with jax 0.10.2 on 2 cores). Adding this zero to
  the next group's input makes the groups run one after another.
  """
  first = x.reshape(-1)[0]
  return 0.0 * jnp.where(jnp.isfinite(first), first, 0.0)


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise UserError(f"shampoo {name}={value!r} is not supported; use one of "
                    f"{', '.join(repr(a) for a in allowed)}")


def _check_number(name: str, value: Any, ok: bool, requirement: str) -> None:
  if not ok:
    raise UserError(f"shampoo {name}={value!r} is invalid; it must be "
                    f"{requirement}")


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return (isinstance(value, (int, float, np.integer, np.floating)) and
          not isinstance(value, bool))


@dataclasses.dataclass(frozen=True)
class Settings:
  """The validated arguments of `scale_by_shampoo` (see its docstring)."""
  block_size: int = 128
  beta2: float = 0.999
  diagonal_epsilon: float = 1e-10
  matrix_epsilon: float = 1e-6
  start_preconditioning_step: int = 10
  preconditioning_compute_steps: int = 10
  graft_type: str = "adam"
  exponent_override: int = 0
  merge_small_dims_block_size: int = 4096
  skip_preconditioning_dim_size_gt: int = 4096
  skip_preconditioning_rank_lt: int = 2
  inverse_root_method: str = "eigh"
  inverse_failure_threshold: float = 0.1

  def __post_init__(self):
    """Raises UserError naming the first bad argument."""
    _check_number("block_size", self.block_size, _is_int(self.block_size) and
                  self.block_size >= 1, "an integer >= 1 (e.g. 128)")
    _check_number("beta2", self.beta2, _is_real(self.beta2) and
                  0.0 < self.beta2 <= 1.0,
                  "in (0, 1] (1 accumulates sums, AdaGrad style)")
    for name in ("diagonal_epsilon", "matrix_epsilon", "inverse_failure_threshold"):
      value = getattr(self, name)
      _check_number(name, value, _is_real(value) and value >= 0, "a number >= 0")
    for name, low in (("start_preconditioning_step", 0), ("exponent_override", 0),
                      ("skip_preconditioning_rank_lt", 0),
                      ("preconditioning_compute_steps", 1),
                      ("merge_small_dims_block_size", 1),
                      ("skip_preconditioning_dim_size_gt", 1)):
      value = getattr(self, name)
      _check_number(name, value, _is_int(value) and value >= low,
                    f"an integer >= {low}")
    _check_choice("graft_type", self.graft_type, GRAFT_TYPES)
    _check_choice("inverse_root_method", self.inverse_root_method,
                  INVERSE_ROOT_METHODS)

  @functools.lru_cache(maxsize=None)
  def layout(self, shape: tuple[int, ...]) -> BlockLayout:
    return make_layout(
        shape, self.block_size,
        merge_small_dims_block_size=self.merge_small_dims_block_size,
        skip_preconditioning_dim_size_gt=self.skip_preconditioning_dim_size_gt,
        skip_preconditioning_rank_lt=self.skip_preconditioning_rank_lt)

  def exponent(self, layout: BlockLayout) -> int:
    return self.exponent_override or 2 * len(layout.preconditioned_axes)


def _graft_step(graft_type: str, grad: jax.Array, second_moment: Any,
                count: jax.Array, beta2: float, epsilon: float):
  """Returns (graft step without lr and momentum, new second moment)."""
  if graft_type == "sgd":
    return grad, second_moment
  scaled = grad
  if graft_type == "rmsprop_normalized":
    scaled = grad / (jnp.linalg.norm(grad) + _NORM_EPSILON)
  if graft_type == "adagrad":
    second_moment = second_moment + jnp.square(scaled)
  else:  # EMA; beta2 == 1 means plain sums, as for the statistics.
    weight = 1.0 if beta2 == 1.0 else 1.0 - beta2
    second_moment = beta2 * second_moment + weight * jnp.square(scaled)
  denominator = second_moment
  if graft_type == "adam" and beta2 < 1.0:
    denominator = second_moment / (1.0 - beta2 ** (count + 1.0))
  return scaled / (jnp.sqrt(denominator) + epsilon), second_moment


def _init(settings: Settings, params) -> ShampooState:
  leaves, treedef = jax.tree.flatten(params)

  def matrices(shape, scale):
    layout = settings.layout(tuple(shape))
    return tuple(jnp.broadcast_to(scale * jnp.eye(s, dtype=jnp.float32),
                                  (layout.total_blocks, s, s))
                 for s in layout.statistic_sizes)

  has_second_moment = settings.graft_type != "sgd"
  return ShampooState(
      count=jnp.zeros([], jnp.int32),
      graft_second_moment=treedef.unflatten(
          [jnp.zeros(x.shape, jnp.float32) for x in leaves])
      if has_second_moment else (),
      statistics=treedef.unflatten(
          [matrices(x.shape, settings.matrix_epsilon) for x in leaves]),
      preconditioners=treedef.unflatten([matrices(x.shape, 1.0) for x in leaves]))


def _updated_statistics(settings: Settings, layout: BlockLayout, grad, statistics):
  """Blockwise EMA (or sums, beta2 = 1) of the Gram matrices along each axis."""
  if not statistics:
    return statistics
  blocks = layout.partition(grad)
  old_weight, new_weight = ((1.0, 1.0) if settings.beta2 == 1.0
                            else (settings.beta2, 1.0 - settings.beta2))
  return tuple(old_weight * old + new_weight * _gram(blocks, axis)
               for axis, old in zip(layout.preconditioned_axes, statistics))


def _roots(settings: Settings, statistics, previous, exponents):
  """Inverse roots of all statistics, batched by matrix size (one eigh per size)."""
  by_size = {}
  for i, s in enumerate(statistics):
    by_size.setdefault(s.shape[-1], []).append(i)
  roots = [None] * len(statistics)
  root_fn = functools.partial(
      inverse_pth_root, epsilon=settings.matrix_epsilon,
      method=settings.inverse_root_method,
      failure_threshold=settings.inverse_failure_threshold)
  new = None
  for indices in by_size.values():
    stacked = jnp.concatenate([statistics[i] for i in indices])
    if new is not None:
      stacked = stacked + _zero_after(new)  # one size group at a time
    powers = jnp.concatenate([
        jnp.full(statistics[i].shape[0], exponents[i], jnp.int32) for i in indices])
    new, ok = jax.vmap(root_fn)(stacked, powers)
    old = jnp.concatenate([previous[i] for i in indices])
    new = jnp.where(ok[:, None, None], new, old)  # failed root: keep old
    offsets = np.cumsum([statistics[i].shape[0] for i in indices])[:-1]
    for i, part in zip(indices, jnp.split(new, offsets)):
      roots[i] = part
  return roots


def _updated_preconditioners(settings: Settings, count, layouts, statistics,
                             preconditioners):
  """New roots on recompute steps (lax.cond: not computed at all on the others)."""
  flat_stats = [s for per_param in statistics for s in per_param]
  flat_old = [p for per_param in preconditioners for p in per_param]
  if not flat_stats:
    return preconditioners
  exponents = [settings.exponent(layout) for layout, per_param in
               zip(layouts, statistics) for _ in per_param]
  since_start = count - settings.start_preconditioning_step
  recompute = (since_start >= 0) & (
      since_start % settings.preconditioning_compute_steps == 0)
  flat_new = lax.cond(recompute,
                      lambda s, o: _roots(settings, s, o, exponents),
                      lambda s, o: list(o), flat_stats, flat_old)
  regrouped, offset = [], 0
  for per_param in preconditioners:
    regrouped.append(tuple(flat_new[offset:offset + len(per_param)]))
    offset += len(per_param)
  return regrouped


def _grafted_step(layout: BlockLayout, grad, graft, preconditioners):
  """The graft step's norm in Shampoo's direction (the graft alone if none)."""
  if not preconditioners:
    return graft
  direction = precondition(layout, grad, preconditioners)
  return direction * (jnp.linalg.norm(graft) /
                      (jnp.linalg.norm(direction) + _NORM_EPSILON))


def _update(settings: Settings, updates, state: ShampooState, params=None):
  del params
  leaves, treedef = jax.tree.flatten(updates)
  count = state.count
  grads = [g.astype(jnp.float32) for g in leaves]
  layouts = [settings.layout(tuple(g.shape)) for g in grads]
  statistics = [_updated_statistics(settings, layout, g, s) for layout, g, s in
                zip(layouts, grads, treedef.flatten_up_to(state.statistics))]
  preconditioners = _updated_preconditioners(
      settings, count, layouts, statistics,
      treedef.flatten_up_to(state.preconditioners))
  has_second_moment = settings.graft_type != "sgd"
  old_moments = (treedef.flatten_up_to(state.graft_second_moment)
                 if has_second_moment else [None] * len(grads))
  started = count >= settings.start_preconditioning_step
  steps, moments = [], []
  for layout, g, v, pre, leaf in zip(layouts, grads, old_moments, preconditioners,
                                     leaves):
    graft, v = _graft_step(settings.graft_type, g, v, count, settings.beta2,
                           settings.diagonal_epsilon)
    step = jnp.where(started, _grafted_step(layout, g, graft, pre), graft)
    steps.append(step.astype(leaf.dtype))
    moments.append(v)
  new_state = ShampooState(
      count=optax.safe_int32_increment(count),
      graft_second_moment=treedef.unflatten(moments) if has_second_moment else (),
      statistics=treedef.unflatten(statistics),
      preconditioners=treedef.unflatten(preconditioners))
  return treedef.unflatten(steps), new_state


def scale_by_shampoo(**kwargs) -> optax.GradientTransformation:
  """Shampoo's grafted, preconditioned step (no momentum, no learning rate).

  Keyword arguments (defaults in `Settings`):
    block_size: tile size for the statistics of long axes (cost is cubic).
    beta2: EMA factor of the statistics and of the graft's second moment;
      1.0 sums them (AdaGrad style).
    diagonal_epsilon: epsilon of the diagonal graft optimizers.
    matrix_epsilon: ridge relative to the largest eigenvalue of each statistic;
      statistics also start at `matrix_epsilon * I` (as distributed_shampoo).
    start_preconditioning_step: steps before this use the pure graft step; the
      first preconditioner is computed at this step.
    preconditioning_compute_steps: recompute the inverse roots every this many
      steps (counted from `start_preconditioning_step`).
    graft_type: 'adam' (RMSProp with Adam's bias corrections), 'rmsprop',
      'rmsprop_normalized', 'adagrad' or 'sgd' (the norm of the gradient).
    exponent_override: p of the inverse p-th root; 0 means 2 x number of
      preconditioned axes of the tensor.
    merge_small_dims_block_size: consecutive dims are merged while their
      product stays <= this.
    skip_preconditioning_dim_size_gt: merged axes longer than this get no
      preconditioner.
    skip_preconditioning_rank_lt: tensors of lower rank take the pure graft
      step (default 2: biases and norm scales; 1 preconditions vectors too).
    inverse_root_method: 'eigh' (default) or 'newton' (coupled iteration).
    inverse_failure_threshold: Newton roots with max |M - I| at or above this
      are rejected (the previous preconditioner is kept).
  """
  unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(Settings)})
  if unknown:
    raise UserError(f"shampoo has no option(s) {', '.join(unknown)}")
  settings = Settings(**kwargs)
  return optax.GradientTransformation(functools.partial(_init, settings),
                                      functools.partial(_update, settings))


class MomentumState(NamedTuple):
  count: jax.Array
  momentum: Any


def momentum(beta1: float = 0.9, nesterov: bool = False,
             moving_average: bool = True, debias: bool = False
             ) -> optax.GradientTransformation:
  """Momentum over Shampoo's grafted steps, in either convention.

  moving_average=False is heavy ball `m = beta1 m + u` (optax.trace, Nesterov
  `u + beta1 m`); True is `m = beta1 m + (1 - beta1) u` (optax.ema), with
  `debias` dividing by `1 - beta1^t` (the 'adam' graft: keeps Adam's step size).
  Only moving average + Nesterov is written here (optax.ema has no Nesterov):
  `(1 - beta1) u + beta1 m_debiased`.
  """
  _check_number("beta1", beta1, _is_real(beta1) and 0.0 <= beta1 < 1.0, "in [0, 1)")
  if not moving_average:
    return optax.trace(decay=beta1, nesterov=nesterov)
  if not nesterov:
    return optax.ema(decay=beta1, debias=debias)

  def init_fn(params):
    return MomentumState(count=jnp.zeros([], jnp.int32),
                         momentum=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)
    new_momentum = jax.tree.map(lambda m, u: beta1 * m + (1.0 - beta1) * u,
                                state.momentum, updates)
    correction = 1.0 - beta1 ** count.astype(jnp.float32) if debias else 1.0
    directions = jax.tree.map(lambda m, u: (1.0 - beta1) * u + beta1 * m / correction,
                              new_momentum, updates)
    return directions, MomentumState(count=count, momentum=new_momentum)

  return optax.GradientTransformation(init_fn, update_fn)


def direction(beta1: float = 0.9, nesterov: bool = False,
              moving_average_for_momentum: bool = True,
              **kwargs) -> optax.GradientTransformation:
  """`scale_by_shampoo` followed by its momentum: the trainer's direction."""
  return optax.chain(
      scale_by_shampoo(**kwargs),
      momentum(beta1, nesterov, moving_average_for_momentum,
               debias=moving_average_for_momentum and
               kwargs.get("graft_type", "adam") == "adam"))


def shampoo(learning_rate: ScalarOrSchedule, **kwargs) -> optax.GradientTransformation:
  """Shampoo with grafting and momentum as one optax optimizer (returns -lr * step).

  `kwargs` are those of `direction` (beta1, nesterov, moving_average_for_momentum)
  and `scale_by_shampoo`. Weight decay is not an option here: chain
  `optax.add_decayed_weights` where it belongs (funmatch/optim does).
  """
  _check_number("learning_rate", learning_rate,
                callable(learning_rate) or (_is_real(learning_rate) and learning_rate >= 0),
                "a number >= 0 or an optax schedule")
  return optax.chain(direction(**kwargs), optax.scale_by_learning_rate(learning_rate))


def config_defaults() -> dict[str, Any]:
  """config.optax keys of optax_name='shampoo' with their defaults."""
  momentum_defaults = dict(beta1=0.9, nesterov=False, moving_average_for_momentum=True)
  return {**momentum_defaults,
          **{f.name: f.default for f in dataclasses.fields(Settings)}}
