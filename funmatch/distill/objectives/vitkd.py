"""ViTKD (Yang et al. 2022): feature distillation between ViTs, with NKD optionally.

Patch tokens only (the CLS token is dropped), f_S / f_T the student's / teacher's:

  Mimicking (shallow blocks 0 and 1), W_l a Linear(Ds -> Dt) per block when the
  widths differ (the identity otherwise):
    L_lr = alpha / B * sum_l sum_{n, d} (W_l f_S,l - sg f_T,l)^2
  Generation (the final-LayerNorm tokens): x = Linear(Ds -> Dt) f_S (identity when
  the widths match); per example a random `mask_ratio` (lambda) of the tokens is
  replaced by a learnable mask token (zero init); x is laid out on the token grid
  and G = Conv3x3 -> ReLU -> Conv3x3 (Dt -> Dt) regenerates the teacher's tokens:
    L_gen = beta / lambda / B * sum_{masked n, d} (G(x) - sg f_T,L)^2

Total: ce_weight * CE(labels) + L_lr + L_gen + nkd_weight * NKD (the paper's best
adds NKD with T = 1, gamma = 1). The adapters, the mask token and the generator
are the objective's aux params: trained with the student, never exported.
"""
import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from funmatch.distill import losses
from funmatch.distill.objectives.base import (Objective, check_settings, single_teacher,
                                              target_labels)
from funmatch.distill.objectives.nkd import nkd_loss
from funmatch.errors import UserError
from funmatch.models import conv

DEEP_TAP = "encoded"


def patch_tokens(tokens: jax.Array) -> jax.Array:
  """[B, 1 + N, D] tokens (CLS first) -> the N patch tokens, float32."""
  return tokens[:, 1:].astype(jnp.float32)


def random_mask(rng: jax.Array, batch: int, tokens: int, mask_ratio: float) -> jax.Array:
  """Bool [B, N], True where a token is masked: per example a random subset of
  `tokens - int(tokens * (1 - mask_ratio))` tokens, as the reference code."""
  keep = int(tokens * (1 - mask_ratio))
  ranks = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (batch, tokens)), -1), -1)
  return ranks >= keep


def mimic_loss(student_features: Sequence[jax.Array], teacher_features: Sequence[jax.Array],
               alpha: float) -> jax.Array:
  """alpha / B * sum over layers, tokens and channels of the squared difference."""
  batch = student_features[0].shape[0]
  total = sum(jnp.sum((s - jax.lax.stop_gradient(t)) ** 2)
              for s, t in zip(student_features, teacher_features))
  return alpha * total / batch


def generation_loss(generated: jax.Array, teacher: jax.Array, masked: jax.Array,
                    beta: float, mask_ratio: float) -> jax.Array:
  """beta / lambda / B * sum over the masked tokens (and channels) of the squared error."""
  error = jnp.sum((generated - jax.lax.stop_gradient(teacher)) ** 2, -1)
  return beta / mask_ratio * jnp.sum(jnp.where(masked, error, 0.0)) / generated.shape[0]


class Heads(nn.Module):
  """ViTKD's training-only layers: mimicking adapters, projection, mask token, generator.

  `__call__(shallow, deep, masked) -> (adapted shallow features, generated tokens)`;
  shallow: a [B, N, Ds] per mimicked block, deep: [B, N, Ds], masked: bool [B, N].
  """
  teacher_width: int
  adapt: bool  # widths differ: Linear(Ds -> Dt) adapters

  @nn.compact
  def __call__(self, shallow, deep, masked):
    width = self.teacher_width
    if self.adapt:
      shallow = [nn.Dense(width, name=f"mimic_{i}")(f) for i, f in enumerate(shallow)]
      deep = nn.Dense(width, name="project")(deep)
    # Not a kernel, so config.wd_mask's default leaves it undecayed (as MAE's).
    mask_token = self.param("mask_token", nn.initializers.zeros, (width,), jnp.float32)
    x = jnp.where(masked[..., None], mask_token, deep)
    batch, tokens, _ = x.shape
    side = math.isqrt(tokens)
    x = x.reshape(batch, side, side, width)
    x = conv.Conv(width, 3, padding="SAME", name="generator_0")(x)
    x = conv.Conv(width, 3, padding="SAME", name="generator_1")(nn.relu(x))
    return list(shallow), x.reshape(batch, tokens, width)


