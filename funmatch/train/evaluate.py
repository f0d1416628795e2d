"""Evaluation: accuracy, teacher agreement and KL over eval splits (or their first N).

Each eval set has its own cadence and size, so a long run can check a quick
minival often and the full test set rarely: `config.evals.<name>.every_steps`
(0: `config.eval_every_steps`) and `.max_examples` (the split's first N, 0: all).
Every set is evaluated at the last step. Each call reports its wall time per set
(`<eval>/seconds`): what a periodic eval costs the run.

An objective whose `evaluation` is 'linear_probe' (SEED) also gets the linear
probe of the frozen student features (funmatch/train/probe.py) in every
evaluation: `<eval>/linear_probe_top1` at the end of training, at periodic evals
and in funmatch-eval.
"""
import json
import logging
import time
from typing import Any, Mapping, Sequence

import jax

from funmatch import fileio, parallel
from funmatch.errors import UserError
from funmatch.train import step as step_lib


def _count_setting(eval_config, name: str, key: str, meaning: str) -> int:
  value = eval_config.get(key, 0)
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise UserError(f"config.evals.{name}.{key}={value!r} must be an integer >= 0 "
                    f"({meaning})")
  return value


def check_settings(config) -> None:
  """UserError for a bad every_steps / max_examples of any eval set (no I/O)."""
  for name, eval_config in config.evals.items():
    eval_every_steps(config, name)
    _count_setting(eval_config, name, "max_examples", "0: the whole split")


def eval_every_steps(config, name: str) -> int:
  """The cadence of eval set `name`: its own every_steps, else the global one."""
  own = _count_setting(config.evals[name], name, "every_steps",
                       "0: every config.eval_every_steps")
  return own or int(config.eval_every_steps)


def make_eval_sets(run) -> dict[str, Any]:
  """One re-iterable eval pipeline per entry of config.evals, over the splits the
  run opened (run.data.eval_sources)."""
  from funmatch.data import pipeline  # pylint: disable=import-outside-toplevel
  sharding = parallel.batch_sharding(run.mesh)
  return {name: pipeline.make_eval_iterator(run.data.eval_sources[name], run.plan.views,
                                            sharding=sharding)
          for name in run.config.evals}


class Evaluator:
  """Evaluates student params on the run's eval sets: `evaluator(params) -> results`."""

  def __init__(self, run):
    self.sets = make_eval_sets(run)
    self.every = {name: eval_every_steps(run.config, name) for name in self.sets}
    self._teacher_params = run.teacher_params
    self._step = jax.jit(step_lib.make_eval_step(run.student, run.teachers,
                                                 run.objective.teacher_log_probs))
    self._probe = None
    if run.objective.evaluation == "linear_probe":
      from funmatch.train import probe  # pylint: disable=import-outside-toplevel
      self._probe = probe.LinearProbe(run.student, run.config, run.plan.views["student"],
                                      run.mesh, run.num_classes,
                                      tap=run.objective.probe_tap)

  def due(self, step: int, total_steps: int) -> list[str]:
    """The sets to evaluate after `step`: those whose cadence divides it; all at the end."""
    return [name for name, every in self.every.items()
            if step == total_steps or (every > 0 and step % every == 0)]

  def __call__(self, params, names: Sequence[str] | None = None) -> dict[str, float]:
    """Runs the eval sets `names` (default: all) once; flat `<eval_name>/<metric>`."""
    sets = {name: self.sets[name] for name in (self.sets if names is None else names)}
    results = {}
    for name, batches in sets.items():
      started = time.perf_counter()
      totals = None
      for batch in batches:
        sums = self._step(params, self._teacher_params, batch)
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
      if totals is None:
        continue
      totals = jax.device_get(totals)  # waits for the device: the time below is real
      count = float(totals.pop("count"))
      for metric, value in totals.items():
        results[f"{name}/{metric}"] = float(value) / max(count, 1.0)
      results[f"{name}/examples"] = int(count)
      results[f"{name}/seconds"] = time.perf_counter() - started
    if self._probe is not None and sets:
      started = time.perf_counter()
      results.update(self._probe(params, sets))
      results["linear_probe/seconds"] = time.perf_counter() - started
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
