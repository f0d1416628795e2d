"""Tests for funmatch.models.mobilenet_v3 (MobileNetV3-Large with GroupNorm)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funmatch.errors import UserError
from clu.parameter_overview import count_parameters as count_params
from funmatch.models import get_model
from funmatch.models import mobilenet_v3 as mnv3

# ---------------------------------------------------------------------------
# Numpy references (float64, written independently of the module).
# ---------------------------------------------------------------------------


def np_group_norm(x, scale, bias, groups=8, eps=1e-5):
  b, h, w, c = x.shape
  g = x.astype(np.float64).reshape(b, h * w, groups, c // groups)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = ((g - mean)**2).mean(axis=(1, 3), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def np_hard_sigmoid(x):
  return np.clip(x + 3, 0, 6) / 6


def np_hard_swish(x):
  return x * np_hard_sigmoid(x)


def np_depthwise(x, kernel, stride):
  """kxk depthwise conv with symmetric zero padding (k-1)//2, per channel."""
  k = kernel.shape[0]
  p = (k - 1) // 2
  xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  out_h = (xp.shape[1] - k) // stride + 1
  out_w = (xp.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]))
  for oy in range(out_h):
    for ox in range(out_w):
      window = xp[:, oy * stride:oy * stride + k, ox * stride:ox * stride + k]
      out[:, oy, ox] = np.einsum("bijc,ijc->bc", window, kernel[:, :, 0, :])
  return out


def np_block(x, p, spec):
  act = np_hard_swish if spec.activation == "hswish" else (
      lambda v: np.maximum(v, 0))
  gn = lambda v, q: np_group_norm(v, q["group_norm"]["scale"],
                                  q["group_norm"]["bias"])
  h = x.astype(np.float64)
  if "expand" in p:
    h = act(gn(h @ p["expand"]["conv"]["kernel"][0, 0], p["expand"]))
  h = act(gn(np_depthwise(h, p["depthwise"]["conv"]["kernel"], spec.stride),
             p["depthwise"]))
  if "se" in p:
    s = h.mean(axis=(1, 2))
    s = np.maximum(s @ p["se"]["reduce"]["kernel"][0, 0]
                   + p["se"]["reduce"]["bias"], 0)
    s = np_hard_sigmoid(s @ p["se"]["expand"]["kernel"][0, 0]
                        + p["se"]["expand"]["bias"])
    h = h * s[:, None, None, :]
  h = gn(h @ p["project"]["conv"]["kernel"][0, 0], p["project"])
  return h + x if h.shape == x.shape else h


def randomize(tree, seed=0):
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(tree)
  return flax.traverse_util.unflatten_dict({
      path: (rng.uniform(0.5, 1.5, leaf.shape) if path[-1] == "scale" else
             0.3 * rng.standard_normal(leaf.shape)).astype(np.float32)
      for path, leaf in flat.items()})


def random_params(model, size=32, seed=0):
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, size, size, 3)))
  assert set(shapes) == {"params"}  # GroupNorm only: no batch_stats.
  return randomize(shapes["params"], seed)


def images(batch=2, size=32, seed=1):
  return np.random.default_rng(seed).uniform(
      -1, 1, (batch, size, size, 3)).astype(np.float32)


