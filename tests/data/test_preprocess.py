"""Preprocessing ops against numpy references."""

import io

import numpy as np
import pytest
import tensorflow as tf
from ml_collections import ConfigDict
from PIL import Image

from funmatch.data import preprocess as pp
from funmatch.errors import UserError


def _seed(i, j=0):
  return tf.constant([i, j], tf.int64)


def _bilinear_matrix(n_in, n_out):
  """[n_out, n_in] weights of half-pixel-centre bilinear resampling (no antialias)."""
  weights = np.zeros((n_out, n_in))
  for d in range(n_out):
    s = (d + 0.5) * n_in / n_out - 0.5
    lo = int(np.floor(s))
    frac = s - lo
    weights[d, np.clip(lo, 0, n_in - 1)] += 1 - frac
    weights[d, np.clip(lo + 1, 0, n_in - 1)] += frac
  return weights


def _area_matrix(n_in, n_out):
  """[n_out, n_in] weights of an area resize: output pixel d covers the input
  interval [d * r, (d + 1) * r), r = n_in / n_out, and averages what it covers."""
  ratio = n_in / n_out
  weights = np.zeros((n_out, n_in))
  for d in range(n_out):
    lo, hi = d * ratio, (d + 1) * ratio
    for j in range(int(np.floor(lo)), min(int(np.ceil(hi)), n_in)):
      weights[d, j] = (min(hi, j + 1) - max(lo, j)) / ratio
  return weights


def np_area_resize(image, height, width):
  image = image.astype(np.float64)
  return np.einsum("yh,hwc,xw->yxc", _area_matrix(image.shape[0], height), image,
                   _area_matrix(image.shape[1], width))


def np_resize(image, height, width):
  image = image.astype(np.float64)
  wy = _bilinear_matrix(image.shape[0], height)
  wx = _bilinear_matrix(image.shape[1], width)
  return np.einsum("yh,hwc,xw->yxc", wy, image, wx)


def _smooth_image(height, width):
  y = np.linspace(0, 1, height)[:, None, None]
  x = np.linspace(0, 1, width)[None, :, None]
  return (127.5 + 127.5 * np.sin(5 * x + 3 * y + np.array([0, 1, 2]))).astype(
      np.uint8)


def _encode(array, fmt, **kwargs):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt, **kwargs)
  return buf.getvalue()


@pytest.fixture(scope="module")
def noise_image():
  return np.random.default_rng(0).integers(0, 256, (24, 36, 3), dtype=np.uint8)


def test_value_range_maps_uint8_to_minus_one_one():
  pixels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
  out = pp.value_range(pixels).numpy()
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, pixels / 127.5 - 1, atol=1e-6)
  assert out.min() == -1.0 and out.max() == 1.0


def test_decode_png_is_lossless_and_grayscale_becomes_rgb(noise_image):
  out = pp.decode(tf.constant(_encode(noise_image, "PNG"))).numpy()
  np.testing.assert_array_equal(out, noise_image)
  gray = noise_image[..., 0]
  out = pp.decode(tf.constant(_encode(gray, "PNG"))).numpy()
  assert out.shape == (24, 36, 3)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], gray)
  rgba = np.concatenate([noise_image, np.full((24, 36, 1), 7, np.uint8)], -1)
  out = pp.decode(tf.constant(_encode(rgba, "PNG"))).numpy()
  np.testing.assert_array_equal(out, noise_image)


def test_decode_jpeg_matches_pil():
  image = _smooth_image(40, 56)
  encoded = _encode(image, "JPEG", quality=95)
  out = pp.decode(tf.constant(encoded)).numpy()
  reference = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
  assert out.shape == (40, 56, 3) and out.dtype == np.uint8
  # TF decodes with the fast integer IDCT, PIL with the accurate one.
  assert np.abs(out.astype(int) - reference).mean() < 3.0
  assert np.abs(out.astype(int) - image).mean() < 3.0


def test_flip_is_numpy_fliplr_and_a_pure_function_of_the_seed(noise_image):
  np.testing.assert_array_equal(
      pp.maybe_flip(noise_image, tf.constant(True)).numpy(),
      noise_image[:, ::-1])
  np.testing.assert_array_equal(
      pp.maybe_flip(noise_image, tf.constant(False)).numpy(), noise_image)
  decisions = [bool(pp.flip_decision(_seed(i))) for i in range(200)]
  assert decisions == [bool(pp.flip_decision(_seed(i))) for i in range(200)]
  assert 60 < sum(decisions) < 140  # a fair coin, not a constant
  for i in range(6):
    expected = noise_image[:, ::-1] if decisions[i] else noise_image
    np.testing.assert_array_equal(
        pp.flip_left_right(noise_image, _seed(i)).numpy(), expected)


