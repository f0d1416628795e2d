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
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from funmatch.errors import UserError
from funmatch.models import conv

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
    spec = self.spec
    common = dict(dtype=self.dtype, conv_impl=self.conv_impl)
    y = x
    if self.expanded != x.shape[-1]:
      y = ConvNorm(self.expanded, activation=spec.activation, name="expand",
                   **common)(y)
    y = ConvNorm(self.expanded, spec.kernel, spec.stride, depthwise=True,
                 activation=spec.activation, name="depthwise", **common)(y)
    if spec.use_se:
      y = SqueezeExcite(make_divisible(self.expanded // 4), name="se", **common)(y)
    y = ConvNorm(self.out, name="project", **common)(y)
    if spec.stride == 1 and x.shape[-1] == self.out:
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
    for index, spec in enumerate(LARGE_BLOCKS, start=1):
      x = InvertedResidual(spec, self._channels(spec.expanded),
                           self._channels(spec.out), name=f"block{index:02d}",
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
