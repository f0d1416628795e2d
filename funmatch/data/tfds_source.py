"""TFDS sources: a prepared dataset's split, read by index or streamed.

How a prepared split is read (`DataSource.access`), decided by `_access`:
  'memory'        cache_raw=True: the encoded split is loaded once into host
                  memory (an `ArraySource`).
  'array_record'  its ArrayRecord files, read by index (`ArrayRecordSource`).
  'streaming'     its TFRecord files, read in sequence (`StreamedSource`; no
                  seeking, no exact resume).
`random_access` None picks 'array_record' when the prepared files include
ArrayRecord and 'streaming' otherwise; True insists on ArrayRecord, False streams.
Index i is the i-th example of the (sliced) split in the order TFDS wrote it:
the same in every mode, so a run may switch between them and keep its order.

TFDS's metadata is read through etils.epath (which fileio points at gcsfs);
examples through TensorFlow's readers or the ArrayRecord reader, which reach
gs:// themselves. Nothing here ever downloads.
"""

import concurrent.futures
import logging
import os
import threading
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from funmatch import fileio
from funmatch.data.source import ArraySource, DataSource, IndexedSource
from funmatch.errors import UserError

ARRAY_RECORD, TFRECORD = "array_record", "tfrecord"
_READABLE_FORMATS = (ARRAY_RECORD, TFRECORD)
_FILE_LIMIT_HEADROOM = 1024


class Shard(NamedTuple):
  """Records [skip, skip + count) of one file hold `count` examples of a split."""

  path: str
  skip: int
  count: int
  records_in_file: int


class _Fields(NamedTuple):
  """The TFDS fields of an input config, read once."""

  name: str
  split: str
  data_dir: Optional[str]
  image_key: str
  label_key: str


def random_access_setting(cfg: Any, where: str) -> Optional[bool]:
  value = cfg.get("random_access", None)
  if value is not None and not isinstance(value, bool):
    raise UserError(f"{where}.random_access={value!r} must be True, False or None "
                    "(None: read by index when ArrayRecord files exist)")
  return value


def open_tfds(cfg: Any, where: str) -> DataSource:
  """Checks the prepared dataset `cfg` names (split, features, every shard) and
  opens it in the access mode the config asks for; reads no example."""
  fields = _fields(cfg, where)
  builder = _builder(fields, where)
  access, file_format = _access(cfg, fields, builder, where)
  _use_format(builder, file_format)
  num_examples = _check_split(builder, fields.split, where)
  if num_examples == 0:
    raise UserError(f"{where}.split={fields.split!r} of TFDS {fields.name!r} has no "
                    "examples")
  label = _check_features(builder, fields, where)
  root = _root(builder, fields.data_dir)
  repair = (f"copy the file again or re-create the dataset with "
            f"{_build_command(fields.name, root, file_format)}")
  shards = split_shards(builder, fields.split)
  _check_shards(fields.name, shards, file_format, repair)
  description = dict(
      config=cfg, where=where, kind="tfds",
      name=_split_name(builder, fields),
      num_examples=num_examples, num_classes=int(label.num_classes),
      class_names=tuple(label.names), access=access, repair=repair)
  if access == "array_record":
    reader = ShardReader(_split_name(builder, fields), shards,
                         _wanted_features(builder, fields), fields)
    return ArrayRecordSource(reader, **description)
  if access == "memory":
    return ArraySource("encoded", lambda: _read_into_memory(
        builder, fields, shards, file_format), **description)
  return StreamedSource(builder, fields, note=(
      f"for exact resume add ArrayRecord files: {_add_array_record(builder)}"),
                        **description)


# ---------------------------------------------------------------------------
# The config and the prepared dataset.


def _fields(cfg: Any, where: str) -> _Fields:
  name = cfg.get("name", None)
  if not name or not isinstance(name, str):
    raise UserError(f"{where}.name must name a TFDS dataset (e.g. "
                    "'oxford_flowers102') when source='tfds'")
  data_dir = cfg.get("data_dir", None)
  return _Fields(name, cfg.get("split", "train"),
                 fileio.abspath(data_dir) if data_dir else None,
                 cfg.get("image_key", "image"), cfg.get("label_key", "label"))