@pytest.mark.parametrize("shape,size", [((24, 36), 16), ((25, 31), 10),
                                        ((8, 8), 8)])
def test_central_crop_matches_numpy(shape, size):
  image = np.random.default_rng(1).integers(0, 256, shape + (3,), np.uint8)
  y, x = (shape[0] - size) // 2, (shape[1] - size) // 2
  np.testing.assert_array_equal(pp.central_crop(image, size).numpy(),
                                image[y:y + size, x:x + size])


def test_resize_matches_numpy_bilinear(noise_image):
  out = pp.resize(noise_image, 20).numpy()
  assert out.shape == (20, 20, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, np_resize(noise_image, 20, 20), atol=1e-3)
  # Exact 2x downsampling with half-pixel centres is the 2x2 box mean.
  square = noise_image[:, :24]
  box_mean = square.reshape(12, 2, 12, 2, 3).astype(np.float64).mean((1, 3))
  np.testing.assert_allclose(pp.resize(square, 12).numpy(), box_mean, atol=1e-3)
  up = pp.resize(noise_image, 50).numpy()
  np.testing.assert_allclose(up, np_resize(noise_image, 50, 50), atol=1e-3)
  assert up.min() >= 0 and up.max() <= 255


@pytest.mark.parametrize("shape,size,expected", [((40, 60), 20, (20, 30)),
                                                 ((60, 40), 20, (30, 20)),
                                                 ((30, 45), 30, (30, 45)),
                                                 ((33, 50), 16, (16, 24))])
def test_resize_small_keeps_aspect(shape, size, expected):
  image = np.random.default_rng(2).integers(0, 256, shape + (3,), np.uint8)
  out = pp.resize_small(image, size).numpy()
  assert out.shape == expected + (3,)
  np.testing.assert_allclose(out, np_area_resize(image, *expected), atol=1e-3)


def test_resize_small_does_not_alias_high_frequencies():
  """4x down: every output pixel is the mean of its 4x4 block (a box filter), as
  big_vision's area resize_small; bilinear without antialiasing would read only 2x2
  of the 16 pixels and keep the high-frequency noise."""
  image = np.random.default_rng(7).integers(0, 256, (64, 96, 3), np.uint8)
  out = pp.resize_small(image, 16).numpy()
  box = image.reshape(16, 4, 24, 4, 3).astype(np.float64).mean((1, 3))
  np.testing.assert_allclose(out, box, atol=1e-3)
  aliased = np_resize(image, 16, 24)
  assert np.abs(aliased - box).max() > 20  # the reference tells the two apart


def test_eval_view_is_resize_small_then_central_crop():
  image = np.random.default_rng(3).integers(0, 256, (64, 96, 3), np.uint8)
  spec = pp.Spec(eval_resize_ratio=1.0)
  out = pp.eval_view(image, 32, spec).numpy()
  # Shorter side 64 -> 32 is an exact 2x box mean; then the central 32 columns.
  small = image.reshape(32, 2, 48, 2, 3).astype(np.float64).mean((1, 3))
  np.testing.assert_allclose(out, small[:, 8:40] / 127.5 - 1, atol=1e-5)
  # Default ratio: 224 -> 256 (the usual ImageNet eval).
  big = np.zeros((300, 400, 3), np.uint8)
  big[:, 200:] = 255
  out = pp.eval_view(big, 224, pp.Spec()).numpy()
  assert out.shape == (224, 224, 3)
  # 300x400 -> 256x341; the edge at column 200 lands at 170.5, i.e. at 112.5
  # in the central crop (offset (341 - 224) // 2 = 58).
  assert np.all(out[:, :100] == -1) and np.allclose(out[:, 120:], 1, atol=1e-4)


def test_eval_view_resize_squashes_whole_image(noise_image):
  out = pp.eval_view(noise_image, 12, pp.Spec(eval_crop="resize")).numpy()
  np.testing.assert_allclose(out, np_resize(noise_image, 12, 12) / 127.5 - 1,
                             atol=1e-5)


def test_inception_crop_boxes_respect_area_aspect_and_bounds():
  height, width = 100, 150
  boxes = np.stack([
      pp.inception_crop_box(tf.constant([height, width, 3]), _seed(i), 0.3,
                            0.5).numpy() for i in range(300)])
  y, x, h, w = boxes.T
  area = h * w / (height * width)
  assert np.all((area >= 0.3 - 1e-9) & (area <= 0.5 + 1e-9))
  # Aspect ratio within [3/4, 4/3] up to rounding to whole pixels.
  assert np.all((w / h > 0.75 * 0.95) & (w / h < 4 / 3 * 1.05))
  assert np.all((y >= 0) & (x >= 0) & (y + h <= height) & (x + w <= width))
  assert len({tuple(b) for b in boxes}) > 250  # seeds give different crops
  again = pp.inception_crop_box(tf.constant([height, width, 3]), _seed(7), 0.3, 0.5)
  np.testing.assert_array_equal(again.numpy(), boxes[7])


