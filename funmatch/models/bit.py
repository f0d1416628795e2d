"""BiT ResNet-v2 (Kolesnikov et al. 2020) with the official `.npz` weights.

The network follows the official BiT code (google-research/big_transfer):
pre-activation bottleneck units, GroupNorm with 32 groups (eps 1e-5) and
weight-standardised convolutions (eps 1e-10), a 7x7/2 root conv followed by
zero padding and a 3x3/2 VALID max-pool, and a final GN -> ReLU -> global
average pool -> zero-initialised 1x1-conv head.

Flax parameter names mirror the official checkpoint names one to one, so the
loader is a renaming and nothing else: the official name is `resnet/` + the
flax path, with GroupNorm `scale`/`bias` called `gamma`/`beta`:

  resnet/root_block/standardized_conv2d/kernel
  resnet/block1/unit01/a/group_norm/gamma|beta  (GN before conv a)
  resnet/block1/unit01/a/standardized_conv2d/kernel  (a 1x1, b 3x3, c 1x1)
  resnet/block1/unit01/a/proj/standardized_conv2d/kernel  (shortcut)
  resnet/group_norm/gamma|beta  (final GN before the head)
  resnet/head/conv2d/kernel|bias

Every parameter also has the official shape: conv kernels HWIO, GroupNorm
scale/bias [C], head kernel [1, 1, C, num_classes], head bias [num_classes].
That is also what timm's `resnetv2._load_weights` reads, so 'npz' exports
load there unchanged.

`WEIGHTS` (the end of this file) also reads big_vision's `bit_paper` names (`root_block/conv_root/
kernel`, `block1/unit01/gn1/scale`, ..., `norm-pre-head/scale`, `head/kernel`),
timm `ResNetV2` state dicts (`stem.conv.weight`, `stages.0.blocks.0.conv1.
weight`, ..., `head.fc.weight`; OIHW kernels) and funmatch's own flax names;
its `formats` say which layout each export format writes. big_vision pads
the stem max-pool with -inf where the others pad with zeros: the layout
implies `stem_pool_padding` (see `Model`).
"""

import dataclasses
import functools
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from funmatch.errors import UserError
from funmatch.models import conv, pool, spec

Params = Mapping[str, Any]

# Official block counts per stage (26 is timm's / big_vision's R26).
BLOCK_COUNTS = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
GN_GROUPS = 32
GN_EPSILON = 1e-5
WS_EPSILON = 1e-10  # As in the official bit_jax / bit_pytorch StdConv.
PREFIX = "resnet/"
STEM_POOL_PADDINGS = ("auto", "zeros", "neg_inf")
# What an 'auto' option means when no weights file says otherwise.
AUTO_OPTIONS = {"stem_pool_padding": "zeros"}


# --------------------------------------------------------------------------
# Configuration checks.
# --------------------------------------------------------------------------


def block_counts(depth: Union[int, Sequence[int]]) -> Tuple[int, ...]:
  """Returns the four per-stage unit counts for `depth` (int or 4 counts)."""
  if isinstance(depth, (int, np.integer)) and not isinstance(depth, bool):
    if int(depth) in BLOCK_COUNTS:
      return BLOCK_COUNTS[int(depth)]
  elif isinstance(depth, (list, tuple)) and len(depth) == 4 and all(
      isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1
      for d in depth):
    return tuple(int(d) for d in depth)
  raise UserError(
      f"BiT depth={depth!r} is not supported; use one of "
      f"{sorted(BLOCK_COUNTS)} or a list of 4 positive block counts such as "
      "[1, 1, 1, 1].")


def root_channels(width: float) -> int:
  """Channels of the root conv (64 * width), checked against GroupNorm(32)."""
  try:
    channels = 64 * float(width)
  except (TypeError, ValueError):
    channels = float("nan")
  # Every later channel count is this times a power of two, so checking the
  # root is enough for all GroupNorm layers to split into 32 groups.
  if not (channels > 0 and channels == round(channels)
          and round(channels) % GN_GROUPS == 0):
    raise UserError(
        f"BiT width={width!r} gives {channels:g} root channels, which 32 "
        "GroupNorm groups cannot split; use a width that makes 64*width a "
        "multiple of 32 (0.5, 1, 1.5, 2, 3, 4, ...).")
  return int(round(channels))


# --------------------------------------------------------------------------
# Layers.
# --------------------------------------------------------------------------


