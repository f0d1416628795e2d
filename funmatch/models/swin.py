"""Swin Transformer V1 (Liu et al. 2021), as timm's `SwinTransformer` builds it.

The network: a patch embedding (patch_size conv + LayerNorm), four stages of
Swin blocks (LN -> window attention with a relative position bias -> residual,
LN -> MLP(4x, GELU) -> residual; every other block shifts its windows by half a
window, with timm's -100 mask across the wrapped edges), a 2x2 patch merging
(LN + Linear(4C -> 2C)) before stages 2-4, a final LayerNorm, average pooling
and a zero-initialised Dense head. LayerNorm epsilon is 1e-5 and the GELU
exact, as in timm.

The windows are laid out for one image size, `img_size` (as timm's): every
stage's map (img_size / patch_size / 2^i) must be a whole number of windows. A
stage whose map is exactly one window does not shift (timm's rule), so the
standard models run at 224 with window 7 (maps 56, 28, 14, 7).

Variants (embed_dim, depths, num_heads; `embed_dim` / `depths` / `num_heads`
override them): tiny 96 [2, 2, 6, 2] [3, 6, 12, 24], small 96 [2, 2, 18, 2],
base 128 [2, 2, 18, 2] [4, 8, 16, 32], large 192 [2, 2, 18, 2] [6, 12, 24, 48].

Taps (224px, C_i = embed_dim * 2^(i-1)):
  stage1..stage4  each stage's output tokens (row-major grid, no CLS token),
                  [B, 56^2 / 28^2 / 14^2 / 7^2, C_i]
  pre_logits      final-LayerNorm tokens averaged, float32 [B, C_4]

Weights: funmatch's names in .npz / .safetensors and timm `SwinTransformer`
state dicts (`patch_embed.proj|norm`, `layers.{i}.downsample.norm|reduction`,
`layers.{i}.blocks.{j}.norm1|attn.qkv|attn.relative_position_bias_table|
attn.proj|norm2|mlp.fc1|mlp.fc2`, `norm`, `head.fc`); files in timm's older
naming (downsample at the end of the previous stage, `head.weight`) and with
the stored `relative_position_index` / `attn_mask` buffers also load.
"""
import re
from typing import Any, Dict, Mapping, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from funmatch.errors import UserError
from funmatch.models import conv, spec

LN_EPSILON = 1e-5
MASK_VALUE = -100.0  # timm's (and the paper's) mask across shifted edges


class Dims(NamedTuple):
  embed_dim: int
  depths: tuple
  num_heads: tuple


