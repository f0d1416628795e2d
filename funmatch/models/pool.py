"""Max-pooling as strided slices, with a gradient XLA:CPU runs fast.

`nn.max_pool`'s gradient (reduce_window's JVP) compiles on XLA:CPU (jaxlib 0.10)
to a variadic reduce-window that carries one s32 iota per input dimension to
find each window's argmax: for BiT's stem pool (3x3 / 2 on [N, 34, 34, 64]) that
was 14% of a [1,1,1,1]x1 student's forward + backward at 64px
(docs/benchmarks.md). Here the forward is the elementwise max of the k*k
strided windows and the backward sends each output's gradient to the first
window position (row-major) that holds the maximum, as XLA's select-and-scatter
does: the same function and the same gradient, with elementwise loops only.
"""
import functools

import jax
import jax.numpy as jnp


def _windows(x: jax.Array, window: int, stride: int) -> list[jax.Array]:
  """The window*window strided views of NHWC `x` (VALID), in row-major order."""
  out_h = (x.shape[1] - window) // stride + 1
  out_w = (x.shape[2] - window) // stride + 1
  return [x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
          for i in range(window) for j in range(window)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """`nn.max_pool(x, (window, window), (stride, stride), 'VALID')` for NHWC x."""
  return functools.reduce(jnp.maximum, _windows(x, window, stride))


def _forward(x, window, stride):
  y = max_pool(x, window, stride)
  return y, (x, y)


def _backward(window, stride, residuals, dy):
  x, y = residuals
  views, scatter = jax.vjp(lambda v: _windows(v, window, stride), x)
  taken = jnp.zeros(y.shape, bool)
  cotangents = []
  for view in views:  # the first maximum of each window takes the gradient
    chosen = (view == y) & ~taken
    taken = taken | chosen
    cotangents.append(jnp.where(chosen, dy, jnp.zeros_like(dy)))
  return scatter(cotangents)


max_pool.defvjp(_forward, _backward)
