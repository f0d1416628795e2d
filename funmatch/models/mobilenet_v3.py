"""MobileNetV3-Large (Howard et al. 2019) with GroupNorm(8) for BatchNorm.

This is the student of the paper's cross-family experiment. The layer table,
squeeze-excite sizes, activations and classifier (960 -> 1280 -> classes)
follow the standard MobileNetV3-Large (as in torchvision), with every
BatchNorm replaced by GroupNorm with 8 groups, so there are no batch
statistics and train/eval behave the same (except optional dropout).

`width` scales every channel count (stem, blocks, SE, the 960 and 1280
layers), rounded to a multiple of 8 as in the reference implementations.

Taps, one per resolution (for a 224px input):
  stem    after the 3x3/2 stem conv        112px, 16 channels
  stage1  after block 1                    112px, 16
  stage2  after block 3                     56px, 24
  stage3  after block 6                     28px, 40
  stage4  after block 12                    14px, 112
  stage5  after block 15 (before the 960)    7px, 160
  pre_logits  the 1280-d features fed to the classifier, [B, 1280]

Weights: funmatch's own names ('/'-joined flax paths) in .npz or
.safetensors, and timm `MobileNetV3` state dicts built with GroupNorm(8)
(`conv_stem`, `bn1`, `blocks.{stage}.{i}.conv_pw|conv_dw|conv_pwl|se`,
`conv_head`, `classifier`; see `timm_spec`). timm's pretrained MobileNetV3
files use BatchNorm and cannot be loaded faithfully: they are refused.
"""

import dataclasses
import functools
import re
from typing import (Any, Dict, List, Mapping, NamedTuple, Optional, Sequence,
                    Union)

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from funmatch.errors import UserError
from funmatch.models import conv, spec

GN_GROUPS = 8
GN_EPSILON = 1e-5


class BlockSpec(NamedTuple):
  kernel: int
  expanded: int
  out: int
  use_se: bool
  activation: str  # 'relu' or 'hswish'
  stride: int


# The MobileNetV3-Large table (Howard et al. 2019, Table 1).
LARGE_BLOCKS = (
    BlockSpec(3, 16, 16, False, "relu", 1),
    BlockSpec(3, 64, 24, False, "relu", 2),
    BlockSpec(3, 72, 24, False, "relu", 1),
    BlockSpec(5, 72, 40, True, "relu", 2),
    BlockSpec(5, 120, 40, True, "relu", 1),
    BlockSpec(5, 120, 40, True, "relu", 1),
    BlockSpec(3, 240, 80, False, "hswish", 2),
    BlockSpec(3, 200, 80, False, "hswish", 1),
    BlockSpec(3, 184, 80, False, "hswish", 1),
    BlockSpec(3, 184, 80, False, "hswish", 1),
    BlockSpec(3, 480, 112, True, "hswish", 1),
    BlockSpec(3, 672, 112, True, "hswish", 1),
    BlockSpec(5, 672, 160, True, "hswish", 2),
    BlockSpec(5, 960, 160, True, "hswish", 1),
    BlockSpec(5, 960, 160, True, "hswish", 1),
)
STEM_CHANNELS = 16
LAST_CHANNELS = 1280
# Index (1-based) of the last block at each resolution -> stage taps.
STAGE_ENDS = (1, 3, 6, 12, 15)

_ACTIVATIONS = {"relu": nn.relu, "hswish": jax.nn.hard_swish}
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def make_divisible(value: float, divisor: int = 8) -> int:
  """Rounds to the nearest multiple of `divisor`, never down by over 10%."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


def hard_sigmoid(x: jnp.ndarray) -> jnp.ndarray:
  """relu6(x + 3) / 6, the gate used by MobileNetV3's squeeze-excite."""
  return jax.nn.relu6(x + 3.0) / 6.0


class ConvNorm(nn.Module):
  """Bias-free conv -> GroupNorm(8) -> optional activation."""
  features: int
  kernel: int = 1
  stride: int = 1
  depthwise: bool = False
  activation: str = ""
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    pad = (self.kernel - 1) // 2  # Symmetric, as in torchvision.
    x = conv.Conv(self.features, self.kernel, self.stride, padding=[(pad, pad)] * 2,
                  feature_group_count=x.shape[-1] if self.depthwise else 1,
                  use_bias=False, kernel_init=_conv_init, dtype=self.dtype,
                  impl=self.conv_impl, name="conv")(x)
    x = nn.GroupNorm(num_groups=GN_GROUPS, epsilon=GN_EPSILON,
                     dtype=self.dtype, name="group_norm")(x)
    return _ACTIVATIONS[self.activation](x) if self.activation else x


