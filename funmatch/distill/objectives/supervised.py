"""Supervised training on labels (teacher fine-tuning and label-only baselines)."""
import dataclasses

import jax.numpy as jnp
import ml_collections
import optax

from funmatch.distill.objectives.function_matching import entropy
from funmatch.errors import UserError


@dataclasses.dataclass(frozen=True)
class Supervised:
  """Softmax cross-entropy on the (mixed, optionally smoothed) labels."""
  label_smoothing: float = 0.0
  needs_teachers = False

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Supervised":
    smoothing = float(config.get("label_smoothing", 0.0))
    if not 0.0 <= smoothing < 1.0:
      raise UserError(f"config.label_smoothing must be in [0, 1), got {smoothing}")
    return cls(label_smoothing=smoothing)

  def init_aux(self, rng, student_out, teacher_outs):
    del rng, student_out, teacher_outs
    return {}

  def __call__(self, aux_params, student_out, teacher_outs, batch, rng):
    del aux_params, teacher_outs, rng
    logits, _ = student_out
    targets = batch["label_probs"]
    if self.label_smoothing:
      targets = optax.smooth_labels(targets, self.label_smoothing)
    loss = jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))
    return loss, {"student_entropy": entropy(logits)}
