"""BiT's official .npz files in and out (funmatch.weights over bit.WEIGHTS).

The numpy reference network and the random official weights are test_bit's.
"""
import os

import flax
import numpy as np
import pytest

from funmatch.errors import UserError
from funmatch.models import bit
from funmatch.weights import files, layouts

from test_bit import (SMALL, images, np_bit, official_arrays, official_shapes,
                      random_official, random_params)


# ---------------------------------------------------------------------------
# Loading official .npz files.
# ---------------------------------------------------------------------------


def write_npz(path, weights):
  with open(path, "wb") as f:
    np.savez(f, **weights)
  return str(path)


def test_load_official_npz_values_and_forward(tmp_path):
  weights = random_official(SMALL, 0.5, 10)
  # Some official files keep singleton dims on GN params / the head.
  weights["resnet/group_norm/gamma"] = weights["resnet/group_norm/gamma"][
      None, None, None]
  weights["resnet/block1/unit01/b/group_norm/beta"] = weights[
      "resnet/block1/unit01/b/group_norm/beta"][None, None, None]
  path = write_npz(tmp_path / "BiT-test.npz", weights)
  model = bit.Model(10, depth=SMALL, width=0.5)
  params = layouts.load("bit", path, random_params(model))

  unit = params["block2"]["unit01"]
  np.testing.assert_array_equal(
      unit["a"]["proj"]["standardized_conv2d"]["kernel"],
      weights["resnet/block2/unit01/a/proj/standardized_conv2d/kernel"])
  np.testing.assert_array_equal(
      unit["c"]["group_norm"]["scale"],
      weights["resnet/block2/unit01/c/group_norm/gamma"])
  np.testing.assert_array_equal(
      params["block1"]["unit01"]["b"]["group_norm"]["bias"],
      weights["resnet/block1/unit01/b/group_norm/beta"].ravel())
  np.testing.assert_array_equal(
      params["group_norm"]["scale"], weights["resnet/group_norm/gamma"].ravel())
  np.testing.assert_array_equal(params["head"]["conv2d"]["bias"],
                                weights["resnet/head/conv2d/bias"])
  assert "proj" not in params["block2"]["unit02"]["a"]

  x = images()
  logits, _ = model.apply({"params": params}, x)
  expected = np_bit(weights, x, SMALL)
  np.testing.assert_allclose(logits, expected, rtol=2e-4,
                             atol=2e-4 * np.abs(expected).max())


def test_head_kernel_stored_2d_is_accepted(tmp_path):
  weights = random_official((1, 1, 1, 1), 0.5, 3)
  name = "resnet/head/conv2d/kernel"
  weights[name] = weights[name][0, 0]
  path = write_npz(tmp_path / "w.npz", weights)
  params = layouts.load("bit", path, random_params(bit.Model(3, [1, 1, 1, 1], 0.5)))
  np.testing.assert_array_equal(params["head"]["conv2d"]["kernel"][0, 0],
                                weights["resnet/head/conv2d/kernel"])


def test_save_load_round_trip_is_exact(tmp_path):
  model = bit.Model(10, depth=SMALL, width=0.5)
  params = random_params(model)
  path = files.write_npz(str(tmp_path / "out" / "student.npz"), official_arrays(params), {})
  with np.load(path) as f:
    assert set(f.files) == set(official_shapes(SMALL, 0.5, 10))
  loaded = layouts.load("bit", path, random_params(model))
  flat_a = flax.traverse_util.flatten_dict(params)
  flat_b = flax.traverse_util.flatten_dict(loaded)
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(flat_a[key], flat_b[key])
  # Also works on a {'params': ...} variables dict.
  wrapped = layouts.load("bit", path, {"params": random_params(model)})
  assert set(wrapped) == {"params"}