class SqueezeExcite(nn.Module):
  """Global pool -> 1x1 (ReLU) -> 1x1 (hard sigmoid) -> channel gate."""
  squeeze: int
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    common = dict(dtype=self.dtype, kernel_init=_conv_init, impl=self.conv_impl)
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.relu(conv.Conv(self.squeeze, 1, name="reduce", **common)(s))
    s = hard_sigmoid(conv.Conv(x.shape[-1], 1, name="expand", **common)(s))
    return x * s


class InvertedResidual(nn.Module):
  """Expand 1x1 -> depthwise kxk -> [SE] -> project 1x1 (+ skip if it fits)."""
  spec: BlockSpec
  expanded: int
  out: int
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    block = self.spec
    common = dict(dtype=self.dtype, conv_impl=self.conv_impl)
    y = x
    if self.expanded != x.shape[-1]:
      y = ConvNorm(self.expanded, activation=block.activation, name="expand",
                   **common)(y)
    y = ConvNorm(self.expanded, block.kernel, block.stride, depthwise=True,
                 activation=block.activation, name="depthwise", **common)(y)
    if block.use_se:
      y = SqueezeExcite(make_divisible(self.expanded // 4), name="se", **common)(y)
    y = ConvNorm(self.out, name="project", **common)(y)
    if block.stride == 1 and x.shape[-1] == self.out:
      y = y + x
    return y


class Model(nn.Module):
  """MobileNetV3-Large with GroupNorm(8); returns (logits, taps).

  Attributes:
    num_classes: classifier size; 0 means no classifier (logits = pre_logits).
    width: channel multiplier (1.0 is the standard model); channel counts are
      rounded to multiples of 8.
    dtype: activation / compute dtype; params stay float32, logits float32.
    dropout_rate: dropout before the classifier, active only with train=True
      (then a 'dropout' rng is needed).
    conv_impl: 'auto', 'xla' or 'matmul' (funmatch.models.conv): how the
      convs run; the same params and function either way.

  Images are NHWC in [-1, 1]. See the module docstring for the taps.
  """
  num_classes: int
  width: float = 1.0
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0
  conv_impl: str = "auto"

  def __post_init__(self):
    # Config errors surface at construction, not inside init/jit.
    if (not isinstance(self.num_classes, (int, np.integer))
        or isinstance(self.num_classes, bool) or self.num_classes < 0):
      raise UserError(f"MobileNetV3 num_classes={self.num_classes!r} must be "
                      "an integer >= 0 (0 means no classifier).")
    if not (isinstance(self.width, (int, float)) and self.width > 0):
      raise UserError(f"MobileNetV3 width={self.width!r} must be a positive "
                      "number (1.0 is the standard model).")
    if not (isinstance(self.dropout_rate, (int, float))
            and 0.0 <= self.dropout_rate < 1.0):
      raise UserError(f"MobileNetV3 dropout_rate={self.dropout_rate!r} must "
                      "be in [0, 1).")
    conv.check_impl(self.conv_impl)
    super().__post_init__()

  def _channels(self, value: int) -> int:
    return make_divisible(value * self.width)

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False):
    taps = {}
    common = dict(dtype=self.dtype, conv_impl=self.conv_impl)
    x = taps["stem"] = ConvNorm(self._channels(STEM_CHANNELS), 3, 2,
                                activation="hswish", name="stem", **common)(images)
    for index, block in enumerate(LARGE_BLOCKS, start=1):
      x = InvertedResidual(block, self._channels(block.expanded),
                           self._channels(block.out), name=f"block{index:02d}",
                           **common)(x)
      if index in STAGE_ENDS:
        taps[f"stage{STAGE_ENDS.index(index) + 1}"] = x
    # 6x the last block's width (960 at width 1), as in the reference.
    x = ConvNorm(6 * x.shape[-1], activation="hswish", name="final", **common)(x)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # Pool in float32.
    x = nn.Dense(self._channels(LAST_CHANNELS), dtype=self.dtype,
                 name="pre_logits")(x)
    x = taps["pre_logits"] = jax.nn.hard_swish(x).astype(jnp.float32)
    if not self.num_classes:
      return x, taps
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                      dtype=jnp.float32, name="head")(x)
    return logits, taps


# --------------------------------------------------------------------------
# Weight layouts: funmatch names and timm (GroupNorm) state dicts.
# --------------------------------------------------------------------------

