"""Where examples come from: scikit-learn digits, TFDS, or an image folder.

`source_info(cfg)` validates a whole input config (source fields and
preprocessing fields) and describes the source, WITHOUT building a tf.data
pipeline, so the trainer can reject a bad config before touching the workdir.

Two access patterns feed the pipeline:
  * random access (`load_random_access`): digits, folder, TFDS with
    `cache_raw=True`, and TFDS prepared as ArrayRecord files (read by index
    through a TFDS data source, nothing held in memory); example i is
    addressable by index, which makes training batches a pure function of
    (seed, step) and resumes exact.
  * streaming (`tfds_dataset`): TFDS read in sequence from its TFRecord files.
`SourceInfo.access` says which one a config gets (see the TFDS section).

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
import logging
import os
import threading
from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from funmatch import fileio
from funmatch.data import preprocess
from funmatch.errors import UserError

SOURCES = ("digits", "tfds", "folder")
# SourceInfo.access: how examples are read. Every mode but 'streaming' reads
# by index, which is what makes resume exact.
ACCESS_MODES = ("memory", "files", "array_record", "streaming")
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
  access: str = "memory"  # one of ACCESS_MODES
  repair: str = "fix or remove the bad file"  # what to do when a read fails
  note: str = ""  # streaming: how to get exact resume


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

  @property
  def encoded(self) -> bool:
    return self.kind != "pixels"


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
  if source == "tfds":
    return _tfds_info(cfg, where)
  if _random_access_setting(cfg, where) is False:
    raise UserError(f"{where}.random_access=False: a {source} source is always read "
                    "by index; only TFDS can stream (remove the setting)")
  if source == "digits":
    return _digits_info(cfg, where)
  return _folder_info(cfg, where)


def load_random_access(cfg: Any, where: str = "input"
                       ) -> Union[RandomAccessData, "ArrayRecordSplit"]:
  """A source read by index: in memory, image files, or ArrayRecord files.

  For TFDS, `source_info(cfg)` must have validated the config first.
  """
  source = source_type(cfg, where)
  if source == "digits":
    images, labels = digits(_digits_split(cfg, where), _digits_size(cfg, where))
    return RandomAccessData("pixels", images, labels)
  if source == "folder":
    paths, labels, _ = _folder_listing(cfg, where)
    if cfg.get("cache_raw", False):  # small folders: no disk reads per epoch
      return RandomAccessData("encoded", _read_files(paths), labels)
    return RandomAccessData("paths", np.array(paths, dtype=object), labels)
  name, split, data_dir = _tfds_fields(cfg, where)
  image_key, label_key = _tfds_keys(cfg)
  access, file_format = _tfds_access(cfg, _tfds_builder(cfg, where), where)
  if access == "array_record":
    return _array_record_split(name, split, data_dir, image_key, label_key)
  if access != "memory":
    raise ValueError(f"{where}: TFDS {name!r} is streamed, not read by index")
  encoded, labels = _cached_tfds_split(name, split, data_dir, image_key, label_key,
                                       file_format)
  return RandomAccessData("encoded", encoded, labels)


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
                    tuple(str(i) for i in range(10)), access="memory")


# ---------------------------------------------------------------------------
# TFDS.
#
# How a prepared split is read (`SourceInfo.access`), decided by `_tfds_access`:
#   'memory'        cache_raw=True: the encoded split is loaded once into host memory.
#   'array_record'  its ArrayRecord files, read by index through a TFDS data source.
#   'streaming'     its TFRecord files, read in sequence (no seeking: no exact resume).
# `random_access` None picks 'array_record' when the prepared files include
# ArrayRecord and 'streaming' otherwise; True insists on ArrayRecord, False streams.
# Index i is the i-th example of the (sliced) split in the order TFDS wrote it:
# the same in every mode, so a run may switch between them and keep its order.

ARRAY_RECORD, TFRECORD = "array_record", "tfrecord"
_READABLE_FORMATS = (ARRAY_RECORD, TFRECORD)


class Shard(NamedTuple):
  """Records [skip, skip + count) of one file hold `count` examples of a split."""

  path: str
  skip: int
  count: int
  records_in_file: int


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


def _tfds_root(builder: tfds.core.DatasetBuilder, data_dir: Optional[str]) -> str:
  """The data_dir to name in messages (builder.data_dir is ROOT/name/version)."""
  return data_dir or fileio.dirname(fileio.dirname(str(builder.data_dir)))


def _build_command(name: str, root: str, file_format: str = ARRAY_RECORD) -> str:
  return f"`tfds build {name} --file_format={file_format} --data_dir {root}`"


def _add_array_record(builder: tfds.core.DatasetBuilder) -> str:
  """How to give a TFRecord-only dataset its ArrayRecord files."""
  return (f"`tfds convert_format --dataset_version_dir {builder.data_dir} "
          f"--out_file_format array_record` beside the TFRecords, or "
          f"{_build_command(builder.name, 'NEW_DIR')} into a new data_dir")


def _tfds_builder(cfg: Any, where: str, file_format: Optional[str] = None
                  ) -> tfds.core.DatasetBuilder:
  """A builder for a PREPARED dataset, set to read `file_format`; never downloads.

  Datasets TFDS does not know by name (your own) are read from their files in
  data_dir alone: no builder class is needed.
  """
  name, _, data_dir = _tfds_fields(cfg, where)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise UserError(f"{where}.name={name!r}: TFDS dataset not found "
                    f"({str(e).splitlines()[0]}); check the name") from e
  if not builder.is_prepared():
    looked = _tfds_root(builder, data_dir)
    raise UserError(
        f"TFDS dataset {name!r} is not prepared in data_dir {looked} (looked for "
        f"{builder.data_dir}); funmatch never downloads: on a machine with network "
        f"run {_build_command(name, looked)} (or "
        f"tfds.builder({name!r}, data_dir=...).download_and_prepare()) and set "
        f"{where}.data_dir to that directory")
  if file_format:
    _use_format(builder, file_format)
  return builder


def _use_format(builder: tfds.core.DatasetBuilder, file_format: str) -> None:
  """Points the builder's split files at `file_format` (one of its prepared formats)."""
  if builder.info.file_format.value != file_format:
    # A dataset prepared in several formats lists the others as alternatives.
    builder.info.set_file_format(file_format, override=True,
                                 override_if_initialized=True)


