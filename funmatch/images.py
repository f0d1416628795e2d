"""Image files to model inputs with numpy and PIL: funmatch's eval view, no TensorFlow.

`funmatch.load_student` and funmatch-predict run where TensorFlow is not
installed (the GPU machine, a deployment), so they cannot use
funmatch/data/preprocess.py. This module repeats its eval view with the same
arithmetic as TensorFlow's kernels, in float32:

  resize_small_central  area resize (TF `resize_area`) of the shorter side to
                        max(res, round(res * ratio)), then the central res x res
  resize                bilinear to res x res (half-pixel centres, TF
                        `resize_bilinear`; antialiased: TF `scale_and_translate`
                        with a triangle kernel)

then [0, 255] -> [-1, 1]. tests/test_images.py compares both with TensorFlow.
PNG decoding is exact; JPEG decoders (PIL's libjpeg vs TensorFlow's) may differ
by one intensity level on some pixels.
"""
import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from funmatch.errors import UserError

EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How an image becomes a model input (as recorded with the weights)."""
  res: int
  eval_crop: str = "resize_small_central"
  resize_small_ratio: float = 1.143
  antialias: bool = False

  @classmethod
  def from_metadata(cls, res: int, metadata: Mapping[str, Any]) -> "Preprocessing":
    """From `weights.layouts.preprocessing_metadata()` as stored in a file or config."""
    return cls(int(res), str(metadata.get("eval_crop", cls.eval_crop)),
               float(metadata.get("resize_small_ratio", cls.resize_small_ratio)),
               bool(metadata.get("antialias", cls.antialias)))

  def __call__(self, image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [res, res, 3] in [-1, 1]."""
    return eval_view(image, self)


def decode(path: str) -> np.ndarray:
  """An image file as uint8 [H, W, 3] RGB (gray replicated, alpha dropped, no EXIF
  rotation: what TensorFlow's decode_image gives)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  try:
    with Image.open(path) as image:
      image.load()
      if image.mode != "RGB":
        image = image.convert("RGB")
      return np.asarray(image, np.uint8)
  except Exception as e:  # pylint: disable=broad-except  (any decoder error)
    raise UserError(f"cannot decode {path} ({type(e).__name__}: "
                    f"{' '.join(str(e).split())[:120]}); use a JPEG or PNG file") from None


def eval_view(image: np.ndarray, spec: Preprocessing) -> np.ndarray:
  """funmatch's eval view of one uint8 [H, W, 3] image (see the module docstring)."""
  image = np.asarray(image, np.float32)
  res = spec.res
  if spec.eval_crop == "resize":
    out = _resize_bilinear(image, res, res, spec.antialias)
  elif spec.eval_crop == "resize_small_central":
    small = max(res, int(round(res * spec.resize_small_ratio)))
    out = _central_crop(_resize_small(image, small), res)
  else:
    raise UserError(f"unknown eval_crop {spec.eval_crop!r}; use resize_small_central "
                    "or resize")
  return np.clip(out, 0.0, 255.0) / np.float32(127.5) - np.float32(1.0)


def _resize_small(image: np.ndarray, size: int) -> np.ndarray:
  """Area resize so the shorter side is `size` (preprocess.resize_small)."""
  shape = np.array(image.shape[:2], np.float32)
  scale = np.float32(size) / shape.min()
  # tf.round rounds half to even, as np.rint does.
  height, width = np.maximum(np.rint(shape * scale).astype(np.int64), size)
  return _separable(image, _area_weights(image.shape[0], height),
                    _area_weights(image.shape[1], width))


def _central_crop(image: np.ndarray, size: int) -> np.ndarray:
  y = (image.shape[0] - size) // 2
  x = (image.shape[1] - size) // 2
  return image[y:y + size, x:x + size]


def _separable(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """out[y, x] = sum_ij rows[y, i] * cols[x, j] * image[i, j] (float32)."""
  out = np.einsum("yi,ijc->yjc", rows, image, dtype=np.float32)
  return np.einsum("xj,yjc->yxc", cols, out, dtype=np.float32)


def _area_weights(in_size: int, out_size: int) -> np.ndarray:
  """TF resize_area's weights: each output cell averages the input it covers."""
  scale = np.float32(in_size) / np.float32(out_size)
  weights = np.zeros((out_size, in_size), np.float32)
  for y in range(out_size):
    start, end = np.float32(y) * scale, np.float32(y + 1) * scale
    for i in range(int(math.floor(start)), int(math.ceil(end))):
      overlap = min(np.float32(i + 1), end) - max(np.float32(i), start)
      weights[y, min(i, in_size - 1)] += overlap
  return weights / scale


def _resize_bilinear(image: np.ndarray, height: int, width: int,
                     antialias: bool) -> np.ndarray:
  weights = _antialiased_weights if antialias else _bilinear_weights
  return _separable(image, weights(image.shape[0], height),
                    weights(image.shape[1], width))


def _bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
  """TF resize_bilinear with half-pixel centres."""
  scale = np.float32(in_size) / np.float32(out_size)
  weights = np.zeros((out_size, in_size), np.float32)
  for y in range(out_size):
    center = (np.float32(y) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(center)
    lower = max(int(floor), 0)
    upper = min(int(np.ceil(center)), in_size - 1)
    lerp = center - floor
    weights[y, lower] += 1 - lerp
    weights[y, upper] += lerp
  return weights


def _antialiased_weights(in_size: int, out_size: int) -> np.ndarray:
  """TF scale_and_translate, triangle kernel, widened by the downscale factor."""
  inv_scale = np.float32(in_size) / np.float32(out_size)
  kernel_scale = max(inv_scale, np.float32(1.0))
  weights = np.zeros((out_size, in_size), np.float32)
  for y in range(out_size):
    sample = (np.float32(y) + np.float32(0.5)) * inv_scale
    start = int(np.ceil(sample - kernel_scale - np.float32(0.5)))
    end = int(np.floor(sample + kernel_scale - np.float32(0.5)))
    start, end = min(max(start, 0), in_size - 1), min(max(end, 0), in_size - 1) + 1
    positions = np.arange(start, end, dtype=np.float32) + np.float32(0.5) - sample
    row = np.maximum(0, 1 - np.abs(positions / kernel_scale)).astype(np.float32)
    total = row.sum(dtype=np.float32)
    weights[y, start:end] = row / total if abs(total) > 0 else row
  return weights