HEAD = ("head/kernel", "head/bias")
# timm groups the blocks into stages: (stage, index) of block01..block15.
_TIMM_STAGES = (1, 2, 3, 4, 2, 3)
_TIMM_POSITION = {
    block: (stage, index)
    for stage, block, index in [
        (stage, 1 + sum(_TIMM_STAGES[:stage]) + index, index)
        for stage, count in enumerate(_TIMM_STAGES) for index in range(count)]}
_FINAL_STAGE = len(_TIMM_STAGES)
_BLOCK = re.compile(r"block(\d\d)/(.+)")
# Block 1 is timm's DepthwiseSeparableConv (no expansion), the rest
# InvertedResidual; both name their convs and norms differently.
_DS_NAMES = {"depthwise/conv": "conv_dw", "depthwise/group_norm": "bn1",
             "project/conv": "conv_pw", "project/group_norm": "bn2",
             "se/reduce": "se.conv_reduce", "se/expand": "se.conv_expand"}
_IR_NAMES = {"expand/conv": "conv_pw", "expand/group_norm": "bn1",
             "depthwise/conv": "conv_dw", "depthwise/group_norm": "bn2",
             "se/reduce": "se.conv_reduce", "se/expand": "se.conv_expand",
             "project/conv": "conv_pwl", "project/group_norm": "bn3"}
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _timm_name(name: str) -> str:
  """funmatch name -> timm `MobileNetV3` state-dict name."""
  *scope, leaf = name.split("/")
  layer, leaf = "/".join(scope), _LEAVES.get(leaf, leaf)
  block = _BLOCK.fullmatch(layer)
  if block and int(block[1]) in _TIMM_POSITION:
    stage, index = _TIMM_POSITION[int(block[1])]
    names = _DS_NAMES if int(block[1]) == 1 else _IR_NAMES
    return f"blocks.{stage}.{index}.{names.get(block[2], block[2])}.{leaf}"
  layer = {"stem/conv": "conv_stem", "stem/group_norm": "bn1",
           "final/conv": f"blocks.{_FINAL_STAGE}.0.conv",
           "final/group_norm": f"blocks.{_FINAL_STAGE}.0.bn1",
           "pre_logits": "conv_head", "head": "classifier"}.get(layer, layer)
  return f"{layer}.{leaf}"


