"""OFA-KD: one-for-all distillation across architectures (Hao et al. 2023).

Branch heads project intermediate student features into logit space, where any
teacher (CNN or ViT) can be matched; only the teacher's logits are used, so
heterogeneous pairs (ViT teacher -> BiT/MobileNet student, BiT teacher -> ViT
student) need nothing else. With y = one_hot(argmax(label)) (the label's class, also
when mixup mixes the labels, as the authors' code) and p = softmax(z/T):

  L_OFA(z_S, z_T; gamma) = mean_B sum_c -[(p_T,c + y_c)^gamma - y_c] * log p_S,c
  loss = ce_weight * CE(z_S, mixed labels)
       + ofa_weight * (L_OFA(z_S, z_T; gamma_last) + sum_s L_OFA(branch_s, z_T; gamma_s))

gamma = 1 is plain soft cross-entropy with the teacher; gamma > 1 enhances the
target class (weight (1 + p_T)^gamma - 1). `gamma` is one number for every term or,
as the authors' per-stage `ofa_eps`, a tuple with one value per branch stage (in
`stages` order) and the last for the final logits. As in the authors' code there is
no T^2 factor (T = 1 by default). Several teachers: their logits are averaged first.

Branches (training-only aux params, never exported), one per entry of `stages`:
  CNN stage [B, H, W, C] (BiT, MobileNetV3, ConvNeXt): conv3x3 (stride 2 while
      the map is larger than the student's last stage map) + GroupNorm + ReLU
      blocks, channels doubling up to the last stage's width (at least one block),
      then global average pooling + Linear(num_classes).
  Transformer tokens: a ViT block [B, 1 + N, D] (CLS first; dropped) or a Swin
      stage [B, N, D] (a row-major token grid, no CLS): the square patch grid gets
      one 2x2 patch merging (concat 4 neighbours -> LayerNorm -> Linear(4D -> 2D)),
      then one pre-LN transformer block, then mean pooling + LayerNorm + Linear.
`stages='auto'` picks, for models with stage taps (CNNs and Swin), the stages
before the last (at most three, the deepest ones: BiT / ConvNeXt / Swin stage1-3,
MobileNetV3 stage2-4) and, for ViTs, the blocks at 1/4, 2/4 and 3/4 of the depth
(ViT-B: block2, block5, block8). Otherwise `stages` is a tuple of tap names or
one comma-separated string.
"""
import dataclasses
import math
import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from funmatch.distill import losses
from funmatch.distill.objectives.base import Objective, check_settings
from funmatch.errors import UserError
from funmatch.models import conv

_STAGE = re.compile(r"^stage(\d+)$")
_BLOCK = re.compile(r"^block(\d+)$")


def ofa_loss(student_logits, teacher_logits, target_mask, gamma: float,
             temperature: float = 1.0) -> jax.Array:
  """L_OFA averaged over the batch; `target_mask` is one-hot [B, C] (the label class)."""
  log_p_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, -1)
  p_teacher = jax.nn.softmax(teacher_logits.astype(jnp.float32) / temperature, -1)
  target_mask = target_mask.astype(jnp.float32)
  weights = jax.lax.stop_gradient((p_teacher + target_mask) ** gamma - target_mask)
  return jnp.mean(jnp.sum(-weights * log_p_student, -1))