# ---------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("width,size,channels,pre_logits", [
    # Hand-derived: channels rounded to multiples of 8 (12 -> 16, 20 -> 24).
    (1.0, 32, (16, 16, 24, 40, 112, 160), 1280),
    (0.5, 32, (8, 8, 16, 24, 56, 80), 640),
    (1.0, 224, (16, 16, 24, 40, 112, 160), 1280),
])
def test_shapes_and_taps(width, size, channels, pre_logits):
  model = mnv3.Model(10, width=width)
  x = jnp.zeros((2, size, size, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  logits, taps = jax.eval_shape(model.apply, variables, x)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  names = ("stem", "stage1", "stage2", "stage3", "stage4", "stage5")
  assert set(taps) == set(names) | {"pre_logits"}
  strides = (2, 2, 4, 8, 16, 32)
  for name, c, s in zip(names, channels, strides):
    assert taps[name].shape == (2, -(-size // s), -(-size // s), c), name
  assert taps["pre_logits"].shape == (2, pre_logits)


def test_param_count_matches_published_mobilenet_v3_large():
  model = get_model("mobilenet_v3", 1000)
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jnp.zeros((1, 224, 224, 3)))
  # torchvision's mobilenet_v3_large has 5,483,032 parameters; GroupNorm has
  # the same affine parameters as BatchNorm (and no running statistics).
  assert count_params(variables) == 5_483_032
  flat = flax.traverse_util.flatten_dict(variables["params"])
  assert not any("batch" in "/".join(k).lower() for k in flat)
  norms = [k for k in flat if k[-2] == "group_norm" and k[-1] == "scale"]
  # Stem, block 1 (no expand conv: depthwise + project), blocks 2-15
  # (expand + depthwise + project), final 1x1 conv.
  assert len(norms) == 1 + 2 + 3 * 14 + 1


def test_group_norm_uses_8_groups():
  layer = mnv3.ConvNorm(16)
  rng = np.random.default_rng(2)
  x = (1 + rng.standard_normal((2, 5, 5, 16))).astype(np.float32)
  scale = rng.uniform(0.5, 2, 16).astype(np.float32)
  bias = rng.standard_normal(16).astype(np.float32)
  params = {"conv": {"kernel": np.eye(16, dtype=np.float32)[None, None]},
            "group_norm": {"scale": scale, "bias": bias}}
  out = layer.apply({"params": params}, x)
  np.testing.assert_allclose(out, np_group_norm(x, scale, bias, groups=8),
                             atol=1e-4)
  assert not np.allclose(out, np_group_norm(x, scale, bias, groups=16),
                         atol=1e-3)


@pytest.mark.parametrize("spec,cin,expanded,out", [
    (mnv3.BlockSpec(5, 48, 24, True, "hswish", 2), 16, 48, 24),
    (mnv3.BlockSpec(3, 16, 16, False, "relu", 1), 16, 16, 16),
    (mnv3.BlockSpec(3, 64, 16, True, "relu", 1), 16, 64, 16),
])
def test_inverted_residual_matches_numpy(spec, cin, expanded, out):
  block = mnv3.InvertedResidual(spec, expanded, out)
  x = np.random.default_rng(3).standard_normal((2, 8, 8, cin)).astype(
      np.float32)
  shapes = jax.eval_shape(block.init, jax.random.key(0), x)["params"]
  params = randomize(shapes, seed=4)
  assert ("expand" in params) == (expanded != cin)
  assert ("se" in params) == spec.use_se
  if spec.use_se:  # Squeeze to expanded/4 rounded to a multiple of 8.
    assert params["se"]["reduce"]["kernel"].shape[-1] == mnv3.make_divisible(
        expanded // 4)
  got = block.apply({"params": params}, x)
  np.testing.assert_allclose(got, np_block(x, params, spec), rtol=1e-4,
                             atol=1e-4)


def test_forward_finite_and_examples_independent():
  model = mnv3.Model(10, width=0.5)
  params = random_params(model)
  x = images(4)
  apply = jax.jit(model.apply, static_argnames="train")
  logits, taps = apply({"params": params}, x)
  assert np.all(np.isfinite(logits)) and np.std(logits) > 0
  assert all(np.all(np.isfinite(t)) for t in taps.values())
  # No batch statistics: an example's output ignores the rest of the batch,
  # and train mode (without dropout) computes the same function.
  other = x.copy()
  other[1:] = images(3, seed=9)
  logits_other, _ = apply({"params": params}, other)
  np.testing.assert_allclose(logits_other[0], logits[0], rtol=1e-5, atol=1e-5)
  logits_train, _ = apply({"params": params}, x, train=True)
  np.testing.assert_allclose(logits_train, logits, rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training():
  model = mnv3.Model(10, width=0.5, dropout_rate=0.5)
  params = random_params(model)
  x = images(2)
  apply = jax.jit(model.apply, static_argnames="train")
  eval_logits, _ = apply({"params": params}, x)
  no_dropout, _ = jax.jit(mnv3.Model(10, width=0.5).apply)({"params": params},
                                                           x)
  np.testing.assert_allclose(eval_logits, no_dropout, rtol=1e-6)
  train_a, _ = apply({"params": params}, x, train=True,
                     rngs={"dropout": jax.random.key(1)})
  train_b, _ = apply({"params": params}, x, train=True,
                     rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(train_a, eval_logits)
  assert not np.allclose(train_a, train_b)


def test_no_classifier_returns_pre_logits():
  model = mnv3.Model(0, width=0.5)
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert "head" not in variables["params"]
  logits, taps = jax.eval_shape(model.apply, variables, x)
  assert logits.shape == taps["pre_logits"].shape == (2, 640)


@pytest.mark.parametrize("value,expected", [
    (16, 16), (12, 16), (20, 24), (56, 56), (4, 8), (90, 88),
    (1280 * .75, 960)])
def test_make_divisible(value, expected):
  assert mnv3.make_divisible(value) == expected


@pytest.mark.parametrize("kwargs,culprit", [
    (dict(width=0), "width"), (dict(width=-1.0), "width"),
    (dict(dropout_rate=1.5), "dropout_rate"), (dict(depth=50), "depth")])
def test_invalid_options_are_user_errors(kwargs, culprit):
  with pytest.raises(UserError, match=culprit):
    get_model("mobilenet_v3", 10, **kwargs)
