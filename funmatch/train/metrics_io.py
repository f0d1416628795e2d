"""Metric writers: one clu MultiWriter of metrics.jsonl and TensorBoard (process 0).

clu has no JSON-lines writer, so `JsonlWriter` is one (a MetricWriter, scalars
only): one JSON object per `write_scalars` call, the file funmatch's tools and
tests read. clu's TensorBoard writer needs tensorflow; where it is missing (e.g. a
GPU machine with JAX only) metrics still go to metrics.jsonl.

Both write through funmatch.fileio, so the workdir may be on gs://. The loop
calls `flush()` at log steps: locally that is a cheap flush; on object storage
metrics.jsonl is re-uploaded whole (one atomic PUT, readers never see a torn
line) and TensorBoard's event files, which TensorFlow writes to a local staging
directory, are uploaded beside it (`StagedEventFiles`). TensorFlow's own GCS
filesystem is not used: it would be a second path layer with its own
credentials, and no emulator can stand in for it in tests. A run that has lost
its workdir's lease (funmatch/lease.py) publishes nothing more: its uploads would
replace the new holder's files.
"""
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Mapping

import jax
import numpy as np
from clu.metric_writers import interface, multi_writer

from funmatch import fileio

METRICS_FILE = "metrics.jsonl"
EVENTS_PREFIX = "events.out.tfevents"
# A staged event file is re-uploaded whole at every flush; past this size the
# writer starts a new file (TensorBoard reads all of a directory's event files),
# so a flush costs at most this much upload however long the run.
EVENT_FILE_ROLL_BYTES = 4 << 20


def _to_python(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.size == 1 else value.tolist()


class _ScalarsOnly(interface.MetricWriter):
  """Drops everything but scalars (metrics.jsonl holds numbers only)."""

  def write_summaries(self, step, values, metadata=None):
    pass

  write_images = write_videos = write_texts = write_summaries

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass


def _always() -> bool:
  return True


class JsonlWriter(_ScalarsOnly):
  """Appends `{"step": N, name: value, ...}` lines to WORKDIR/metrics.jsonl.

  `may_publish()` False (the lease is lost) drops what was not published yet.
  """

  def __init__(self, workdir: str, may_publish: Callable[[], bool] = _always):
    self._may_publish = may_publish
    path = fileio.join(workdir, METRICS_FILE)
    # A run killed mid-write may leave a partial last line (local disks; uploads
    # to object storage are whole): start on a new one.
    torn = (fileio.exists(path) and fileio.getsize(path) > 0
            and _last_byte(path) != b"\n")
    self._file = fileio.open(path, "a", buffering=1)  # line-buffered locally
    if torn:
      self._file.write("\n")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step), **{k: _to_python(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(row) + "\n")

  def flush(self):
    if self._may_publish():
      self._file.flush()

  def close(self):
    if self._may_publish() or not hasattr(self._file, "discard"):
      self._file.close()
    else:
      self._file.discard()


class StagedEventFiles(interface.MetricWriter):
  """clu's TensorBoard writer into a local directory, published to a URL at flush.

  Each flush uploads the event files that grew since the last one (whole: one
  atomic upload each); a file past EVENT_FILE_ROLL_BYTES is finished and a new
  one started, which bounds the cost of a flush.
  """

  def __init__(self, workdir: str, may_publish: Callable[[], bool] = _always):
    from clu.metric_writers import summary_writer  # pylint: disable=import-outside-toplevel
    self._make = summary_writer.SummaryWriter
    self._may_publish = may_publish
    self._workdir = workdir
    self._staging = tempfile.mkdtemp(prefix="funmatch-events-")
    self._uploaded: dict[str, int] = {}
    self._writer = self._make(self._staging)

  def write_summaries(self, step, values, metadata=None):
    self._writer.write_summaries(step, values, metadata)

  def write_scalars(self, step, scalars):
    self._writer.write_scalars(step, scalars)

  def write_images(self, step, images):
    self._writer.write_images(step, images)

  def write_videos(self, step, videos):
    self._writer.write_videos(step, videos)

  def write_audios(self, step, audios, *, sample_rate):
    self._writer.write_audios(step, audios, sample_rate=sample_rate)

  def write_texts(self, step, texts):
    self._writer.write_texts(step, texts)

  def write_histograms(self, step, arrays, num_buckets=None):
    self._writer.write_histograms(step, arrays, num_buckets)

  def write_hparams(self, hparams):
    self._writer.write_hparams(hparams)

  def flush(self):
    self._writer.flush()
    if not self._may_publish():
      return
    rolled = False
    for name in sorted(os.listdir(self._staging)):
      local = os.path.join(self._staging, name)
      size = os.path.getsize(local)
      if size != self._uploaded.get(name):
        fileio.upload_file(local, fileio.join(self._workdir, name))
        self._uploaded[name] = size
      if size > EVENT_FILE_ROLL_BYTES:
        os.remove(local)  # published whole; its successor starts below
        rolled = True
    if rolled:
      self._writer.close()
      self._writer = self._make(self._staging)

  def close(self):
    try:
      self.flush()
      self._writer.close()
      self.flush()  # whatever close() wrote
    finally:
      shutil.rmtree(self._staging, ignore_errors=True)


def make_writer(workdir: str, hold: Any = None) -> interface.MetricWriter:
  """metrics.jsonl + TensorBoard on process 0; a writer that drops everything elsewhere.

  `hold` is the workdir's lease (funmatch.lease); once it is lost, nothing more
  is published.
  """
  if jax.process_index() != 0:
    return multi_writer.MultiWriter([])
  may_publish = lambda: not getattr(hold, "lost", None)
  writers = [JsonlWriter(workdir, may_publish)]
  try:
    if fileio.is_remote(workdir):
      writers.append(StagedEventFiles(workdir, may_publish))
    else:
      from clu.metric_writers import summary_writer  # pylint: disable=import-outside-toplevel
      writers.append(summary_writer.SummaryWriter(workdir))
  except ImportError as e:
    logging.info("TensorBoard writer unavailable (%s); writing metrics.jsonl only", e)
  return multi_writer.MultiWriter(writers)


def _last_byte(path: str) -> bytes:
  with fileio.open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All rows of WORKDIR/metrics.jsonl (for plots and tests); skips torn lines."""
  rows = []
  for line in fileio.read_text(fileio.join(workdir, METRICS_FILE)).splitlines():
    try:
      rows.append(json.loads(line))
    except ValueError:
      continue  # blank, or cut short by a killed run
  return rows
