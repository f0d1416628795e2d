"""tf.data input pipelines: per-host batches -> global jax.Arrays on the mesh.

Every function here takes a `DataSource` (funmatch/data/source.py), opened
once per split by `sources.open_source(cfg, where)`; the batch size and the
preprocessing come from the config section it was opened from
(`source.config`). Input config (`config.input` for training,
`config.evals.<name>` per eval set; an `ml_collections.ConfigDict`, missing
fields take the defaults shown):

  source           'digits' | 'tfds' | 'folder'                   (required)
    digits:  split 'train' | 'test' ('train'); image_size int (32): 8x8 digits
             upsampled bilinearly; fixed stratified split, see digits.py.
    tfds:    name (required); split, TFDS slicing like 'train[:90%]' ('train');
             data_dir (TFDS default); image_key ('image'); label_key ('label').
             Never downloads: an unprepared dataset is a UserError.
             random_access (None): how the prepared files are read. None picks
             ArrayRecord files by index when the dataset has them (prepare
             with `tfds build NAME --file_format=array_record --data_dir DIR`),
             else streams its TFRecords; True insists on ArrayRecord, False
             streams TFRecords. Missing, empty or truncated shards are named
             before anything runs; a garbled one when it is read.
    folder:  root (required): root/<class>/*.jpg|jpeg|png, classes sorted
             alphabetically -> label ids; classes (optional list fixing the
             order); verify_images (True): decode every image up front.
  batch_size       GLOBAL batch size (512); divisible by the process count and
                   the number of data shards.
  cache_raw        (False) keep the encoded images in host memory, every host
                   all of them: for TFDS, random access (and exact resume)
                   without ArrayRecord files; for folders, no file reads. Meant
                   for small datasets (< ~2 GB encoded); digits are always in
                   memory.
  shuffle_buffer   streaming TFDS shuffle buffer (50_000).
  crop             training crop (inception): 'inception' (area range below,
                   aspect 3/4..4/3), 'random' (a square of the shorter side,
                   placed uniformly in the image zero-padded by
                   random_crop_pad (0) pixels, CIFAR-style), 'resize' (the
                   whole image).
  crop_area_min, crop_area_max   inception crop area fraction (0.05, 1.0).
  flip             random left-right flip in training (True).
  eval_crop        'resize_small_central' (default): shorter side to
                   round(eval_resize_ratio * res) by an area resize (as big_vision's
                   resize_small), then the central res x res;
                   'resize': whole image squashed (bilinear) to res x res.
  eval_resize_ratio  (1.143 = 256/224).
  max_examples     eval sets only (0): evaluate the split's first N examples, in
                   split order (a quick minival); 0 = the whole split.
  resize_antialias   antialias the bilinear resizes (False, like big_vision).

Crops (`crops=`, from the run's teaching plan, funmatch/teaching.py):
  shared: ONE crop + flip per example; every view is that crop resized to its own
      resolution (function matching's mixup happens later, on device).
  independent: every view its own random crop + flip.
  fixed: the 'student' view gets the random crop + flip, every other view the
      eval preprocessing (the same every epoch).

Order and resume. Random-access sources (digits, folder, TFDS with cache_raw,
TFDS in ArrayRecord files) use a global index stream: epoch e is a stateless
permutation of range(N) keyed by (seed, e); the example at global stream
position j = step * B + i gets all its random ops seeded by (seed, j). Batch k
is thus a pure function of (seed, k): `start_step=k` resumes exactly and reads
nothing before it. Host p of P takes positions [p*B/P, (p+1)*B/P) of every
global batch, so P may change between runs as long as B does not.
A TFDS index i is the i-th example of the (sliced) split in the order TFDS
wrote its files; ArrayRecord reads, cache_raw and TFRecord streaming all see
that order, so a run may switch between cache_raw and ArrayRecord. ArrayRecord
records are read in chunks of `ArrayRecordSource.read_chunk` indices per
call, several chunks at once, then parsed, decoded (only the crop window of a
JPEG) and resized in tf.data (AUTOTUNE, deterministic order).
Streaming TFDS cannot resume exactly: each host reads its own sub-split, and
its file-order, shuffle and augmentation seeds are derived from
(seed, start_step, process_index), so a resumed run sees a fresh order.
`train_dataset` logs which of these a run gets.

Eval: deterministic, no shuffling; host p reads a contiguous part of the split
(of its first `max_examples` examples when set), padded (mask False) so every
host yields the same number of batches and each example counts exactly once.
"""

