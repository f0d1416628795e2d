"""Function matching: the student matches the teacher(s) on the same mixed crops.

There is no label loss. With several teachers, either each teacher's distance is
summed (for KL this equals matching a probability-space ensemble, up to the
teacher count as a factor) or the teachers' logits are averaged first (the
paper's best 224px + 384px ImageNet student).
"""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from funmatch.distill import distances
from funmatch.errors import UserError

ENSEMBLES = ("sum_kl", "mean_logits")


def entropy(logits: jax.Array) -> jax.Array:
  """Mean entropy (nats) of softmax(logits) over the batch."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.mean(jnp.sum(jnp.exp(log_p) * log_p, -1))


@dataclasses.dataclass(frozen=True)
class FunctionMatching:
  """`loss = distance(student_logits, teacher_logits)`; no labels used."""
  distance: str = "kl"
  temperature: float = 1.0
  ensemble: str = "sum_kl"
  label_smoothing: float = 0.0  # only for distance='hard'
  needs_teachers = True

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "FunctionMatching":
    objective = cls(distance=config.get("distance", "kl"),
                    temperature=float(config.get("temperature", 1.0)),
                    ensemble=config.get("ensemble", "sum_kl"),
                    label_smoothing=float(config.get("label_smoothing", 0.0)))
    objective.validate()
    return objective

  def validate(self) -> None:
    if self.distance not in distances.DISTANCES:
      raise UserError(f"unknown config.distance '{self.distance}'; choose one of: "
                      f"{', '.join(distances.DISTANCES)}")
    if self.ensemble not in ENSEMBLES:
      raise UserError(f"unknown config.ensemble '{self.ensemble}'; choose one of: "
                      f"{', '.join(ENSEMBLES)}")
    if not self.temperature > 0:
      raise UserError(f"config.temperature must be > 0, got {self.temperature}")

  def init_aux(self, rng, student_out, teacher_outs):
    del rng, student_out, teacher_outs
    return {}

  def _distance(self, student_logits, teacher_logits):
    if self.distance == "kl":
      return distances.kl(student_logits, teacher_logits, self.temperature)
    if self.distance == "hard":
      return distances.hard(student_logits, teacher_logits, self.label_smoothing)
    return distances.DISTANCES[self.distance](student_logits, teacher_logits)

  def __call__(self, aux_params, student_out, teacher_outs, batch, rng):
    del aux_params, batch, rng
    student_logits, _ = student_out
    teacher_logits = {name: out[0] for name, out in teacher_outs.items()}
    metrics = {"student_entropy": entropy(student_logits)}
    if self.ensemble == "mean_logits" and len(teacher_logits) > 1:
      mean_logits = jnp.mean(jnp.stack(list(teacher_logits.values())), 0)
      loss = self._distance(student_logits, mean_logits)
      metrics["teacher_entropy"] = entropy(mean_logits)
      return loss, metrics
    per_teacher = {name: self._distance(student_logits, logits)
                   for name, logits in teacher_logits.items()}
    for name, logits in teacher_logits.items():
      suffix = "" if len(teacher_logits) == 1 else f"_{name}"
      metrics[f"teacher_entropy{suffix}"] = entropy(logits)
      if suffix:
        metrics[f"loss{suffix}"] = per_teacher[name]
    return sum(per_teacher.values()), metrics