VARIANTS = {
    "tiny": Dims(96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": Dims(96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": Dims(128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": Dims(192, (2, 2, 18, 2), (6, 12, 24, 48)),
}


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def relative_position_index(window: int) -> np.ndarray:
  """[w^2, w^2] indices into the (2w-1)^2-row bias table (timm's order)."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window),
                                indexing="ij")).reshape(2, -1)
  relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
  relative = relative + (window - 1)
  return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def window_partition(x, window: int):
  """[B, H, W, C] -> [B * windows, w * w, C], windows row-major."""
  batch, height, width, channels = x.shape
  x = x.reshape(batch, height // window, window, width // window, window,
                channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window * window, channels)


def window_reverse(windows, window: int, height: int, width: int):
  channels = windows.shape[-1]
  x = windows.reshape(-1, height // window, width // window, window, window,
                      channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, height, width, channels)


def shift_mask(size: int, window: int, shift: int) -> np.ndarray:
  """[windows, w^2, w^2]: 0 within a region, -100 across the wrapped edges."""
  regions = np.zeros((1, size, size, 1), np.float32)
  bounds = ((0, size - window), (size - window, size - shift), (size - shift, size))
  label = 0
  for top, bottom in bounds:
    for left, right in bounds:
      regions[:, top:bottom, left:right] = label
      label += 1
  windows = window_partition(regions, window)[..., 0]  # [nW, w^2]
  different = windows[:, None, :] != windows[:, :, None]
  return np.where(different, MASK_VALUE, 0.0).astype(np.float32)


class WindowAttention(nn.Module):
  """Multi-head attention within each window, plus the relative bias."""
  num_heads: int
  window: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    windows, tokens, channels = x.shape
    head_dim = channels // self.num_heads
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=nn.initializers.truncated_normal(0.02), name=name)
    qkv = dense(3 * channels, "qkv")(x).reshape(
        windows, tokens, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # [windows, heads, tokens, head_dim]
    table = self.param("relative_position_bias_table",
                       nn.initializers.truncated_normal(0.02),
                       ((2 * self.window - 1) ** 2, self.num_heads), jnp.float32)
    index = relative_position_index(self.window).reshape(-1)
    bias = table[index].reshape(tokens, tokens, -1).transpose(2, 0, 1)
    logits = jnp.einsum("whqd,whkd->whqk", q * head_dim ** -0.5, k)
    logits = logits.astype(jnp.float32) + bias
    if mask is not None:
      count = mask.shape[0]
      logits = (logits.reshape(-1, count, self.num_heads, tokens, tokens)
                + mask[None, :, None]).reshape(logits.shape)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("whqk,whkd->wqhd", weights, v).reshape(
        windows, tokens, channels)
    return dense(channels, "proj")(out)


class Block(nn.Module):
  """LN -> (shifted) window attention -> residual, LN -> MLP -> residual."""
  num_heads: int
  window: int
  shift: int = 0
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    _, height, width, channels = x.shape
    norm = lambda name: nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype,
                                     param_dtype=jnp.float32, name=name)
    drop = lambda name: nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3),
                                   deterministic=not train, name=name)
    y = norm("norm1")(x)
    mask = None
    if self.shift:
      y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
      mask = jnp.asarray(shift_mask(height, self.window, self.shift))
    y = WindowAttention(self.num_heads, self.window, self.dtype, name="attn")(
        window_partition(y, self.window), mask)
    y = window_reverse(y, self.window, height, width)
    if self.shift:
      y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
    x = x + drop("drop_path1")(y)
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=nn.initializers.truncated_normal(0.02), name=name)
    y = nn.gelu(dense(4 * channels, "fc1")(norm("norm2")(x)), approximate=False)
    return x + drop("drop_path2")(dense(channels, "fc2")(y))


class PatchMerging(nn.Module):
  """Each 2x2 neighbourhood -> one token: concat (timm's order), LN, Linear."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    # [B, H/2, 2(h), W/2, 2(w), C] -> features ordered (w, h, C), as timm's.
    x = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
    x = x.transpose(0, 1, 3, 4, 2, 5).reshape(batch, height // 2, width // 2,
                                              4 * channels)
    x = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype,
                     param_dtype=jnp.float32, name="norm")(x)
    return nn.Dense(2 * channels, use_bias=False, dtype=self.dtype,
                    param_dtype=jnp.float32,
                    kernel_init=nn.initializers.truncated_normal(0.02),
                    name="reduction")(x)


class Model(nn.Module):
  """Swin Transformer classifier. `__call__(images, train) -> (logits, taps)`.

  Attributes:
    num_classes: head size; 0 means no head (logits are the pre-logits).
    variant: 'tiny', 'small', 'base' or 'large'.
    embed_dim, depths, num_heads: override the variant's (0 / empty keeps
      it), e.g. for tiny test models.
    patch_size: side of the embedding's patches (4 in every timm variant).
    window_size: side of the attention windows (7 in the 224px variants).
    img_size: the image size the windows are laid out for; images must have
      it (the shift masks and which stages shift depend on it).
    drop_path: stochastic depth, rising linearly over all blocks from 0 to
      this; active only with train=True (then a 'dropout' rng is needed).
    dtype: activation / compute dtype; params stay float32, logits float32.
    conv_impl: 'auto', 'xla' or 'matmul': how the patch embedding runs.
  """
  num_classes: int
  variant: str = "tiny"
  embed_dim: int = 0
  depths: Sequence[int] = ()
  num_heads: Sequence[int] = ()
  patch_size: int = 4
  window_size: int = 7
  img_size: int = 224
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  def __post_init__(self):
    # Config errors surface at construction, not inside init/jit.
    if not _is_int(self.num_classes) or self.num_classes < 0:
      raise UserError(f"Swin num_classes={self.num_classes!r} must be an "
                      "integer >= 0 (0 means no head).")
    if self.variant not in VARIANTS:
      raise UserError(f"Swin variant={self.variant!r} is unknown; use one of "
                      f"{', '.join(VARIANTS)}.")
    for name in ("embed_dim", "patch_size", "window_size", "img_size"):
      value = getattr(self, name)
      if not _is_int(value) or value < (0 if name == "embed_dim" else 1):
        raise UserError(f"Swin {name}={value!r} must be a positive integer"
                        + (" (0 takes the variant's)." if name == "embed_dim"
                           else "."))
    for name in ("depths", "num_heads"):
      value = tuple(getattr(self, name))
      if value and (len(value) != 4
                    or not all(_is_int(v) and v > 0 for v in value)):
        raise UserError(f"Swin {name}={list(value)} must be four positive "
                        "integers, one per stage (empty keeps the variant's).")
    embed_dim, depths, heads = self.dims
    for stage, count in enumerate(heads):
      if (embed_dim << stage) % count:
        raise UserError(f"Swin stage {stage + 1} width {embed_dim << stage} is "
                        f"not divisible by its num_heads={count}; choose "
                        "embed_dim / num_heads that divide.")
    if not (isinstance(self.drop_path, (int, float, np.floating))
            and not isinstance(self.drop_path, bool)
            and 0.0 <= self.drop_path < 1.0):
      raise UserError(f"Swin drop_path={self.drop_path!r} must be in [0, 1) "
                      "(0 disables stochastic depth).")
    step = self.patch_size * 2 ** (len(depths) - 1) * self.window_size
    if self.img_size % step:
      raise UserError(
          f"Swin img_size={self.img_size} does not fit window_size="
          f"{self.window_size} with patch_size={self.patch_size}: every "
          "stage's map must be a whole number of windows; use an image size "
          f"(res and img_size) that is a multiple of {step} ({step}, "
          f"{2 * step}, {3 * step}, ...), or another window_size.")
    conv.check_impl(self.conv_impl)
    super().__post_init__()

  @property
  def dims(self) -> Dims:
    """(embed_dim, depths, num_heads) after the explicit overrides."""
    preset = VARIANTS[self.variant]
    return Dims(int(self.embed_dim) or preset.embed_dim,
                tuple(int(d) for d in self.depths) or preset.depths,
                tuple(int(h) for h in self.num_heads) or preset.num_heads)

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False):
    embed_dim, depths, heads = self.dims
    if tuple(images.shape[1:3]) != (self.img_size,) * 2:
      raise UserError(
          f"Swin was built for {self.img_size}px images (img_size) but got "
          f"{images.shape[1]}x{images.shape[2]}; set the model's img_size to "
          "the res it runs at.")
    x = conv.Conv(embed_dim, self.patch_size, self.patch_size, padding="VALID",
                  dtype=self.dtype, impl=self.conv_impl,
                  name="patch_embed")(images.astype(self.dtype))
    x = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype,
                     param_dtype=jnp.float32, name="patch_embed_norm")(x)
    total = sum(depths)
    rates = np.linspace(0.0, float(self.drop_path), total).tolist()
    taps: Dict[str, jnp.ndarray] = {}
    start = 0
    for stage, (depth, count) in enumerate(zip(depths, heads), start=1):
      if stage > 1:
        x = PatchMerging(self.dtype, name=f"stage{stage}_downsample")(x)
      size = x.shape[1]
      # timm: a map of one window neither shifts nor needs a mask.
      shift = self.window_size // 2 if size > self.window_size else 0
      for index in range(depth):
        x = Block(count, self.window_size, shift if index % 2 else 0,
                  rates[start + index], self.dtype,
                  name=f"stage{stage}_block{index}")(x, train)
      start += depth
      taps[f"stage{stage}"] = x.reshape(x.shape[0], -1, x.shape[-1])
    x = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype,
                     param_dtype=jnp.float32, name="norm")(x)
    x = taps["pre_logits"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if not self.num_classes:
      return x, taps
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                      dtype=jnp.float32, name="head")(x)
    return logits, taps


