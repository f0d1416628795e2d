"""Metric writers: metrics.jsonl, TensorBoard (through clu) and the console.

Only process 0 writes. clu's TensorBoard writer needs tensorflow; where it is
missing (e.g. a GPU machine with JAX only) metrics still go to metrics.jsonl.
"""
import json
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"


def _to_python(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.size == 1 else value.tolist()


class MetricsWriter:
  """Appends one JSON object per written step; mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    self._jsonl = None
    self._tensorboard = None
    if not self._enabled:
      return
    path = os.path.join(workdir, METRICS_FILE)
    # A run killed mid-write may leave a partial last line: start on a new one.
    torn = os.path.exists(path) and os.path.getsize(path) > 0 and _last_byte(path) != b"\n"
    self._jsonl = open(path, "a", buffering=1)
    if torn:
      self._jsonl.write("\n")
    try:
      from clu import metric_writers  # pylint: disable=import-outside-toplevel
      self._tensorboard = metric_writers.SummaryWriter(workdir)
    except Exception as e:  # pylint: disable=broad-except
      logging.info("TensorBoard writer unavailable (%s); writing metrics.jsonl only", e)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self._enabled:
      return
    row = {"step": int(step), **{k: _to_python(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    if self._tensorboard is not None:
      self._tensorboard.write_scalars(int(step), {
          k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))})

  def flush(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.flush()
    if self._jsonl is not None:
      self._jsonl.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
    if self._jsonl is not None:
      self._jsonl.close()


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