def _random_access_setting(cfg: Any, where: str) -> Optional[bool]:
  value = cfg.get("random_access", None)
  if value is not None and not isinstance(value, bool):
    raise UserError(f"{where}.random_access={value!r} must be True, False or None "
                    "(None: read by index when ArrayRecord files exist)")
  return value


def _tfds_access(cfg: Any, builder: tfds.core.DatasetBuilder,
                 where: str) -> tuple[str, str]:
  """(access mode, file format it reads) for a prepared dataset; see above."""
  name, _, data_dir = _tfds_fields(cfg, where)
  wanted = _random_access_setting(cfg, where)
  formats = {f.value for f in builder.info.available_file_formats()}
  have = " and ".join(sorted(formats)) or "no known"
  root = _tfds_root(builder, data_dir)
  readable = [f for f in _READABLE_FORMATS if f in formats]
  if not readable:
    raise UserError(f"TFDS {name!r} in {builder.data_dir} has {have} files; funmatch "
                    "reads ArrayRecord or TFRecord files: run "
                    f"{_build_command(name, root)}")
  if cfg.get("cache_raw", False):
    if wanted is False:
      raise UserError(f"{where}.cache_raw=True reads the split by index from memory, "
                      f"but {where}.random_access=False asks to stream it; drop one")
    return "memory", readable[0]
  if wanted is None:
    wanted = ARRAY_RECORD in formats
  if wanted and ARRAY_RECORD not in formats:
    raise UserError(f"{where}.random_access=True but TFDS {name!r} in "
                    f"{builder.data_dir} has only {have} files; add ArrayRecord files "
                    f"({_add_array_record(builder)}) or drop the setting to "
                    "stream them (resume is then not exact)")
  if not wanted and TFRECORD not in formats:
    raise UserError(f"{where}.random_access=False but TFDS {name!r} in "
                    f"{builder.data_dir} has only {have} files, which TFDS cannot "
                    "stream; drop the setting to read them by index")
  return ("array_record", ARRAY_RECORD) if wanted else ("streaming", TFRECORD)


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