# --------------------------------------------------------------------------
# Weights: funmatch names and timm `SwinTransformer` state dicts.
# --------------------------------------------------------------------------

HEAD = ("head/kernel", "head/bias")
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_BLOCK = re.compile(r"stage(\d)_block(\d+)/(.+)")
_DOWNSAMPLE = re.compile(r"stage(\d)_downsample/(norm|reduction)")
_BLOCK_NAMES = {"fc1": "mlp.fc1", "fc2": "mlp.fc2", "attn/qkv": "attn.qkv",
                "attn/proj": "attn.proj", "norm1": "norm1", "norm2": "norm2"}
_BUFFERS = ("relative_position_index", "attn_mask")


def _timm_name(name: str) -> str:
  """funmatch name -> timm `SwinTransformer` state-dict name."""
  *scope, leaf = name.split("/")
  layer = "/".join(scope)
  if leaf != "relative_position_bias_table":
    leaf = _LEAVES.get(leaf, leaf)
  if block := _BLOCK.fullmatch(name):
    stage, index, rest = int(block[1]) - 1, block[2], block[3]
    prefix = f"layers.{stage}.blocks.{index}"
    if rest == "attn/relative_position_bias_table":
      return f"{prefix}.attn.relative_position_bias_table"
    return f"{prefix}.{_BLOCK_NAMES[rest.rsplit('/', 1)[0]]}.{leaf}"
  if down := _DOWNSAMPLE.match(layer):
    return f"layers.{int(down[1]) - 1}.downsample.{down[2]}.{leaf}"
  layer = {"patch_embed": "patch_embed.proj",
           "patch_embed_norm": "patch_embed.norm", "head": "head.fc"}.get(
               layer, layer)
  return f"{layer}.{leaf}"


