"""Vision Transformer (Dosovitskiy et al. 2021) with the taps TinyMIM/ViTKD need.

The network is the standard ViT classifier: a patch_size x patch_size/stride
patch_size conv embedding, a learned CLS token prepended, a learned position
embedding (for the token grid of the image size seen at init), pre-LN encoder
blocks (LN -> multi-head self-attention -> residual, LN -> MLP(GELU) ->
residual), a final LayerNorm, and a zero-initialised Dense head on the CLS
token of the final-norm tokens (as in big_vision).

Flax parameter names follow the official JAX ViT checkpoints
(google-research/vision_transformer, big_vision), so a funmatch export joined
with '/' has the official names and shapes:

  embedding/kernel [p, p, 3, D], embedding/bias [D]
  cls [1, 1, D]
  Transformer/posembed_input/pos_embedding [1, 1 + N, D]
  Transformer/encoderblock_{i}/LayerNorm_0/scale|bias [D]
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/
      query|key|value/kernel [D, H, D/H], .../bias [H, D/H]
      out/kernel [H, D/H, D], out/bias [D]
  Transformer/encoderblock_{i}/LayerNorm_2/scale|bias [D]
  Transformer/encoderblock_{i}/MlpBlock_3/Dense_0 (D -> M), Dense_1 (M -> D)
  Transformer/encoder_norm/scale|bias [D]
  head/kernel [D, classes], head/bias [classes]

LayerNorm epsilon is 1e-6 and the GELU is the tanh approximation, both as in
the official JAX code (`gelu='exact'` runs timm's erf GELU instead).

Weights (`WEIGHTS`, read by funmatch.weights): the official npz (= funmatch's names) and timm
`VisionTransformer` state dicts (`patch_embed.proj.weight`, `cls_token`,
`pos_embed`, `blocks.{i}.attn.qkv.weight` fused [3D, D], `mlp.fc1`, `norm`,
`head`; PyTorch [out, in] layouts). A timm file implies `gelu='exact'`.

Taps (B images, N patches, D width, tokens CLS first):
  block{i}    output tokens of encoder block i, [B, 1 + N, D], i < depth
  encoded     the final-LayerNorm tokens, [B, 1 + N, D]
  pre_logits  CLS token of `encoded`, float32 [B, D]
  q, k, v     Q, K, V of block `qkv_block` (from its first LayerNorm, i.e.
              exactly what its attention uses), split into `relation_heads`
              heads (default: the model's own): [B, R, 1 + N, D / R]

`relation_heads` is TinyMIM's "adaptive last block": a student's Q/K/V are
split into the teacher's head count for the relation loss, without extra
parameters; the block's own attention still uses `num_heads`.
"""

import re
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from funmatch.errors import UserError
from funmatch.models import conv, spec

LN_EPSILON = 1e-6
GELUS = ("auto", "tanh", "exact")
# What an 'auto' option means when no weights file says otherwise.
AUTO_OPTIONS = {"gelu": "tanh"}


class Dims(NamedTuple):
  width: int
  depth: int
  num_heads: int
  mlp_dim: int


# (width, depth, num_heads, mlp_dim) of the standard ViT sizes.
VARIANTS = {
    "Ti": Dims(192, 12, 3, 768),
    "S": Dims(384, 12, 6, 1536),
    "B": Dims(768, 12, 12, 3072),
    "L": Dims(1024, 24, 16, 4096),
}


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def drop_path_rates(depth: int, drop_path: float) -> tuple:
  """Per-block stochastic-depth rates, rising linearly from 0 to drop_path."""
  return tuple(float(drop_path) * i / max(depth - 1, 1) for i in range(depth))


