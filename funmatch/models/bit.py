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
That is also what timm's `resnetv2._load_weights` reads, so `save_npz` files
load there unchanged.
"""

import os
import re
import tempfile
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from funmatch.errors import UserError
from funmatch.models import conv

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
_HEAD_NAMES = (PREFIX + "head/conv2d/kernel", PREFIX + "head/conv2d/bias")


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
    grouped = x.astype(jnp.float32).reshape(
        x.shape[:-1] + (self.num_groups, channels // self.num_groups))
    spatial_and_group = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
    y = standardize(grouped, spatial_and_group, self.epsilon).reshape(x.shape)
    return (y * scale + bias).astype(self.dtype)


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
  """7x7/2 StdConv, then ZERO padding of 1 and a 3x3/2 VALID max-pool."""
  features: int
  standardize_weights: bool = True
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = StdConv(self.features, 7, 2, self.standardize_weights, self.dtype,
                self.conv_impl, name="standardized_conv2d")(x)
    # Zeros, not -inf: the official model pads with zeros before pooling, and
    # the conv output can be negative here (no ReLU before the pool).
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


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
    super().__post_init__()

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False):
    del train  # No dropout or batch statistics in BiT.
    width = root_channels(self.width)
    common = dict(standardize_weights=self.standardize_weights,
                  dtype=self.dtype, conv_impl=self.conv_impl)
    taps = {}
    x = taps["stem"] = RootBlock(width, name="root_block", **common)(images)
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
# Parameters <-> official names.
# --------------------------------------------------------------------------


def _unwrap(params: Params) -> Tuple[Params, bool]:
  """Accepts either the params tree or a variables dict {'params': tree}."""
  if set(params.keys()) == {"params"}:
    return params["params"], True
  return params, False


def _flax_to_official(path: Tuple[str, ...]) -> str:
  """('block1','unit01','a','group_norm','scale') -> resnet/.../gamma."""
  *scope, leaf = path
  if scope and scope[-1] == "group_norm":
    leaf = {"scale": "gamma", "bias": "beta"}.get(leaf, leaf)
  return PREFIX + "/".join(scope + [leaf])


def official_names(params: Params) -> Dict[str, Tuple[str, ...]]:
  """Maps each official `.npz` name to its flax params path."""
  flat = flax.traverse_util.flatten_dict(_unwrap(params)[0])
  return {_flax_to_official(path): path for path in flat}


def to_npz_dict(params: Params) -> Dict[str, np.ndarray]:
  """Params as the official BiT `.npz` contents (names, shapes, float32)."""
  flat = flax.traverse_util.flatten_dict(_unwrap(params)[0])
  return {_flax_to_official(path): np.asarray(value, np.float32)
          for path, value in flat.items()}


def save_npz(path: str, params: Params) -> str:
  """Writes params as an official-format BiT `.npz`; returns `path`.

  The file appears atomically (written beside it, then renamed) so a reader
  never sees half a file.
  """
  arrays = to_npz_dict(params)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise
  return path


def describe(params: Params) -> str:
  """`depth=[3, 4, 6, 3], width=1, num_classes=10`-style summary of params."""
  tree = _unwrap(params)[0]
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
  tree, wrapped = _unwrap(params)
  flat = flax.traverse_util.flatten_dict(tree)
  flat = {path: (standardize_kernel(jnp.asarray(value, jnp.float32))
                 if path[-2:] == ("standardized_conv2d", "kernel") else value)
          for path, value in flat.items()}
  tree = flax.traverse_util.unflatten_dict(flat)
  return {"params": tree} if wrapped else tree


# --------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------


def _read_npz(path: str) -> Dict[str, np.ndarray]:
  """All arrays of an `.npz`, or a one-line UserError naming the path."""
  if not os.path.isfile(path):
    raise UserError(f"BiT checkpoint {path!r} does not exist; check the path "
                    "(an official BiT-*.npz or a funmatch export).")
  try:
    archive = np.load(path, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
      raise ValueError("a single .npy array, not an .npz archive")
    with archive:
      return {name: np.asarray(archive[name]) for name in archive.files}
  except Exception as e:  # pylint: disable=broad-except
    # Whatever the parser trips on (bad zip, truncated member, pickles, ...),
    # the cause is the file: say so in one line.
    reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
    raise UserError(f"BiT checkpoint {path!r} is not a valid .npz ({reason});"
                    " re-download or re-export it.") from None


def _normalize_names(arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Undoes known naming quirks of some official files."""
  # Some official dumps number repeated layers `standardized_conv2d_1`, ...
  return {re.sub(r"/standardized_conv2d_\d+/", "/standardized_conv2d/", name):
          value for name, value in arrays.items()}


