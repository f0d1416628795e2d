"""The toy source: scikit-learn's 8x8 digits, upsampled.

Split (fixed on every machine, no RNG involved): within each class, in the
order `load_digits()` returns the examples, every 4th example (rank % 4 == 3)
is 'test' and the rest 'train': 1352 train / 445 test, stratified by
construction. No random generator means no dependence on library versions.
"""

import functools
from typing import Any

import numpy as np
import tensorflow as tf

from funmatch.data.source import ArraySource
from funmatch.errors import UserError

SPLITS = ("train", "test")
_TEST_EVERY = 4

# The two caches below hold a package constant (the digits arrays, by split and
# size), not anything a config points at: many runs and tests in one process
# share them, and they cannot go stale.


@functools.lru_cache(maxsize=None)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
  # Imported lazily: scikit-learn is only needed for the toy source.
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  bunch = load_digits()
  return bunch.images.astype(np.float32), bunch.target.astype(np.int32)


def split_indices(split: str) -> np.ndarray:
  """Indices into `load_digits()` of the fixed stratified 'train'/'test' split."""
  _, labels = _load_digits()
  rank = np.zeros(len(labels), np.int64)
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    rank[members] = np.arange(len(members))
  is_test = rank % _TEST_EVERY == _TEST_EVERY - 1
  return np.flatnonzero(is_test if split == "test" else ~is_test)


@functools.lru_cache(maxsize=8)
def digits(split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [N, S, S, 3] images, int32 [N] labels) of a digits split.

  The 8x8 images (values 0..16) are scaled to 0..255, upsampled bilinearly
  (half-pixel centres) to `image_size` and replicated to 3 channels.
  """
  images, labels = _load_digits()
  idx = split_indices(split)
  pixels = images[idx][..., None] * (255.0 / 16.0)
  big = tf.image.resize(pixels, [image_size, image_size], method="bilinear")
  big = np.clip(np.round(big.numpy()), 0, 255).astype(np.uint8)
  out = np.repeat(big, 3, axis=-1)
  out.setflags(write=False)
  return out, labels[idx]


def open_digits(cfg: Any, where: str) -> ArraySource:
  """The digits split `cfg` names, at its image_size."""
  split = cfg.get("split", "train")
  if split not in SPLITS:
    raise UserError(f"{where}.split={split!r} is not a digits split; use one of "
                    f"{SPLITS}")
  size = cfg.get("image_size", 32)
  if not isinstance(size, int) or isinstance(size, bool) or size < 8:
    raise UserError(f"{where}.image_size={size!r} must be an integer >= 8")
  return ArraySource(
      "pixels", lambda: digits(split, size), config=cfg, where=where,
      kind="digits", name=f"digits[{split}]",
      num_examples=len(split_indices(split)), num_classes=10,
      class_names=tuple(str(i) for i in range(10)), access="memory")
