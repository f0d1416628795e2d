"""NKD: normalized knowledge distillation (Yang et al. 2023), the logit loss the ViTKD
authors add on top of ViTKD.

With `t` the label (the argmax of the mixed label), `p = softmax(z)`:

  NKD = -mean_B[sg(p_T,t) * log p_S,t]                                  (target, T = 1)
        - gamma * T^2 * mean_B sum_{i != t} q_T,i * log q_S,i           (non-target)

where `q = softmax(z_not-t / T)` is a softmax over the non-target logits only, so
the non-target term does not depend on the target logit of either model. The
objective adds cross-entropy on the (mixed) labels: `ce_weight * CE + NKD`.
Works with any teacher/student pair (only logits are used).
"""
import dataclasses

import jax
import jax.numpy as jnp

from funmatch.distill import losses
from funmatch.distill.objectives.base import (Objective, check_settings, single_teacher,
                                              target_labels)
from funmatch.errors import UserError

# Stands in for the excluded target logit: exp() of it is exactly 0 in float32,
# while log-softmax stays finite (no 0 * -inf = nan).
_EXCLUDED = -1e9


def nkd_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
             temperature: float = 1.0, gamma: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """The NKD loss, returned as (target term, non-target term); their sum is NKD.

  student_logits, teacher_logits: [B, C]; labels: int [B] (the target class t).
  The teacher side is a constant (stop_gradient).
  """
  student = student_logits.astype(jnp.float32)
  teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  is_target = jax.nn.one_hot(labels, student.shape[-1], dtype=jnp.bool_)
  # Target term at T = 1 over all classes.
  p_teacher_target = jnp.sum(jnp.where(is_target, jax.nn.softmax(teacher), 0.0), -1)
  log_p_student_target = jnp.sum(jnp.where(is_target, jax.nn.log_softmax(student), 0.0), -1)
  target_term = -jnp.mean(p_teacher_target * log_p_student_target)
  # Non-target term: softmax over the C - 1 non-target logits at temperature T.
  q_teacher = jax.nn.softmax(jnp.where(is_target, _EXCLUDED, teacher / temperature))
  log_q_student = jax.nn.log_softmax(jnp.where(is_target, _EXCLUDED, student / temperature))
  non_target = jnp.sum(jnp.where(is_target, 0.0, q_teacher * log_q_student), -1)
  non_target_term = -gamma * temperature**2 * jnp.mean(non_target)
  return target_term, non_target_term


@dataclasses.dataclass(frozen=True)
class NKD(Objective):
  """`ce_weight * CE(labels) + NKD(student, teacher)`; NKD's defaults are DeiT's."""
  temperature: float = 1.0
  gamma: float = 1.0
  ce_weight: float = 1.0

  def validate(self, global_batch: int) -> None:
    del global_batch
    check_settings(self, positive=("temperature",), non_negative=("gamma", "ce_weight"))

  def check_models(self, student_out, teacher_outs) -> None:
    teacher_logits, _ = single_teacher(teacher_outs, "nkd")
    if teacher_logits.shape[-1] != student_out[0].shape[-1]:
      raise UserError(f"the teacher has {teacher_logits.shape[-1]} classes but the student "
                      f"{student_out[0].shape[-1]}; NKD needs the same classes")

  def __call__(self, aux_params, student_out, teacher_outs, batch, rng):
    del aux_params, rng
    student_logits, _ = student_out
    teacher_logits, _ = single_teacher(teacher_outs, "nkd")
    ce = losses.cross_entropy(student_logits, batch["label_probs"])
    target_term, non_target_term = nkd_loss(student_logits, teacher_logits,
                                            target_labels(batch), self.temperature,
                                            self.gamma)
    nkd = target_term + non_target_term
    metrics = {"ce": ce, "nkd": nkd, "nkd_target": target_term,
               "nkd_non_target": non_target_term,
               "student_entropy": losses.entropy(student_logits),
               "teacher_entropy": losses.entropy(teacher_logits)}
    return self.ce_weight * ce + nkd, metrics
