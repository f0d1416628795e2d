"""Where examples come from: scikit-learn digits, TFDS, or an image folder.

`source_info(cfg)` validates a whole input config (source fields and
preprocessing fields) and describes the source, WITHOUT building a tf.data
pipeline, so the trainer can reject a bad config before touching the workdir.

Two access patterns feed the pipeline:
  * random access (`load_random_access`): digits, folder, and TFDS with
    `cache_raw=True`; example i is addressable by index, which makes training
    batches a pure function of (seed, step) and resumes exact.
  * streaming (`tfds_dataset`): TFDS read from its TFRecord files.

Locations may be paths or gs:// URLs. Listings, image checks and cached reads
go through funmatch.fileio, TFDS's metadata through etils.epath (which fileio
points at gcsfs). Reading examples while streaming goes through TensorFlow
(tf.data's readers for TFDS, tf.io.read_file for image folders), which reaches
gs:// with TensorFlow's own GCS filesystem.

Digits split (fixed on every machine, no RNG involved): within each class, in
the order `load_digits()` returns the examples, every 4th example (rank % 4 ==
3) is 'test' and the rest 'train': 1352 train / 445 test, stratified by
construction. No random generator means no dependence on library versions.
"""

import concurrent.futures
import dataclasses
import functools
import io
import os
from typing import Any, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from funmatch import fileio
from funmatch.data import preprocess
from funmatch.errors import UserError

SOURCES = ("digits", "tfds", "folder")
DIGITS_SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_DIGITS_TEST_EVERY = 4


@dataclasses.dataclass(frozen=True)
class SourceInfo:
  """What the trainer needs to know about a source before reading it."""

  name: str  # human-readable, used in messages: 'digits[train]', a root, ...
  num_examples: int
  num_classes: int
  class_names: Optional[tuple[str, ...]] = None
  random_access: bool = True  # True: exact resume of the training order.


@dataclasses.dataclass(frozen=True)
class RandomAccessData:
  """All examples of a split, addressable by index.

  `kind` says what `values[i]` is: 'pixels' (uint8 [S, S, 3]), 'encoded'
  (JPEG/PNG bytes) or 'paths' (a file to read and decode).
  """

  kind: str
  values: np.ndarray
  labels: np.ndarray  # int32 [N]

  @property
  def num_examples(self) -> int:
    return len(self.labels)


# ---------------------------------------------------------------------------
# Validation / description.


def source_type(cfg: Any, where: str = "input") -> str:
  source = cfg.get("source", None)
  if source not in SOURCES:
    raise UserError(f"{where}.source={source!r} is unknown; use one of {SOURCES}")
  return source


def check_batch_size(cfg: Any, where: str = "input") -> int:
  batch_size = cfg.get("batch_size", 512)
  if (not isinstance(batch_size, int) or isinstance(batch_size, bool)
      or batch_size <= 0):
    raise UserError(f"{where}.batch_size={batch_size!r} must be a positive integer")
  return batch_size


def source_info(cfg: Any, where: str = "input") -> SourceInfo:
  """Validates `cfg` (source + preprocessing fields) and describes its source.

  Reads metadata only (file listings, TFDS dataset_info, image headers), never
  builds tf.data pipelines and never downloads.
  """
  source = source_type(cfg, where)
  check_batch_size(cfg, where)
  preprocess.spec_from_config(cfg, where)
  shuffle_buffer = cfg.get("shuffle_buffer", 50_000)
  if not isinstance(shuffle_buffer, int) or shuffle_buffer <= 0:
    raise UserError(f"{where}.shuffle_buffer={shuffle_buffer!r} must be a "
                    "positive integer")
  if source == "digits":
    return _digits_info(cfg, where)
  if source == "tfds":
    return _tfds_info(cfg, where)
  return _folder_info(cfg, where)


def load_random_access(cfg: Any, where: str = "input") -> RandomAccessData:
  """Loads a random-access source (digits, folder, or TFDS with cache_raw)."""
  source = source_type(cfg, where)
  if source == "digits":
    images, labels = digits(_digits_split(cfg, where), _digits_size(cfg, where))
    return RandomAccessData("pixels", images, labels)
  if source == "folder":
    paths, labels, _ = _folder_listing(cfg, where)
    if cfg.get("cache_raw", False):  # small folders: no disk reads per epoch
      return RandomAccessData("encoded", _read_files(paths), labels)
    return RandomAccessData("paths", np.array(paths, dtype=object), labels)
  if not cfg.get("cache_raw", False):
    raise ValueError(f"{where}: TFDS without cache_raw is a streaming source")
  name, split, data_dir = _tfds_fields(cfg, where)
  image_key, label_key = _tfds_keys(cfg)
  _tfds_builder(cfg, where)  # validates
  encoded, labels = _cached_tfds_split(name, split, data_dir, image_key, label_key)
  return RandomAccessData("encoded", encoded, labels)


