"""Evaluation: accuracy, teacher agreement and KL over whole eval splits.

An objective whose `evaluation` attribute is 'linear_probe' (SEED) also gets the
linear probe of the frozen student features (funmatch/train/probe.py) in every
evaluation: `<eval>/linear_probe_top1` at the end of training, at periodic evals
and in funmatch-eval. The probe rides on the eval function, so the loop and the
CLI call `evaluate(make_eval_fn(run), ...)` as for any objective.
"""
import json
import logging
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np

from funmatch.train import step as step_lib


class EvalFn:
  """The jitted eval step of a run, plus its linear probe when the objective asks."""

  def __init__(self, step: Callable, probe: Callable | None = None):
    self.step = step
    self.probe = probe

  def __call__(self, params, teacher_params, batch):
    return self.step(params, teacher_params, batch)


def make_eval_fn(run) -> EvalFn:
  """A jitted eval step for the run's student and teachers (and the probe, if any)."""
  probe = None
  if getattr(run.objective, "evaluation", None) == "linear_probe":
    from funmatch.train import probe as probe_lib  # pylint: disable=import-outside-toplevel
    probe = probe_lib.LinearProbe(run.student, run.config, run.views["student"], run.mesh,
                                  run.num_classes,
                                  tap=getattr(run.objective, "probe_tap", "pre_logits"))
  ensemble = getattr(run.objective, "ensemble", "mean_logits")
  return EvalFn(jax.jit(step_lib.make_eval_step(run.student, run.teachers, ensemble)),
                probe)


def make_eval_sets(run) -> dict[str, Any]:
  """One re-iterable eval pipeline per entry of config.evals."""
  from funmatch import parallel  # pylint: disable=import-outside-toplevel
  from funmatch.data import pipeline  # pylint: disable=import-outside-toplevel
  sharding = parallel.batch_sharding(run.mesh)
  evals = {}
  for name, eval_config in run.config.get("evals", {}).items():
    eval_config = eval_config.copy_and_resolve_references()
    with eval_config.unlocked():
      eval_config.batch_size = int(eval_config.get("batch_size", run.config.input.batch_size))
    evals[name] = pipeline.make_eval_iterator(eval_config, run.views, sharding=sharding,
                                              where=f"evals.{name}")
  return evals


def evaluate(eval_fn: Callable, params, teacher_params,
             eval_sets: Mapping[str, Any]) -> dict[str, float]:
  """Runs every eval set once; returns flat `<eval_name>/<metric>` values."""
  results = {}
  for name, batches in eval_sets.items():
    totals = None
    for batch in batches:
      sums = eval_fn(params, teacher_params, batch)
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    if totals is None:
      continue
    totals = jax.device_get(totals)
    count = float(totals.pop("count"))
    for metric, value in totals.items():
      results[f"{name}/{metric}"] = float(value) / max(count, 1.0)
    results[f"{name}/examples"] = int(count)
  probe = getattr(eval_fn, "probe", None)
  if probe is not None and eval_sets:
    results.update(probe(params, eval_sets))
  return results


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
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(dict(results), f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  logging.info("wrote %s", path)
