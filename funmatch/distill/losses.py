"""Losses shared by the objectives, each written once.

Distances between student and teacher logits (`DISTANCES`, function matching's
`config.objective_args.distance`) take `(student_logits, teacher_logits)` of shape
[B, C] and return a scalar averaged over the batch; the teacher side is a constant
(stop_gradient). Then cross-entropy on (mixed) labels, entropy, and the
log-probabilities of a teachers' ensemble.
"""
from typing import Mapping

import jax
import jax.numpy as jnp
import optax


def kl(student_logits, teacher_logits, temperature: float = 1.0):
  """`T^2 * KL(softmax(t/T) || softmax(s/T))`, averaged over the batch.

  The T^2 factor keeps gradient magnitudes comparable across temperatures
  (Hinton et al.), as in the paper.
  """
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  log_p_teacher = jax.nn.log_softmax(t)
  log_p_student = jax.nn.log_softmax(s)
  per_example = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), -1)
  return temperature**2 * jnp.mean(per_example)


def hard(student_logits, teacher_logits, label_smoothing: float = 0.0):
  """Cross-entropy to the teacher's argmax, optionally label-smoothed.

  Smoothing follows big_vision's distillation: the argmax class gets 1 - ls and
  each of the other C - 1 classes ls / (C - 1) (not optax's ls / C on every class).
  """
  num_classes = teacher_logits.shape[-1]
  targets = jax.nn.one_hot(jnp.argmax(teacher_logits, -1), num_classes)
  if label_smoothing:
    targets = (targets * (1.0 - label_smoothing)
               + (1.0 - targets) * label_smoothing / (num_classes - 1))
  return jnp.mean(optax.softmax_cross_entropy(student_logits.astype(jnp.float32), targets))


def l2(student_logits, teacher_logits):
  """Mean over the batch of the squared Euclidean distance between logits."""
  diff = student_logits.astype(jnp.float32) - jax.lax.stop_gradient(teacher_logits)
  return jnp.mean(jnp.sum(diff**2, -1))


def euclidean(student_logits, teacher_logits):
  """Mean over the batch of the (unsquared) Euclidean distance between logits."""
  diff = student_logits.astype(jnp.float32) - jax.lax.stop_gradient(teacher_logits)
  return jnp.mean(jnp.sqrt(jnp.sum(diff**2, -1) + 1e-12))


def logsoftmax_euclidean(student_logits, teacher_logits):
  """Euclidean distance between log-probabilities (shift-invariant logits)."""
  return euclidean(jax.nn.log_softmax(student_logits.astype(jnp.float32)),
                   jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits)))


DISTANCES = {
    "kl": kl,
    "hard": hard,
    "l2": l2,
    "euclidean": euclidean,
    "logsoftmax_euclidean": logsoftmax_euclidean,
}


def cross_entropy(logits: jax.Array, label_probs: jax.Array) -> jax.Array:
  """Softmax cross-entropy on (mixed, maybe smoothed) label distributions, batch mean."""
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), label_probs))


def entropy(logits: jax.Array) -> jax.Array:
  """Mean entropy (nats) of softmax(logits) over the batch."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.mean(jnp.sum(jnp.exp(log_p) * log_p, -1))


ENSEMBLES = ("sum_kl", "mean_logits")


def ensemble_log_probs(teacher_logits: Mapping[str, jax.Array],
                       ensemble: str = "mean_logits") -> jax.Array:
  """Log-probabilities [B, C] of the teachers' ensemble at T=1.

  'mean_logits': softmax of the mean logits; 'sum_kl': the mean of the teachers'
  probabilities (what a sum of KLs trains the student towards).
  """
  stacked = jnp.stack([logits.astype(jnp.float32) for logits in teacher_logits.values()])
  if ensemble == "sum_kl":
    return (jax.scipy.special.logsumexp(jax.nn.log_softmax(stacked), axis=0)
            - jnp.log(float(stacked.shape[0])))
  return jax.nn.log_softmax(jnp.mean(stacked, 0))