def _to_timm(name: str, value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:
    return spec.hwio_to_oihw(value)
  if name == "pre_logits/kernel":  # a Dense here, a 1x1 conv in timm
    return value.T[:, :, None, None]
  if value.ndim == 2:
    return value.T
  return value


def _from_timm(name: str, value: np.ndarray, shape=None) -> np.ndarray:
  if name == "pre_logits/kernel" and value.ndim == 4:
    return value.reshape(value.shape[:2]).T
  if value.ndim == 4:
    return spec.oihw_to_hwio(value)
  if value.ndim == 2:
    return value.T
  return value


TIMM = spec.Layout("timm", _timm_name, to_file=_to_timm,
                   to_model=_from_timm,
                   marker=lambda name: name.startswith("conv_stem."))
FUNMATCH = dataclasses.replace(spec.FUNMATCH,
                               marker=lambda name: name == "stem/conv/kernel")


def _batch_norm_file(path: str, names: Sequence[str]) -> Optional[str]:
  """Why a BatchNorm MobileNetV3 (timm's own) cannot load here, or None."""
  if any(name.endswith(".running_mean") for name in names):
    return (f"weights file {path} is a BatchNorm MobileNetV3 (it has "
            "running statistics); funmatch's MobileNetV3 uses GroupNorm(8), so "
            "these weights cannot run faithfully; start from random init or a "
            "GroupNorm checkpoint (a funmatch export).")
  return None


def describe(params) -> str:
  """`width: stem 16 channels, num_classes=10`-style summary of params."""
  flat = spec.flat_params(params)
  stem = np.shape(flat.get("stem/conv/kernel", np.zeros((0,))))[-1]
  head = flat.get(HEAD[0])
  classes = 0 if head is None else np.shape(head)[-1]
  return f"MobileNetV3 with a {stem}-channel stem, num_classes={classes}"


# --------------------------------------------------------------------------
# timm.
# --------------------------------------------------------------------------


def _timm_arch_def(model: "Model") -> List[List[str]]:
  """timm block strings with funmatch's exact channel counts."""
  channels = model._channels  # pylint: disable=protected-access
  in_channels = channels(STEM_CHANNELS)
  blocks = []
  for index, block in enumerate(LARGE_BLOCKS, start=1):
    mid, out = channels(block.expanded), channels(block.out)
    # timm's block 1 never expands and the others always do; funmatch
    # expands exactly when mid differs from the input channels.
    if (index == 1) != (mid == in_channels):
      raise UserError(
          f"MobileNetV3 width={model.width} gives block {index} an "
          f"expansion timm's MobileNetV3 cannot express ({in_channels} -> "
          f"{mid} channels); export it as 'npz' or 'safetensors' instead.")
    relu = "_nre" if block.activation == "relu" else ""
    se = "_se0.25" if block.use_se else ""
    if index == 1:
      blocks.append(f"ds_r1_k{block.kernel}_s{block.stride}_e1_c{out}{se}{relu}")
    else:
      ratio = mid / in_channels  # timm: mid = make_divisible(in * ratio)
      blocks.append(f"ir_r1_k{block.kernel}_s{block.stride}_e{ratio!r}"
                    f"_c{out}{se}{relu}")
    in_channels = out
  stages, start = [], 0
  for count in _TIMM_STAGES:
    stages.append(blocks[start:start + count])
    start += count
  stages.append([f"cn_r1_k1_s1_c{6 * in_channels}"])
  return stages


def timm_spec(model: "Model", params: Mapping[str, Any]) -> Dict[str, Any]:
  """How timm builds a `MobileNetV3` computing what `model` computes.

  timm's registered `mobilenetv3_large_*` cannot take a GroupNorm (their
  factory fixes norm_layer), and they scale channels differently below
  width 1, so the spec is `timm.models.mobilenetv3.MobileNetV3` built from
  block strings with funmatch's exact channel counts. Returns
  {'model_name': None, 'kwargs' (JSON), 'code' (the Python that builds it)}.
  """
  del params  # Everything follows from the model's options.
  channels = model._channels  # pylint: disable=protected-access
  kwargs = {"arch_def": _timm_arch_def(model),
            "stem_size": channels(STEM_CHANNELS),
            "num_features": channels(LAST_CHANNELS),
            "num_classes": int(model.num_classes),
            "gn_groups": GN_GROUPS}
  code = (
      "timm.models.mobilenetv3.MobileNetV3(block_args=timm.models."
      f"_efficientnet_builder.decode_arch_def({kwargs['arch_def']!r}), "
      f"stem_size={kwargs['stem_size']}, fix_stem=True, "
      f"num_features={kwargs['num_features']}, "
      f"num_classes={kwargs['num_classes']}, "
      "act_layer=timm.layers.get_act_layer('hard_swish'), "
      "norm_layer=functools.partial(timm.layers.GroupNormAct, "
      f"num_groups={GN_GROUPS}), se_layer=functools.partial(timm.models."
      "_efficientnet_blocks.SqueezeExcite, gate_layer='hard_sigmoid', "
      "force_act_layer=torch.nn.ReLU, rd_round_fn=timm.models."
      "_efficientnet_builder.round_channels))")
  return {"model_name": None, "kwargs": kwargs, "code": code}


def build_timm(recipe: Mapping[str, Any]):
  """The timm module a `timm_spec` describes (imports timm and torch)."""
  # pylint: disable=import-outside-toplevel
  import timm
  from timm.models import _efficientnet_blocks as blocks
  from timm.models import _efficientnet_builder as builder
  import torch
  kwargs = recipe["kwargs"]
  return timm.models.mobilenetv3.MobileNetV3(
      block_args=builder.decode_arch_def(kwargs["arch_def"]),
      stem_size=kwargs["stem_size"], fix_stem=True,
      num_features=kwargs["num_features"], num_classes=kwargs["num_classes"],
      act_layer=timm.layers.get_act_layer("hard_swish"),
      norm_layer=functools.partial(timm.layers.GroupNormAct,
                                   num_groups=kwargs["gn_groups"]),
      se_layer=functools.partial(blocks.SqueezeExcite,
                                 gate_layer="hard_sigmoid",
                                 force_act_layer=torch.nn.ReLU,
                                 rd_round_fn=builder.round_channels))


WEIGHTS = spec.WeightsSpec(
    what="MobileNetV3",
    layouts=(TIMM, FUNMATCH),
    formats={"npz": "funmatch", "safetensors": "funmatch", "timm": "timm"},
    head=HEAD,
    describe=describe,
    hint="set the model's width to that of the checkpoint, or use "
    "dont_load for names to keep from init.",
    check_file=_batch_norm_file,
    timm=timm_spec,
    build_timm=build_timm,
)
