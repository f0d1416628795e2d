"""Function matching: the student matches the teacher(s) on the same mixed crops.

There is no label loss. With several teachers, either each teacher's distance is
summed (`ensemble='sum_kl'`: for KL this equals matching a probability-space
ensemble, up to the teacher count as a factor) or the teachers' logits are
averaged first (`'mean_logits'`, the paper's best 224px + 384px ImageNet student).
Evaluation compares the student with the same ensemble.
"""
import dataclasses

import jax.numpy as jnp

from funmatch.distill import losses
from funmatch.distill.objectives.base import Objective
from funmatch.errors import UserError


@dataclasses.dataclass(frozen=True)
class FunctionMatching(Objective):
  """`loss = distance(student_logits, teacher_logits)`; no labels used."""
  distance: str = "kl"            # kl | hard | l2 | euclidean | logsoftmax_euclidean
  temperature: float = 1.0        # for distance='kl'
  ensemble: str = "sum_kl"        # sum_kl | mean_logits (several teachers)
  label_smoothing: float = 0.0    # for distance='hard'

  def validate(self, global_batch: int) -> None:
    del global_batch
    where = "config.objective_args"
    if self.distance not in losses.DISTANCES:
      raise UserError(f"unknown {where}.distance '{self.distance}'; choose one of: "
                      f"{', '.join(losses.DISTANCES)}")
    if self.ensemble not in losses.ENSEMBLES:
      raise UserError(f"unknown {where}.ensemble '{self.ensemble}'; choose one of: "
                      f"{', '.join(losses.ENSEMBLES)}")
    if not self.temperature > 0:
      raise UserError(f"{where}.temperature must be > 0, got {self.temperature}")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise UserError(f"{where}.label_smoothing must be in [0, 1), "
                      f"got {self.label_smoothing}")

  def teacher_log_probs(self, teacher_logits):
    return losses.ensemble_log_probs(teacher_logits, self.ensemble)

  def _distance(self, student_logits, teacher_logits):
    if self.distance == "kl":
      return losses.kl(student_logits, teacher_logits, self.temperature)
    if self.distance == "hard":
      return losses.hard(student_logits, teacher_logits, self.label_smoothing)
    return losses.DISTANCES[self.distance](student_logits, teacher_logits)

  def __call__(self, aux_params, student_out, teacher_outs, batch, rng):
    del aux_params, batch, rng
    student_logits, _ = student_out
    teacher_logits = {name: out[0] for name, out in teacher_outs.items()}
    metrics = {"student_entropy": losses.entropy(student_logits)}
    if self.ensemble == "mean_logits" and len(teacher_logits) > 1:
      mean_logits = jnp.mean(jnp.stack(list(teacher_logits.values())), 0)
      metrics["teacher_entropy"] = losses.entropy(mean_logits)
      return self._distance(student_logits, mean_logits), metrics
    per_teacher = {name: self._distance(student_logits, logits)
                   for name, logits in teacher_logits.items()}
    for name, logits in teacher_logits.items():
      suffix = "" if len(teacher_logits) == 1 else f"_{name}"
      metrics[f"teacher_entropy{suffix}"] = losses.entropy(logits)
      if suffix:
        metrics[f"loss{suffix}"] = per_teacher[name]
    return sum(per_teacher.values()), metrics