import collections
import logging
import math
import re
import zlib
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import numpy as np
import tensorflow as tf

from funmatch.data import preprocess
from funmatch.data import sources
from funmatch.data.source import DataSource
from funmatch.errors import UserError
from funmatch.teaching import STUDENT_VIEW

CROPS = ("shared", "independent", "fixed")
_DEVICE_PREFETCH = 2
_ACCESS_WORDS = {
    "memory": "held in memory and read by index",
    "files": "image files read by index",
    "array_record": "ArrayRecord files read by index",
    "streaming": "TFRecord files streamed",
}
log = logging.getLogger("funmatch")
# Seed-stream tags: keep the permutation, per-example and streaming seeds apart.
_PERMUTATION, _EXAMPLE, _STREAM = 1, 2, 3

Batch = dict[str, Any]


# ---------------------------------------------------------------------------
# Checks and small helpers.


def check_views(views: Mapping[str, int]) -> None:
  """UserError unless `views` maps model names to positive resolutions."""
  if not views:
    raise UserError("no model views to feed: views must map names to resolutions")
  for name, res in views.items():
    if not isinstance(res, (int, np.integer)) or res <= 0:
      raise UserError(f"resolution {res!r} of view {name!r} must be a positive int")


def check_crops(crops: str, views: Mapping[str, int]) -> None:
  """ValueError unless `crops` is known and fits `views` (the teaching plan made both)."""
  if crops not in CROPS:
    raise ValueError(f"crops={crops!r} is not one of {CROPS}")
  check_views(views)
  if crops == "fixed" and STUDENT_VIEW not in views:
    raise ValueError(f"crops='fixed' needs a view named {STUDENT_VIEW!r} (got "
                     f"{sorted(views)})")


def local_batch_size(cfg: Any, process_count: int, where: str = "input") -> int:
  """This host's share B / P of the global batch size B."""
  batch_size = sources.check_batch_size(cfg, where)
  if batch_size % process_count:
    raise UserError(f"{where}.batch_size={batch_size} must be divisible by the "
                    f"number of processes ({process_count})")
  return batch_size // process_count


