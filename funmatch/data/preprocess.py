"""Image preprocessing ops: plain TensorFlow functions on single examples.

Every random op is *stateless*: it takes an explicit seed tensor (int64 [2]) and
its result is a pure function of that seed and its inputs. That is what lets the
pipeline reproduce any training batch from (seed, step) and give several views
of one example the very same crop.

Crops are described by a box `[y, x, height, width]` (int32 [4]) so one sampled
crop can be applied to several images, or handed to `decode_and_crop_jpeg`.

`Spec` gathers the preprocessing fields of an input config (see
`funmatch/data/pipeline.py` for the full table) and validates them.
"""

import dataclasses
from typing import Any, Callable

import tensorflow as tf

from funmatch.errors import UserError

CROPS = ("inception", "random", "resize")
EVAL_CROPS = ("resize_small_central", "resize")
# The usual Inception-style aspect-ratio range (as in big_vision / torchvision).
ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)

Box = tf.Tensor  # int32 [4]: y, x, height, width


# ---------------------------------------------------------------------------
# Config.


@dataclasses.dataclass(frozen=True)
class Spec:
  """Validated preprocessing settings of one input config."""

  crop: str = "inception"
  crop_area_min: float = 0.05
  crop_area_max: float = 1.0
  random_crop_pad: int = 0
  flip: bool = True
  eval_crop: str = "resize_small_central"
  eval_resize_ratio: float = 1.143  # 256 / 224
  # Bilinear resizes (training crops, eval_crop='resize'): False matches big_vision's
  # `resize`. The eval resize_small is an area resize, antialiased by construction.
  resize_antialias: bool = False


def spec_from_config(cfg: Any, where: str = "input") -> Spec:
  """Reads and validates the preprocessing fields of `cfg` (defaults via .get).

  Args:
    cfg: an input config (ConfigDict or dict-like with `.get`).
    where: the config path named in error messages, e.g. 'input' or 'evals.val'.
  """
  d = Spec()
  spec = Spec(
      crop=cfg.get("crop", d.crop),
      crop_area_min=cfg.get("crop_area_min", d.crop_area_min),
      crop_area_max=cfg.get("crop_area_max", d.crop_area_max),
      random_crop_pad=cfg.get("random_crop_pad", d.random_crop_pad),
      flip=cfg.get("flip", d.flip),
      eval_crop=cfg.get("eval_crop", d.eval_crop),
      eval_resize_ratio=cfg.get("eval_resize_ratio", d.eval_resize_ratio),
      resize_antialias=cfg.get("resize_antialias", d.resize_antialias),
  )
  if spec.crop not in CROPS:
    raise UserError(f"{where}.crop={spec.crop!r} is unknown; use one of {CROPS}")
  if spec.eval_crop not in EVAL_CROPS:
    raise UserError(
        f"{where}.eval_crop={spec.eval_crop!r} is unknown; use one of {EVAL_CROPS}")
  if not (isinstance(spec.crop_area_min, (int, float))
          and isinstance(spec.crop_area_max, (int, float))
          and 0 < spec.crop_area_min <= spec.crop_area_max <= 1):
    raise UserError(
        f"{where}.crop_area_min={spec.crop_area_min!r} and crop_area_max="
        f"{spec.crop_area_max!r} must satisfy 0 < min <= max <= 1")
  if (not isinstance(spec.random_crop_pad, int) or isinstance(
      spec.random_crop_pad, bool) or spec.random_crop_pad < 0):
    raise UserError(f"{where}.random_crop_pad={spec.random_crop_pad!r} must be "
                    "an integer >= 0")
  for key in ("flip", "resize_antialias"):
    if not isinstance(getattr(spec, key), bool):
      raise UserError(f"{where}.{key}={getattr(spec, key)!r} must be True or False")
  if (not isinstance(spec.eval_resize_ratio, (int, float))
      or spec.eval_resize_ratio < 1):
    raise UserError(f"{where}.eval_resize_ratio={spec.eval_resize_ratio!r} must be "
                    ">= 1 (resize the shorter side to ratio*res, then crop res)")
  return spec