@dataclasses.dataclass(frozen=True)
class ViTKD(Objective):
  """CE + shallow mimicking + deep generation (+ NKD); defaults are the paper's."""
  alpha: float = 3e-5
  beta: float = 3e-6
  mask_ratio: float = 0.5            # lambda
  shallow_blocks: tuple = (0, 1)
  ce_weight: float = 1.0
  nkd_weight: float = 0.0            # the paper's best: 1.0
  nkd_temperature: float = 1.0
  nkd_gamma: float = 1.0

  def validate(self, global_batch: int) -> None:
    del global_batch
    check_settings(self, positive=("nkd_temperature",),
                   non_negative=("alpha", "beta", "ce_weight", "nkd_weight", "nkd_gamma"))
    if not 0 < self.mask_ratio < 1:
      raise UserError(f"config.objective_args.mask_ratio must be in (0, 1), "
                      f"got {self.mask_ratio}")
    blocks = self.shallow_blocks
    if (not isinstance(blocks, (tuple, list)) or not blocks
        or not all(isinstance(b, int) and b >= 0 for b in blocks)):
      raise UserError(f"config.objective_args.shallow_blocks={self.shallow_blocks} must "
                      "list block indices >= 0 (the paper: (0, 1); alpha=0 turns mimicking off)")

  @property
  def shallow_taps(self) -> tuple[str, ...]:
    return tuple(f"block{b}" for b in self.shallow_blocks)

  def check_models(self, student_out, teacher_outs) -> None:
    teacher_name = next(iter(teacher_outs)) if len(teacher_outs) == 1 else None
    _, teacher_taps = single_teacher(teacher_outs, "vitkd")
    needed = (*self.shallow_taps, DEEP_TAP)
    for what, taps in (("student", student_out[1]), (teacher_name, teacher_taps)):
      missing = [t for t in needed if t not in taps]
      if missing and DEEP_TAP in taps:
        raise UserError(
            f"config.{what} has no tap(s) {', '.join(missing)} (too few blocks) for "
            f"config.objective_args.shallow_blocks={self.shallow_blocks}; use a deeper ViT "
            "or other shallow_blocks")
      if missing:
        kind = "a CNN" if "stem" in taps else "a model"
        raise UserError(
            f"config.objective='vitkd' distils ViT tokens, but config.{what} is {kind} "
            f"without the tap(s) {', '.join(missing)}; set config.{what}.model='vit' "
            "(ViTKD needs a ViT teacher and a ViT student)")
    student_tokens = student_out[1][DEEP_TAP].shape[1]
    teacher_tokens = teacher_taps[DEEP_TAP].shape[1]
    if student_tokens != teacher_tokens:
      raise UserError(
          f"the student has {student_tokens} tokens but config.{teacher_name} "
          f"{teacher_tokens}; ViTKD compares token by token, so give both the same token "
          "grid (res / patch_size)")
    patches = student_tokens - 1
    if math.isqrt(patches) ** 2 != patches:
      raise UserError(f"ViTKD's generator needs a square token grid, but the student has "
                      f"{patches} patch tokens; use square images")

  def _heads(self, student_taps, teacher_taps) -> Heads:
    student_width = student_taps[DEEP_TAP].shape[-1]
    teacher_width = teacher_taps[DEEP_TAP].shape[-1]
    return Heads(teacher_width=teacher_width, adapt=student_width != teacher_width)

  def init_aux(self, rng, student_out, teacher_outs):
    student_taps = student_out[1]
    _, teacher_taps = single_teacher(teacher_outs, "vitkd")
    heads = self._heads(student_taps, teacher_taps)
    def dummy(name):  # zeros shaped like the student's patch tokens of tap `name`
      batch, tokens, width = student_taps[name].shape
      return jnp.zeros((batch, tokens - 1, width), jnp.float32)
    deep = dummy(DEEP_TAP)
    return heads.init(rng, [dummy(t) for t in self.shallow_taps], deep,
                      jnp.zeros(deep.shape[:2], jnp.bool_))["params"]

  def __call__(self, aux_params, student_out, teacher_outs, batch, rng):
    student_logits, student_taps = student_out
    teacher_logits, teacher_taps = single_teacher(teacher_outs, "vitkd")
    deep = patch_tokens(student_taps[DEEP_TAP])
    masked = random_mask(rng, deep.shape[0], deep.shape[1], self.mask_ratio)
    shallow, generated = self._heads(student_taps, teacher_taps).apply(
        {"params": aux_params}, [patch_tokens(student_taps[t]) for t in self.shallow_taps],
        deep, masked)
    mimic = mimic_loss(shallow, [patch_tokens(teacher_taps[t]) for t in self.shallow_taps],
                       self.alpha)
    generation = generation_loss(generated, patch_tokens(teacher_taps[DEEP_TAP]), masked,
                                 self.beta, self.mask_ratio)
    ce = losses.cross_entropy(student_logits, batch["label_probs"])
    loss = self.ce_weight * ce + mimic + generation
    metrics = {"ce": ce, "mimic": mimic, "generation": generation,
               "student_entropy": losses.entropy(student_logits),
               "teacher_entropy": losses.entropy(teacher_logits)}
    if self.nkd_weight:
      target_term, non_target_term = nkd_loss(student_logits, teacher_logits,
                                              target_labels(batch), self.nkd_temperature,
                                              self.nkd_gamma)
      metrics["nkd"] = target_term + non_target_term
      loss = loss + self.nkd_weight * metrics["nkd"]
    return loss, metrics