def is_random_access(cfg: Any) -> bool:
  return cfg.get("source") != "tfds" or bool(cfg.get("cache_raw", False))


# ---------------------------------------------------------------------------
# Digits.


@functools.lru_cache(maxsize=None)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
  # Imported lazily: scikit-learn is only needed for the toy source.
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  bunch = load_digits()
  return bunch.images.astype(np.float32), bunch.target.astype(np.int32)


def digits_split_indices(split: str) -> np.ndarray:
  """Indices into `load_digits()` of the fixed stratified 'train'/'test' split."""
  _, labels = _load_digits()
  rank = np.zeros(len(labels), np.int64)
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    rank[members] = np.arange(len(members))
  is_test = rank % _DIGITS_TEST_EVERY == _DIGITS_TEST_EVERY - 1
  return np.flatnonzero(is_test if split == "test" else ~is_test)


@functools.lru_cache(maxsize=8)
def digits(split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [N, S, S, 3] images, int32 [N] labels) of a digits split.

  The 8x8 images (values 0..16) are scaled to 0..255, upsampled bilinearly
  (half-pixel centres) to `image_size` and replicated to 3 channels.
  """
  images, labels = _load_digits()
  idx = digits_split_indices(split)
  pixels = images[idx][..., None] * (255.0 / 16.0)
  big = tf.image.resize(pixels, [image_size, image_size], method="bilinear")
  big = np.clip(np.round(big.numpy()), 0, 255).astype(np.uint8)
  out = np.repeat(big, 3, axis=-1)
  out.setflags(write=False)
  return out, labels[idx]


def _digits_split(cfg: Any, where: str) -> str:
  split = cfg.get("split", "train")
  if split not in DIGITS_SPLITS:
    raise UserError(f"{where}.split={split!r} is not a digits split; use one of "
                    f"{DIGITS_SPLITS}")
  return split


def _digits_size(cfg: Any, where: str) -> int:
  size = cfg.get("image_size", 32)
  if not isinstance(size, int) or isinstance(size, bool) or size < 8:
    raise UserError(f"{where}.image_size={size!r} must be an integer >= 8")
  return size


def _digits_info(cfg: Any, where: str) -> SourceInfo:
  split = _digits_split(cfg, where)
  _digits_size(cfg, where)
  return SourceInfo(f"digits[{split}]", len(digits_split_indices(split)), 10,
                    tuple(str(i) for i in range(10)), True)


# ---------------------------------------------------------------------------
# TFDS.


def _tfds_fields(cfg: Any, where: str) -> tuple[str, str, Optional[str]]:
  name = cfg.get("name", None)
  if not name or not isinstance(name, str):
    raise UserError(f"{where}.name must name a TFDS dataset (e.g. "
                    "'oxford_flowers102') when source='tfds'")
  split = cfg.get("split", "train")
  data_dir = cfg.get("data_dir", None)
  return name, split, (fileio.abspath(data_dir) if data_dir else None)


def _tfds_keys(cfg: Any) -> tuple[str, str]:
  return cfg.get("image_key", "image"), cfg.get("label_key", "label")


def _tfds_builder(cfg: Any, where: str) -> tfds.core.DatasetBuilder:
  """A builder for a PREPARED dataset; never downloads."""
  name, _, data_dir = _tfds_fields(cfg, where)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise UserError(f"{where}.name={name!r}: TFDS dataset not found "
                    f"({str(e).splitlines()[0]}); check the name") from e
  if not builder.is_prepared():
    looked = data_dir or fileio.dirname(fileio.dirname(str(builder.data_dir)))
    raise UserError(
        f"TFDS dataset {name!r} is not prepared in data_dir {looked} (looked for "
        f"{builder.data_dir}); funmatch never downloads: on a machine with network "
        f"run `tfds build {name} --data_dir {looked}` (or "
        f"tfds.builder({name!r}, data_dir=...).download_and_prepare()) and set "
        f"{where}.data_dir to that directory")
  return builder


def _tfds_check_split(builder: tfds.core.DatasetBuilder, split: Any,
                      where: str) -> int:
  """Number of examples in `split` (TFDS slicing syntax); UserError if bad."""
  try:
    return int(builder.info.splits[split].num_examples)
  except (KeyError, ValueError, TypeError, AssertionError) as e:
    raise UserError(
        f"{where}.split={split!r} is not a valid split of TFDS "
        f"{builder.name!r} (available: {sorted(builder.info.splits.keys())}; "
        f"slicing like 'train[:90%]' is allowed): {str(e).splitlines()[0]}"
    ) from e


def _tfds_info(cfg: Any, where: str) -> SourceInfo:
  name, split, _ = _tfds_fields(cfg, where)
  builder = _tfds_builder(cfg, where)
  num_examples = _tfds_check_split(builder, split, where)
  if num_examples == 0:
    raise UserError(f"{where}.split={split!r} of TFDS {name!r} has no examples")
  image_key, label_key = _tfds_keys(cfg)
  features = builder.info.features
  image = features[image_key] if image_key in features else None
  if not isinstance(image, tfds.features.Image):
    raise UserError(f"TFDS {name!r} has no image feature {image_key!r} "
                    f"(features: {list(features)}); set {where}.image_key")
  label = features[label_key] if label_key in features else None
  if not isinstance(label, tfds.features.ClassLabel):
    raise UserError(f"TFDS {name!r} has no class-label feature {label_key!r} "
                    f"(features: {list(features)}); set {where}.label_key")
  return SourceInfo(f"TFDS {name}[{split}] in {builder.data_dir}", num_examples,
                    int(label.num_classes), tuple(label.names),
                    bool(cfg.get("cache_raw", False)))


@functools.lru_cache(maxsize=4)
def _cached_tfds_split(name: str, split: str, data_dir: Optional[str],
                       image_key: str, label_key: str
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Reads all (encoded image, label) pairs of a split into host memory once."""
  builder = tfds.builder(name, data_dir=data_dir)
  ds = builder.as_dataset(
      split=split, shuffle_files=False,
      decoders={image_key: tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: (ex[image_key], ex[label_key])).batch(1024)
  encoded, labels = [], []
  for images, label in ds.as_numpy_iterator():
    encoded.extend(images)
    labels.append(label)
  values = np.empty(len(encoded), dtype=object)
  values[:] = encoded
  return values, np.concatenate(labels).astype(np.int32)


def tfds_dataset(cfg: Any, *, process_index: int, process_count: int,
                 shuffle_seed: Optional[int], where: str = "input"
                 ) -> tuple[tf.data.Dataset, int]:
  """This host's part of a TFDS split as (encoded image, int32 label) pairs.

  Hosts read disjoint contiguous sub-splits (`tfds.even_splits`). With a
  `shuffle_seed`, the files are read in a shuffled order that is reshuffled on
  every repetition; None reads in a fixed order. Returns the dataset and its
  number of examples.
  """
  _, split, _ = _tfds_fields(cfg, where)
  builder = _tfds_builder(cfg, where)
  _tfds_check_split(builder, split, where)
  host_split = host_tfds_split(split, process_index, process_count)
  num_examples = _tfds_check_split(builder, host_split, where)
  image_key, label_key = _tfds_keys(cfg)
  read_config = tfds.ReadConfig(
      shuffle_seed=shuffle_seed, shuffle_reshuffle_each_iteration=True,
      try_autocache=False, skip_prefetch=True)
  ds = builder.as_dataset(
      split=host_split, shuffle_files=shuffle_seed is not None,
      read_config=read_config,
      decoders={image_key: tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)),
              num_parallel_calls=tf.data.AUTOTUNE)
  return ds, num_examples