def _root(builder: tfds.core.DatasetBuilder, data_dir: Optional[str]) -> str:
  """The data_dir to name in messages (builder.data_dir is ROOT/name/version)."""
  return data_dir or fileio.dirname(fileio.dirname(str(builder.data_dir)))


def _build_command(name: str, root: str, file_format: str = ARRAY_RECORD) -> str:
  return f"`tfds build {name} --file_format={file_format} --data_dir {root}`"


def _add_array_record(builder: tfds.core.DatasetBuilder) -> str:
  """How to give a TFRecord-only dataset its ArrayRecord files."""
  return (f"`tfds convert_format --dataset_version_dir {builder.data_dir} "
          f"--out_file_format array_record` beside the TFRecords, or "
          f"{_build_command(builder.name, 'NEW_DIR')} into a new data_dir")


def _builder(fields: _Fields, where: str) -> tfds.core.DatasetBuilder:
  """A builder for a PREPARED dataset; never downloads.

  Datasets TFDS does not know by name (your own) are read from their files in
  data_dir alone: no builder class is needed.
  """
  name, data_dir = fields.name, fields.data_dir
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise UserError(f"{where}.name={name!r}: TFDS dataset not found "
                    f"({str(e).splitlines()[0]}); check the name") from e
  if not builder.is_prepared():
    looked = _root(builder, data_dir)
    raise UserError(
        f"TFDS dataset {name!r} is not prepared in data_dir {looked} (looked for "
        f"{builder.data_dir}); funmatch never downloads: on a machine with network "
        f"run {_build_command(name, looked)} (or "
        f"tfds.builder({name!r}, data_dir=...).download_and_prepare()) and set "
        f"{where}.data_dir to that directory")
  return builder


def _use_format(builder: tfds.core.DatasetBuilder, file_format: str) -> None:
  """Points the builder's split files at `file_format` (one of its prepared formats)."""
  if builder.info.file_format.value != file_format:
    # A dataset prepared in several formats lists the others as alternatives.
    builder.info.set_file_format(file_format, override=True,
                                 override_if_initialized=True)


def _access(cfg: Any, fields: _Fields, builder: tfds.core.DatasetBuilder,
            where: str) -> tuple[str, str]:
  """(access mode, file format it reads) for a prepared dataset; see above."""
  name = fields.name
  wanted = random_access_setting(cfg, where)
  formats = {f.value for f in builder.info.available_file_formats()}
  have = " and ".join(sorted(formats)) or "no known"
  readable = [f for f in _READABLE_FORMATS if f in formats]
  if not readable:
    raise UserError(f"TFDS {name!r} in {builder.data_dir} has {have} files; funmatch "
                    "reads ArrayRecord or TFRecord files: run "
                    f"{_build_command(name, _root(builder, fields.data_dir))}")
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


def _check_split(builder: tfds.core.DatasetBuilder, split: Any, where: str) -> int:
  """Number of examples in `split` (TFDS slicing syntax); UserError if bad."""
  try:
    return int(builder.info.splits[split].num_examples)
  except (KeyError, ValueError, TypeError, AssertionError) as e:
    raise UserError(
        f"{where}.split={split!r} is not a valid split of TFDS "
        f"{builder.name!r} (available: {sorted(builder.info.splits.keys())}; "
        f"slicing like 'train[:90%]' is allowed): {str(e).splitlines()[0]}"
    ) from e


def _check_features(builder: tfds.core.DatasetBuilder, fields: _Fields,
                    where: str) -> tfds.features.ClassLabel:
  """The label feature, once the image and label keys are known to fit."""
  features = builder.info.features
  image = features[fields.image_key] if fields.image_key in features else None
  if not isinstance(image, tfds.features.Image):
    raise UserError(f"TFDS {fields.name!r} has no image feature {fields.image_key!r} "
                    f"(features: {list(features)}); set {where}.image_key")
  label = features[fields.label_key] if fields.label_key in features else None
  if not isinstance(label, tfds.features.ClassLabel):
    raise UserError(f"TFDS {fields.name!r} has no class-label feature "
                    f"{fields.label_key!r} (features: {list(features)}); set "
                    f"{where}.label_key")
  return label