class AddPositionEmbedding(nn.Module):
  """Adds a learned [1, 1 + N, D] position embedding (CLS included)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    shape = (1,) + x.shape[1:]
    if self.has_variable("params", "pos_embedding"):
      stored = self.get_variable("params", "pos_embedding").shape
      if tuple(stored) != shape:
        raise UserError(
            f"ViT position embedding was made for {stored[1] - 1} patches but "
            f"the images give {shape[1] - 1}; use the image size (res) the "
            "params were initialised with.")
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                     shape, jnp.float32)
    return x + pos.astype(x.dtype)


class Attention(nn.Module):
  """Multi-head self-attention; also returns its Q, K, V as [B, T, D]."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    dense = lambda name: nn.DenseGeneral(
        (self.num_heads, head_dim), axis=-1, dtype=self.dtype,
        param_dtype=jnp.float32, kernel_init=nn.initializers.xavier_uniform(),
        name=name)
    q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)  # [B,T,H,d]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(
        self.dtype)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v)
    out = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype,
                          param_dtype=jnp.float32,
                          kernel_init=nn.initializers.xavier_uniform(),
                          name="out")(mixed)
    merge = lambda t: t.reshape(t.shape[:2] + (width,))
    return out, (merge(q), merge(k), merge(v))


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> GELU -> Dense(width)."""
  mlp_dim: int
  dtype: Any = jnp.float32
  exact_gelu: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    common = dict(dtype=self.dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.xavier_uniform(),
                  bias_init=nn.initializers.normal(stddev=1e-6))
    h = nn.Dense(self.mlp_dim, name="Dense_0", **common)(x)
    h = nn.gelu(h, approximate=not self.exact_gelu)
    return nn.Dense(x.shape[-1], name="Dense_1", **common)(h)


class EncoderBlock(nn.Module):
  """Pre-LN block with stochastic depth; returns (tokens, (q, k, v))."""
  num_heads: int
  mlp_dim: int
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  exact_gelu: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool):
    # Stochastic depth: drop a residual branch per example (broadcast over
    # tokens and channels), scaling kept branches by 1 / (1 - rate).
    drop = lambda name: nn.Dropout(self.drop_path, broadcast_dims=(1, 2),
                                   deterministic=not train, name=name)
    norm = lambda name: nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype,
                                     param_dtype=jnp.float32, name=name)
    y, qkv = Attention(self.num_heads, self.dtype,
                       name="MultiHeadDotProductAttention_1")(
                           norm("LayerNorm_0")(x))
    x = x + drop("drop_path_attention")(y)
    y = MlpBlock(self.mlp_dim, self.dtype, self.exact_gelu,
                 name="MlpBlock_3")(
        norm("LayerNorm_2")(x))
    x = x + drop("drop_path_mlp")(y)
    return x, qkv


class Encoder(nn.Module):
  """Position embedding, the blocks and the final LayerNorm."""
  depth: int
  num_heads: int
  mlp_dim: int
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  exact_gelu: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool):
    x = AddPositionEmbedding(name="posembed_input")(x)
    outputs, qkvs = [], []
    for i, rate in enumerate(drop_path_rates(self.depth, self.drop_path)):
      x, qkv = EncoderBlock(self.num_heads, self.mlp_dim, rate, self.dtype,
                            self.exact_gelu,
                            name=f"encoderblock_{i}")(x, train)
      outputs.append(x)
      qkvs.append(qkv)
    encoded = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype,
                           param_dtype=jnp.float32, name="encoder_norm")(x)
    return encoded, outputs, qkvs


class Model(nn.Module):
  """ViT classifier. `__call__(images, train) -> (logits, taps)`.

  Attributes:
    num_classes: head size; 0 means no head (logits are the pre-logits).
    variant: 'Ti', 'S', 'B' or 'L' (width, depth, heads, mlp_dim presets).
    width, depth, num_heads, mlp_dim: override the variant's value (0 keeps
      it), e.g. for tiny models.
    patch_size: side of the square patches; the image size must divide by it.
    drop_path: stochastic depth, rising linearly from 0 (first block) to this
      (last block); active only with train=True, then a 'dropout' rng is
      needed.
    qkv_block: the block whose Q, K, V are tapped (negative: from the end).
    relation_heads: heads the tapped Q, K, V are split into (0: num_heads).
    dtype: activation / compute dtype; params stay float32, logits float32.
    gelu: 'tanh' (the approximation the official JAX ViT and big_vision
      train with), 'exact' (erf; timm's nn.GELU), or 'auto': whatever the
      weights file implies, resolved by `weights.init.decide_options` before the
      model is built (unresolved, 'auto' runs as 'tanh').
    conv_impl: 'auto', 'xla' or 'matmul' (funmatch.models.conv): how the
      patch embedding runs (as a reshape + matmul for 'matmul').

  Images are NHWC in [-1, 1]. See the module docstring for the taps.
  """
  num_classes: int
  variant: str = "S"
  width: int = 0
  depth: int = 0
  num_heads: int = 0
  mlp_dim: int = 0
  patch_size: int = 16
  drop_path: float = 0.0
  qkv_block: int = -1
  relation_heads: int = 0
  dtype: Any = jnp.float32
  gelu: str = "auto"
  conv_impl: str = "auto"

  def __post_init__(self):
    # Config errors surface at construction, not inside init/jit.
    if not _is_int(self.num_classes) or self.num_classes < 0:
      raise UserError(f"ViT num_classes={self.num_classes!r} must be an "
                      "integer >= 0 (0 means no head).")
    if self.variant not in VARIANTS:
      raise UserError(f"ViT variant={self.variant!r} is unknown; use one of "
                      f"{', '.join(VARIANTS)}.")
    for name in ("width", "depth", "num_heads", "mlp_dim", "relation_heads"):
      value = getattr(self, name)
      if not _is_int(value) or value < 0:
        raise UserError(f"ViT {name}={value!r} must be an integer >= 0 "
                        "(0 takes the variant's value).")
    if self.gelu not in GELUS:
      raise UserError(f"ViT gelu={self.gelu!r} is unknown; use one of "
                      f"{', '.join(GELUS)}.")
    if not _is_int(self.patch_size) or self.patch_size < 1:
      raise UserError(f"ViT patch_size={self.patch_size!r} must be a positive "
                      "integer (16 is standard).")
    dims = self.dims
    if dims.width % dims.num_heads:
      raise UserError(f"ViT width={dims.width} is not divisible by "
                      f"num_heads={dims.num_heads}; choose a width that is a "
                      "multiple of num_heads.")
    if self.relation_heads and dims.width % self.relation_heads:
      raise UserError(f"ViT width={dims.width} is not divisible by "
                      f"relation_heads={self.relation_heads}; choose "
                      "relation_heads that divides the width (0 = num_heads).")
    if not _is_int(self.qkv_block) or not (
        -dims.depth <= self.qkv_block < dims.depth):
      raise UserError(f"ViT qkv_block={self.qkv_block!r} is out of range for "
                      f"depth={dims.depth}; use a block index in "
                      f"[{-dims.depth}, {dims.depth - 1}] (-1 = last block).")
    if not (isinstance(self.drop_path, (int, float, np.floating))
            and not isinstance(self.drop_path, bool)
            and 0.0 <= self.drop_path < 1.0):
      raise UserError(f"ViT drop_path={self.drop_path!r} must be in [0, 1) "
                      "(0 disables stochastic depth).")
    conv.check_impl(self.conv_impl)
    super().__post_init__()

  @property
  def dims(self) -> Dims:
    """(width, depth, num_heads, mlp_dim) after the explicit overrides."""
    preset = VARIANTS[self.variant]
    return Dims(*(int(getattr(self, f)) or getattr(preset, f)
                  for f in Dims._fields))

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False):
    width, depth, num_heads, mlp_dim = self.dims
    p = self.patch_size
    height, wide = images.shape[1:3]
    if height % p or wide % p:
      raise UserError(f"ViT image size {height}x{wide} is not divisible by "
                      f"patch_size={p}; use a res that is a multiple of {p}.")
    x = conv.Conv(width, p, p, padding="VALID", dtype=self.dtype,
                  param_dtype=jnp.float32, impl=self.conv_impl,
                  name="embedding")(images.astype(self.dtype))
    batch = x.shape[0]
    x = x.reshape(batch, -1, width)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, width), jnp.float32)
    x = jnp.concatenate(
        [jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, width)), x], axis=1)
    gelu = AUTO_OPTIONS["gelu"] if self.gelu == "auto" else self.gelu
    encoded, outputs, qkvs = Encoder(depth, num_heads, mlp_dim,
                                     float(self.drop_path), self.dtype,
                                     exact_gelu=gelu == "exact",
                                     name="Transformer")(x, train)

    taps: Dict[str, jnp.ndarray] = {
        f"block{i}": out for i, out in enumerate(outputs)}
    taps["encoded"] = encoded
    heads = self.relation_heads or num_heads
    for name, t in zip("qkv", qkvs[self.qkv_block]):
      taps[name] = t.reshape(t.shape[:2] + (heads, width // heads)).transpose(
          0, 2, 1, 3)
    x = taps["pre_logits"] = encoded[:, 0].astype(jnp.float32)
    if not self.num_classes:
      return x, taps
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                      dtype=jnp.float32, param_dtype=jnp.float32,
                      name="head")(x)
    return logits, taps


# --------------------------------------------------------------------------
# Weight layouts: official ViT npz (= funmatch names) and timm.
# --------------------------------------------------------------------------

HEAD = ("head/kernel", "head/bias")
_BLOCK = re.compile(r"Transformer/encoderblock_(\d+)/(.+)")
_TIMM_BLOCK_NAMES = {
    "LayerNorm_0/scale": "norm1.weight",
    "LayerNorm_0/bias": "norm1.bias",
    "MultiHeadDotProductAttention_1/out/kernel": "attn.proj.weight",
    "MultiHeadDotProductAttention_1/out/bias": "attn.proj.bias",
    "LayerNorm_2/scale": "norm2.weight",
    "LayerNorm_2/bias": "norm2.bias",
    "MlpBlock_3/Dense_0/kernel": "mlp.fc1.weight",
    "MlpBlock_3/Dense_0/bias": "mlp.fc1.bias",
    "MlpBlock_3/Dense_1/kernel": "mlp.fc2.weight",
    "MlpBlock_3/Dense_1/bias": "mlp.fc2.bias",
}
# timm fuses q, k, v into one `qkv`; loading splits it into these parts.
_QKV = ("query", "key", "value")
_QKV_PART = re.compile(
    r"(blocks\.\d+\.attn)\.qkv\.(weight|bias)\((query|key|value)\)")


def _timm_name(name: str) -> str:
  """funmatch name -> timm `VisionTransformer` name (q/k/v: a part of qkv)."""
  block = _BLOCK.fullmatch(name)
  if block:
    index, rest = block.groups()
    parts = rest.split("/")
    if len(parts) == 3 and parts[1] in _QKV:
      kind = "weight" if parts[2] == "kernel" else "bias"
      return f"blocks.{index}.attn.qkv.{kind}({parts[1]})"
    return f"blocks.{index}." + _TIMM_BLOCK_NAMES.get(rest, rest)
  return {
      "embedding/kernel": "patch_embed.proj.weight",
      "embedding/bias": "patch_embed.proj.bias",
      "cls": "cls_token",
      "Transformer/posembed_input/pos_embedding": "pos_embed",
      "Transformer/encoder_norm/scale": "norm.weight",
      "Transformer/encoder_norm/bias": "norm.bias",
      "head/kernel": "head.weight",
      "head/bias": "head.bias",
  }.get(name, name)


def _to_timm(name: str, value: np.ndarray) -> np.ndarray:
  """funmatch (flax) array -> timm (PyTorch) array."""
  if name == "embedding/kernel":
    return spec.hwio_to_oihw(value)
  if name.endswith("/kernel"):
    if value.ndim == 3 and name.endswith("out/kernel"):  # [H, d, D]
      value = value.reshape(-1, value.shape[-1])
    elif value.ndim == 3:  # q/k/v [D, H, d]
      value = value.reshape(value.shape[0], -1)
    return value.T
  if value.ndim == 2 and name.endswith(("query/bias", "key/bias",
                                        "value/bias")):
    return value.reshape(-1)
  return value


def _from_timm(name: str, value: np.ndarray, shape=None) -> np.ndarray:
  """timm (PyTorch) array -> funmatch (flax) array of `shape`."""
  if name == "embedding/kernel" and value.ndim == 4:
    return spec.oihw_to_hwio(value)
  if name.endswith("/kernel") and value.ndim == 2:
    value = value.T
  if shape is not None and value.size == int(np.prod(shape)):
    return value.reshape(shape)  # q/k/v/out heads split back out
  return value


def _split_qkv(arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  out = {}
  for name, value in arrays.items():
    fused = re.fullmatch(r"(blocks\.\d+\.attn)\.qkv\.(weight|bias)", name)
    if fused and value.shape[0] % 3 == 0:
      for part, piece in zip(_QKV, np.split(value, 3, axis=0)):
        out[f"{name}({part})"] = piece
    else:
      out[name] = value
  return out


def _fuse_qkv(arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  out, parts = {}, {}
  for name, value in arrays.items():
    part = _QKV_PART.fullmatch(name)
    if part:
      parts.setdefault(f"{part[1]}.qkv.{part[2]}", {})[part[3]] = value
    else:
      out[name] = value
  for name, pieces in parts.items():
    out[name] = np.concatenate([pieces[p] for p in _QKV], axis=0)
  return out


OFFICIAL = spec.Layout("vit_official", lambda name: name,
                       implies={"gelu": "tanh"},
                       marker=lambda name: name == "embedding/kernel")
TIMM = spec.Layout("timm", _timm_name, to_file=_to_timm,
                   to_model=_from_timm, prepare=_split_qkv,
                   finish=_fuse_qkv, implies={"gelu": "exact"},
                   marker=lambda name: name.startswith("patch_embed."))


def describe(params) -> str:
  """`width=64, depth=2, patch_size=8, num_classes=10`-style summary."""
  flat = spec.flat_params(params)
  kernel = np.shape(flat.get("embedding/kernel", np.zeros((0, 0, 0, 0))))
  depth = sum(1 for name in flat
              if name.endswith("LayerNorm_0/scale"))
  head = flat.get(HEAD[0])
  classes = 0 if head is None else np.shape(head)[-1]
  return (f"ViT width={kernel[-1]}, depth={depth}, patch_size={kernel[0]}, "
          f"num_classes={classes}")


# --------------------------------------------------------------------------
# timm.
# --------------------------------------------------------------------------

_TIMM_SIZES = {"Ti": "tiny", "S": "small", "B": "base", "L": "large"}
# (size, patch) pairs timm registers as vit_{size}_patch{patch}_{224,384}.
_TIMM_NAMED = {("tiny", 16), ("small", 16), ("small", 32), ("base", 16),
               ("base", 32), ("large", 16), ("large", 32)}


def timm_spec(model: "Model", params: Mapping[str, Any]) -> Dict[str, Any]:
  """How timm builds a `VisionTransformer` computing what `model` computes.

  Returns {'model_name' (a `timm.create_model` name or None), 'kwargs' (JSON
  values; they also fit `timm.models.vision_transformer.VisionTransformer`),
  'code'}. The image size comes from the position embedding in `params`.
  """
  width, depth, num_heads, mlp_dim = model.dims
  if model.gelu == "auto":
    raise ValueError("resolve gelu='auto' before exporting")
  pos = spec.flat_params(params)["Transformer/posembed_input/pos_embedding"]
  grid = int(round((np.shape(pos)[1] - 1) ** 0.5))
  mlp_ratio = mlp_dim / width
  if grid * grid != np.shape(pos)[1] - 1 or int(width * mlp_ratio) != mlp_dim:
    raise UserError(
        f"ViT width={width}, mlp_dim={mlp_dim}, {np.shape(pos)[1] - 1} "
        "patches has no exact timm VisionTransformer (it needs a square "
        "patch grid and mlp_dim = int(width * mlp_ratio)); export it as "
        "'npz' or 'safetensors' instead.")
  kwargs = {"img_size": grid * model.patch_size,
            "patch_size": model.patch_size, "embed_dim": width,
            "depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio,
            "num_classes": int(model.num_classes),
            "act_layer": "gelu_tanh" if model.gelu == "tanh" else "gelu"}
  size = {_TIMM_SIZES[k]: v for k, v in VARIANTS.items()}
  name = None
  for size_name, dims in size.items():
    if (dims == model.dims and (size_name, model.patch_size) in _TIMM_NAMED
        and kwargs["img_size"] in (224, 384)):
      name = f"vit_{size_name}_patch{model.patch_size}_{kwargs['img_size']}"
  args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
  code = (f"timm.create_model({name!r}, {args})" if name else
          f"timm.models.vision_transformer.VisionTransformer({args})")
  return {"model_name": name, "kwargs": kwargs, "code": code}


def build_timm(recipe: Mapping[str, Any]):
  """The timm module a `timm_spec` describes (imports timm)."""
  import timm  # pylint: disable=import-outside-toplevel
  if recipe.get("model_name"):
    return timm.create_model(recipe["model_name"], pretrained=False,
                             **recipe["kwargs"])
  return timm.models.vision_transformer.VisionTransformer(**recipe["kwargs"])


WEIGHTS = spec.WeightsSpec(
    what="ViT",
    # The official npz names are funmatch's: a file without metadata reads as
    # official (tanh GELU); a funmatch export records its layout.
    layouts=(OFFICIAL, TIMM, spec.FUNMATCH),
    formats={"npz": "vit_official", "safetensors": "funmatch", "timm": "timm"},
    head=HEAD,
    describe=describe,
    hint="set the model's variant/width/depth/num_heads/mlp_dim, "
    "patch_size and res to those of the checkpoint, or use dont_load for "
    "names to keep from init.",
    auto_options=AUTO_OPTIONS,
    timm=timm_spec,
    build_timm=build_timm,
)