def split_shards(builder: tfds.core.DatasetBuilder, split: str) -> list[Shard]:
  """The files (in the builder's format) that hold `split`, in index order."""
  shards = []
  for instruction in builder.info.splits[split].file_instructions:
    count = (instruction.take if instruction.take >= 0
             else instruction.examples_in_shard - instruction.skip)
    if count > 0:
      shards.append(Shard(os.fspath(instruction.filename), instruction.skip, count,
                          instruction.examples_in_shard))
  return shards


def _array_record_module() -> Any:
  """The ArrayRecord reader module (TFDS installs it on Linux only)."""
  try:
    # pylint: disable-next=g-import-not-at-top
    from array_record.python import array_record_module as module
  except ImportError as e:
    raise UserError(f"reading ArrayRecord files needs the array_record package "
                    f"({e}; it exists for Linux): `pip install array_record`, or set "
                    "random_access=False to stream TFRecords") from None
  return module


def _array_record_problem(path: str, records_in_file: int) -> Optional[str]:
  """None if the file's header and index (at its end) read back, else why not."""
  try:
    reader = _array_record_module().ArrayRecordReader(path, "readahead_buffer_size:0")
  except (RuntimeError, ValueError) as e:
    return f"cannot be opened ({e})"
  try:
    if not reader.ok():
      return ("is damaged: its record index cannot be read (a truncated or "
              "overwritten copy?)")
    if reader.num_records() != records_in_file:
      return (f"holds {reader.num_records()} records where dataset_info.json says "
              f"{records_in_file}")
    return None
  finally:
    try:
      reader.close()
    except RuntimeError:
      pass


# Shards whose cheap checks passed, keyed by (path, size, version): source_info
# runs several times per run, and ImageNet has 1024 training shards.
_CHECKED_SHARDS: set[tuple[str, int, str]] = set()


def _check_shards(name: str, shards: Sequence[Shard], file_format: str,
                  repair: str) -> None:
  """UserError naming the first missing or damaged shard; reads no records.

  Cheap enough for every start: a stat per file, and for ArrayRecord the
  header and the index at the file's end (which a truncated copy loses). A
  chunk garbled in the middle is caught by its checksum when it is read.
  """
  def problem(shard: Shard) -> Optional[str]:
    try:
      size, version = fileio.version(shard.path)
    except FileNotFoundError:
      return "is missing"
    key = (shard.path, size, version)
    if key in _CHECKED_SHARDS:
      return None
    if size == 0:
      return "is empty"
    if file_format == ARRAY_RECORD:
      why = _array_record_problem(shard.path, shard.records_in_file)
      if why:
        return why
    _CHECKED_SHARDS.add(key)
    return None

  workers = max(1, min(32, len(shards)))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    problems = list(pool.map(problem, shards))
  for shard, why in zip(shards, problems):
    if why:
      raise UserError(f"TFDS {name!r}: shard {shard.path} {why}; {repair}")


def _tfds_repair(name: str, root: str, file_format: str) -> str:
  return (f"copy the file again or re-create the dataset with "
          f"{_build_command(name, root, file_format)}")


