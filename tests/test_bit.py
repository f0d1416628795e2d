"""Tests for funmatch.models.bit against numpy references and official names."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funmatch.errors import UserError
from funmatch.models import bit
from funmatch.weights import layouts
from clu.parameter_overview import count_parameters as count_params
from funmatch.models import get_model

# ---------------------------------------------------------------------------
# Numpy references, written independently of the module (float64, loops).
# ---------------------------------------------------------------------------


def np_conv(x, kernel, stride=1, pad=(0, 0)):
  """NHWC x HWIO convolution by summing shifted matrix products."""
  x = np.pad(x, ((0, 0), pad, pad, (0, 0)))
  kh, kw = kernel.shape[:2]
  out_h = (x.shape[1] - kh) // stride + 1
  out_w = (x.shape[2] - kw) // stride + 1
  out = np.zeros(x.shape[:1] + (out_h, out_w, kernel.shape[3]))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i:i + stride * (out_h - 1) + 1:stride,
                j:j + stride * (out_w - 1) + 1:stride, :]
      out += patch @ kernel[i, j]
  return out


def np_weight_standardize(kernel, eps=1e-10):
  out = np.empty_like(kernel, dtype=np.float64)
  for o in range(kernel.shape[-1]):
    w = kernel[..., o].astype(np.float64)
    out[..., o] = (w - w.mean()) / np.sqrt(w.var() + eps)
  return out


def np_group_norm(x, gamma, beta, groups=32, eps=1e-5):
  x = x.astype(np.float64)
  out = np.empty_like(x)
  size = x.shape[-1] // groups
  for b in range(x.shape[0]):
    for g in range(groups):
      chunk = x[b, ..., g * size:(g + 1) * size]
      out[b, ..., g * size:(g + 1) * size] = (
          (chunk - chunk.mean()) / np.sqrt(chunk.var() + eps))
  return out * np.ravel(gamma) + np.ravel(beta)


def np_relu(x):
  return np.maximum(x, 0)


def np_max_pool_3x3_s2_zero_pad(x):
  x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # Zeros, as in BiT.
  out_h = (x.shape[1] - 3) // 2 + 1
  out_w = (x.shape[2] - 3) // 2 + 1
  out = np.full(x.shape[:1] + (out_h, out_w, x.shape[3]), -np.inf)
  for i in range(3):
    for j in range(3):
      out = np.maximum(out, x[:, i:i + 2 * out_h - 1:2, j:j + 2 * out_w - 1:2])
  return out


def np_unit(x, w, prefix, stride):
  """One pre-activation bottleneck unit from official-name weights `w`."""
  def gn(h, layer):
    return np_group_norm(h, w[f"{prefix}{layer}/group_norm/gamma"],
                         w[f"{prefix}{layer}/group_norm/beta"])

  def kernel(name):
    return np_weight_standardize(
        w[f"{prefix}{name}/standardized_conv2d/kernel"])

  preact = np_relu(gn(x, "a"))
  proj_name = f"{prefix}a/proj/standardized_conv2d/kernel"
  shortcut = np_conv(preact, kernel("a/proj"), stride) if proj_name in w else x
  h = np_conv(preact, kernel("a"))
  h = np_conv(np_relu(gn(h, "b")), kernel("b"), stride, pad=(1, 1))
  h = np_conv(np_relu(gn(h, "c")), kernel("c"))
  return h + shortcut


def np_bit(w, images, blocks):
  """Whole BiT forward straight from an official-name weight dict."""
  root = w["resnet/root_block/standardized_conv2d/kernel"]
  x = np_conv(images.astype(np.float64), np_weight_standardize(root),
              stride=2, pad=(3, 3))
  x = np_max_pool_3x3_s2_zero_pad(x)
  for b, units in enumerate(blocks, start=1):
    for u in range(1, units + 1):
      stride = 2 if (b > 1 and u == 1) else 1
      x = np_unit(x, w, f"resnet/block{b}/unit{u:02d}/", stride)
  x = np_relu(np_group_norm(x, w["resnet/group_norm/gamma"],
                            w["resnet/group_norm/beta"]))
  pooled = x.mean(axis=(1, 2))
  kernel = w["resnet/head/conv2d/kernel"].reshape(pooled.shape[1], -1)
  return pooled @ kernel + w["resnet/head/conv2d/bias"]


def official_shapes(blocks, width, num_classes):
  """Official BiT names -> shapes, built from the published layout."""
  root = int(64 * width)
  shapes = {"resnet/root_block/standardized_conv2d/kernel": (7, 7, 3, root)}
  cin = root
  for b, units in enumerate(blocks, start=1):
    mid = root * 2**(b - 1)
    for u in range(1, units + 1):
      p = f"resnet/block{b}/unit{u:02d}/"
      for layer, c_in, k, c_out in (("a", cin, 1, mid), ("b", mid, 3, mid),
                                    ("c", mid, 1, 4 * mid)):
        shapes[p + f"{layer}/group_norm/gamma"] = (c_in,)
        shapes[p + f"{layer}/group_norm/beta"] = (c_in,)
        shapes[p + f"{layer}/standardized_conv2d/kernel"] = (k, k, c_in, c_out)
      if u == 1:
        shapes[p + "a/proj/standardized_conv2d/kernel"] = (1, 1, cin, 4 * mid)
      cin = 4 * mid
  shapes["resnet/group_norm/gamma"] = (cin,)
  shapes["resnet/group_norm/beta"] = (cin,)
  if num_classes:
    shapes["resnet/head/conv2d/kernel"] = (1, 1, cin, num_classes)
    shapes["resnet/head/conv2d/bias"] = (num_classes,)
  return shapes


def random_official(blocks, width, num_classes, seed=0):
  rng = np.random.default_rng(seed)
  weights = {}
  for name, shape in official_shapes(blocks, width, num_classes).items():
    if name.endswith("gamma"):
      weights[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      weights[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
  return weights


def random_params(model, seed=1):
  """Random params with the model's structure, without running its init."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))["params"]
  return randomize(shapes, seed)