def host_tfds_split(split: str, process_index: int, process_count: int) -> Any:
  """The contiguous sub-split read by one host (the whole split on one host)."""
  if process_count == 1:
    return split
  return tfds.even_splits(split, n=process_count)[process_index]


def tfds_host_sizes(cfg: Any, process_count: int, where: str = "input") -> list[int]:
  """Number of examples each host's sub-split holds."""
  _, split, _ = _tfds_fields(cfg, where)
  builder = _tfds_builder(cfg, where)
  _tfds_check_split(builder, split, where)
  return [_tfds_check_split(builder, host_tfds_split(split, p, process_count),
                            where) for p in range(process_count)]


# ---------------------------------------------------------------------------
# Image folder.


def _folder_root(cfg: Any, where: str) -> str:
  root = cfg.get("root", None)
  if not root or not isinstance(root, str):
    raise UserError(f"{where}.root must be a directory (root/<class>/*.jpg) when "
                    "source='folder'")
  root = fileio.abspath(root)
  if not fileio.isdir(root):
    raise UserError(f"{where}.root={root} is not a directory; expected "
                    "root/<class>/*.jpg|jpeg|png")
  return root


def _class_names(root: str, classes: Optional[Sequence[str]],
                 where: str) -> list[str]:
  found = sorted(name for name, is_dir in fileio.scandir(root)
                 if is_dir and not name.startswith("."))
  if classes is None:
    if not found:
      raise UserError(f"folder {root} has no class sub-folders; expected "
                      "root/<class>/*.jpg|jpeg|png")
    return found
  classes = list(classes)
  missing = [c for c in classes if c not in found]
  extra = [c for c in found if c not in classes]
  if missing or extra or len(set(classes)) != len(classes):
    raise UserError(
        f"{where}.classes does not match the sub-folders of {root} (missing "
        f"folders: {missing}, folders not listed: {extra}); fix the list or the "
        "folders")
  return classes


