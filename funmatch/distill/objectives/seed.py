"""SEED: self-supervised distillation with a queue of teacher embeddings (no labels).

Student and teacher see the same crop. With `s = normalize(head(student features))`,
`t = normalize(teacher embedding)` (frozen) and the queue `Q` [dim, K] of past
teacher embeddings:

  z_S = [s.t, s^T Q] / tau_S,   p_T = softmax([t.t, t^T Q] / tau_T)
  loss = -1/B sum_b sum_j p_T,j log softmax(z_S)_j

and after the step the batch's teacher embeddings replace the oldest K/B-th of the
queue (FIFO). The queue and its pointer are the objective state, so they live in
the train state: checkpointed, restored and kept on non-finite steps like the rest.

Embeddings. The student's embedding is its `student_tap` (default `pre_logits`)
through the training-only projection head Linear(d, d)-ReLU-Linear(d, dim) (aux
params, never exported; the linear probe evaluates the features before it). The
teacher here is a classifier, not a self-supervised model with its own 128-d head,
so its embedding is its `teacher_tap` (default `pre_logits`) passed through a FIXED
random Gaussian projection to `dim` (drawn once, in `init_state`, from the key the
trainer passes: PRNGKey(config.seed); kept in the objective state, never trained:
it plays the part of the frozen teacher's projection head; random projections keep
inner products up to O(1/sqrt(dim)), Johnson-Lindenstrauss). `dim=0` instead uses
the teacher's own width without any projection (exactly the paper's formula on the
raw features, at the cost of a [d_T, K] queue: 2048 x 65536 floats = 512 MiB for a
BiT-R50 teacher). A tap that is not [B, D] is pooled: [B, H, W, C] by the spatial
mean, ViT tokens [B, 1 + N, D] by their CLS token.

Evaluation is the linear probe on the frozen student features (`evaluation`, see
funmatch/train/probe.py): funmatch reports `<eval>/linear_probe_top1`.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from funmatch.distill.objectives.base import Objective, check_settings
from funmatch.errors import UserError

_PROJECTION_TAG = 0x5EED  # folded into init_state's key for the teacher projection
_QUEUE_TAG = 0x0EEE       # ... and for the initial queue


class ProjectionHead(nn.Module):
  """SEED's student head: Linear(d, d) - ReLU - Linear(d, dim)."""
  hidden: int
  dim: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
    return nn.Dense(self.dim, name="out")(x)


def pooled(features: jax.Array) -> jax.Array:
  """[B, D] features of a tap: spatial mean of [B,H,W,C], CLS token of [B,1+N,D]."""
  features = features.astype(jnp.float32)
  if features.ndim == 4:
    return jnp.mean(features, axis=(1, 2))
  if features.ndim == 3:
    return features[:, 0]
  return features


def normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def seed_loss(student_embeddings, teacher_embeddings, queue, student_temperature,
              teacher_temperature):
  """SEED's soft cross-entropy (METHODS.md section 4) and its two logit matrices.

  student_embeddings, teacher_embeddings: unit rows [B, dim]; queue [dim, K].
  Returns (loss, student_logits [B, 1+K], teacher_logits [B, 1+K]); column 0 is
  the positive (the image's own teacher embedding).
  """
  s, t = student_embeddings, teacher_embeddings
  queue = queue.astype(jnp.float32)
  student_logits = jnp.concatenate(
      [jnp.sum(s * t, -1, keepdims=True), s @ queue], axis=1) / student_temperature
  teacher_logits = jnp.concatenate(
      [jnp.sum(t * t, -1, keepdims=True), t @ queue], axis=1) / teacher_temperature
  teacher_probs = jax.nn.softmax(teacher_logits, axis=-1)
  log_student = jax.nn.log_softmax(student_logits, axis=-1)
  loss = -jnp.mean(jnp.sum(teacher_probs * log_student, axis=-1))
  return loss, student_logits, teacher_logits


def enqueue(queue: jax.Array, pointer: jax.Array, embeddings: jax.Array):
  """FIFO: `embeddings` [B, dim] overwrite columns [pointer, pointer + B) of
  `queue` [dim, K]; the pointer advances by B modulo K (K is a multiple of B, so
  a batch never straddles the end)."""
  batch = embeddings.shape[0]
  queue = jax.lax.dynamic_update_slice(
      queue, embeddings.T.astype(queue.dtype), (jnp.zeros([], pointer.dtype), pointer))
  return queue, (pointer + batch) % queue.shape[1]


