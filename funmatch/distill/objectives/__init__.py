"""Training objectives: one per method, one interface.

An objective is called inside the jitted step as
  `loss, metrics = objective(aux_params, student_out, teacher_outs, batch, rng)`
where `student_out` is the student's `(logits, taps)`, `teacher_outs` maps each
teacher name to its `(logits, taps)` (computed frozen, without gradient) and
`batch` holds at least `label` (int [B]) and `label_probs` (the labels mixed the
same way as the images, [B, C]) and `objective_state`. `aux_params` are the
objective's own trainable, training-only parameters (empty for function
matching). Besides `__call__` and `from_config(config)`, an objective has:
  needs_teachers                           class attribute (bool)
  init_aux(rng, student_out, teacher_outs) -> aux_params (a pytree, maybe {})
and optionally:
  check_models(student_out, teacher_outs)  raises UserError for models whose taps
                                           the method cannot use
  init_state(student_out, teacher_outs)    -> objective_state (non-trainable,
                                           checkpointed, e.g. SEED's queue)
  next_state(objective_state, teacher_outs) -> the state after this step
Here `student_out` / `teacher_outs` are shapes (jax.ShapeDtypeStruct leaves of
the models' outputs on a batch of 2), known before any step runs.
Method-specific settings live in `config.objective_args`, filled with the
method's defaults by `config_util.set_objective(config, name)`.
"""
import dataclasses
import importlib
from typing import Any

import ml_collections

from funmatch.errors import UserError

# name -> "module:Class"; modules load on first use.
OBJECTIVES = {
    "function_matching": "funmatch.distill.objectives.function_matching:FunctionMatching",
    "supervised": "funmatch.distill.objectives.supervised:Supervised",
    "tinymim": "funmatch.distill.objectives.tinymim:TinyMIM",
    "vitkd": "funmatch.distill.objectives.vitkd:ViTKD",
    "nkd": "funmatch.distill.objectives.nkd:NKD",
    "seed": "funmatch.distill.objectives.seed:SEED",
    "ofakd": "funmatch.distill.objectives.ofakd:OFAKD",
}


def objective_class(name: str) -> type:
  if name not in OBJECTIVES:
    raise UserError(f"unknown config.objective '{name}'; "
                    f"choose one of: {', '.join(OBJECTIVES)}")
  module, cls = OBJECTIVES[name].split(":")
  return getattr(importlib.import_module(module), cls)


def default_args(name: str) -> dict[str, Any]:
  """The settings of objective `name` with their defaults (its dataclass fields)."""
  cls = objective_class(name)
  return {f.name: f.default for f in dataclasses.fields(cls)
          if f.default is not dataclasses.MISSING}


def args_of(cls: type, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`config.objective_args` checked against the fields of objective class `cls`."""
  args = dict(config.get("objective_args", None) or {})
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(args) - known)
  if unknown:
    raise UserError(f"config.objective_args has unknown key(s) {', '.join(unknown)} for "
                    f"objective '{config.objective}'; valid keys: {', '.join(sorted(known))}")
  return {k: (tuple(v) if isinstance(v, list) else v) for k, v in args.items()}


def check_settings(objective, positive: tuple[str, ...] = (),
                   non_negative: tuple[str, ...] = ()) -> None:
  """One-line errors for settings outside their range (NaN fails both checks)."""
  for names, ok, bound in ((positive, lambda v: v > 0, "> 0"),
                           (non_negative, lambda v: v >= 0, ">= 0")):
    for name in names:
      value = getattr(objective, name)
      if not ok(value):
        raise UserError(f"config.objective_args.{name} must be {bound}, got {value}")


def make_objective(config: ml_collections.ConfigDict):
  """Builds the objective named by `config.objective` from its config fields."""
  return objective_class(config.objective).from_config(config)
