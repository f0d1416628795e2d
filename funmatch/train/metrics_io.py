"""Metric writers: one clu MultiWriter of metrics.jsonl and TensorBoard (process 0).

clu has no JSON-lines writer, so `JsonlWriter` is one (a MetricWriter, scalars
only): one JSON object per `write_scalars` call, the file funmatch's tools and
tests read. clu's TensorBoard writer needs tensorflow; where it is missing (e.g. a
GPU machine with JAX only) metrics still go to metrics.jsonl.
"""
import json
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
from clu.metric_writers import interface, multi_writer

METRICS_FILE = "metrics.jsonl"


def _to_python(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.size == 1 else value.tolist()


class JsonlWriter(interface.MetricWriter):
  """Appends `{"step": N, name: value, ...}` lines to WORKDIR/metrics.jsonl."""

  def __init__(self, workdir: str):
    path = os.path.join(workdir, METRICS_FILE)
    # A run killed mid-write may leave a partial last line: start on a new one.
    torn = os.path.exists(path) and os.path.getsize(path) > 0 and _last_byte(path) != b"\n"
    self._file = open(path, "a", buffering=1)  # pylint: disable=consider-using-with
    if torn:
      self._file.write("\n")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step), **{k: _to_python(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(row) + "\n")

  def write_summaries(self, step, values, metadata=None):
    pass  # only scalars go to metrics.jsonl

  write_images = write_videos = write_texts = write_summaries

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def make_writer(workdir: str) -> interface.MetricWriter:
  """metrics.jsonl + TensorBoard on process 0; a writer that drops everything elsewhere."""
  if jax.process_index() != 0:
    return multi_writer.MultiWriter([])
  writers = [JsonlWriter(workdir)]
  try:
    from clu.metric_writers import summary_writer  # pylint: disable=import-outside-toplevel
    writers.append(summary_writer.SummaryWriter(workdir))
  except Exception as e:  # pylint: disable=broad-except
    logging.info("TensorBoard writer unavailable (%s); writing metrics.jsonl only", e)
  return multi_writer.MultiWriter(writers)


def _last_byte(path: str) -> bytes:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All rows of WORKDIR/metrics.jsonl (for plots and tests); skips torn lines."""
  path = os.path.join(workdir, METRICS_FILE)
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except ValueError:
        continue  # blank, or cut short by a killed run
  return rows