@dataclasses.dataclass(frozen=True)
class SEED(Objective):
  """SEED (Fang et al. 2021); settings in config.objective_args."""
  dim: int = 128                        # embedding width; 0: the teacher tap's width
  queue_size: int = 65536               # K, a multiple of the global batch
  student_temperature: float = 0.2      # tau_S
  teacher_temperature: float = 1e-4     # tau_T
  student_tap: str = "pre_logits"       # the features the head (and the probe) sees
  teacher_tap: str = "pre_logits"
  hidden_dim: int = 0                   # the head's hidden width; 0: the student's d
  evaluation = "linear_probe"           # evaluate.py adds <eval>/linear_probe_top1

  def validate(self, global_batch: int) -> None:
    where = "config.objective_args"
    if self.dim < 0:
      raise UserError(f"{where}.dim must be >= 0 (0: the teacher's width), got {self.dim}")
    check_settings(self, positive=("student_temperature", "teacher_temperature"),
                   non_negative=("hidden_dim",))
    if global_batch <= 0 or self.queue_size <= 0 or self.queue_size % global_batch:
      suggestion = max(global_batch, 1) * max(1, round(self.queue_size / max(global_batch, 1)))
      raise UserError(
          f"{where}.queue_size={self.queue_size} must be a positive multiple of the "
          f"global batch config.input.batch_size={global_batch} (the queue takes whole "
          f"batches), e.g. queue_size={suggestion}")

  @property
  def probe_tap(self) -> str:
    """The probe reads the features the projection head sees."""
    return self.student_tap

  # ---- models and shapes ----
  def check_models(self, student_out, teacher_outs) -> None:
    if len(teacher_outs) != 1:
      raise UserError(f"objective 'seed' distils one teacher; config.teachers has "
                      f"{len(teacher_outs)} ({', '.join(teacher_outs)})")
    (teacher_name, (_, teacher_taps)), = teacher_outs.items()
    for what, taps, tap in (("student", student_out[1], self.student_tap),
                            (teacher_name, teacher_taps, self.teacher_tap)):
      if tap not in taps:
        key = "student_tap" if what == "student" else "teacher_tap"
        raise UserError(f"config.objective_args.{key}='{tap}' is not a tap of the "
                        f"{what} model; its taps: {', '.join(sorted(taps))}")
      if taps[tap].ndim not in (2, 3, 4):
        raise UserError(f"the {what} tap '{tap}' has shape {taps[tap].shape}; SEED needs "
                        "[B, D], [B, H, W, C] or [B, 1+N, D] features")

  def _teacher_width(self, teacher_outs) -> int:
    (_, (_, taps)), = teacher_outs.items()
    tap = taps[self.teacher_tap]
    return int(tap.shape[-1])

  def embedding_dim(self, teacher_outs) -> int:
    return self.dim or self._teacher_width(teacher_outs)

  def init_aux(self, rng, student_out, teacher_outs):
    self.check_models(student_out, teacher_outs)
    width = int(student_out[1][self.student_tap].shape[-1])
    head = ProjectionHead(hidden=self.hidden_dim or width,
                          dim=self.embedding_dim(teacher_outs))
    return {"head": head.init(rng, jnp.zeros((1, width), jnp.float32))["params"]}

  def init_state(self, rng, student_out, teacher_outs):
    """A queue of random unit vectors (as MoCo starts), pointer 0 and, when the
    teacher's width is not `dim`, the fixed teacher projection."""
    del student_out
    dim = self.embedding_dim(teacher_outs)
    queue = jax.random.normal(jax.random.fold_in(rng, _QUEUE_TAG),
                              (dim, self.queue_size), jnp.float32)
    state = {"queue": queue / jnp.linalg.norm(queue, axis=0, keepdims=True),
             "pointer": jnp.zeros([], jnp.int32)}
    width = self._teacher_width(teacher_outs)
    if dim != width:
      state["projection"] = jax.random.normal(jax.random.fold_in(rng, _PROJECTION_TAG),
                                              (width, dim), jnp.float32) / jnp.sqrt(dim)
    return state

  # ---- embeddings ----
  def teacher_embeddings(self, objective_state, teacher_outs) -> jax.Array:
    """normalize(fixed projection of the teacher tap) [B, dim], no gradient."""
    (_, (_, taps)), = teacher_outs.items()
    features = jax.lax.stop_gradient(pooled(taps[self.teacher_tap]))
    if "projection" in objective_state:
      features = features @ objective_state["projection"]
    return normalize(features)

  def student_embeddings(self, aux_params, student_out) -> jax.Array:
    features = pooled(student_out[1][self.student_tap])
    head = ProjectionHead(hidden=self.hidden_dim or features.shape[-1],
                          dim=aux_params["head"]["out"]["kernel"].shape[-1])
    return normalize(head.apply({"params": aux_params["head"]}, features))

  # ---- the step ----
  def __call__(self, aux_params, student_out, teacher_outs, batch, rng):
    del rng
    state = batch["objective_state"]
    s = self.student_embeddings(aux_params, student_out)
    t = self.teacher_embeddings(state, teacher_outs)
    loss, student_logits, teacher_logits = seed_loss(
        s, t, state["queue"], self.student_temperature, self.teacher_temperature)
    teacher_top = jnp.argmax(teacher_logits, -1)
    metrics = {
        # How often the teacher's most similar entry is the image itself, and how
        # often the student picks the teacher's most similar entry.
        "teacher_self_top1": jnp.mean((teacher_top == 0).astype(jnp.float32)),
        "student_agreement_top1": jnp.mean(
            (jnp.argmax(student_logits, -1) == teacher_top).astype(jnp.float32)),
        "positive_similarity": jnp.mean(student_logits[:, 0]) * self.student_temperature,
    }
    return loss, metrics

  def next_state(self, objective_state, teacher_outs):
    # Inside the jitted step the batch axis is the GLOBAL batch (the arrays are
    # sharded over the mesh), so enqueueing it is the all-gather of every
    # device's teacher embeddings: every replica's queue gets the same columns.
    queue, pointer = enqueue(objective_state["queue"], objective_state["pointer"],
                             self.teacher_embeddings(objective_state, teacher_outs))
    return {**objective_state, "queue": queue, "pointer": pointer}