def standardize(x: jnp.ndarray, axis: Sequence[int], eps: float) -> jnp.ndarray:
  """(x - mean) / sqrt(var + eps) over `axis`, variance from the deviations."""
  x = x - jnp.mean(x, axis=axis, keepdims=True)
  return x / jnp.sqrt(jnp.mean(jnp.square(x), axis=axis, keepdims=True) + eps)


def standardize_kernel(kernel: jnp.ndarray) -> jnp.ndarray:
  """Weight standardisation of an HWIO kernel, per output channel.

  The same as `standardize(kernel, (0, 1, 2), WS_EPSILON)`, with the means over
  the leading axes taken as products with an averaging vector: XLA:CPU's
  reductions over leading axes made weight standardisation a fifth of a small
  student's training step (docs/benchmarks.md); its matrix-vector products are
  fast, and at HIGHEST precision as exact on every backend.
  """
  flat = kernel.reshape(-1, kernel.shape[-1])  # [kh * kw * in, out]
  average = jnp.full((flat.shape[0],), 1.0 / flat.shape[0], flat.dtype)
  mean = lambda x: jnp.dot(average, x, precision=jax.lax.Precision.HIGHEST)
  centred = flat - mean(flat)
  return (centred / jnp.sqrt(mean(jnp.square(centred)) + WS_EPSILON)).reshape(kernel.shape)


class StdConv(nn.Module):
  """Bias-free conv with weight standardisation and BiT's fixed padding.

  Padding is explicit and symmetric-first ((k-1)//2 before, the rest after),
  as in the official code, rather than TF "SAME" (which pads strided convs
  differently and would shift the pretrained features).
  """
  features: int
  kernel_size: int = 1
  stride: int = 1
  standardize_weights: bool = True
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    if self.standardize_weights:
      kernel = standardize_kernel(kernel)  # In float32, then cast.
    before = (k - 1) // 2
    padding = [(before, k - 1 - before)] * 2
    return conv.conv2d(x.astype(self.dtype), kernel.astype(self.dtype),
                       self.stride, padding, impl=self.conv_impl)


def _sum_hw(x: jnp.ndarray) -> jnp.ndarray:
  """[N, S, C] -> [N, C]: the sum over the spatial axis."""
  return jnp.sum(x, axis=1)


