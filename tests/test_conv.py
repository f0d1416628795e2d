"""funmatch.models.conv: the matmul forms compute the native conv, values and gradients,
for every conv pattern the models use; the models give the same function either way."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from funmatch import config_util, models
from funmatch.errors import UserError
from funmatch.models import conv


def native(x, kernel, stride, padding, groups=1):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=groups)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _both_forms(x, kernel, stride, padding, groups):
  """(native, matmul form) outputs and their gradients w.r.t. x and kernel, in one
  program: op by op, every slice and reshape of the matmul form compiles its own."""

  def loss(fn):  # a non-linear loss, so every output position gets its own cotangent
    return lambda x, kernel: jnp.sum(jnp.sin(fn(x, kernel)))

  forms = (lambda x, k: native(x, k, stride, padding, groups),
           lambda x, k: conv.conv2d(x, k, stride, padding, groups, impl="matmul"))
  return tuple((fn(x, kernel), jax.grad(loss(fn), argnums=(0, 1))(x, kernel))
               for fn in forms)


def assert_same_function(x, kernel, stride, padding, groups=1, rtol=1e-5):
  """conv2d(impl='matmul') equals lax.conv: values and gradients w.r.t. x and kernel."""
  padding = padding if isinstance(padding, str) else tuple(map(tuple, padding))
  (expected, expected_grads), (got, got_grads) = _both_forms(x, kernel, stride, padding,
                                                             groups)
  assert got.shape == expected.shape and got.dtype == expected.dtype
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * scale)
  for got_grad, expected_grad in zip(got_grads, expected_grads):
    scale = float(jnp.max(jnp.abs(expected_grad)))
    np.testing.assert_allclose(got_grad, expected_grad, rtol=10 * rtol, atol=rtol * scale)


def _arrays(seed, x_shape, kernel_shape):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal(x_shape), jnp.float32),
          jnp.asarray(rng.standard_normal(kernel_shape), jnp.float32))


# (input H=W, kernel size, stride, padding). BiT: 1x1 (stride 1, 2), 3x3 (stride 1, 2)
# with its symmetric-first padding, the 7x7/2 root; MobileNetV3: 3x3/2 stem, 1x1;
# ViTKD / OFA-KD: 3x3 'SAME' (stride 1, 2); odd sizes, asymmetric padding, a 3x3 on
# a map smaller than its window (BiT's last stage at low resolution).
DENSE_CASES = [(8, 1, 1, ((0, 0), (0, 0))), (8, 1, 2, ((0, 0), (0, 0))),
               (7, 1, 2, ((0, 0), (0, 0))), (8, 3, 1, ((1, 1), (1, 1))),
               (8, 3, 2, ((1, 1), (1, 1))), (9, 3, 2, ((1, 1), (1, 1))),
               (16, 7, 2, ((3, 3), (3, 3))), (15, 7, 2, ((3, 3), (3, 3))),
               (6, 3, 1, ((0, 2), (1, 0))), (5, 2, 1, ((0, 1), (0, 1))),
               (1, 3, 1, ((1, 1), (1, 1))), (2, 3, 2, ((1, 1), (1, 1))),
               (7, 3, 1, "SAME"), (7, 3, 2, "SAME"), (8, 3, 2, "SAME")]


@pytest.mark.parametrize("size, k, stride, padding", DENSE_CASES)
def test_dense_matmul_form_equals_native_conv(size, k, stride, padding):
  x, kernel = _arrays(size * 100 + k * 10 + stride, (2, size, size, 4), (k, k, 4, 5))
  assert_same_function(x, kernel, stride, padding)


# ViT's patch embedding: p x p / stride p, VALID (a reshape + one matmul); also a
# size that does not divide (the native conv drops the remainder, so must we).
@pytest.mark.parametrize("size, patch", [(8, 4), (16, 8), (12, 4), (10, 4), (6, 2)])
def test_patch_embedding_equals_native_conv(size, patch):
  x, kernel = _arrays(size + patch, (2, size, size, 3), (patch, patch, 3, 6))
  assert_same_function(x, kernel, patch, "VALID")


# MobileNetV3's depthwise convs: 3x3 and 5x5, stride 1 and 2, symmetric padding
# (k-1)//2, on even and odd maps, down to maps smaller than the window.
DEPTHWISE_CASES = [(8, 3, 1), (8, 3, 2), (7, 3, 2), (8, 5, 1), (8, 5, 2), (9, 5, 2),
                   (2, 5, 1), (1, 3, 1), (3, 5, 2)]


@pytest.mark.parametrize("size, k, stride", DEPTHWISE_CASES)
def test_depthwise_matmul_form_equals_native_conv(size, k, stride):
  channels = 6
  x, kernel = _arrays(size * 100 + k * 10 + stride, (2, size, size, channels),
                      (k, k, 1, channels))
  pad = (k - 1) // 2
  assert_same_function(x, kernel, stride, ((pad, pad), (pad, pad)), groups=channels)


def test_other_groupings_use_the_native_conv():
  x, kernel = _arrays(0, (1, 6, 6, 4), (3, 3, 2, 6))  # 2 groups: no matmul form
  np.testing.assert_array_equal(
      conv.conv2d(x, kernel, 1, "SAME", feature_group_count=2, impl="matmul"),
      native(x, kernel, 1, ((1, 1), (1, 1)), groups=2))


@pytest.mark.parametrize("groups", [1, 3])
def test_bfloat16_keeps_its_dtype_and_values(groups):
  x, kernel = _arrays(1, (1, 6, 6, 3), (3, 3, 3 // groups, 3))
  x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  outs = [conv.conv2d(x, kernel, 1, ((1, 1), (1, 1)), groups, impl=impl)
          for impl in ("xla", "matmul")]
  assert all(out.dtype == jnp.bfloat16 for out in outs)
  np.testing.assert_allclose(np.float32(outs[1]), np.float32(outs[0]), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("kwargs, x_shape", [
    (dict(features=5, kernel_size=(3, 3), padding="SAME"), (2, 7, 7, 4)),
    (dict(features=5, kernel_size=(3, 3), strides=(2, 2), padding="SAME", use_bias=False),
     (2, 7, 7, 4)),
    (dict(features=6, kernel_size=(4, 4), strides=(4, 4), padding="VALID",
          dtype=jnp.bfloat16), (2, 8, 8, 3)),
    (dict(features=4, kernel_size=(5, 5), strides=(2, 2), padding=[(2, 2), (2, 2)],
          feature_group_count=4, use_bias=False), (2, 9, 9, 4)),
    (dict(features=3, kernel_size=(1, 1)), (2, 1, 1, 8)),
])
def test_conv_module_is_a_drop_in_for_flax_conv(kwargs, x_shape):
  """Same param names, shapes, initial values and outputs as nn.Conv: checkpoints keep."""
  x = jax.random.normal(jax.random.PRNGKey(1), x_shape)
  reference = nn.Conv(**kwargs)
  reference_params = reference.init(jax.random.PRNGKey(0), x)
  for impl in ("xla", "matmul"):
    module = conv.Conv(**kwargs, impl=impl)
    params = module.init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(params) == jax.tree.structure(reference_params)
    for got, expected in zip(jax.tree.leaves(params), jax.tree.leaves(reference_params)):
      np.testing.assert_array_equal(got, expected)
    got, expected = module.apply(params, x), reference.apply(params, x)
    assert got.dtype == expected.dtype
    tolerance = 3e-2 if kwargs.get("dtype") == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.float32(got), np.float32(expected), rtol=tolerance,
                               atol=tolerance)


# --------------------------------------------------------------------------
# Choosing the implementation.


def test_auto_is_matmul_on_cpu_and_the_environment_overrides_it(monkeypatch):
  monkeypatch.delenv(conv.ENV_VAR, raising=False)
  assert conv.resolve_impl("auto") == ("matmul" if jax.default_backend() == "cpu"
                                       else "xla")
  assert conv.resolve_impl("xla") == "xla"
  monkeypatch.setenv(conv.ENV_VAR, "xla")
  assert conv.resolve_impl("auto") == "xla"
  assert conv.resolve_impl("matmul") == "matmul"  # a model's own setting wins


def test_the_environment_reaches_the_model(monkeypatch):
  """FUNMATCH_CONV=xla makes a conv_impl='auto' model trace the native conv."""
  model = models.get_model("bit", 3, depth=[1, 1, 1, 1], width=0.5)
  x = jnp.zeros((1, 16, 16, 3))
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))

  def has_native_conv():
    jaxpr = jax.make_jaxpr(lambda p: model.apply(p, x))(params)
    return "conv_general_dilated" in str(jaxpr)

  monkeypatch.setenv(conv.ENV_VAR, "xla")
  assert has_native_conv()
  monkeypatch.setenv(conv.ENV_VAR, "matmul")
  assert not has_native_conv()


def test_bad_values_are_one_line_user_errors(monkeypatch):
  monkeypatch.delenv(conv.ENV_VAR, raising=False)
  with pytest.raises(UserError, match=r"conv_impl='cudnn' .* auto, xla, matmul"):
    models.get_model("vit", 3, conv_impl="cudnn")
  from funmatch.train import build  # pylint: disable=import-outside-toplevel
  config = config_util.model_config("bit", res=16, depth=[1, 1, 1, 1], width=0.5)
  config.conv_impl = "cudnn"
  with pytest.raises(UserError) as error:
    build.build_model(config, 3, "student")
  message = str(error.value)
  assert "config.student.conv_impl='cudnn'" in message and "auto, xla, matmul" in message
  assert "\n" not in message
  monkeypatch.setenv(conv.ENV_VAR, "fast")
  with pytest.raises(UserError, match=r"FUNMATCH_CONV='fast' .* auto, xla, matmul"):
    models.get_model("mobilenet_v3", 3)


def test_config_option_reaches_the_model():
  """config.student.conv_impl is in every model config and is passed to the model."""
  from funmatch.train import build  # pylint: disable=import-outside-toplevel
  config = config_util.model_config("vit", res=16, variant="Ti", width=24, depth=1,
                                    num_heads=2, mlp_dim=48, patch_size=8)
  assert config.conv_impl == "auto"
  config.conv_impl = "xla"
  module, _ = build.build_model(ml_collections.ConfigDict(config), 3, "student")
  assert module.conv_impl == "xla"


# --------------------------------------------------------------------------
# Whole models: the same logits and gradients with either implementation.


MODELS = [
    ("bit", dict(depth=[1, 1, 1, 1], width=0.5), 32),
    ("bit", dict(depth=[1, 1, 1, 1], width=0.5, standardize_weights=False), 16),
    ("mobilenet_v3", dict(width=0.35), 32),
    ("vit", dict(variant="Ti", width=48, depth=2, num_heads=3, mlp_dim=96, patch_size=8),
     32),
]


@pytest.mark.parametrize("name, kwargs, res", MODELS)
def test_models_compute_the_same_function_with_either_impl(name, kwargs, res):
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, res, res, 3), minval=-1.0, maxval=1.0)
  reference = models.get_model(name, 5, conv_impl="xla", **kwargs)

  @jax.jit  # one program: eager init and noise compile one small program per shape
  def init(x):
    params = reference.init(jax.random.PRNGKey(0), x)["params"]
    # Heads start at zero; random ones make the logits (and their gradients) informative.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    return jax.tree.unflatten(treedef, [
        leaf + 0.1 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)])

  params = init(x)

  def loss_and_logits(model):
    def loss(params):
      logits, taps = model.apply({"params": params}, x, train=False)
      return jnp.sum(jax.nn.log_softmax(logits) * jnp.arange(5.0)), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (loss_xla, logits_xla), grads_xla = loss_and_logits(reference)
  (loss_mm, logits_mm), grads_mm = loss_and_logits(
      models.get_model(name, 5, conv_impl="matmul", **kwargs))
  np.testing.assert_allclose(logits_mm, logits_xla, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(loss_mm, loss_xla, rtol=1e-4)
  flat_xla = jax.tree_util.tree_flatten_with_path(grads_xla)[0]
  flat_mm = jax.tree.leaves(grads_mm)
  for (path, expected), got in zip(flat_xla, flat_mm):
    scale = float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * scale + 1e-7,
                               err_msg=jax.tree_util.keystr(path))
