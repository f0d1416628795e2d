"""Evaluation: accuracy, teacher agreement and KL over whole eval splits.

An objective whose `evaluation` is 'linear_probe' (SEED) also gets the linear
probe of the frozen student features (funmatch/train/probe.py) in every
evaluation: `<eval>/linear_probe_top1` at the end of training, at periodic evals
and in funmatch-eval.
"""
import json
import logging
from typing import Any, Mapping

import jax

from funmatch import fileio, parallel
from funmatch.train import step as step_lib


def make_eval_sets(run) -> dict[str, Any]:
  """One re-iterable eval pipeline per entry of config.evals."""
  from funmatch.data import pipeline  # pylint: disable=import-outside-toplevel
  sharding = parallel.batch_sharding(run.mesh)
  return {name: pipeline.make_eval_iterator(eval_config, run.plan.views, sharding=sharding,
                                            where=f"evals.{name}")
          for name, eval_config in run.config.evals.items()}


class Evaluator:
  """Evaluates student params on the run's eval sets: `evaluator(params) -> results`."""

  def __init__(self, run):
    self.sets = make_eval_sets(run)
    self._teacher_params = run.teacher_params
    self._step = jax.jit(step_lib.make_eval_step(run.student, run.teachers,
                                                 run.objective.teacher_log_probs))
    self._probe = None
    if run.objective.evaluation == "linear_probe":
      from funmatch.train import probe  # pylint: disable=import-outside-toplevel
      self._probe = probe.LinearProbe(run.student, run.config, run.plan.views["student"],
                                      run.mesh, run.num_classes,
                                      tap=run.objective.probe_tap)

  def __call__(self, params) -> dict[str, float]:
    """Runs every eval set once; returns flat `<eval_name>/<metric>` values."""
    results = {}
    for name, batches in self.sets.items():
      totals = None
      for batch in batches:
        sums = self._step(params, self._teacher_params, batch)
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
      if totals is None:
        continue
      totals = jax.device_get(totals)
      count = float(totals.pop("count"))
      for metric, value in totals.items():
        results[f"{name}/{metric}"] = float(value) / max(count, 1.0)
      results[f"{name}/examples"] = int(count)
    if self._probe is not None and self.sets:
      results.update(self._probe(params, self.sets))
    return results


def summary(results: Mapping[str, float]) -> str:
  """The top-1 figures of `results`, for a log line."""
  keys = [k for k in results if k.endswith(("student_top1", "teacher_top1", "agreement_top1"))]
  return ", ".join(f"{k}={results[k]:.4f}" for k in sorted(keys))


def format_table(results: Mapping[str, float]) -> str:
  """Results as an aligned two-column table, one metric per row."""
  width = max((len(k) for k in results), default=10)
  lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -------"]
  for key in sorted(results):
    value = results[key]
    text = f"{value:.4f}" if isinstance(value, float) else str(value)
    lines.append(f"{key:<{width}}  {text}")
  return "\n".join(lines)


def write_json(path: str, results: Mapping[str, Any]) -> None:
  """Writes `results` to `path` (a path or a gs:// URL) whole or not at all."""
  fileio.write_atomic(path, json.dumps(dict(results), indent=2, sort_keys=True))
  logging.info("wrote %s", path)
