"""ConvNeXt V1 (Liu et al. 2022) and V2 (Woo et al. 2023), as timm builds them.

The network: a patchify stem (4x4/4 conv + LayerNorm), four stages of blocks
(depthwise 7x7 conv -> LayerNorm -> Linear(4C) -> GELU [-> GRN] -> Linear(C)
[-> layer scale] -> stochastic depth -> residual), a downsampling layer before
stages 2-4 (LayerNorm + 2x2/2 conv), global average pooling, LayerNorm and a
zero-initialised Dense head. V2 adds Global Response Normalisation (GRN) after
the GELU and drops layer scale. LayerNorm epsilon is 1e-6, the GELU exact (erf),
both as in timm. Every convolution goes through funmatch/models/conv.py.

Variants (timm's depths and widths; `depths` / `dims` override them):
  atto [2, 2, 6, 2] x [40, 80, 160, 320]     tiny  [3, 3, 9, 3]  x [96 .. 768]
  femto                [48 .. 384]           small [3, 3, 27, 3] x [96 .. 768]
  pico                 [64 .. 512]           base  [3, 3, 27, 3] x [128 .. 1024]
  nano [2, 2, 8, 2] x  [80 .. 640]           large [3, 3, 27, 3] x [192 .. 1536]

Taps (224px input, C_i the width of stage i):
  stage1..stage4  each stage's output, [B, 56 / 28 / 14 / 7, ..., C_i]
  pre_logits      pooled + LayerNorm features, float32 [B, C_4]

Weights: funmatch's names ('/'-joined flax paths, below) in .npz / .safetensors,
and timm `ConvNeXt` state dicts (`stem.0`, `stages.{i}.downsample.{0,1}`,
`stages.{i}.blocks.{j}.conv_dw|norm|mlp.fc1|mlp.grn|mlp.fc2|gamma`, `head.norm`,
`head.fc`), whose MLP is either Linear [out, in] or, for timm's atto..nano
(`conv_mlp`), 1x1 conv [out, in, 1, 1]: both load. A timm export writes Linear
MLPs and records `conv_mlp=False`, so timm builds the matching module.
"""
import re
from typing import Any, Dict, Mapping, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from funmatch.errors import UserError
from funmatch.models import conv, spec

LN_EPSILON = 1e-6
LAYER_SCALE_INIT = 1e-6
VERSIONS = (1, 2)


class Dims(NamedTuple):
  depths: tuple
  dims: tuple