def _list_images(class_dir: str) -> list[str]:
  return sorted(
      fileio.join(class_dir, name) for name, is_dir in fileio.scandir(class_dir)
      if not is_dir and name.lower().endswith(IMAGE_EXTENSIONS)
      and not name.startswith("."))


def _folder_listing(cfg: Any, where: str
                    ) -> tuple[list[str], np.ndarray, list[str]]:
  """(paths sorted by class then name, int32 labels, class names)."""
  root = _folder_root(cfg, where)
  names = _class_names(root, cfg.get("classes", None), where)
  paths, labels = [], []
  for label, name in enumerate(names):
    files = _list_images(fileio.join(root, name))
    if not files:
      raise UserError(f"folder {fileio.join(root, name)} has no .jpg/.jpeg/.png "
                      "images; add images or remove the folder")
    paths.extend(files)
    labels.extend([label] * len(files))
  return paths, np.array(labels, np.int32), names


def _read_files(paths: Sequence[str]) -> np.ndarray:
  values = np.empty(len(paths), dtype=object)
  for i, path in enumerate(paths):
    values[i] = fileio.read_bytes(path)
  return values


_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_image_file(path: str) -> Optional[str]:
  """None if `path` is a decodable JPEG/PNG, else the reason it is not.

  Decodes the whole file (catching truncation and corrupt data); JPEGs are
  decoded at 1/8 scale via PIL's draft mode, which still reads every byte of
  the compressed stream but skips most of the pixel work.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    data = fileio.read_bytes(path)  # one read, also from object storage
    if not (data.startswith(_JPEG_MAGIC) or data.startswith(_PNG_MAGIC)):
      return "not a JPEG or PNG file"
    with Image.open(io.BytesIO(data)) as image:
      if image.format == "JPEG":
        image.draft("RGB", (1, 1))
      image.load()
  except Exception as e:  # pylint: disable=broad-except
    return f"{type(e).__name__}: {e}"
  return None


# Verification results of unchanged files, keyed by (path, size, mtime or
# generation).
_VERIFIED: set[tuple[str, int, str]] = set()


def verify_images(paths: Sequence[str], root: str) -> None:
  """Raises UserError naming the unreadable images among `paths`, if any."""
  def check(path):  # in the pool: on object storage the version is a request too
    key = (path, *fileio.version(path))
    return key, (None if key in _VERIFIED else check_image_file(path))

  # Threads, not cores: the work is mostly waiting for reads.
  workers = min(32, 2 * (os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    results = list(pool.map(check, paths))
  bad = [(key[0], why) for key, why in results if why]
  _VERIFIED.update(key for key, why in results if not why)
  if bad:
    shown = "; ".join(f"{p} ({why})" for p, why in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise UserError(f"unreadable image in folder {root}: {shown}{more}; "
                    "delete or replace it (or set verify_images=False to skip "
                    "this check)")


def _folder_info(cfg: Any, where: str) -> SourceInfo:
  root = _folder_root(cfg, where)
  paths, labels, names = _folder_listing(cfg, where)
  if cfg.get("verify_images", True):
    verify_images(paths, root)
  return SourceInfo(f"folder {root}", len(labels), len(names), tuple(names), True)