# ---------------------------------------------------------------------------
# Seeds.


def fold_in(seed: tf.Tensor, data: Any) -> tf.Tensor:
  """A new seed derived from `seed` and an integer; int64 [2]."""
  return tf.random.experimental.stateless_fold_in(
      tf.cast(seed, tf.int64), tf.cast(data, tf.int64))


# Sub-seed tags, so the crop and the flip of one view draw independent numbers.
_CROP, _FLIP, _CROP_X = 1, 2, 3


# ---------------------------------------------------------------------------
# Decoding.


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """JPEG/PNG bytes -> uint8 [H, W, 3] RGB (grayscale is replicated, alpha dropped)."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def decode_and_crop(encoded: tf.Tensor, box_fn: Callable[[tf.Tensor], Box],
                    pad: int = 0) -> tf.Tensor:
  """Decodes only the crop `box_fn(image_shape)` of a JPEG; decodes+crops others.

  Decoding just the crop window is much cheaper for large JPEGs with small
  Inception crops. `pad` > 0 (CIFAR-style random crops) needs the full image.
  """
  def full():
    image = decode(encoded)
    return crop(image, box_fn(tf.shape(image)), pad)

  if pad:
    return full()

  def jpeg():
    box = box_fn(tf.image.extract_jpeg_shape(encoded))
    return tf.image.decode_and_crop_jpeg(encoded, box, channels=3)

  image = tf.cond(tf.io.is_jpeg(encoded), jpeg, full)
  image.set_shape([None, None, 3])
  return image


# ---------------------------------------------------------------------------
# Crop boxes (functions of the image shape and a seed).


def full_box(shape: tf.Tensor) -> Box:
  """The whole image."""
  shape = tf.cast(shape, tf.int32)
  return tf.stack([0, 0, shape[0], shape[1]])


def inception_crop_box(shape: tf.Tensor, seed: tf.Tensor,
                       area_min: float = 0.05, area_max: float = 1.0) -> Box:
  """Inception-style random crop: area fraction in range, aspect in [3/4, 4/3].

  Falls back to the whole image when no valid box is found (TF's rule).
  """
  shape = tf.cast(shape, tf.int32)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, tf.zeros([0, 0, 4], tf.float32), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=ASPECT_RATIO_RANGE,
      area_range=(area_min, area_max), max_attempts=100,
      use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def random_crop_box(shape: tf.Tensor, seed: tf.Tensor, pad: int = 0) -> Box:
  """A uniformly placed square of side min(H, W) in the image padded by `pad`.

  With a square image and pad=4 this is the classic CIFAR augmentation. The box
  is in the coordinates of the padded image (use `crop(image, box, pad)`).
  """
  shape = tf.cast(shape, tf.int32)
  side = tf.minimum(shape[0], shape[1])
  y = tf.random.stateless_uniform(
      [], fold_in(seed, _CROP), minval=0, maxval=shape[0] + 2 * pad - side + 1,
      dtype=tf.int32)
  x = tf.random.stateless_uniform(
      [], fold_in(seed, _CROP_X), minval=0, maxval=shape[1] + 2 * pad - side + 1,
      dtype=tf.int32)
  return tf.stack([y, x, side, side])


def train_box(spec: Spec, shape: tf.Tensor, seed: tf.Tensor) -> Box:
  """The training crop box selected by `spec.crop`."""
  if spec.crop == "inception":
    return inception_crop_box(shape, seed, spec.crop_area_min, spec.crop_area_max)
  if spec.crop == "random":
    return random_crop_box(shape, seed, spec.random_crop_pad)
  return full_box(shape)


def crop(image: tf.Tensor, box: Box, pad: int = 0) -> tf.Tensor:
  """Cuts `box` out of `image` zero-padded by `pad` pixels on each side."""
  if pad:
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  return tf.slice(image, tf.stack([box[0], box[1], 0]),
                  tf.stack([box[2], box[3], -1]))


# ---------------------------------------------------------------------------
# Flip.


def flip_decision(seed: tf.Tensor) -> tf.Tensor:
  """A fair coin (bool scalar) as a pure function of the seed."""
  return tf.random.stateless_uniform([], seed) < 0.5


def maybe_flip(image: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
  """Mirrors left-right when `flip` is True."""
  image = tf.convert_to_tensor(image)
  return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def flip_left_right(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Stateless random left-right flip."""
  return maybe_flip(image, flip_decision(seed))


# ---------------------------------------------------------------------------
# Resizing, value range.


def resize(image: tf.Tensor, size: int, antialias: bool = False) -> tf.Tensor:
  """Bilinear resize to [size, size]; float32 in the input's value range."""
  out = tf.image.resize(image, [size, size], method="bilinear",
                        antialias=antialias)
  return tf.clip_by_value(out, 0.0, 255.0)


def resize_small(image: tf.Tensor, size: int) -> tf.Tensor:
  """Area resize so the shorter side is `size`, keeping the aspect ratio.

  Area (each output pixel the mean of the input pixels it covers), as big_vision's
  `resize_small`: eval images are usually downscaled several times, where bilinear
  without antialiasing would alias (sample 4 of every 16 pixels at 4x).
  """
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = size / tf.reduce_min(shape)
  # The shorter side must come out at exactly `size`, whatever the rounding.
  new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
  out = tf.image.resize(image, new_shape, method="area")
  return tf.clip_by_value(out, 0.0, 255.0)


def central_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """The central [size, size] window (offsets rounded down)."""
  shape = tf.shape(image)
  y = (shape[0] - size) // 2
  x = (shape[1] - size) // 2
  return tf.slice(image, tf.stack([y, x, 0]), tf.stack([size, size, -1]))


def value_range(image: tf.Tensor) -> tf.Tensor:
  """[0, 255] -> float32 [-1, 1]."""
  return tf.cast(image, tf.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------------
# Whole views.


def eval_view(image: tf.Tensor, res: int, spec: Spec) -> tf.Tensor:
  """Deterministic eval preprocessing: float32 [res, res, 3] in [-1, 1]."""
  if spec.eval_crop == "resize":
    out = resize(image, res, spec.resize_antialias)
  else:
    small = max(res, int(round(res * spec.eval_resize_ratio)))
    out = central_crop(resize_small(image, small), res)
  out = tf.ensure_shape(out, [res, res, 3])
  return value_range(out)


def random_view(image: tf.Tensor, seed: tf.Tensor, res: int, spec: Spec) -> tf.Tensor:
  """Training crop + flip of a decoded image: float32 [res, res, 3] in [-1, 1]."""
  cropped = crop(image, train_box(spec, tf.shape(image), fold_in(seed, _CROP)),
                 spec.random_crop_pad)
  if spec.flip:
    cropped = flip_left_right(cropped, fold_in(seed, _FLIP))
  return value_range(tf.ensure_shape(
      resize(cropped, res, spec.resize_antialias), [res, res, 3]))


def shared_crop(raw: tf.Tensor, encoded: bool, seed: tf.Tensor,
                spec: Spec) -> tf.Tensor:
  """The ONE training crop (+ flip) of an example that all its views share.

  `raw` is uint8 [H, W, 3] pixels, or JPEG/PNG bytes when `encoded`. Uses the
  same sub-seeds as `random_view`, so `random_view(image, seed, res)` equals
  `value_range(resize(shared_crop(image, seed), res))`.
  """
  def box_fn(shape):
    return train_box(spec, shape, fold_in(seed, _CROP))

  if encoded:
    image = decode_and_crop(raw, box_fn, spec.random_crop_pad)
  else:
    image = crop(raw, box_fn(tf.shape(raw)), spec.random_crop_pad)
  if spec.flip:
    image = flip_left_right(image, fold_in(seed, _FLIP))
  return image