def test_inception_crop_default_area_range():
  areas = [np.prod(pp.inception_crop_box(tf.constant([64, 64, 3]),
                                         _seed(i, 5)).numpy()[2:]) / 64**2
           for i in range(200)]
  assert min(areas) >= 0.05 and max(areas) <= 1.0
  assert min(areas) < 0.2 and max(areas) > 0.8  # the range is actually used


def test_random_crop_with_padding_matches_numpy():
  image = np.random.default_rng(4).integers(1, 256, (32, 32, 3), np.uint8)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  offsets = set()
  for i in range(300):
    box = pp.random_crop_box(tf.constant([32, 32, 3]), _seed(i), pad=4).numpy()
    y, x, h, w = box
    assert (h, w) == (32, 32) and 0 <= y <= 8 and 0 <= x <= 8
    offsets.add((y, x))
    if i < 5:
      np.testing.assert_array_equal(pp.crop(image, box, pad=4).numpy(),
                                    padded[y:y + 32, x:x + 32])
  assert len(offsets) > 60  # most of the 81 placements appear


def test_random_crop_on_non_square_image_takes_shorter_side_square():
  ys, xs = set(), set()
  for i in range(100):
    y, x, h, w = pp.random_crop_box(tf.constant([20, 50, 3]), _seed(i)).numpy()
    assert (h, w) == (20, 20) and y == 0 and 0 <= x <= 30
    xs.add(x)
  assert len(xs) > 15


def test_decode_and_crop_equals_crop_of_decode():
  image = _smooth_image(90, 120)
  box_fn = lambda shape: pp.inception_crop_box(shape, _seed(3))
  box = box_fn(tf.constant([90, 120, 3])).numpy()
  png = pp.decode_and_crop(tf.constant(_encode(image, "PNG")), box_fn).numpy()
  np.testing.assert_array_equal(
      png, image[box[0]:box[0] + box[2], box[1]:box[1] + box[3]])
  encoded = _encode(image, "JPEG", quality=95)
  jpeg = pp.decode_and_crop(tf.constant(encoded), box_fn).numpy()
  full = pp.decode(tf.constant(encoded)).numpy()
  reference = full[box[0]:box[0] + box[2], box[1]:box[1] + box[3]]
  assert jpeg.shape == reference.shape
  # The JPEG fast path decodes only the window; chroma upsampling at its edge
  # may differ by a few levels.
  assert np.abs(jpeg.astype(int) - reference).mean() < 2.0


def test_shared_crop_and_random_view_agree(noise_image):
  spec = pp.Spec(crop_area_min=0.2)
  for i in range(4):
    crop = pp.shared_crop(tf.constant(noise_image), False, _seed(i), spec)
    view = pp.random_view(tf.constant(noise_image), _seed(i), 16, spec).numpy()
    np.testing.assert_allclose(view, pp.value_range(pp.resize(crop, 16)).numpy(),
                               atol=1e-6)
    # And the crop is a (possibly mirrored) window of the image.
    crop = crop.numpy()
    h, w = crop.shape[:2]
    windows = [noise_image[y:y + h, x:x + w] for y in range(25 - h)
               for x in range(37 - w)]
    assert any(np.array_equal(crop, c) or np.array_equal(crop, c[:, ::-1])
               for c in windows)


def test_spec_defaults_and_validation():
  assert pp.spec_from_config(ConfigDict({})) == pp.Spec(
      crop="inception", crop_area_min=0.05, crop_area_max=1.0, flip=True,
      eval_crop="resize_small_central", eval_resize_ratio=1.143)
  bad = [({"crop": "center"}, "crop"), ({"eval_crop": "x"}, "eval_crop"),
         ({"crop_area_min": 0.6, "crop_area_max": 0.5}, "crop_area_min"),
         ({"crop_area_min": 0.0}, "crop_area_min"),
         ({"random_crop_pad": -1}, "random_crop_pad"),
         ({"flip": "yes"}, "flip"), ({"eval_resize_ratio": 0.9}, "eval_resize_ratio")]
  for fields, key in bad:
    with pytest.raises(UserError, match=f"evals.val.{key}"):
      pp.spec_from_config(ConfigDict(fields), where="evals.val")