def _split_name(builder: tfds.core.DatasetBuilder, fields: _Fields) -> str:
  return f"TFDS {fields.name}[{fields.split}] in {builder.data_dir}"


def _wanted_features(builder: tfds.core.DatasetBuilder,
                     fields: _Fields) -> tfds.features.FeaturesDict:
  features = builder.info.features
  return tfds.features.FeaturesDict({fields.image_key: features[fields.image_key],
                                     fields.label_key: features[fields.label_key]})


# ---------------------------------------------------------------------------
# Shards: listed and checked once, when the source is opened.


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


def _shard_problem(shard: Shard, file_format: str) -> Optional[str]:
  try:
    size, _ = fileio.version(shard.path)
  except FileNotFoundError:
    return "is missing"
  if size == 0:
    return "is empty"
  if file_format == ARRAY_RECORD:
    return _array_record_problem(shard.path, shard.records_in_file)
  return None


def _check_shards(name: str, shards: Sequence[Shard], file_format: str,
                  repair: str) -> None:
  """UserError naming the first missing or damaged shard; reads no records.

  Cheap enough for every start (ImageNet has 1024 training shards): a stat per
  file, and for ArrayRecord the header and the index at the file's end (which a
  truncated copy loses). A chunk garbled in the middle is caught by its
  checksum when it is read.
  """
  workers = max(1, min(32, len(shards)))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    problems = list(pool.map(lambda s: _shard_problem(s, file_format), shards))
  for shard, why in zip(shards, problems):
    if why:
      raise UserError(f"TFDS {name!r}: shard {shard.path} {why}; {repair}")


# ---------------------------------------------------------------------------
# Read by index: ArrayRecord files.


class ShardReader:
  """Reads a TFDS split's ArrayRecord files by index; nothing held in memory.

  Index i of the (sliced) split is record `skip + i - first` of the shard whose
  examples [first, first + count) contain i, shards in the order of TFDS's file
  instructions: the mapping `tfds.data_source` uses, and the order TFDS wrote
  the examples, which TFRecord streaming and cache_raw read too.

  Reads go straight to one ArrayRecord reader per shard file, opened on first
  use and shared by all threads and sources (it is thread-safe and releases the
  GIL while it reads; see _READERS). Not through the data source's
  `__getitems__`: that starts a Python thread pool on every call, up to one
  thread per shard touched, and under tf.data's threads those pools deadlocked
  in our stress runs. Records come
  back serialized; `parse` (a TF function) takes out the encoded image and the
  label, so decoding stays in tf.data.
  """

  def __init__(self, name: str, shards: Sequence[Shard],
               features: tfds.features.FeaturesDict, fields: _Fields):
    self.name = name
    self.shards = tuple(shards)
    self.features = features  # a FeaturesDict of just the image and the label
    self.image_key, self.label_key = fields.image_key, fields.label_key
    self._starts = np.cumsum([0] + [s.count for s in self.shards])
    self._readers: list[Any] = [None] * len(self.shards)
    _allow_open_files(len(_READERS) + len(self.shards))

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
      self._readers[k] = _open_reader(self.shards[k].path)
    return self._readers[k]


class ArrayRecordSource(IndexedSource):
  """A split read by index from its ArrayRecord files (a `ShardReader`)."""

  # Records per read call (see `examples`).
  read_chunk = 64

  def __init__(self, reader: ShardReader, **description):
    super().__init__(**description)
    self.reader = reader

  def examples(self, stream: tf.data.Dataset) -> tf.data.Dataset:
    """Chunks of `read_chunk` indices are read per call: the Python call and the
    reader's per-shard setup are paid once per chunk, the reader releases the
    GIL while it reads, and AUTOTUNE runs several chunks at once. Order stays
    deterministic, so the stream is still a pure function of (seed, step)."""
    parallel = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    reader = self.reader

    def read(indices):
      return np.array(reader.read(indices.tolist()), dtype=object)

    def read_chunk(keys, indices):
      records = tf.numpy_function(read, [indices], tf.string, stateful=False)
      return keys, indices, tf.reshape(records, tf.shape(indices))

    def parse(key, index, record):
      return (key, index) + reader.parse(record)

    chunks = stream.batch(self.read_chunk).map(read_chunk, **parallel)
    return chunks.unbatch().map(parse, **parallel)


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