def _fit_shape(value: np.ndarray,
               shape: Tuple[int, ...]) -> Optional[np.ndarray]:
  """`value` reshaped to `shape` if only singleton dims differ, else None.

  Dropping size-1 dims never reorders elements, so e.g. GN gamma stored as
  [1, 1, 1, C] or a head kernel stored as [C, K] fit unambiguously, while a
  transposed [K, C] kernel does not.
  """
  if value.shape == tuple(shape):
    return value
  squeeze = lambda s: tuple(d for d in s if d != 1)
  if squeeze(value.shape) == squeeze(shape):
    return value.reshape(shape)
  return None


def _compile_patterns(dont_load: Sequence[str]):
  if isinstance(dont_load, str):
    dont_load = (dont_load,)
  patterns = []
  for pattern in dont_load:
    try:
      patterns.append(re.compile(pattern))
    except re.error as e:
      raise UserError(f"BiT dont_load pattern {pattern!r} is not a valid "
                      f"regex ({e}); fix the pattern.") from None
  return patterns


def _head_in_use(arrays, model_names, init_flat, path) -> bool:
  """Whether the file's head should be loaded; logs why when not."""
  kernel_name = _HEAD_NAMES[0]
  if kernel_name not in model_names:
    if any(name in arrays for name in _HEAD_NAMES):
      logging.info("BiT %s: the model has no head; ignoring the file's head.",
                   path)
    return False
  if kernel_name not in arrays:
    logging.info("BiT %s has no head; keeping the initial head.", path)
    return False
  file_classes = arrays[kernel_name].shape[-1]
  model_classes = init_flat[model_names[kernel_name]].shape[-1]
  if file_classes != model_classes:
    logging.info("BiT %s: head has %d classes, model %d; keeping the initial "
                 "head.", path, file_classes, model_classes)
    return False
  return True


def _first(items, count: int = 3) -> str:
  shown = ", ".join(items[:count])
  return shown + (f", ... ({len(items) - count} more)" if len(items) > count
                  else "")


def load_npz(path: str, init_params: Params,
             dont_load: Sequence[str] = ()) -> Params:
  """Loads an official BiT `.npz` (or a `save_npz` export) into `Model` params.

  Args:
    path: the `.npz` file, with official names (`resnet/block1/unit01/...`).
    init_params: params of the target model (from `Model.init`); fixes the
      structure of the result and supplies every value not loaded.
    dont_load: regexes, searched (`re.search`) in the official names, whose
      values are kept from `init_params` (e.g. `("head/",)`).

  Returns:
    params with the structure of `init_params`; loaded leaves are float32
    numpy arrays, the others are `init_params`' own leaves. The head is kept
    from `init_params` (and logged) when the file's class count differs.

  Raises:
    UserError: missing/corrupt file, or names/shapes that do not fit the model.
  """
  tree, wrapped = _unwrap(init_params)
  init_flat = flax.traverse_util.flatten_dict(tree)
  model_names = official_names(tree)
  arrays = _normalize_names(_read_npz(path))
  patterns = _compile_patterns(dont_load)
  skip = lambda name: any(p.search(name) for p in patterns)
  load_head = _head_in_use(arrays, model_names, init_flat, path)

  loaded, missing, clashes = {}, [], []
  for name, flax_path in model_names.items():
    init_value = init_flat[flax_path]
    if skip(name) or (name in _HEAD_NAMES and not load_head):
      loaded[flax_path] = init_value
    elif name not in arrays:
      missing.append(name)
    else:
      value = _fit_shape(np.asarray(arrays[name], np.float32),
                         np.shape(init_value))
      if value is None:
        clashes.append(f"{name} file {list(arrays[name].shape)} vs model "
                       f"{list(np.shape(init_value))}")
      loaded[flax_path] = value
  unexpected = [name for name in arrays if name not in model_names
                and not skip(name) and name not in _HEAD_NAMES]

  if missing or unexpected or clashes:
    missing, unexpected, clashes = map(sorted, (missing, unexpected, clashes))
    problems = []
    if missing:
      problems.append(f"{len(missing)} missing ({_first(missing)})")
    if unexpected:
      problems.append(f"{len(unexpected)} unexpected ({_first(unexpected)})")
    if clashes:
      problems.append(f"{len(clashes)} shape clashes ({_first(clashes)})")
    raise UserError(
        f"BiT checkpoint {path!r} does not fit the model "
        f"({describe(tree)}): {'; '.join(problems)}; set the model's depth "
        "and width to those of the checkpoint (e.g. BiT-M-R50x1 is depth=50, "
        "width=1), or use dont_load for names to keep from init.")
  tree = flax.traverse_util.unflatten_dict(loaded)
  return {"params": tree} if wrapped else tree
