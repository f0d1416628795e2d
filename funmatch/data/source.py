"""The DataSource: one configured split, described and opened once per run.

`sources.open_source(cfg, where)` makes one from an input config section; the
pipeline and the evaluator read examples through it and never look at how the
source is stored. Two families, one interface each:

  * `IndexedSource` (random access): example i is addressable by index, which
    makes training batches a pure function of (seed, step) and resumes exact.
    `examples(stream)` maps a stream of (key, index) to (key, index, raw, label).
    `ArraySource` holds its values in host memory (digits, folders, TFDS with
    cache_raw); `tfds_source.ArrayRecordSource` reads ArrayRecord files.
  * `tfds_source.StreamedSource`: TFDS TFRecords read in sequence (no exact
    resume): `stream(...)` gives a host's part, `host_sizes(...)` their sizes.

`random_access` tells the pipeline which family it holds.
"""

from typing import Any, Callable, Optional

import numpy as np
import tensorflow as tf

# How examples are read. Every mode but 'streaming' reads by index, which is
# what makes resume exact.
ACCESS_MODES = ("memory", "files", "array_record", "streaming")
KINDS = ("digits", "tfds", "folder")


class DataSource:
  """What the trainer knows about a split before reading it, and how to read it.

  `config` is the section it was opened from: the pipeline takes the batch
  size and the preprocessing from it.
  """

  encoded = True  # raw examples are JPEG/PNG bytes (False: uint8 pixels)

  def __init__(self, *, config: Any, where: str, kind: str, name: str,
               num_examples: int, num_classes: int,
               class_names: Optional[tuple[str, ...]], access: str,
               repair: str = "fix or remove the bad file", note: str = ""):
    assert kind in KINDS and access in ACCESS_MODES, (kind, access)
    self.config = config
    self.where = where  # the config path named in messages: 'input', 'evals.val'
    self.kind = kind
    self.name = name  # human-readable, used in messages: 'digits[train]', a root
    self.num_examples = num_examples
    self.num_classes = num_classes
    self.class_names = class_names
    self.access = access
    self.repair = repair  # what to do when a read fails
    self.note = note  # streaming: how to get exact resume

  @property
  def random_access(self) -> bool:
    """True: read by index, the training order resumes exactly."""
    return self.access != "streaming"

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({self.where}: {self.name}, "
            f"{self.num_examples} examples, {self.access})")


class IndexedSource(DataSource):
  """A source read by index (see the module docstring)."""

  def examples(self, stream: tf.data.Dataset) -> tf.data.Dataset:
    """(key, index) -> (key, index, raw example, int32 label), in stream order."""
    raise NotImplementedError


class ArraySource(IndexedSource):
  """All examples of a split in host memory, addressable by index.

  `holds` says what `values[i]` is: 'pixels' (uint8 [S, S, 3]), 'encoded'
  (JPEG/PNG bytes) or 'paths' (a file to read and decode). `load` gives
  (values, labels) on first use, so opening a source never reads its examples.
  """

  def __init__(self, holds: str, load: Callable[[], tuple[np.ndarray, np.ndarray]],
               **description):
    super().__init__(**description)
    assert holds in ("pixels", "encoded", "paths"), holds
    self.holds = holds
    self.encoded = holds != "pixels"
    self._arrays = _Once(load)

  @property
  def values(self) -> np.ndarray:
    return self._arrays()[0]

  @property
  def labels(self) -> np.ndarray:
    """int32 [N]."""
    return self._arrays()[1]

  def examples(self, stream: tf.data.Dataset) -> tf.data.Dataset:
    values = tf.constant(self.values)
    labels = tf.constant(self.labels, tf.int32)
    read_files = self.holds == "paths"

    def lookup(key, index):
      raw = tf.gather(values, index)
      if read_files:
        raw = tf.io.read_file(raw)
      return key, index, raw, tf.gather(labels, index)

    return stream.map(lookup, num_parallel_calls=tf.data.AUTOTUNE,
                      deterministic=True)


class _Once:
  """Calls `load` on first use and keeps what it returned."""

  def __init__(self, load: Callable[[], Any]):
    self._load, self._value = load, None

  def __call__(self) -> Any:
    if self._load is not None:
      self._value, self._load = self._load(), None
    return self._value
