"""TinyMIM (Ren et al. 2023): distil a ViT's attention relations into a smaller ViT.

From the Q, K, V of one block (taken after that block's first LayerNorm, all tokens,
CLS included), per head h with head dim d_h:

  R_QK = softmax(Q K^T / sqrt(d_h)),  R_VV = softmax(V V^T / sqrt(d_h))
  L = sum_{r in QK, VV} mean_{B, H, Nq} sum_{Nk} R_T,r * (log R_T,r - log R_S,r)

The student's target is its last block, its Q, K, V split into the teacher's head
count (the model's `relation_heads`, no extra parameters; d_h is then the student
width / teacher heads). The teacher's is the block its config picks with `qkv_block`
(block 18 of 24 for ViT-L, the last block for ViT-B/S). Same crop for both, no
masking. By default there is no label loss (the paper's pre-training; fine-tune
on labels afterwards); `ce_weight > 0` adds cross-entropy on the labels.

Sequential distillation (B -> S -> T, the paper's best): a finished TinyMIM
student is the next run's teacher by pointing `config.teacher.init` at its workdir
or its funmatch-export .npz (see configs/digits_tinymim.py).
"""
import dataclasses

import jax
import jax.numpy as jnp

from funmatch.distill import losses
from funmatch.distill.objectives.base import Objective, check_settings, single_teacher
from funmatch.errors import UserError

RELATIONS = (("qk", "q", "k"), ("vv", "v", "v"))


def log_relation(a: jax.Array, b: jax.Array) -> jax.Array:
  """`log softmax(a b^T / sqrt(d_h))` per head: [B, H, N, d] x2 -> [B, H, N, N]."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  logits = jnp.einsum("bhqd,bhkd->bhqk", a, b) / jnp.sqrt(jnp.float32(a.shape[-1]))
  return jax.nn.log_softmax(logits, axis=-1)


def relation_kl(student_log_relation: jax.Array, teacher_log_relation: jax.Array) -> jax.Array:
  """KL(R_T || R_S) summed over keys, averaged over batch, heads and queries."""
  teacher = jax.lax.stop_gradient(teacher_log_relation)
  return jnp.mean(jnp.sum(jnp.exp(teacher) * (teacher - student_log_relation), -1))


def relation_losses(student_taps, teacher_taps) -> dict[str, jax.Array]:
  """{'qk': KL of the Q-K relations, 'vv': KL of the V-V relations}."""
  return {name: relation_kl(log_relation(student_taps[a], student_taps[b]),
                            log_relation(teacher_taps[a], teacher_taps[b]))
          for name, a, b in RELATIONS}


def _kind(taps) -> str:
  """A short description of a model from its tap names, for error messages."""
  if "stem" in taps:
    return "a CNN (taps: " + ", ".join(sorted(taps)) + ")"
  return "a model with taps " + ", ".join(sorted(taps))


@dataclasses.dataclass(frozen=True)
class TinyMIM(Objective):
  """Q-K and V-V relation KL between the student's last block and a teacher block."""
  qk_weight: float = 1.0
  vv_weight: float = 1.0
  ce_weight: float = 0.0

  def validate(self, global_batch: int) -> None:
    del global_batch
    check_settings(self, non_negative=("qk_weight", "vv_weight", "ce_weight"))

  def check_models(self, student_out, teacher_outs) -> None:
    teacher_name = next(iter(teacher_outs)) if len(teacher_outs) == 1 else None
    _, teacher_taps = single_teacher(teacher_outs, "tinymim")
    student_taps = student_out[1]
    for what, taps in (("student", student_taps), (teacher_name, teacher_taps)):
      if not {"q", "k", "v"} <= set(taps):
        raise UserError(
            f"config.objective='tinymim' distils attention relations between ViTs, but "
            f"config.{what} is {_kind(taps)} without q/k/v taps; set "
            f"config.{what}.model='vit' (TinyMIM needs a ViT teacher and a ViT student)")
    student_q, teacher_q = student_taps["q"], teacher_taps["q"]
    if student_q.shape[1] != teacher_q.shape[1]:
      raise UserError(
          f"the student's relations have {student_q.shape[1]} heads but the teacher's "
          f"{teacher_q.shape[1]}; set config.student.relation_heads={teacher_q.shape[1]} "
          "(the teacher's head count) so the student's last block is split like the teacher's")
    if student_q.shape[2] != teacher_q.shape[2]:
      raise UserError(
          f"the student has {student_q.shape[2]} tokens but config.{teacher_name} "
          f"{teacher_q.shape[2]}; TinyMIM compares token-to-token relations, so give both "
          "the same token grid (res / patch_size)")

  def __call__(self, aux_params, student_out, teacher_outs, batch, rng):
    del aux_params, rng
    student_logits, student_taps = student_out
    _, teacher_taps = single_teacher(teacher_outs, "tinymim")
    relations = relation_losses(student_taps, teacher_taps)
    loss = self.qk_weight * relations["qk"] + self.vv_weight * relations["vv"]
    metrics = {"relation_qk": relations["qk"], "relation_vv": relations["vv"],
               "student_entropy": losses.entropy(student_logits)}
    if self.ce_weight:
      metrics["ce"] = losses.cross_entropy(student_logits, batch["label_probs"])
      loss = loss + self.ce_weight * metrics["ce"]
    return loss, metrics