def _per_channel(stat: jnp.ndarray, channels: int) -> jnp.ndarray:
  """[N, G] per-group values -> [N, 1, C], each group's value on its channels."""
  return jnp.repeat(stat, channels // stat.shape[1], axis=1)[:, None, :]


def _group_mean(per_channel_sum: jnp.ndarray, groups: int, count: int) -> jnp.ndarray:
  """[N, C] channel sums -> [N, G] group means over `count` elements each."""
  n, c = per_channel_sum.shape
  return jnp.sum(per_channel_sum.reshape(n, groups, c // groups), axis=-1) / count


def _group_norm_forward(x, scale, bias, groups, eps):
  n, h, w, c = x.shape
  flat = x.reshape(n, h * w, c)
  count = h * w * (c // groups)
  centred = flat - _per_channel(_group_mean(_sum_hw(flat), groups, count), c)
  variance = _group_mean(_sum_hw(jnp.square(centred)), groups, count)
  inv_std = jax.lax.rsqrt(variance + eps)
  normed = centred * _per_channel(inv_std, c)
  return (normed * scale + bias).reshape(x.shape), (normed, inv_std, scale)


def _group_norm_backward(groups, eps, residuals, dy):
  """The closed-form gradient: per (sample, group), with x^ the normalised input
  and g = dy * scale, dx = (g - mean(g) - x^ mean(g x^)) / std. XLA:CPU's own
  derivative of the two-pass statistics re-reduces over strided axes several
  times; this reads dy and x^ once for two channel sums and once for dx."""
  del eps
  normed, inv_std, scale = residuals
  n, hw, c = normed.shape
  shape, dy = dy.shape, dy.reshape(n, hw, c)
  dy_sum, dy_normed_sum = _sum_hw(dy), _sum_hw(dy * normed)  # [N, C] each
  count = hw * (c // groups)
  mean_g = _group_mean(dy_sum * scale, groups, count)
  mean_g_normed = _group_mean(dy_normed_sum * scale, groups, count)
  dx = (dy * scale - _per_channel(mean_g, c)
        - normed * _per_channel(mean_g_normed, c)) * _per_channel(inv_std, c)
  return dx.reshape(shape), jnp.sum(dy_normed_sum, axis=0), jnp.sum(dy_sum, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray,
               groups: int = GN_GROUPS, eps: float = GN_EPSILON) -> jnp.ndarray:
  """GroupNorm of float32 NHWC `x`: mean and variance (from the deviations) over
  each sample's (H, W, C / groups) block, then `* scale + bias` per channel."""
  return _group_norm_forward(x, scale, bias, groups, eps)[0]


group_norm.defvjp(_group_norm_forward, _group_norm_backward)


class GroupNorm(nn.Module):
  """BiT's GroupNorm: statistics in float32, variance from the deviations."""
  num_groups: int = GN_GROUPS
  epsilon: float = GN_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    y = group_norm(x.astype(jnp.float32), scale, bias, self.num_groups, self.epsilon)
    return y.astype(self.dtype)


class _Projection(nn.Module):
  """Holds the shortcut conv so it is named `a/proj/standardized_conv2d`."""
  features: int
  stride: int
  standardize_weights: bool = True
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return StdConv(self.features, 1, self.stride, self.standardize_weights,
                   self.dtype, self.conv_impl, name="standardized_conv2d")(x)


class PreActConv(nn.Module):
  """GN -> ReLU -> StdConv: one of a unit's `a`, `b`, `c` sub-blocks.

  When `proj_features` is set (only for `a`), the projection shortcut is also
  computed from the pre-activated input and returned as the second output.
  """
  features: int
  kernel_size: int = 1
  stride: int = 1
  proj_features: Optional[int] = None
  proj_stride: int = 1
  standardize_weights: bool = True
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray):
    h = nn.relu(GroupNorm(dtype=self.dtype, name="group_norm")(x))
    shortcut = None
    if self.proj_features:
      shortcut = _Projection(self.proj_features, self.proj_stride,
                             self.standardize_weights, self.dtype,
                             self.conv_impl, name="proj")(h)
    y = StdConv(self.features, self.kernel_size, self.stride,
                self.standardize_weights, self.dtype, self.conv_impl,
                name="standardized_conv2d")(h)
    return y, shortcut


class BottleneckUnit(nn.Module):
  """Pre-activation bottleneck; the stride sits on the 3x3 conv (`b`)."""
  mid_features: int
  stride: int = 1
  standardize_weights: bool = True
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    out_features = 4 * self.mid_features
    needs_proj = x.shape[-1] != out_features or self.stride != 1
    common = dict(standardize_weights=self.standardize_weights,
                  dtype=self.dtype, conv_impl=self.conv_impl)
    y, proj = PreActConv(
        self.mid_features, 1, 1,
        proj_features=out_features if needs_proj else None,
        proj_stride=self.stride, name="a", **common)(x)
    y, _ = PreActConv(self.mid_features, 3, self.stride, name="b", **common)(y)
    y, _ = PreActConv(out_features, 1, 1, name="c", **common)(y)
    return y + (proj if needs_proj else x.astype(y.dtype))


class Stage(nn.Module):
  """`units` bottleneck units named unit01, unit02, ...; the first strides."""
  units: int
  mid_features: int
  first_stride: int = 1
  standardize_weights: bool = True
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for i in range(self.units):
      x = BottleneckUnit(self.mid_features, self.first_stride if i == 0 else 1,
                         self.standardize_weights, self.dtype, self.conv_impl,
                         name=f"unit{i + 1:02d}")(x)
    return x


class RootBlock(nn.Module):
  """7x7/2 StdConv, then a 3x3/2 max-pool over a 1-pixel border.

  The border is zeros (`pool_padding='zeros'`: official BiT and timm pad
  with zeros, then pool VALID) or -inf (`'neg_inf'`: big_vision's
  `bit_paper` pools with padding, which never picks the border). The two
  differ because the conv output can be negative here (no ReLU before the
  pool), so weights must run with the padding they were trained with.
  """
  features: int
  standardize_weights: bool = True
  pool_padding: str = "zeros"
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = StdConv(self.features, 7, 2, self.standardize_weights, self.dtype,
                self.conv_impl, name="standardized_conv2d")(x)
    # -inf (the identity of max, what flax pads a max-pool with) or zeros.
    border = -jnp.inf if self.pool_padding == "neg_inf" else 0
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=border)
    return pool.max_pool(x, 3, 2)


class Head(nn.Module):
  """Zero-initialised 1x1 conv on the pooled features, as in BiT."""
  num_classes: int
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    head = conv.Conv(self.num_classes, 1, use_bias=True,
                     kernel_init=nn.initializers.zeros, dtype=jnp.float32,
                     param_dtype=jnp.float32, impl=self.conv_impl, name="conv2d")
    return head(x.astype(jnp.float32)[:, None, None, :])[:, 0, 0, :]


class Model(nn.Module):
  """BiT ResNet-v2. `__call__(images, train) -> (logits, taps)`.

  Attributes:
    num_classes: head size; 0 means no head (logits are the pre-logits).
    depth: 26, 50, 101, 152 or a list of 4 per-stage unit counts.
    width: width multiplier (root has 64*width channels; must be a multiple
      of 32, so 0.5, 1, 1.5, 2, 3, 4, ...).
    dtype: activation / compute dtype; params stay float32, logits float32.
    standardize_weights: False runs the convs with kernels as stored, for
      params passed through `prestandardize` (a frozen teacher).
    stem_pool_padding: what the stem's max-pool pads with: 'zeros' (official
      BiT, timm), 'neg_inf' (big_vision's bit_paper), or 'auto': whatever
      the weights file implies, resolved by `weights.init.decide_options` before
      the model is built (unresolved, 'auto' runs as 'zeros').
    conv_impl: 'auto', 'xla' or 'matmul' (funmatch.models.conv): how the
      convs run; the same params and function either way.

  Images are NHWC in [-1, 1]. Taps: `stem` (after the max-pool),
  `stage1`..`stage4` (each stage's output), `pre_logits` ([B, C] pooled).
  """
  num_classes: int
  depth: Union[int, Sequence[int]] = 50
  width: float = 1
  dtype: Any = jnp.float32
  standardize_weights: bool = True
  stem_pool_padding: str = "auto"
  conv_impl: str = "auto"

  def __post_init__(self):
    # Fail at construction time (config errors), not deep inside init/jit.
    if isinstance(self.depth, list):
      object.__setattr__(self, "depth", tuple(self.depth))  # Hashable.
    block_counts(self.depth)
    root_channels(self.width)
    conv.check_impl(self.conv_impl)
    if (not isinstance(self.num_classes, (int, np.integer))
        or isinstance(self.num_classes, bool) or self.num_classes < 0):
      raise UserError(f"BiT num_classes={self.num_classes!r} must be an "
                      "integer >= 0 (0 means no head).")
    if self.stem_pool_padding not in STEM_POOL_PADDINGS:
      raise UserError(f"BiT stem_pool_padding={self.stem_pool_padding!r} is "
                      f"unknown; use one of {', '.join(STEM_POOL_PADDINGS)}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False):
    del train  # No dropout or batch statistics in BiT.
    width = root_channels(self.width)
    common = dict(standardize_weights=self.standardize_weights,
                  dtype=self.dtype, conv_impl=self.conv_impl)
    taps = {}
    padding = AUTO_OPTIONS["stem_pool_padding"] if (
        self.stem_pool_padding == "auto") else self.stem_pool_padding
    x = taps["stem"] = RootBlock(width, pool_padding=padding,
                                 name="root_block", **common)(images)
    for stage, units in enumerate(block_counts(self.depth)):
      x = taps[f"stage{stage + 1}"] = Stage(
          units, mid_features=width * 2**stage,
          first_stride=1 if stage == 0 else 2,
          name=f"block{stage + 1}", **common)(x)
    x = nn.relu(GroupNorm(dtype=self.dtype, name="group_norm")(x))
    # Pool in float32: a mean over many bf16 values loses precision.
    x = taps["pre_logits"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if self.num_classes:
      return Head(self.num_classes, self.conv_impl, name="head")(x), taps
    return x, taps


# --------------------------------------------------------------------------
# Weights: official BiT npz, big_vision (bit_paper), timm, funmatch.
# --------------------------------------------------------------------------

HEAD = ("head/conv2d/kernel", "head/conv2d/bias")
_UNIT = re.compile(r"block(\d+)/unit(\d+)/([abc])/(.+)")


def _official_name(name: str) -> str:
  """'block1/unit01/a/group_norm/scale' -> 'resnet/block1/.../gamma'."""
  *scope, leaf = name.split("/")
  if scope and scope[-1] == "group_norm":
    leaf = {"scale": "gamma", "bias": "beta"}.get(leaf, leaf)
  return PREFIX + "/".join(scope + [leaf])


def describe(params: Params) -> str:
  """`depth=[3, 4, 6, 3], width=1, num_classes=10`-style summary of params."""
  tree = spec.unwrap(params)[0]
  units = [sum(k.startswith("unit") for k in tree.get(f"block{i}", {}))
           for i in range(1, 5)]
  summary = f"depth={units}"
  root = tree.get("root_block", {}).get("standardized_conv2d", {})
  if "kernel" in root:
    summary += f", width={np.shape(root['kernel'])[-1] / 64:g}"
  head = tree.get("head", {}).get("conv2d", {})
  classes = np.shape(head["kernel"])[-1] if "kernel" in head else 0
  return summary + f", num_classes={classes}"


def prestandardize(params: Params) -> Params:
  """Returns params with every StdConv kernel already standardised.

  `Model(..., standardize_weights=False)` on the result computes the same
  function as the original model on `params`, without re-standardising the
  (frozen) kernels at every step.
  """
  tree, wrapped = spec.unwrap(params)
  flat = flax.traverse_util.flatten_dict(tree)
  flat = {path: (standardize_kernel(jnp.asarray(value, jnp.float32))
                 if path[-2:] == ("standardized_conv2d", "kernel") else value)
          for path, value in flat.items()}
  tree = flax.traverse_util.unflatten_dict(flat)
  return {"params": tree} if wrapped else tree


def freeze(module: Model, params: Params) -> Tuple[Model, Params]:
  """A frozen BiT: conv kernels standardised once, not at every step."""
  return (module.clone(standardize_weights=False),
          jax.jit(prestandardize)(params))


def _undo_numbered_convs(arrays: Dict[str, np.ndarray]):
  """Some official dumps number repeated layers `standardized_conv2d_1`."""
  return {re.sub(r"/standardized_conv2d_\d+/", "/standardized_conv2d/", name):
          value for name, value in arrays.items()}


def _big_vision_name(name: str) -> str:
  """funmatch name -> big_vision `bit_paper` name."""
  unit = _UNIT.fullmatch(name)
  if unit:
    block, number, part, rest = unit.groups()
    i = "abc".index(part) + 1
    return f"block{block}/unit{number}/" + {
        "group_norm/scale": f"gn{i}/scale",
        "group_norm/bias": f"gn{i}/bias",
        "standardized_conv2d/kernel": f"conv{i}/kernel",
        "proj/standardized_conv2d/kernel": "conv_proj/kernel",
    }.get(rest, rest)
  return {
      "root_block/standardized_conv2d/kernel": "root_block/conv_root/kernel",
      "group_norm/scale": "norm-pre-head/scale",
      "group_norm/bias": "norm-pre-head/bias",
      "head/conv2d/kernel": "head/kernel",
      "head/conv2d/bias": "head/bias",
  }.get(name, name)


def _big_vision_value(name: str, value: np.ndarray) -> np.ndarray:
  """GN params are [1, 1, 1, C] and the head a Dense [C, K] there."""
  if name.endswith(("group_norm/scale", "group_norm/bias")):
    return value.reshape(1, 1, 1, -1)
  if name == HEAD[0]:
    return value.reshape(value.shape[-2:])
  return value


def _strip_params_prefix(arrays: Dict[str, np.ndarray]):
  """big_vision checkpoints may keep params under `params/`."""
  prefix = "params/"
  if arrays and all(name.startswith(prefix) for name in arrays):
    return {name[len(prefix):]: value for name, value in arrays.items()}
  return arrays


def _timm_name(name: str) -> str:
  """funmatch name -> timm `ResNetV2` state-dict name."""
  unit = _UNIT.fullmatch(name)
  if unit:
    block, number, part, rest = unit.groups()
    i = "abc".index(part) + 1
    return f"stages.{int(block) - 1}.blocks.{int(number) - 1}." + {
        "group_norm/scale": f"norm{i}.weight",
        "group_norm/bias": f"norm{i}.bias",
        "standardized_conv2d/kernel": f"conv{i}.weight",
        "proj/standardized_conv2d/kernel": "downsample.conv.weight",
    }.get(rest, rest)
  return {
      "root_block/standardized_conv2d/kernel": "stem.conv.weight",
      "group_norm/scale": "norm.weight",
      "group_norm/bias": "norm.bias",
      "head/conv2d/kernel": "head.fc.weight",
      "head/conv2d/bias": "head.fc.bias",
  }.get(name, name)


def _torch_layout(_name: str, value: np.ndarray) -> np.ndarray:
  return spec.hwio_to_oihw(value) if value.ndim == 4 else value


def _flax_layout(_name: str, value: np.ndarray, _shape=None) -> np.ndarray:
  return spec.oihw_to_hwio(value) if value.ndim == 4 else value


OFFICIAL = spec.Layout(
    "bit_official", _official_name, prepare=_undo_numbered_convs,
    implies={"stem_pool_padding": "zeros"},
    marker=lambda name: name.startswith(PREFIX))
BIG_VISION = spec.Layout(
    "big_vision", _big_vision_name, to_file=_big_vision_value,
    prepare=_strip_params_prefix, implies={"stem_pool_padding": "neg_inf"},
    marker=lambda name: name.endswith("root_block/conv_root/kernel"))
# timm's *_bit models pad the stem with zeros ('fixed' stem).
TIMM = spec.Layout(
    "timm", _timm_name, to_file=_torch_layout, to_model=_flax_layout,
    implies={"stem_pool_padding": "zeros"},
    marker=lambda name: name.startswith("stem.conv."))
FUNMATCH = dataclasses.replace(
    spec.FUNMATCH, marker=lambda name: name == "root_block/standardized_conv2d/kernel")


# (depth, width) of the BiT models timm registers as resnetv2_{d}x{w}_bit.
TIMM_NAMED = {(50, 1), (50, 3), (101, 1), (101, 3), (152, 2), (152, 4)}


def timm_spec(model: Model, params: Params) -> Dict[str, Any]:
  """How timm builds a model that computes what `model` computes.

  Returns {'model_name' (a `timm.create_model` name or None), 'kwargs'
  (JSON values for it, or for `timm.models.resnetv2.ResNetV2`), 'code'
  (the Python that builds it)}. timm's BiT convs standardise with eps 1e-8
  where funmatch uses 1e-10, a difference far below float32 noise.
  """
  del params  # Everything follows from the model's options.
  layers = list(block_counts(model.depth))
  width = float(model.width)
  width = int(width) if width.is_integer() else width
  padding = model.stem_pool_padding
  if padding == "auto":
    raise ValueError("resolve stem_pool_padding='auto' before exporting")
  depth = {tuple(v): k for k, v in BLOCK_COUNTS.items()}.get(tuple(layers))
  name = f"resnetv2_{depth}x{width}_bit"
  classes = int(model.num_classes)
  if (depth, width) in TIMM_NAMED and padding == "zeros":
    return {"model_name": name, "kwargs": {"num_classes": classes},
            "code": f"timm.create_model({name!r}, num_classes={classes})"}
  # -inf padding is plain PyTorch max-pool padding: timm's stem_type ''.
  stem_type = "fixed" if padding == "zeros" else ""
  kwargs = {"layers": layers, "width_factor": width, "stem_type": stem_type,
            "num_classes": classes}
  code = ("timm.models.resnetv2.ResNetV2(" +
          ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) +
          ", conv_layer=functools.partial(timm.layers.StdConv2d, eps=1e-8))")
  return {"model_name": None, "kwargs": kwargs, "code": code}


def build_timm(recipe: Mapping[str, Any]):
  """The timm module a `timm_spec` describes (imports timm)."""
  import functools  # pylint: disable=import-outside-toplevel
  import timm  # pylint: disable=import-outside-toplevel
  if recipe.get("model_name"):
    return timm.create_model(recipe["model_name"], pretrained=False,
                             **recipe["kwargs"])
  return timm.models.resnetv2.ResNetV2(
      **recipe["kwargs"],
      conv_layer=functools.partial(timm.layers.StdConv2d, eps=1e-8))


# --------------------------------------------------------------------------
# Published weights: the paper's teachers and students, BiT upstream.
# --------------------------------------------------------------------------


def _paper(name, path, classes, res, description, hub="", depth=152, width=2):
  # The paper trained every model with big_vision's bit_paper, whose stem
  # max-pool pads with -inf (timm's ports of the same weights pad with zeros).
  return spec.Published(
      name, {"depth": depth, "width": width, "stem_pool_padding": "neg_inf"},
      classes, res, description, path=f"distill/{path}", hub=hub)


def _upstream(upstream: str, depth: int, width: int,
              ilsvrc: bool) -> spec.Published:
  # Official BiT (big_transfer) code pads the stem max-pool with zeros.
  name = f"BiT-{upstream}-R{depth}x{width}" + ("-ILSVRC2012" if ilsvrc else "")
  hub = ""
  if upstream == "M":
    hub = (f"resnetv2_{depth}x{width}_bit.goog_in21k"
           + ("_ft_in1k" if ilsvrc else ""))
  if ilsvrc:
    classes, res = 1000, (480 if (depth, width) == (152, 4) else 448)
    what = "BiT-M (ImageNet-21k) fine-tuned on ImageNet-1k"
  else:
    classes, res = (21843 if upstream == "M" else 1000), 224
    what = ("BiT-M upstream (ImageNet-21k)" if upstream == "M"
            else "BiT-S upstream (ImageNet-1k)")
  return spec.Published(
      name, {"depth": depth, "width": width, "stem_pool_padding": "zeros"},
      classes, res, f"{what}, R{depth}x{width}", path=f"{name}.npz", hub=hub)


_SIZES = ((50, 1), (50, 3), (101, 1), (101, 3), (152, 2), (152, 4))

PUBLISHED = (
    # The paper's students (Beyer et al. 2022, Table 1).
    _paper("FunMatch-224px-i1k82.8", "R50x1_224.npz", 1000, 224,
           "BiT-R50x1 student distilled on ImageNet-1k at 224px, 82.8% top-1",
           hub="resnetv2_50x1_bit.goog_distilled_in1k", depth=50, width=1),
    _paper("FunMatch-160px-i1k80.5", "R50x1_160.npz", 1000, 160,
           "BiT-R50x1 student distilled on ImageNet-1k at 160px, 80.5% top-1",
           depth=50, width=1),
    # The paper's teachers: BiT-M R152x2 fine-tuned per dataset.
    _paper("FunMatch-teacher-224px-i1k", "R152x2_T_224.npz", 1000, 224,
           "BiT-M R152x2 teacher, ImageNet-1k, 224px (inception crop), 83.0%",
           hub="resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k"),
    _paper("FunMatch-teacher-384px-i1k", "R152x2_T_384.npz", 1000, 384,
           "BiT-M R152x2 teacher, ImageNet-1k, 384px (resize crop), 84.3%",
           hub="resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k_384"),
    _paper("FunMatch-teacher-128px-flowers", "R152x2_T_flowers128.npz", 102,
           128, "BiT-M R152x2 teacher, Oxford Flowers-102, 128px"),
    _paper("FunMatch-teacher-128px-pet", "R152x2_T_pet128.npz", 37, 128,
           "BiT-M R152x2 teacher, Oxford-IIIT Pets, 128px"),
    _paper("FunMatch-teacher-128px-food", "R152x2_T_food128.npz", 101, 128,
           "BiT-M R152x2 teacher, Food-101, 128px"),
    _paper("FunMatch-teacher-128px-sun", "R152x2_T_sun128.npz", 397, 128,
           "BiT-M R152x2 teacher, SUN397, 128px"),
    # BiT upstream (Kolesnikov et al. 2020) and its ImageNet-1k fine-tunes.
    *(_upstream(up, d, w, False) for up in ("S", "M") for d, w in _SIZES),
    *(_upstream("M", d, w, True) for d, w in _SIZES),
)


WEIGHTS = spec.WeightsSpec(
    what="BiT",
    layouts=(OFFICIAL, BIG_VISION, TIMM, FUNMATCH),
    formats={"npz": "bit_official", "safetensors": "funmatch", "timm": "timm"},
    head=HEAD,
    describe=describe,
    hint="set the model's depth and width to those of the checkpoint (e.g. "
    "BiT-M-R50x1 is depth=50, width=1), or use dont_load for names to keep "
    "from init.",
    auto_options=AUTO_OPTIONS,
    # dont_load regexes also match the official name (resnet/head/conv2d/...).
    dont_load_names=lambda name: (name, _official_name(name)),
    freeze=freeze,
    timm=timm_spec,
    build_timm=build_timm,
    published=PUBLISHED,
)
