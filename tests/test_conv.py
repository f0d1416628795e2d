"""funmatch.models.conv: the matmul form computes the native conv, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funmatch.models import conv


def native(x, kernel, stride, padding):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


# (input H=W, kernel size, stride, padding): BiT's 1x1, 3x3 (stride 1, 2) and 7x7/2
# root convs with its symmetric-first padding, plus odd sizes and asymmetric padding.
CASES = [(8, 1, 1, ((0, 0), (0, 0))), (8, 1, 2, ((0, 0), (0, 0))),
         (7, 1, 2, ((0, 0), (0, 0))), (8, 3, 1, ((1, 1), (1, 1))),
         (8, 3, 2, ((1, 1), (1, 1))), (9, 3, 2, ((1, 1), (1, 1))),
         (16, 7, 2, ((3, 3), (3, 3))), (6, 3, 1, ((0, 2), (1, 0))), (5, 2, 1, ((0, 1), (0, 1)))]


@pytest.mark.parametrize("size, k, stride, padding", CASES)
def test_matmul_form_equals_native_conv(size, k, stride, padding):
  rng = np.random.default_rng(size * 100 + k * 10 + stride)
  x = jnp.asarray(rng.standard_normal((2, size, size, 4)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((k, k, 4, 5)), jnp.float32)
  expected = native(x, kernel, stride, padding)
  got = conv.conv2d(x, kernel, stride, padding, impl="matmul")
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

  def loss(fn):
    return lambda x, kernel: jnp.sum(jnp.sin(fn(x, kernel, stride, padding)))

  expected_grads = jax.grad(loss(native), argnums=(0, 1))(x, kernel)
  got_grads = jax.grad(loss(lambda *a: conv.conv2d(*a, impl="matmul")),
                       argnums=(0, 1))(x, kernel)
  for got_grad, expected_grad in zip(got_grads, expected_grads):
    np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-4, atol=1e-4)


def test_bfloat16_keeps_its_dtype():
  x = jnp.ones((1, 4, 4, 3), jnp.bfloat16)
  kernel = jnp.ones((3, 3, 3, 2), jnp.bfloat16)
  for impl in ("xla", "matmul"):
    assert conv.conv2d(x, kernel, 1, ((1, 1), (1, 1)), impl=impl).dtype == jnp.bfloat16


def test_impl_choice(monkeypatch):
  monkeypatch.delenv(conv.ENV_VAR, raising=False)
  expected_auto = "matmul" if jax.default_backend() == "cpu" else "xla"
  assert conv.resolve_impl() == expected_auto
  assert conv.resolve_impl("xla") == "xla"
  monkeypatch.setenv(conv.ENV_VAR, "xla")
  assert conv.resolve_impl() == "xla"
  assert conv.resolve_impl("matmul") == "matmul"  # the caller wins over the environment
  monkeypatch.setenv(conv.ENV_VAR, "cudnn")
  with pytest.raises(ValueError, match="FUNMATCH_CONV"):
    conv.resolve_impl()
