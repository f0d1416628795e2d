"""The one objective contract: a frozen dataclass of settings plus hooks with defaults.

An objective is called inside the jitted step as
  `loss, metrics = objective(aux_params, student_out, teacher_outs, batch, rng)`
where `student_out` is the student's `(logits, taps)`, `teacher_outs` maps each
teacher name to its `(logits, taps)` (computed frozen, without gradient) and
`batch` holds `label` (int [B]), `label_probs` (the labels mixed like the images,
[B, C]) and `objective_state`.

Its settings are the dataclass fields, read from `config.objective_args` (and only
from there) by `from_config`; `config_util.set_objective` writes them out with
their defaults. The hooks below have defaults, so an objective overrides only what
it needs. In the hooks, `student_out` / `teacher_outs` are shapes
(jax.ShapeDtypeStruct leaves of the models' outputs), known before any step runs.
"""
import dataclasses
from typing import Any, ClassVar

import jax
import ml_collections

from funmatch.distill import losses
from funmatch.errors import UserError


@dataclasses.dataclass(frozen=True)
class Objective:
  """Base class of every objective (see the module docstring)."""
  needs_teachers: ClassVar[bool] = True
  # 'classification' (accuracy, agreement, KL) or 'linear_probe' (also a linear probe
  # of the frozen student features, funmatch/train/probe.py).
  evaluation: ClassVar[str] = "classification"

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Objective":
    """The objective with its settings from config.objective_args, validated."""
    objective = cls(**settings(cls, config))
    objective.validate(int(config.input.batch_size))
    return objective

  def validate(self, global_batch: int) -> None:
    """Raises UserError for settings out of range (the run's global batch given)."""

  def check_models(self, student_out, teacher_outs) -> None:
    """Raises UserError for models whose outputs or taps the method cannot use."""

  def init_aux(self, rng: jax.Array, student_out, teacher_outs) -> Any:
    """The objective's trainable, training-only params (never exported)."""
    del rng, student_out, teacher_outs
    return {}

  def init_state(self, rng: jax.Array, student_out, teacher_outs) -> Any:
    """Non-trainable state kept in the train state (checkpointed), e.g. a queue."""
    del rng, student_out, teacher_outs
    return {}

  def next_state(self, objective_state, teacher_outs) -> Any:
    """The state after a step (inside the jitted step)."""
    del teacher_outs
    return objective_state

  def teacher_log_probs(self, teacher_logits: dict[str, jax.Array]) -> jax.Array:
    """What evaluation compares the student with: log-probs [B, C] of the teachers."""
    return losses.ensemble_log_probs(teacher_logits, "mean_logits")

  @property
  def probe_tap(self) -> str:
    """The student tap a linear-probe evaluation reads."""
    return "pre_logits"

  def __call__(self, aux_params, student_out, teacher_outs, batch, rng):
    raise NotImplementedError


def settings(cls: type, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`config.objective_args` checked against the fields of objective class `cls`.

  A key no field reads is an error: a setting must never be silently ignored.
  """
  args = dict(config.objective_args)
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


def single_teacher(teacher_outs, method: str):
  """The `(logits, taps)` of the one teacher `method` distils from."""
  if len(teacher_outs) != 1:
    raise UserError(f"config.objective='{method}' distils from exactly one teacher but "
                    f"config.teachers names {len(teacher_outs)} ({', '.join(teacher_outs)}); "
                    "set config.teachers=('teacher',)")
  return next(iter(teacher_outs.values()))


def target_labels(batch) -> jax.Array:
  """The target class of each example: the argmax of the mixed label."""
  return jax.numpy.argmax(batch["label_probs"], -1)