def host_range(num_examples: int, process_index: int,
               process_count: int) -> tuple[int, int]:
  """The contiguous [start, end) of examples host `process_index` evaluates."""
  return (process_index * num_examples // process_count,
          (process_index + 1) * num_examples // process_count)


def epoch_permutation(seed: int, epoch: Any, num_examples: int) -> tf.Tensor:
  """The example order of one epoch: int64 [N], a pure function of (seed, epoch)."""
  perm_seed = preprocess.fold_in(tf.constant([seed, _PERMUTATION], tf.int64), epoch)
  return tf.random.experimental.stateless_shuffle(
      tf.range(num_examples, dtype=tf.int64), seed=perm_seed)


def example_seed(seed: int, position: Any) -> tf.Tensor:
  """Seed of every random op for the example at global stream position j."""
  return preprocess.fold_in(tf.constant([seed, _EXAMPLE], tf.int64), position)


def view_tag(name: str) -> int:
  """A stable per-view constant (Python's hash() is salted per process)."""
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # One thread per op keeps the whole pool busy with different examples.
  options.threading.max_intra_op_parallelism = 1
  return options


# ---------------------------------------------------------------------------
# Views of one example.


def train_views(raw: tf.Tensor, encoded: bool, seed: tf.Tensor,
                views: Mapping[str, int], crops: str,
                spec: preprocess.Spec) -> dict[str, tf.Tensor]:
  """{view: float32 [res, res, 3] in [-1, 1]} of one training example.

  `raw` is uint8 [H, W, 3] pixels, or JPEG/PNG bytes when `encoded`.
  """
  def resized(image, res):
    out = preprocess.resize(image, res, spec.resize_antialias)
    return preprocess.value_range(tf.ensure_shape(out, [res, res, 3]))

  if crops == "shared":
    image = preprocess.shared_crop(raw, encoded, seed, spec)
    return {name: resized(image, res) for name, res in views.items()}
  image = preprocess.decode(raw) if encoded else raw
  if crops == "independent":
    return {name: preprocess.random_view(
        image, preprocess.fold_in(seed, view_tag(name)), res, spec)
            for name, res in views.items()}
  return {name: (preprocess.random_view(image, seed, res, spec)
                 if name == STUDENT_VIEW else preprocess.eval_view(image, res, spec))
          for name, res in views.items()}


def eval_views(raw: tf.Tensor, encoded: bool, views: Mapping[str, int],
               spec: preprocess.Spec) -> dict[str, tf.Tensor]:
  """{view: float32 [res, res, 3] in [-1, 1]}: the eval preprocessing."""
  image = preprocess.decode(raw) if encoded else raw
  return {name: preprocess.eval_view(image, res, spec)
          for name, res in views.items()}


def _log_access(source: DataSource) -> None:
  """One line saying how the data is read and whether resume is exact."""
  if source.random_access:
    log.info("%s: %s, %s: batch k is a pure function of (seed, k), resume is "
             "exact", source.where, source.name, _ACCESS_WORDS[source.access])
  else:
    log.warning("%s: %s, %s: resume is NOT exact (a resumed run sees a fresh data "
                "order); %s", source.where, source.name, _ACCESS_WORDS[source.access],
                source.note)


# ---------------------------------------------------------------------------
# Host-level tf.data datasets (testable on one process).


def train_dataset(source: DataSource, views: Mapping[str, int], *, seed: int,
                  start_step: int = 0, crops: str = "shared",
                  process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
  """Endless local batches of one host: {'images', 'label', 'index'}.

  'index' is the example's index in the source (-1 for streaming TFDS).
  """
  check_crops(crops, views)
  cfg, where = source.config, source.where
  spec = preprocess.spec_from_config(cfg, where)
  local_batch = local_batch_size(cfg, process_count, where)
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0")
  _log_access(source)
  if source.random_access:
    examples = _random_access_train(
        source, views, spec, crops, seed, start_step,
        local_batch * process_count, process_index, process_count)
  else:
    examples = _streaming_train(source, views, spec, crops, seed, start_step,
                                process_index, process_count)
  ds = examples.batch(local_batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def _random_access_train(source, views, spec, crops, seed, start_step,
                         global_batch, process_index, process_count):
  """Examples of this host, in global-stream order, starting at start_step."""
  n = source.num_examples
  local_batch = global_batch // process_count
  first_epoch, offset = divmod(start_step * global_batch, n)

  def epoch_positions(epoch):
    # Only the first epoch starts mid-way; nothing before start_step is read.
    first = tf.where(epoch == first_epoch, tf.constant(offset, tf.int64), 0)
    perm = epoch_permutation(seed, epoch, n)
    positions = epoch * n + tf.range(first, n, dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices((positions, perm[first:]))

  lo = process_index * local_batch
  stream = tf.data.Dataset.counter(first_epoch).flat_map(epoch_positions)
  stream = stream.batch(global_batch).map(
      lambda pos, idx: (pos[lo:lo + local_batch], idx[lo:lo + local_batch]))

  def make(position, index, raw, label):
    images = train_views(raw, source.encoded, example_seed(seed, position), views,
                         crops, spec)
    return {"images": images, "label": label, "index": index}

  examples = source.examples(stream.unbatch())
  return examples.map(make, num_parallel_calls=tf.data.AUTOTUNE,
                      deterministic=True)


def _stream_seeds(seed: int, start_step: int, process_index: int
                  ) -> tuple[int, int, int]:
  """(file-order, shuffle, augmentation) seeds of one host's streaming run."""
  state = np.random.SeedSequence(
      [seed & 0xFFFFFFFFFFFFFFFF, _STREAM, start_step, process_index])
  return tuple(int(s) for s in state.generate_state(3, np.uint32))


def _streaming_train(source, views, spec, crops, seed, start_step,
                     process_index, process_count):
  file_seed, shuffle_seed, aug_seed = _stream_seeds(seed, start_step,
                                                    process_index)
  ds, num_examples = source.stream(process_index=process_index,
                                   process_count=process_count,
                                   shuffle_seed=file_seed)
  if not num_examples:  # repeat() over nothing would spin forever
    raise UserError(f"{source.where}.split has no examples for process "
                    f"{process_index} of {process_count}; use a larger split")
  ds = ds.repeat().shuffle(source.config.get("shuffle_buffer", 50_000),
                           seed=shuffle_seed)

  def make(count, example):
    raw, label = example
    images = train_views(raw, True, example_seed(aug_seed, count), views,
                         crops, spec)
    return {"images": images, "label": label,
            "index": tf.constant(-1, tf.int64)}

  return ds.enumerate().map(make, num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True)


def eval_size(cfg: Any, split_examples: int, where: str = "eval") -> int:
  """How many examples an eval pass covers: the first `max_examples` of the split
  (0 or unset: all of it)."""
  limit = cfg.get("max_examples", 0)
  if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
    raise UserError(f"{where}.max_examples={limit!r} must be an integer >= 0 (0: the "
                    "whole split)")
  return min(limit, split_examples) if limit else split_examples


def eval_dataset(source: DataSource, views: Mapping[str, int], *,
                 process_index: int = 0, process_count: int = 1
                 ) -> tuple[tf.data.Dataset, int, int]:
  """One pass of local eval batches: {'images', 'label', 'mask', 'index'}.

  Returns (dataset, number of examples the pass covers, batches per host).
  'index' is the example's position in the split (-1 on padding). With
  `max_examples` N the pass covers the split's first N examples, split between
  hosts like a whole split, so each is still counted exactly once.
  """
  check_views(views)
  cfg, where = source.config, source.where
  spec = preprocess.spec_from_config(cfg, where)
  local_batch = local_batch_size(cfg, process_count, where)
  num_examples = eval_size(cfg, source.num_examples, where)
  read = _indexed_eval if source.random_access else _streamed_eval
  ranges, examples = read(source, num_examples, views, spec, process_index,
                          process_count)
  sizes = [end - start for start, end in ranges]
  num_batches = max(1, math.ceil(max(sizes) / local_batch))
  num_pad = num_batches * local_batch - sizes[process_index]
  padding = tf.data.Dataset.from_tensors(_padding_example(views)).repeat(num_pad)
  ds = examples.concatenate(padding).batch(local_batch, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
  return ds, num_examples, num_batches


def _indexed_eval(source, num_examples, views, spec, process_index, process_count):
  """(every host's [start, end), this host's eval examples) read by index."""
  ranges = [host_range(num_examples, p, process_count) for p in range(process_count)]
  start, end = ranges[process_index]

  def make(unused_key, index, raw, label):
    return _eval_example(eval_views(raw, source.encoded, views, spec), label, index)

  indices = tf.data.Dataset.range(start, end)
  return ranges, source.examples(tf.data.Dataset.zip(indices, indices)).map(
      make, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _streamed_eval(source, num_examples, views, spec, process_index, process_count):
  """(every host's [start, end), this host's eval examples) streamed in order."""
  if num_examples < source.num_examples:
    # The first N of the split, in order, each host up to its own part (a
    # minival is small; the records a host skips are not decoded).
    ranges = [host_range(num_examples, p, process_count) for p in range(process_count)]
    start, end = ranges[process_index]
    ds, _ = source.stream(process_index=0, process_count=1, shuffle_seed=None)
    ds = ds.skip(start).take(end - start)
  else:  # the whole split: each host reads only its own sub-split
    ends = np.cumsum(source.host_sizes(process_count)).tolist()
    ranges = list(zip([0] + ends[:-1], ends))
    start, _ = ranges[process_index]
    ds, _ = source.stream(process_index=process_index, process_count=process_count,
                          shuffle_seed=None)

  def make(count, example):
    raw, label = example
    return _eval_example(eval_views(raw, True, views, spec), label, count + start)

  return ranges, ds.enumerate().map(make, num_parallel_calls=tf.data.AUTOTUNE,
                                    deterministic=True)


def _eval_example(images, label, index) -> Batch:
  return {"images": images, "label": tf.cast(label, tf.int32),
          "mask": tf.constant(True), "index": tf.cast(index, tf.int64)}


def _padding_example(views: Mapping[str, int]) -> Batch:
  images = {name: tf.zeros([res, res, 3], tf.float32)
            for name, res in views.items()}
  return {"images": images, "label": tf.constant(0, tf.int32),
          "mask": tf.constant(False), "index": tf.constant(-1, tf.int64)}


# ---------------------------------------------------------------------------
# Device side: global jax.Arrays, prefetched.


def _host_batches(ds: tf.data.Dataset, source: DataSource) -> Iterator[Batch]:
  """Numpy batches without 'index'; TF read/decode errors become UserErrors."""
  iterator = ds.as_numpy_iterator()
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      # Drop TF's '{{function_node ...}}' noise; keep the decoder's own words.
      reason = re.sub(r"\{\{[^}]*\}\}", "", e.message or "").strip()
      reason = (reason.splitlines() or [type(e).__name__])[0]
      # ... and tf.data's 'Error in user-defined function ... Iterator::...: '.
      reason = re.sub(r"^Error in user-defined function .*? with iterator: \S+: ", "",
                      reason)
      reason = re.sub(r"^ValueError: ", "", reason)
      raise UserError(f"reading {source.name} failed: {reason}; {source.repair}") from e
    batch.pop("index", None)
    yield batch


def _to_global(batch: Batch, sharding: jax.sharding.Sharding) -> Batch:
  """Assembles each host's slice into global arrays sharded over the batch."""
  count = jax.process_count()

  def put(local):
    global_shape = (local.shape[0] * count,) + local.shape[1:]
    return jax.make_array_from_process_local_data(sharding, local, global_shape)

  return jax.tree.map(put, batch)


def _prefetch_to_device(batches: Iterable[Batch], put: Callable[[Batch], Batch],
                        size: int = _DEVICE_PREFETCH) -> Iterator[Batch]:
  """Keeps `size` batches already transferred ahead of the consumer."""
  queue = collections.deque()
  for batch in batches:
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def make_train_iterator(source: DataSource, views: Mapping[str, int], *, seed: int,
                        start_step: int, sharding: jax.sharding.NamedSharding,
                        crops: str = "shared") -> Iterator[Batch]:
  """Endless global training batches, starting at `start_step`.

  Yields {'images': {view: float32 [B, r, r, 3] in [-1, 1]}, 'label': int32 [B]}
  as jax.Arrays sharded by `sharding` over the leading (batch) axis.
  """
  ds = train_dataset(source, views, seed=seed, start_step=start_step,
                     crops=crops, process_index=jax.process_index(),
                     process_count=jax.process_count())
  return _prefetch_to_device(_host_batches(ds, source),
                             lambda b: _to_global(b, sharding))


class EvalIterable:
  """Re-iterable eval batches; each `iter()` walks the whole split once.

  Batches are {'images': {view: float32 [B, r, r, 3]}, 'label': int32 [B],
  'mask': bool [B]}; padding examples (only in the last batches) have mask False.
  """

  def __init__(self, ds: tf.data.Dataset, source: DataSource,
               num_examples: int, num_batches: int, sharding: jax.sharding.Sharding):
    self._ds = ds
    self._sharding = sharding
    self.source = source
    self.num_examples = num_examples  # what one pass covers (max_examples)
    self.num_batches = num_batches

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[Batch]:
    return _prefetch_to_device(_host_batches(self._ds, self.source),
                               lambda b: _to_global(b, self._sharding))


def make_eval_iterator(source: DataSource, views: Mapping[str, int], *,
                       sharding: jax.sharding.NamedSharding) -> EvalIterable:
  """A re-iterable pass over an eval split (see `EvalIterable`)."""
  ds, num_examples, num_batches = eval_dataset(
      source, views, process_index=jax.process_index(),
      process_count=jax.process_count())
  return EvalIterable(ds, source, num_examples, num_batches, sharding)

