"""The custom gradients of BiT's GroupNorm and stem max-pool against jax.grad of
the plain formulations (small arrays; the whole-model parity is in test_bit.py)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funmatch.models import bit, pool


def _plain_group_norm(x, scale, bias, groups, eps):
  n, h, w, c = x.shape
  grouped = x.reshape(n, h, w, groups, c // groups)
  y = bit.standardize(grouped, (1, 2, 4), eps).reshape(x.shape)
  return y * scale + bias


def _grads(fn, args, cotangent):
  """d sum(fn(*args) * cotangent) / d args, as one jitted program (op by op, each
  primitive would compile on its own)."""
  return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * cotangent),
                          argnums=tuple(range(len(args)))))(*args)


@pytest.mark.parametrize("shape, groups", [((2, 5, 3, 8), 4), ((3, 1, 1, 64), 32),
                                           ((1, 4, 6, 32), 32)])
def test_group_norm_values_and_gradients_match_autodiff_of_plain_form(shape, groups):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.float32)
  scale = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
  dy = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  ours = lambda x, s, b: bit.group_norm(x, s, b, groups, 1e-5)
  plain = lambda x, s, b: _plain_group_norm(x, s, b, groups, 1e-5)
  np.testing.assert_allclose(ours(x, scale, bias), plain(x, scale, bias), rtol=1e-5, atol=1e-5)
  for got, want, name in zip(_grads(ours, (x, scale, bias), dy),
                             _grads(plain, (x, scale, bias), dy), ("x", "scale", "bias")):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)
  # Under jit, and composed with a second-level use (the module's own path).
  module_grads = jax.jit(jax.grad(lambda p: jnp.sum(bit.GroupNorm(groups).apply(
      {"params": p}, x) * dy)))({"scale": scale, "bias": bias})
  np.testing.assert_allclose(module_grads["scale"], _grads(plain, (x, scale, bias), dy)[1],
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("window, stride, size", [(3, 2, 9), (3, 2, 8), (2, 2, 6), (3, 1, 5)])
def test_max_pool_values_and_gradient_match_flax_including_ties(window, stride, size):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, size, size, 3)), jnp.float32)
  x = x.at[:, :2].set(0.0).at[:, -1, :].set(-jnp.inf)  # ties, and a -inf border row
  plain = lambda v: nn.max_pool(v, (window, window), (stride, stride), "VALID")
  ours = lambda v: pool.max_pool(v, window, stride)
  np.testing.assert_array_equal(ours(x), plain(x))
  dy = jnp.asarray(rng.standard_normal(plain(x).shape), jnp.float32)
  np.testing.assert_array_equal(_grads(ours, (x,), dy)[0], _grads(plain, (x,), dy)[0])
  # Eagerly too (the custom gradient outside jit).
  np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(ours(v) * dy))(x),
                                _grads(plain, (x,), dy)[0])