def _groups(channels: int) -> int:
  """Up to 32 GroupNorm groups of at least 4 channels: a branch's maps may be 1x1,
  where a group of one channel would normalise to zero (and pass no gradient)."""
  return max([g for g in range(1, 33) if channels % g == 0 and channels // g >= 4] or [1])


class CNNBranch(nn.Module):
  """Downsampling conv blocks, global average pooling, Linear(num_classes)."""
  num_classes: int
  channels: Sequence[int]   # output channels of each block
  strides: Sequence[int]    # stride of each block (2 while downsampling)

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    for i, (channels, stride) in enumerate(zip(self.channels, self.strides)):
      x = conv.Conv(channels, 3, stride, padding="SAME", use_bias=False,
                    name=f"conv{i}")(x)
      x = nn.relu(nn.GroupNorm(num_groups=_groups(channels), name=f"norm{i}")(x))
    return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


class TransformerBlock(nn.Module):
  """Pre-LN: x + MHSA(LN(x)), then x + MLP(LN(x)) (GELU, 4x width)."""
  num_heads: int

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    y = nn.LayerNorm(epsilon=1e-6, name="norm1")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attention")(y, y)
    y = nn.LayerNorm(epsilon=1e-6, name="norm2")(x)
    y = nn.Dense(4 * width, name="mlp_in")(y)
    return x + nn.Dense(width, name="mlp_out")(nn.gelu(y))


class ViTBranch(nn.Module):
  """2x2 patch merging, one transformer block, mean pooling, Linear(num_classes)."""
  num_classes: int
  num_heads: int
  cls_token: bool = True  # ViT blocks lead with CLS; Swin stages have none

  @nn.compact
  def __call__(self, tokens):
    # The patch tokens (CLS dropped).
    x = (tokens[:, 1:] if self.cls_token else tokens).astype(jnp.float32)
    batch, count, width = x.shape
    side = math.isqrt(count)
    x = x.reshape(batch, side, side, width)
    if side % 2:  # an odd grid is zero-padded to even before merging
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      side += 1
    # Patch merging (Swin): each 2x2 neighbourhood becomes one 4D token.
    x = x.reshape(batch, side // 2, 2, side // 2, 2, width).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch, (side // 2) ** 2, 4 * width)
    x = nn.LayerNorm(epsilon=1e-6, name="merge_norm")(x)
    x = nn.Dense(2 * width, use_bias=False, name="merge")(x)
    x = TransformerBlock(self.num_heads, name="block")(x)
    x = nn.LayerNorm(epsilon=1e-6, name="norm")(jnp.mean(x, axis=1))
    return nn.Dense(self.num_classes, name="head")(x)


def _vit_heads(width: int) -> int:
  """About 64 channels per head, dividing `width`."""
  heads = max(1, width // 64)
  while width % heads:
    heads -= 1
  return heads


def auto_stages(taps) -> tuple[str, ...]:
  """The default branch taps (see the module docstring)."""
  stages = sorted((int(m.group(1)), name) for name in taps
                  if (m := _STAGE.match(name)) and len(taps[name].shape) in (3, 4))
  if stages:
    return tuple(name for _, name in stages[:-1][-3:])
  blocks = sorted(int(m.group(1)) for name in taps
                  if (m := _BLOCK.match(name)) and len(taps[name].shape) == 3)
  if blocks:
    depth = blocks[-1] + 1
    picks = sorted({max(0, depth * k // 4 - 1) for k in (1, 2, 3)} - {depth - 1})
    return tuple(f"block{i}" for i in picks if i in blocks)
  return ()


def _has_cls(tap_name: str) -> bool:
  """ViT block taps lead with the CLS token; Swin stage tokens have none."""
  return bool(_BLOCK.match(tap_name))


def _branchable(taps) -> list[str]:
  return sorted(name for name, tap in taps.items() if len(tap.shape) in (3, 4)
                and (_STAGE.match(name) or _BLOCK.match(name)))


@dataclasses.dataclass(frozen=True)
class OFAKD(Objective):
  """OFA-KD; settings in config.objective_args."""
  gamma: float | tuple = 1.0    # 1.0 (CIFAR) .. 1.5 (ImageNet); or one per stage + final
  temperature: float = 1.0
  stages: str | tuple = "auto"  # 'auto', 'stage1,stage2' or a tuple of tap names
  ce_weight: float = 1.0
  ofa_weight: float = 1.0

  def validate(self, global_batch: int) -> None:
    del global_batch
    where = "config.objective_args"
    gammas = self.gamma if isinstance(self.gamma, (tuple, list)) else (self.gamma,)
    if not gammas or not all(isinstance(g, (int, float)) and g > 0 for g in gammas):
      raise UserError(f"{where}.gamma must be > 0 (1 = soft cross-entropy), or a tuple of "
                      f"such values (one per stage, then the final logits), got {self.gamma}")
    check_settings(self, positive=("temperature",), non_negative=("ce_weight", "ofa_weight"))
    if not isinstance(self.stages, (str, tuple, list)):
      raise UserError(f"{where}.stages must be 'auto', 'stage1,stage2,...' or a tuple of "
                      f"tap names, got {self.stages!r}")

  def gammas(self, stages: Sequence[str]) -> tuple[tuple[float, ...], float]:
    """(gamma of each branch stage, gamma of the final logits)."""
    if not isinstance(self.gamma, (tuple, list)):
      return (float(self.gamma),) * len(stages), float(self.gamma)
    if len(self.gamma) != len(stages) + 1:
      raise UserError(f"config.objective_args.gamma has {len(self.gamma)} values but the "
                      f"student has {len(stages)} branch stages ({', '.join(stages)}) plus "
                      f"the final logits; give {len(stages) + 1} values or one number")
    return tuple(float(g) for g in self.gamma[:-1]), float(self.gamma[-1])

  def stage_names(self, student_taps) -> tuple[str, ...]:
    if isinstance(self.stages, str):
      if self.stages.strip() == "auto":
        return auto_stages(student_taps)
      return tuple(s.strip() for s in self.stages.split(",") if s.strip())
    return tuple(self.stages)

  # ---- models and shapes ----
  def check_models(self, student_out, teacher_outs) -> None:
    student_logits, taps = student_out
    available = _branchable(taps)
    self.gammas(self.stage_names(taps))  # a gamma tuple of the wrong length fails here
    for stage in self.stage_names(taps):
      if stage not in taps:
        raise UserError(f"config.objective_args.stages names '{stage}', which the student "
                        f"model does not have; its stage/block taps: "
                        f"{', '.join(available) or 'none'}")
      if len(taps[stage].shape) not in (3, 4):
        raise UserError(f"config.objective_args.stages names '{stage}' of shape "
                        f"{tuple(taps[stage].shape)}; branches need a CNN stage "
                        f"[B, H, W, C] or transformer tokens [B, (1+)N, D]; choose "
                        f"from: {', '.join(available) or 'none'}")
      patches = taps[stage].shape[1] - _has_cls(stage)
      if len(taps[stage].shape) == 3 and math.isqrt(patches) ** 2 != patches:
        raise UserError(f"the student tap '{stage}' has {patches} patch tokens, not a "
                        "square grid; OFA's transformer branch merges 2x2 patches")
    for name, (teacher_logits, _) in teacher_outs.items():
      if teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise UserError(f"teacher '{name}' has {teacher_logits.shape[-1]} outputs but the "
                        f"student {student_logits.shape[-1]}; OFA-KD matches logits of "
                        "the same classes (give both models a head)")

  def branch(self, stage: str, student_out) -> nn.Module:
    """The branch module of student tap `stage` (built from the taps' shapes)."""
    logits, taps = student_out
    num_classes = int(logits.shape[-1])
    shape = taps[stage].shape
    if len(shape) == 3:
      return ViTBranch(num_classes, _vit_heads(2 * int(shape[-1])), _has_cls(stage))
    # Downsample to the spatial size (and at most the width) of the last stage.
    maps = [t.shape for name, t in taps.items() if len(t.shape) == 4
            and _STAGE.match(name)]
    last = min(maps, key=lambda s: s[1]) if maps else shape
    size, channels = int(shape[1]), int(shape[-1])
    target_size, max_channels = int(last[1]), max(int(last[-1]), channels)
    widths, strides = [], []
    while size > target_size or not widths:
      stride = 2 if size > target_size else 1
      size = -(-size // stride)
      channels = min(2 * channels, max_channels) if stride == 2 else channels
      widths.append(channels)
      strides.append(stride)
    return CNNBranch(num_classes, tuple(widths), tuple(strides))

  def init_aux(self, rng, student_out, teacher_outs):
    self.check_models(student_out, teacher_outs)
    _, taps = student_out
    aux = {}
    for i, stage in enumerate(self.stage_names(taps)):
      dummy = jnp.zeros((1,) + tuple(taps[stage].shape[1:]), jnp.float32)
      aux[f"branch_{stage}"] = self.branch(stage, student_out).init(
          jax.random.fold_in(rng, i), dummy)["params"]
    return aux

  # ---- the step ----
  def branch_logits(self, aux_params, student_out) -> dict[str, jax.Array]:
    _, taps = student_out
    return {stage: self.branch(stage, student_out).apply(
                {"params": aux_params[f"branch_{stage}"]}, taps[stage])
            for stage in self.stage_names(taps)}

  def __call__(self, aux_params, student_out, teacher_outs, batch, rng):
    del rng
    student_logits, _ = student_out
    labels = batch["label_probs"]
    teacher_logits = jnp.mean(jnp.stack([jnp.asarray(out[0], jnp.float32)
                                         for out in teacher_outs.values()]), 0)
    ce = losses.cross_entropy(student_logits, labels)
    target_mask = jax.nn.one_hot(jnp.argmax(labels, -1), labels.shape[-1])
    ofa = lambda z, gamma: ofa_loss(z, teacher_logits, target_mask, gamma, self.temperature)
    branches = self.branch_logits(aux_params, student_out)
    stage_gammas, final_gamma = self.gammas(tuple(branches))
    metrics = {"ce": ce, "ofa_logits": ofa(student_logits, final_gamma),
               "student_entropy": losses.entropy(student_logits),
               "teacher_entropy": losses.entropy(teacher_logits)}
    total_ofa = metrics["ofa_logits"]
    for (stage, logits), gamma in zip(branches.items(), stage_gammas):
      metrics[f"ofa_{stage}"] = ofa(logits, gamma)
      total_ofa = total_ofa + metrics[f"ofa_{stage}"]
    return self.ce_weight * ce + self.ofa_weight * total_ofa, metrics