VARIANTS = {
    "atto": Dims((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": Dims((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": Dims((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": Dims((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": Dims((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": Dims((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": Dims((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": Dims((3, 3, 27, 3), (192, 384, 768, 1536)),
}


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def drop_path_rates(depths: Sequence[int], drop_path: float) -> list:
  """Per-block stochastic-depth rates (one list per stage), rising linearly
  over all blocks from 0 to drop_path, as timm's."""
  total = sum(depths)
  rates = np.linspace(0.0, float(drop_path), total).tolist() if total else []
  out, start = [], 0
  for depth in depths:
    out.append(rates[start:start + depth])
    start += depth
  return out


def _layer_norm(dtype, name):
  return nn.LayerNorm(epsilon=LN_EPSILON, dtype=dtype, param_dtype=jnp.float32,
                      name=name)


class GRN(nn.Module):
  """Global Response Normalisation (ConvNeXt V2): x + scale * (x * N(x)) + bias,
  N(x) = ||x||_2 over space / its mean over channels."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.zeros, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(1, 2),
                            keepdims=True))
    normed = norm / (jnp.mean(norm, axis=-1, keepdims=True) + 1e-6)
    return (x + bias + scale * (x * normed)).astype(self.dtype)


class Block(nn.Module):
  """Depthwise 7x7 -> LN -> MLP(4x, GELU[, GRN]) [-> layer scale] + residual."""
  version: int = 1
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool):
    channels = x.shape[-1]
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=nn.initializers.truncated_normal(0.02), name=name)
    y = conv.Conv(channels, 7, 1, padding=[(3, 3)] * 2,
                  feature_group_count=channels, dtype=self.dtype,
                  kernel_init=nn.initializers.truncated_normal(0.02),
                  impl=self.conv_impl, name="dwconv")(x)
    y = _layer_norm(self.dtype, "norm")(y)
    y = nn.gelu(dense(4 * channels, "fc1")(y), approximate=False)
    if self.version == 2:
      y = GRN(self.dtype, name="grn")(y)
    y = dense(channels, "fc2")(y)
    if self.version == 1:
      gamma = self.param("gamma", nn.initializers.constant(LAYER_SCALE_INIT),
                         (channels,), jnp.float32)
      y = y * gamma.astype(y.dtype)
    # Stochastic depth: drop the branch per example.
    y = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3),
                   deterministic=not train, name="drop_path")(y)
    return x + y


class Model(nn.Module):
  """ConvNeXt classifier. `__call__(images, train) -> (logits, taps)`.

  Attributes:
    num_classes: head size; 0 means no head (logits are the pre-logits).
    variant: one of `VARIANTS` ('atto' .. 'large').
    version: 1 (layer scale) or 2 (GRN, no layer scale).
    depths, dims: four blocks-per-stage / widths overriding the variant's
      (empty keeps it), e.g. for tiny test models.
    drop_path: stochastic depth, rising linearly over all blocks from 0 to
      this; active only with train=True (then a 'dropout' rng is needed).
    dtype: activation / compute dtype; params stay float32, logits float32.
    conv_impl: 'auto', 'xla' or 'matmul' (funmatch.models.conv).

  Images are NHWC in [-1, 1]; the image size must divide by 32.
  """
  num_classes: int
  variant: str = "tiny"
  version: int = 1
  depths: Sequence[int] = ()
  dims: Sequence[int] = ()
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  def __post_init__(self):
    # Config errors surface at construction, not inside init/jit.
    if not _is_int(self.num_classes) or self.num_classes < 0:
      raise UserError(f"ConvNeXt num_classes={self.num_classes!r} must be an "
                      "integer >= 0 (0 means no head).")
    if self.variant not in VARIANTS:
      raise UserError(f"ConvNeXt variant={self.variant!r} is unknown; use one "
                      f"of {', '.join(VARIANTS)}.")
    if self.version not in VERSIONS:
      raise UserError(f"ConvNeXt version={self.version!r} is unknown; use 1 "
                      "(layer scale) or 2 (GRN).")
    for name in ("depths", "dims"):
      value = tuple(getattr(self, name))
      if value and (len(value) != 4
                    or not all(_is_int(v) and v > 0 for v in value)):
        raise UserError(f"ConvNeXt {name}={list(value)} must be four positive "
                        "integers, one per stage (empty keeps the variant's).")
    if not (isinstance(self.drop_path, (int, float, np.floating))
            and not isinstance(self.drop_path, bool)
            and 0.0 <= self.drop_path < 1.0):
      raise UserError(f"ConvNeXt drop_path={self.drop_path!r} must be in "
                      "[0, 1) (0 disables stochastic depth).")
    conv.check_impl(self.conv_impl)
    super().__post_init__()

  @property
  def stage_dims(self) -> Dims:
    """(depths, dims) after the explicit overrides."""
    preset = VARIANTS[self.variant]
    return Dims(tuple(int(d) for d in self.depths) or preset.depths,
                tuple(int(d) for d in self.dims) or preset.dims)

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False):
    depths, dims = self.stage_dims
    height, width = images.shape[1:3]
    if height % 32 or width % 32:
      raise UserError(f"ConvNeXt image size {height}x{width} is not divisible "
                      "by 32 (its total stride); use a res that is a multiple "
                      "of 32.")
    common = dict(dtype=self.dtype, impl=self.conv_impl,
                  kernel_init=nn.initializers.truncated_normal(0.02))
    x = conv.Conv(dims[0], 4, 4, padding="VALID", name="stem_conv",
                  **common)(images.astype(self.dtype))
    x = _layer_norm(self.dtype, "stem_norm")(x)
    taps: Dict[str, jnp.ndarray] = {}
    rates = drop_path_rates(depths, float(self.drop_path))
    for stage, (depth, channels) in enumerate(zip(depths, dims), start=1):
      if stage > 1:
        x = _layer_norm(self.dtype, f"stage{stage}_downsample_norm")(x)
        x = conv.Conv(channels, 2, 2, padding="VALID",
                      name=f"stage{stage}_downsample", **common)(x)
      for index in range(depth):
        x = Block(self.version, rates[stage - 1][index], self.dtype,
                  self.conv_impl, name=f"stage{stage}_block{index}")(x, train)
      taps[f"stage{stage}"] = x
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # Pool in float32.
    x = nn.LayerNorm(epsilon=LN_EPSILON, dtype=jnp.float32,
                     name="head_norm")(x)
    taps["pre_logits"] = x
    if not self.num_classes:
      return x, taps
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                      dtype=jnp.float32, name="head")(x)
    return logits, taps


# --------------------------------------------------------------------------
# Weights: funmatch names and timm `ConvNeXt` state dicts.
# --------------------------------------------------------------------------

HEAD = ("head/kernel", "head/bias")
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_BLOCK = re.compile(r"stage(\d)_block(\d+)/(.+)")
_DOWNSAMPLE = re.compile(r"stage(\d)_downsample(_norm)?")
_BLOCK_NAMES = {"dwconv": "conv_dw", "norm": "norm", "fc1": "mlp.fc1",
                "fc2": "mlp.fc2", "grn": "mlp.grn"}


def _timm_name(name: str) -> str:
  """funmatch name -> timm `ConvNeXt` state-dict name."""
  *scope, leaf = name.split("/")
  layer, leaf = "/".join(scope), _LEAVES.get(leaf, leaf)
  if block := _BLOCK.fullmatch(name):
    stage, index, rest = int(block[1]) - 1, block[2], block[3]
    if rest == "gamma":
      return f"stages.{stage}.blocks.{index}.gamma"
    part, _ = rest.split("/")
    return f"stages.{stage}.blocks.{index}.{_BLOCK_NAMES[part]}.{leaf}"
  if down := _DOWNSAMPLE.fullmatch(layer):
    return f"stages.{int(down[1]) - 1}.downsample.{0 if down[2] else 1}.{leaf}"
  layer = {"stem_conv": "stem.0", "stem_norm": "stem.1",
           "head_norm": "head.norm", "head": "head.fc"}.get(layer, layer)
  return f"{layer}.{leaf}"


def _to_timm(name: str, value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:  # HWIO -> OIHW
    return np.transpose(value, (3, 2, 0, 1))
  return value.T if value.ndim == 2 else value


def _from_timm(name: str, value: np.ndarray, shape=None) -> np.ndarray:
  del shape
  if value.ndim == 4 and re.search(r"/fc[12]/kernel$", name):
    value = value.reshape(value.shape[:2])  # a conv_mlp 1x1 conv
  if value.ndim == 4:  # OIHW -> HWIO
    return np.transpose(value, (2, 3, 1, 0))
  return value.T if value.ndim == 2 else value


TIMM = spec.Layout("timm", _timm_name, to_file=_to_timm, to_model=_from_timm,
                   marker=lambda name: name == "stem.0.weight")
FUNMATCH = spec.Layout("funmatch", lambda name: name,
                       marker=lambda name: name == "stem_conv/kernel")


def _flat(params) -> Dict[str, Any]:
  if set(params.keys()) == {"params"}:
    params = params["params"]
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")


def describe(params) -> str:
  """'ConvNeXt V1 depths=[3, 3, 9, 3], dims=[96, ...], num_classes=1000' of
  params, or of a timm state dict (what a file holds, for mismatch messages)."""
  flat = _flat(params)
  timm_names = "stem.0.weight" in flat
  block = (r"stages\.{}\.blocks\.(\d+)\." if timm_names
           else r"stage{}_block(\d+)/")
  dwconv = ("stages.{}.blocks.0.conv_dw.weight" if timm_names
            else "stage{}_block0/dwconv/kernel")
  depths, dims = [], []
  for stage in range(4):
    number = stage if timm_names else stage + 1
    depths.append(len({m[1] for name in flat
                       if (m := re.match(block.format(number), name))}))
    kernel = flat.get(dwconv.format(number))
    dims.append(0 if kernel is None
                else int(np.shape(kernel)[0 if timm_names else -1]))
  version = 2 if any("grn" in name for name in flat) else 1
  head = flat.get("head.fc.weight" if timm_names else HEAD[0])
  classes = 0 if head is None else int(np.shape(head)[0 if timm_names else -1])
  return (f"ConvNeXt V{version} depths={depths}, dims={dims}, "
          f"num_classes={classes}")


def _timm_name_of(variant: str, version: int) -> str:
  return f"convnext{'v2' if version == 2 else ''}_{variant}"


def timm_spec(model: "Model", params: Mapping[str, Any]) -> Dict[str, Any]:
  """How timm builds a `ConvNeXt` computing what `model` computes.

  The registered name of the variant, with the exact depths / widths and
  Linear MLPs (`conv_mlp=False`: the layout timm_name writes).
  """
  del params  # Everything follows from the model's options.
  depths, dims = model.stage_dims
  name = _timm_name_of(model.variant, model.version)
  kwargs = {"depths": list(depths), "dims": list(dims), "conv_mlp": False,
            "num_classes": int(model.num_classes)}
  return {"model_name": name, "kwargs": kwargs,
          "code": f"timm.create_model({name!r}, **{kwargs!r})"}


def build_timm(timm_entry: Mapping[str, Any]):
  """The timm module a `timm_spec` describes (imports timm)."""
  import timm  # pylint: disable=import-outside-toplevel
  return timm.create_model(timm_entry["model_name"], pretrained=False,
                           **timm_entry["kwargs"])


def _published(variant: str, version: int, tag: str, classes: int, res: int,
               what: str) -> spec.Published:
  hub = f"{_timm_name_of(variant, version)}.{tag}"
  return spec.Published(
      name=hub, options={"variant": variant, "version": version},
      num_classes=classes, res=res, hub=hub,
      description=f"ConvNeXt{' V2' if version == 2 else ''}-{variant} "
      f"{what} (timm hub)")


WEIGHTS = spec.WeightsSpec(
    what="ConvNeXt",
    layouts=(TIMM, FUNMATCH),
    formats={"npz": "funmatch", "safetensors": "funmatch", "timm": "timm"},
    head=HEAD,
    describe=describe,
    describe_file=describe,
    hint="set the model's variant / version (or depths / dims) to the "
    "checkpoint's, or use dont_load for names to keep from init.",
    timm=timm_spec,
    build_timm=build_timm,
    published=(
        _published("tiny", 1, "fb_in22k_ft_in1k", 1000, 224,
                   "ImageNet-21k pre-trained, ImageNet-1k fine-tuned"),
        _published("tiny", 1, "fb_in1k", 1000, 224, "ImageNet-1k"),
        _published("small", 1, "fb_in22k_ft_in1k", 1000, 224,
                   "ImageNet-21k pre-trained, ImageNet-1k fine-tuned"),
        _published("base", 1, "fb_in22k_ft_in1k", 1000, 224,
                   "ImageNet-21k pre-trained, ImageNet-1k fine-tuned"),
        _published("large", 1, "fb_in22k_ft_in1k", 1000, 224,
                   "ImageNet-21k pre-trained, ImageNet-1k fine-tuned"),
        _published("atto", 1, "d2_in1k", 1000, 224, "ImageNet-1k"),
        _published("nano", 1, "in12k_ft_in1k", 1000, 224,
                   "ImageNet-12k pre-trained, ImageNet-1k fine-tuned"),
        _published("atto", 2, "fcmae_ft_in1k", 1000, 224,
                   "FCMAE pre-trained, ImageNet-1k fine-tuned"),
        _published("tiny", 2, "fcmae_ft_in22k_in1k", 1000, 224,
                   "FCMAE, ImageNet-22k then ImageNet-1k fine-tuned"),
        _published("base", 2, "fcmae_ft_in22k_in1k", 1000, 224,
                   "FCMAE, ImageNet-22k then ImageNet-1k fine-tuned"),
    ),
)