def _tfds_info(cfg: Any, where: str) -> SourceInfo:
  name, split, data_dir = _tfds_fields(cfg, where)
  builder = _tfds_builder(cfg, where)
  access, file_format = _tfds_access(cfg, builder, where)
  _use_format(builder, file_format)
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
  root = _tfds_root(builder, data_dir)
  repair = _tfds_repair(name, root, file_format)
  _check_shards(name, split_shards(builder, split), file_format, repair)
  note = "" if access != "streaming" else (
      f"for exact resume add ArrayRecord files: {_add_array_record(builder)}")
  return SourceInfo(f"TFDS {name}[{split}] in {builder.data_dir}", num_examples,
                    int(label.num_classes), tuple(label.names),
                    random_access=access != "streaming", access=access,
                    repair=repair, note=note)


class ArrayRecordSplit:
  """A TFDS split in ArrayRecord files, read by index; nothing held in memory.

  Index i of the (sliced) split is record `skip + i - first` of the shard whose
  examples [first, first + count) contain i, shards in the order of TFDS's file
  instructions: the mapping `tfds.data_source` uses, and the order TFDS wrote
  the examples, which TFRecord streaming and cache_raw read too.

  Reads go straight to one ArrayRecord reader per shard, opened on first use
  and shared by all threads (it is thread-safe and releases the GIL while it
  reads). Not through the data source's `__getitems__`: that starts a Python
  thread pool on every call, up to one thread per shard touched, and under
  tf.data's threads those pools deadlocked in our stress runs. Records come
  back serialized; `parse` (a TF function) takes out the encoded image and the
  label, so decoding stays in tf.data.
  """

  encoded = True

  def __init__(self, name: str, shards: Sequence[Shard], features: Any,
               image_key: str, label_key: str):
    self.name = name
    self.shards = tuple(shards)
    self.features = features  # a FeaturesDict of just the image and the label
    self.image_key, self.label_key = image_key, label_key
    self._starts = np.cumsum([0] + [s.count for s in self.shards])
    self._readers: list[Any] = [None] * len(self.shards)
    self._lock = threading.Lock()

  @property
  def num_examples(self) -> int:
    return int(self._starts[-1])

  def read(self, indices: Sequence[int]) -> list[bytes]:
    """Serialized examples at `indices`; ValueError naming a damaged shard."""
    indices = np.asarray(indices, np.int64)
    if np.any((indices < 0) | (indices >= self.num_examples)):
      raise IndexError(f"indices outside [0, {self.num_examples}) of {self.name}")
    owners = np.searchsorted(self._starts, indices, side="right") - 1
    records: list[bytes] = [b""] * len(indices)
    for k in np.unique(owners):
      rows = np.flatnonzero(owners == k)
      positions = indices[rows] - self._starts[k] + self.shards[k].skip
      try:
        found = self._reader(k).read(positions.tolist())
      except (RuntimeError, ValueError, OSError) as e:
        raise ValueError(f"ArrayRecord shard {self.shards[k].path} is damaged "
                         f"({_first_line(e)})") from None
      for row, record in zip(rows, found):
        records[row] = record
    return records

  def parse(self, serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Serialized example -> (encoded image bytes, int32 label)."""
    example = self.features.deserialize_example(
        serialized, decoders={self.image_key: tfds.decode.SkipDecoding()})
    return example[self.image_key], tf.cast(example[self.label_key], tf.int32)

  def _reader(self, k: int) -> Any:
    if self._readers[k] is None:
      with self._lock:
        if self._readers[k] is None:
          # No read-ahead: every read is a jump (TFDS's data source does the same).
          self._readers[k] = _array_record_module().ArrayRecordReader(
              self.shards[k].path, "readahead_buffer_size:0",
              file_reader_buffer_size=32768)
    return self._readers[k]


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


# Open splits by (dataset dir, split, keys, shard stats): each holds one open
# reader per shard, and tf.data keeps the Python function that reads them alive
# for the life of the process, so a split opened twice would hold its files twice.
_OPEN_SPLITS: dict[tuple[Any, ...], ArrayRecordSplit] = {}
_FILE_LIMIT_HEADROOM = 1024


def _array_record_split(name: str, split: str, data_dir: Optional[str],
                        image_key: str, label_key: str) -> ArrayRecordSplit:
  """The split's ArrayRecord files, opened once per process (see _OPEN_SPLITS)."""
  builder = tfds.builder(name, data_dir=data_dir)
  _use_format(builder, ARRAY_RECORD)
  shards = tuple(split_shards(builder, split))
  stats = tuple((s.path, *fileio.version(s.path)) for s in shards)
  key = (str(builder.data_dir), str(split), image_key, label_key, stats)
  if key not in _OPEN_SPLITS:
    _allow_open_files(sum(len(s.shards) for s in _OPEN_SPLITS.values()) + len(shards))
    features = builder.info.features
    wanted = tfds.features.FeaturesDict({image_key: features[image_key],
                                         label_key: features[label_key]})
    _OPEN_SPLITS[key] = ArrayRecordSplit(
        f"TFDS {name}[{split}] in {builder.data_dir}", shards, wanted, image_key,
        label_key)
  return _OPEN_SPLITS[key]


def _allow_open_files(shard_count: int) -> None:
  """Raises the soft open-file limit for one reader per shard (ImageNet: 1024
  training shards, the common default limit)."""
  import resource  # pylint: disable=g-import-not-at-top
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  need = shard_count + _FILE_LIMIT_HEADROOM
  if soft == resource.RLIM_INFINITY or soft >= need:
    return
  target = need if hard == resource.RLIM_INFINITY else min(need, hard)
  if target > soft:
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
  if target < need:
    logging.getLogger("funmatch").warning(
        "the open-file limit (ulimit -n %d) is low for %d ArrayRecord shards; raise "
        "it (ulimit -n %d) if reads fail with 'Too many open files'", hard,
        shard_count, need)


@functools.lru_cache(maxsize=4)
def _cached_tfds_split(name: str, split: str, data_dir: Optional[str],
                       image_key: str, label_key: str, file_format: str
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Reads all (encoded image, label) pairs of a split into host memory once."""
  if file_format == ARRAY_RECORD:
    data = _array_record_split(name, split, data_dir, image_key, label_key)
    serialized = np.empty(data.num_examples, dtype=object)
    for start in range(0, data.num_examples, 4096):
      chunk = data.read(range(start, min(start + 4096, data.num_examples)))
      serialized[start:start + len(chunk)] = chunk
    ds = tf.data.Dataset.from_tensor_slices(serialized).map(
        data.parse, num_parallel_calls=tf.data.AUTOTUNE)
  else:
    builder = tfds.builder(name, data_dir=data_dir)
    _use_format(builder, TFRECORD)
    ds = builder.as_dataset(
        split=split, shuffle_files=False,
        decoders={image_key: tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ex: (ex[image_key], ex[label_key]))
  encoded, labels = [], []
  for images, label in ds.batch(1024).as_numpy_iterator():
    encoded.extend(images)
    labels.append(label)
  values = np.empty(len(encoded), dtype=object)
  values[:] = encoded
  return values, np.concatenate(labels).astype(np.int32)


def tfds_dataset(cfg: Any, *, process_index: int, process_count: int,
                 shuffle_seed: Optional[int], where: str = "input"
                 ) -> tuple[tf.data.Dataset, int]:
  """This host's part of a TFDS split streamed from TFRecords: (image bytes, label).

  Hosts read disjoint contiguous sub-splits (`tfds.even_splits`). With a
  `shuffle_seed`, the files are read in a shuffled order that is reshuffled on
  every repetition; None reads in a fixed order. Returns the dataset and its
  number of examples.
  """
  _, split, _ = _tfds_fields(cfg, where)
  builder = _tfds_builder(cfg, where, TFRECORD)
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
  return SourceInfo(
      f"folder {root}", len(labels), len(names), tuple(names),
      access="memory" if cfg.get("cache_raw", False) else "files",
      repair="fix or remove the bad file (verify_images=True names it before training)")