# Open ArrayRecord readers by shard FILE (path, size, version), shared by every
# source of the process. tf.data keeps the Python function that reads a split
# alive for the life of the process, so a reader once used is never freed; the
# pool keeps the open files at one per shard file however often a split is
# opened (tests and tools open many runs in one process). A pool of file
# handles, not a cache of a config: a rewritten file gets a new reader.
_READERS: dict[tuple[str, int, str], Any] = {}
_READERS_LOCK = threading.Lock()


def _open_reader(path: str) -> Any:
  key = (path, *fileio.version(path))
  with _READERS_LOCK:
    if key not in _READERS:
      # No read-ahead: every read is a jump (TFDS's data source does the same).
      _READERS[key] = _array_record_module().ArrayRecordReader(
          path, "readahead_buffer_size:0", file_reader_buffer_size=32768)
    return _READERS[key]


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


# ---------------------------------------------------------------------------
# Read by index: the whole split in memory (cache_raw).


def _read_into_memory(builder: tfds.core.DatasetBuilder, fields: _Fields,
                      shards: Sequence[Shard], file_format: str
                      ) -> tuple[np.ndarray, np.ndarray]:
  """All (encoded image, label) pairs of the split, in index order."""
  if file_format == ARRAY_RECORD:
    data = ShardReader(_split_name(builder, fields), shards,
                       _wanted_features(builder, fields), fields)
    serialized = np.empty(data.num_examples, dtype=object)
    for start in range(0, data.num_examples, 4096):
      chunk = data.read(range(start, min(start + 4096, data.num_examples)))
      serialized[start:start + len(chunk)] = chunk
    ds = tf.data.Dataset.from_tensor_slices(serialized).map(
        data.parse, num_parallel_calls=tf.data.AUTOTUNE)
  else:
    ds = builder.as_dataset(
        split=fields.split, shuffle_files=False,
        decoders={fields.image_key: tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ex: (ex[fields.image_key], ex[fields.label_key]))
  encoded, labels = [], []
  for images, label in ds.batch(1024).as_numpy_iterator():
    encoded.extend(images)
    labels.append(label)
  values = np.empty(len(encoded), dtype=object)
  values[:] = encoded
  return values, np.concatenate(labels).astype(np.int32)


# ---------------------------------------------------------------------------
# Streaming: TFRecord files in sequence.


class StreamedSource(DataSource):
  """A TFDS split streamed from its TFRecord files (no random access)."""

  def __init__(self, builder: tfds.core.DatasetBuilder, fields: _Fields,
               **description):
    super().__init__(**description)
    self._builder = builder  # set to read TFRecords
    self._fields = fields

  def stream(self, *, process_index: int, process_count: int,
             shuffle_seed: Optional[int]) -> tuple[tf.data.Dataset, int]:
    """This host's part of the split: (image bytes, int32 label) and its size.

    Hosts read disjoint contiguous sub-splits (`tfds.even_splits`). With a
    `shuffle_seed`, the files are read in a shuffled order that is reshuffled on
    every repetition; None reads in a fixed order.
    """
    image_key, label_key = self._fields.image_key, self._fields.label_key
    host_split = _host_split(self._fields.split, process_index, process_count)
    num_examples = _check_split(self._builder, host_split, self.where)
    read_config = tfds.ReadConfig(
        shuffle_seed=shuffle_seed, shuffle_reshuffle_each_iteration=True,
        try_autocache=False, skip_prefetch=True)
    ds = self._builder.as_dataset(
        split=host_split, shuffle_files=shuffle_seed is not None,
        read_config=read_config, decoders={image_key: tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)),
                num_parallel_calls=tf.data.AUTOTUNE)
    return ds, num_examples

  def host_sizes(self, process_count: int) -> list[int]:
    """Number of examples each host's sub-split holds."""
    return [_check_split(self._builder, _host_split(self._fields.split, p,
                                                    process_count), self.where)
            for p in range(process_count)]


def _host_split(split: str, process_index: int, process_count: int) -> Any:
  """The contiguous sub-split read by one host (the whole split on one host)."""
  if process_count == 1:
    return split
  return tfds.even_splits(split, n=process_count)[process_index]