def randomize(params, seed=1):
  """Random values for every leaf (GN scale around 1) so nothing is trivial."""
  flat = flax.traverse_util.flatten_dict(params)
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in flat.items():
    if path[-1] == "scale":
      out[path] = rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    else:
      out[path] = (0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
  return flax.traverse_util.unflatten_dict(out)


def images(batch=2, size=32, seed=3):
  return np.random.default_rng(seed).uniform(
      -1, 1, (batch, size, size, 3)).astype(np.float32)


def official_arrays(params):
  """Params under the official BiT names: what an 'npz' export holds."""
  return layouts.file_arrays("bit", params)


SMALL = (1, 2, 1, 1)  # Block 2 has a unit without projection.

# ---------------------------------------------------------------------------
# Architecture.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("depth,width,size", [
    (26, 1, 32), (50, 2, 32), ([1, 1, 1, 1], 0.5, 32), (50, 1, 64),
    ((1, 1, 1, 1), 1, 224)])
def test_output_and_tap_shapes(depth, width, size):
  model = bit.Model(7, depth=depth, width=width)
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jnp.zeros((2, size, size, 3)))
  logits, taps = jax.eval_shape(model.apply, variables,
                                jnp.zeros((2, size, size, 3)))
  c = int(64 * width)
  s = size // 4  # 7x7/2 conv, then zero-pad 1 and a 3x3/2 VALID pool.
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert taps["stem"].shape == (2, s, s, c)
  assert taps["stage1"].shape == (2, s, s, 4 * c)
  assert taps["stage2"].shape == (2, s // 2, s // 2, 8 * c)
  assert taps["stage3"].shape == (2, s // 4, s // 4, 16 * c)
  assert taps["stage4"].shape == (2, s // 8, s // 8, 32 * c)
  assert taps["pre_logits"].shape == (2, 32 * c)
  assert set(taps) == {"stem", "stage1", "stage2", "stage3", "stage4",
                       "pre_logits"}
  blocks = bit.BLOCK_COUNTS[depth] if isinstance(depth, int) else depth
  assert [len(variables["params"][f"block{i}"]) for i in range(1, 5)] == list(
      blocks)


@pytest.mark.parametrize("depth,width,num_classes,expected", [
    # Published sizes (timm resnetv2_*_bit model cards).
    (50, 1, 21843, 68_256_659),
    (50, 1, 1000, 25_549_352),
    (152, 2, 1000, 236_335_208),
])
def test_param_counts_match_published_models(depth, width, num_classes,
                                             expected):
  model = bit.Model(num_classes, depth=depth, width=width)
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jnp.zeros((1, 32, 32, 3)))
  assert count_params(variables) == expected


def test_param_names_and_shapes_are_official():
  params = random_params(bit.Model(10, depth=SMALL, width=0.5))
  exported = official_arrays(params)
  expected = official_shapes(SMALL, 0.5, 10)
  assert {k: v.shape for k, v in exported.items()} == expected
  assert all(v.dtype == np.float32 for v in exported.values())


def test_head_is_zero_initialised():
  head = bit.Head(10).init(jax.random.key(0), jnp.ones((2, 64)))["params"]
  assert head["conv2d"]["kernel"].shape == (1, 1, 64, 10)
  assert not np.any(head["conv2d"]["kernel"]) and not np.any(
      head["conv2d"]["bias"])


def test_no_head_returns_pre_logits():
  model = bit.Model(0, depth=[1, 1, 1, 1], width=0.5)
  params = random_params(model)
  assert "head" not in params
  logits, taps = model.apply({"params": params}, images())
  np.testing.assert_array_equal(logits, taps["pre_logits"])
  assert logits.shape == (2, 1024)


@pytest.mark.parametrize("kwargs,culprit", [
    (dict(width=0.3), "width=0.3"), (dict(width=0.25), "width=0.25"),
    (dict(depth=34), "depth=34"), (dict(depth=[1, 1, 1]), "depth"),
    (dict(depth=[1, 0, 1, 1]), "depth")])
def test_invalid_config_is_user_error(kwargs, culprit):
  with pytest.raises(UserError, match=culprit.replace("[", r"\[")):
    bit.Model(10, **kwargs)
  with pytest.raises(UserError):
    get_model("bit", 10, **kwargs)


# ---------------------------------------------------------------------------
# Layers against numpy.
# ---------------------------------------------------------------------------


def test_group_norm_matches_numpy():
  rng = np.random.default_rng(0)
  x = (3 + 2 * rng.standard_normal((2, 5, 4, 64))).astype(np.float32)
  gamma = rng.uniform(0.5, 2, 64).astype(np.float32)
  beta = rng.standard_normal(64).astype(np.float32)
  out = bit.GroupNorm().apply(
      {"params": {"scale": gamma, "bias": beta}}, x)
  np.testing.assert_allclose(out, np_group_norm(x, gamma, beta), atol=2e-5)


@pytest.mark.parametrize("kernel_size,stride", [(3, 2), (7, 2), (1, 1)])
def test_std_conv_matches_numpy(kernel_size, stride):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 9, 10, 4)).astype(np.float32)
  kernel = (0.3 + rng.standard_normal(
      (kernel_size, kernel_size, 4, 6))).astype(np.float32)
  conv = bit.StdConv(6, kernel_size, stride)
  out = conv.apply({"params": {"kernel": kernel}}, x)
  pad = ((kernel_size - 1) // 2, kernel_size - 1 - (kernel_size - 1) // 2)
  expected = np_conv(x, np_weight_standardize(kernel), stride, pad)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
  # Scaling or shifting a kernel's output channel changes nothing.
  shifted = kernel * np.arange(1, 7) + np.arange(6)
  out2 = conv.apply({"params": {"kernel": shifted.astype(np.float32)}}, x)
  np.testing.assert_allclose(out2, out, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("cin,mid,stride", [(32, 32, 2), (128, 32, 1)])
def test_preactivation_unit_matches_numpy(cin, mid, stride):
  unit = bit.BottleneckUnit(mid, stride)
  x = np.random.default_rng(5).standard_normal((2, 8, 8, cin)).astype(
      np.float32)
  params = randomize(unit.init(jax.random.key(0), x)["params"])
  has_proj = "proj" in params["a"]
  assert has_proj == (cin != 4 * mid or stride != 1)
  # A lone unit exports as resnet/a/..., resnet/b/..., resnet/c/...
  weights = official_arrays(params)
  out = unit.apply({"params": params}, x)
  expected = np_unit(x, weights, "resnet/", stride)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# Frozen-teacher helpers and dtype.
# ---------------------------------------------------------------------------


def test_prestandardize_gives_same_outputs():
  model = bit.Model(10, depth=SMALL, width=0.5)
  params = random_params(model)
  fixed = bit.prestandardize(params)
  kernel = np.asarray(
      fixed["block1"]["unit01"]["b"]["standardized_conv2d"]["kernel"])
  np.testing.assert_allclose(kernel.reshape(-1, kernel.shape[-1]).mean(0), 0,
                             atol=1e-5)
  np.testing.assert_allclose(kernel.reshape(-1, kernel.shape[-1]).std(0), 1,
                             atol=1e-4)
  np.testing.assert_array_equal(fixed["group_norm"]["scale"],
                                params["group_norm"]["scale"])
  x = images()
  expected, _ = model.apply({"params": params}, x)
  raw = bit.Model(10, depth=SMALL, width=0.5, standardize_weights=False)
  got, _ = raw.apply({"params": fixed}, x)
  np.testing.assert_allclose(got, expected, rtol=1e-4,
                             atol=1e-4 * np.abs(expected).max())
  # Without prestandardising, the raw model computes something else.
  other, _ = raw.apply({"params": params}, x)
  assert not np.allclose(other, expected, rtol=1e-2)


def test_bfloat16_compute_keeps_float32_params():
  params = random_params(bit.Model(10, depth=[1, 1, 1, 1], width=0.5))
  x = images()
  ref, _ = bit.Model(10, [1, 1, 1, 1], 0.5).apply({"params": params}, x)
  model = bit.Model(10, depth=[1, 1, 1, 1], width=0.5, dtype=jnp.bfloat16)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  logits, taps = model.apply({"params": params}, x)
  assert logits.dtype == jnp.float32 and taps["stage2"].dtype == jnp.bfloat16
  np.testing.assert_allclose(logits, ref, rtol=0.1,
                             atol=0.05 * np.abs(ref).max())


def test_standardize_kernel_equals_the_reduction_form():
  """The matrix-vector form of weight standardisation: same values and gradients."""
  for shape in [(3, 3, 16, 8), (1, 1, 64, 32), (7, 7, 3, 16)]:
    kernel = jax.random.normal(jax.random.PRNGKey(sum(shape)), shape) * 0.3 + 0.1
    reference = lambda k: bit.standardize(k, axis=(0, 1, 2), eps=bit.WS_EPSILON)
    np.testing.assert_allclose(bit.standardize_kernel(kernel), reference(kernel),
                               rtol=1e-5, atol=1e-5)
    cotangent = jax.random.normal(jax.random.PRNGKey(1), shape)
    grads = [jax.grad(lambda k, f=f: jnp.sum(f(k) * cotangent))(kernel)
             for f in (bit.standardize_kernel, reference)]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5)
