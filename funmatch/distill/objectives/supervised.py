"""Supervised training on labels (teacher fine-tuning and label-only baselines)."""
import dataclasses

import optax

from funmatch.distill import losses
from funmatch.distill.objectives.base import Objective
from funmatch.errors import UserError


@dataclasses.dataclass(frozen=True)
class Supervised(Objective):
  """Softmax cross-entropy on the (mixed, optionally smoothed) labels."""
  label_smoothing: float = 0.0
  needs_teachers = False

  def validate(self, global_batch: int) -> None:
    del global_batch
    if not 0.0 <= self.label_smoothing < 1.0:
      raise UserError(f"config.objective_args.label_smoothing must be in [0, 1), "
                      f"got {self.label_smoothing}")

  def __call__(self, aux_params, student_out, teacher_outs, batch, rng):
    del aux_params, teacher_outs, rng
    logits, _ = student_out
    targets = batch["label_probs"]
    if self.label_smoothing:
      targets = optax.smooth_labels(targets, self.label_smoothing)
    return losses.cross_entropy(logits, targets), {"student_entropy": losses.entropy(logits)}