def _to_timm(name: str, value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:  # HWIO -> OIHW
    return np.transpose(value, (3, 2, 0, 1))
  if value.ndim == 2 and not name.endswith("relative_position_bias_table"):
    return value.T
  return value


def _from_timm(name: str, value: np.ndarray, shape=None) -> np.ndarray:
  del shape
  if value.ndim == 4:  # OIHW -> HWIO
    return np.transpose(value, (2, 3, 1, 0))
  if value.ndim == 2 and not name.endswith("relative_position_bias_table"):
    return value.T
  return value


def _timm_current(arrays: dict) -> dict:
  """timm's older Swin naming -> today's, without the stored buffers (as
  timm's own checkpoint_filter_fn)."""
  old = "head.fc.weight" not in arrays and "head.weight" in arrays
  out = {}
  for name, value in arrays.items():
    if any(buffer in name for buffer in _BUFFERS):
      continue
    if old:
      name = re.sub(r"layers\.(\d+)\.downsample",
                    lambda m: f"layers.{int(m[1]) + 1}.downsample", name)
      name = name.replace("head.", "head.fc.")
    out[name] = value
  return out


TIMM = spec.Layout("timm", _timm_name, to_file=_to_timm, to_model=_from_timm,
                   prepare=_timm_current,
                   marker=lambda name: name == "patch_embed.proj.weight")
FUNMATCH = spec.Layout("funmatch", lambda name: name,
                       marker=lambda name: name == "patch_embed/kernel")


def _flat(params) -> Dict[str, Any]:
  if set(params.keys()) == {"params"}:
    params = params["params"]
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")


def describe(params) -> str:
  """'Swin embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, ...], window_size=7,
  num_classes=1000' of params, or of a timm state dict (what a file holds)."""
  flat = _flat(params)
  timm_names = "patch_embed.proj.weight" in flat
  block = (r"layers\.{}\.blocks\.(\d+)\." if timm_names
           else r"stage{}_block(\d+)/")
  table_name = ("layers.{}.blocks.0.attn.relative_position_bias_table"
                if timm_names else
                "stage{}_block0/attn/relative_position_bias_table")
  depths, heads, window = [], [], 0
  for stage in range(4):
    number = stage if timm_names else stage + 1
    depths.append(len({m[1] for name in flat
                       if (m := re.match(block.format(number), name))}))
    table = flat.get(table_name.format(number))
    heads.append(0 if table is None else int(np.shape(table)[1]))
    if table is not None:
      window = (int(round(np.shape(table)[0] ** 0.5)) + 1) // 2
  embed = flat.get("patch_embed.proj.weight" if timm_names
                   else "patch_embed/kernel")
  head = flat.get("head.fc.weight" if timm_names else HEAD[0])
  axis = 0 if timm_names else -1
  return (f"Swin embed_dim={0 if embed is None else np.shape(embed)[axis]}, "
          f"depths={depths}, num_heads={heads}, window_size={window}, "
          f"num_classes={0 if head is None else np.shape(head)[axis]}")


def timm_spec(model: "Model", params: Mapping[str, Any]) -> Dict[str, Any]:
  """How timm builds a `SwinTransformer` computing what `model` computes."""
  del params  # Everything follows from the model's options.
  embed_dim, depths, heads = model.dims
  standard = (model.patch_size, model.window_size, model.img_size) == (4, 7, 224)
  name = (f"swin_{model.variant}_patch4_window7_224" if standard
          else "swin_tiny_patch4_window7_224")
  kwargs = {"img_size": int(model.img_size), "patch_size": int(model.patch_size),
            "window_size": int(model.window_size), "embed_dim": embed_dim,
            "depths": list(depths), "num_heads": list(heads),
            "num_classes": int(model.num_classes)}
  return {"model_name": name, "kwargs": kwargs,
          "code": f"timm.create_model({name!r}, **{kwargs!r})"}


def build_timm(timm_entry: Mapping[str, Any]):
  """The timm module a `timm_spec` describes (imports timm)."""
  import timm  # pylint: disable=import-outside-toplevel
  return timm.create_model(timm_entry["model_name"], pretrained=False,
                           **timm_entry["kwargs"])


def _published(variant: str, tag: str, classes: int, what: str):
  hub = f"swin_{variant}_patch4_window7_224.{tag}"
  return spec.Published(name=hub, options={"variant": variant},
                        num_classes=classes, res=224, hub=hub,
                        description=f"Swin-{variant} {what} (timm hub)")


WEIGHTS = spec.WeightsSpec(
    what="Swin",
    layouts=(TIMM, FUNMATCH),
    formats={"npz": "funmatch", "safetensors": "funmatch", "timm": "timm"},
    head=HEAD,
    describe=describe,
    describe_file=describe,
    hint="set the model's variant (or embed_dim / depths / num_heads / "
    "window_size) to the checkpoint's, or use dont_load for names to keep "
    "from init.",
    timm=timm_spec,
    build_timm=build_timm,
    published=(
        _published("tiny", "ms_in1k", 1000, "ImageNet-1k"),
        _published("tiny", "ms_in22k_ft_in1k", 1000,
                   "ImageNet-22k pre-trained, ImageNet-1k fine-tuned"),
        _published("small", "ms_in1k", 1000, "ImageNet-1k"),
        _published("small", "ms_in22k_ft_in1k", 1000,
                   "ImageNet-22k pre-trained, ImageNet-1k fine-tuned"),
        _published("base", "ms_in22k_ft_in1k", 1000,
                   "ImageNet-22k pre-trained, ImageNet-1k fine-tuned"),
        _published("large", "ms_in22k_ft_in1k", 1000,
                   "ImageNet-22k pre-trained, ImageNet-1k fine-tuned"),
    ),
)