def test_head_kept_when_class_count_differs(tmp_path):
  weights = random_official((1, 1, 1, 1), 0.5, 10)
  path = write_npz(tmp_path / "w.npz", weights)
  model = bit.Model(5, depth=[1, 1, 1, 1], width=0.5)
  init = random_params(model, seed=9)
  params = layouts.load("bit", path, init)
  np.testing.assert_array_equal(params["head"]["conv2d"]["kernel"],
                                init["head"]["conv2d"]["kernel"])
  np.testing.assert_array_equal(params["head"]["conv2d"]["bias"],
                                init["head"]["conv2d"]["bias"])
  np.testing.assert_array_equal(
      params["root_block"]["standardized_conv2d"]["kernel"],
      weights["resnet/root_block/standardized_conv2d/kernel"])
  # A headless model ignores the file's head.
  headless = layouts.load("bit", path, random_params(bit.Model(0, [1, 1, 1, 1], 0.5)))
  assert "head" not in headless


def test_dont_load_keeps_init_values(tmp_path):
  weights = random_official((1, 1, 1, 1), 0.5, 10)
  path = write_npz(tmp_path / "w.npz", weights)
  init = random_params(bit.Model(10, [1, 1, 1, 1], 0.5), seed=7)
  params = layouts.load("bit", path, init, dont_load=[r"block3/.*group_norm", "head/"])
  np.testing.assert_array_equal(
      params["block3"]["unit01"]["b"]["group_norm"]["scale"],
      init["block3"]["unit01"]["b"]["group_norm"]["scale"])
  np.testing.assert_array_equal(params["head"]["conv2d"]["bias"],
                                init["head"]["conv2d"]["bias"])
  np.testing.assert_array_equal(
      params["block3"]["unit01"]["b"]["standardized_conv2d"]["kernel"],
      weights["resnet/block3/unit01/b/standardized_conv2d/kernel"])
  with pytest.raises(UserError, match="dont_load"):
    layouts.load("bit", path, init, dont_load=["("])


def _load_error(path, model):
  with pytest.raises(UserError) as info:  # read as .npz whatever the name
    layouts.load("bit", files.read(path, kind="npz"), random_params(model))
  message = str(info.value)
  assert "\n" not in message and path in message
  return message


def test_mismatched_file_names_missing_unexpected_and_clashes(tmp_path):
  weights = random_official((1, 1, 1, 1), 0.5, 10)
  weights["resnet/extra/kernel"] = np.zeros(3, np.float32)
  path = write_npz(tmp_path / "w.npz", weights)

  message = _load_error(path, bit.Model(10, depth=SMALL, width=0.5))
  assert "9 missing" in message  # unit02: 3 kernels + 3 GN gammas and betas.
  assert "resnet/block2/unit02/a/group_norm/gamma" in message
  assert "more)" in message
  assert "1 unexpected (resnet/extra/kernel)" in message
  assert "depth=[1, 2, 1, 1], width=0.5, num_classes=10" in message

  del weights["resnet/extra/kernel"]
  path = write_npz(tmp_path / "w.npz", weights)
  message = _load_error(path, bit.Model(10, depth=[1, 1, 1, 1], width=1))
  # Every shape differs except the head bias (same 10 classes).
  clashes = len(official_shapes((1, 1, 1, 1), 0.5, 10)) - 1
  assert f"{clashes} shape clashes" in message
  assert "resnet/block1/unit01/a/group_norm/beta file [32] vs model [64]" \
      in message
  assert "missing" not in message and "unexpected" not in message


def test_missing_and_corrupt_files(tmp_path):
  model = bit.Model(10, depth=[1, 1, 1, 1], width=0.5)
  missing = str(tmp_path / "nope.npz")
  assert "does not exist" in _load_error(missing, model)

  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(os.urandom(1000))
  assert "not a valid .npz" in _load_error(str(garbage), model)

  good = write_npz(tmp_path / "good.npz",
                   random_official((1, 1, 1, 1), 0.5, 10))
  data = open(good, "rb").read()
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(data[:len(data) // 2])
  assert "not a valid .npz" in _load_error(str(truncated), model)

  single = tmp_path / "single.npy"
  np.save(single, np.zeros(3))
  assert "not a valid .npz" in _load_error(str(single), model)
