"""2-D convolution, fast on every backend: on CPU as slices + matmuls.

XLA:CPU (jaxlib 0.10) runs a convolution whose input is smaller than its window
(a 3x3 conv on a 2x2 or 1x1 map: BiT's last stages at 64px and below, all the
digits models) about 100x below its usual speed, and its conv gradients are
slower than its matmuls (docs/benchmarks.md, "CPU convolution study"). So on CPU
(impl 'matmul') every conv the models use is written with ops XLA:CPU is fast at:

  dense k x k   pad, the k*k strided slices of the input concatenated on the
                channel axis (features ordered (kh, kw, C), the HWIO kernel's own
                order), one matmul with the kernel reshaped to [k*k*C, O]
  1x1           a (strided) slice and a matmul
  patches       stride == kernel (ViT's patch embedding): a reshape into
                non-overlapping patches and one matmul, no copies of overlaps
  depthwise     k*k shifted slices, each times its [C] kernel tap, summed: one
                fused elementwise loop (a matmul would be block-diagonal)

It is the same function; its gradients are pads, slices and matmuls. GPU and TPU
keep the native convolution (cuDNN / the TPU's conv units).

The implementation is picked by `impl` (a model's `conv_impl` option): 'xla'
(always `lax.conv_general_dilated`), 'matmul', or 'auto' (the default): the
FUNMATCH_CONV environment variable if set, else matmul on CPU and the native
conv elsewhere.
"""
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from funmatch.errors import UserError

IMPLS = ("auto", "xla", "matmul")
ENV_VAR = "FUNMATCH_CONV"
Padding = str | Sequence[tuple[int, int]]


def check_impl(impl: str | None, where: str = "conv_impl") -> None:
  """UserError unless `impl` (the setting `where`) and $FUNMATCH_CONV are valid."""
  for name, value in ((where, impl), (ENV_VAR, os.environ.get(ENV_VAR) or None)):
    if value is not None and value not in IMPLS:
      raise UserError(f"{name}={value!r} is not a conv implementation; use one of "
                      f"{', '.join(IMPLS)} (auto: matmul on CPU, xla elsewhere)")


def resolve_impl(impl: str | None = "auto") -> str:
  """'xla' or 'matmul' for `impl`; 'auto' defers to $FUNMATCH_CONV, then the backend."""
  check_impl(impl)
  if impl in (None, "auto"):
    impl = os.environ.get(ENV_VAR) or "auto"
  if impl == "auto":
    return "matmul" if jax.default_backend() == "cpu" else "xla"
  return impl


def explicit_padding(padding: Padding, size: Sequence[int], kernel: Sequence[int],
                     stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """((top, bottom), (left, right)) for 'SAME', 'VALID' or explicit pairs."""
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(tuple(size), tuple(kernel), (stride, stride), padding)
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _taps(x: jax.Array, kh: int, kw: int, stride: int, out_h: int, out_w: int):
  """The kh*kw strided windows of x, [N, out_h, out_w, C] each, in (kh, kw) order."""
  return [x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
          for i in range(kh) for j in range(kw)]


def _dense(x, kernel, stride, out_h, out_w):
  kh, kw, channels, features = kernel.shape
  if kh == kw == 1:
    patches = _taps(x, 1, 1, stride, out_h, out_w)[0]
  elif kh == kw == stride:  # non-overlapping patches: a reshape, no copies
    n = x.shape[0]
    x = x[:, :out_h * kh, :out_w * kw]
    patches = x.reshape(n, out_h, kh, out_w, kw, channels).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, out_h, out_w, kh * kw * channels)
  else:
    patches = jnp.concatenate(_taps(x, kh, kw, stride, out_h, out_w), axis=-1)
  return jnp.einsum("nhwp,po->nhwo", patches, kernel.reshape(kh * kw * channels, features))


def _depthwise(x, kernel, stride, out_h, out_w):
  kh, kw = kernel.shape[:2]
  taps = _taps(x, kh, kw, stride, out_h, out_w)
  weights = kernel.reshape(kh * kw, -1)
  out = taps[0] * weights[0]
  for tap, weight in zip(taps[1:], weights[1:]):
    out = out + tap * weight
  return out


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1,
           padding: Padding = ((0, 0), (0, 0)), feature_group_count: int = 1,
           impl: str | None = "auto") -> jax.Array:
  """`lax.conv_general_dilated(x, kernel, (stride, stride), padding)`, NHWC / HWIO.

  x: [N, H, W, C]; kernel: [kh, kw, C / groups, O]; padding: 'SAME', 'VALID' or
  ((top, bottom), (left, right)); feature_group_count: 1 (dense) or C with O == C
  (depthwise) take the matmul forms, other groupings always the native conv.
  Both are computed in x's dtype promoted with the kernel's, as the native conv.
  """
  kh, kw, _, features = kernel.shape
  channels = x.shape[-1]
  dtype = jnp.result_type(x, kernel)
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  padding = explicit_padding(padding, x.shape[1:3], (kh, kw), stride)
  depthwise = feature_group_count == channels == features and feature_group_count > 1
  if (resolve_impl(impl) == "xla" or not (feature_group_count == 1 or depthwise)):
    return lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=feature_group_count)
  if kernel.shape[2] * feature_group_count != channels:
    raise ValueError(f"conv2d: input has {channels} channels, the kernel "
                     f"{kernel.shape[2]} x {feature_group_count} groups")
  if any(padding[0]) or any(padding[1]):
    x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  out_h = (x.shape[1] - kh) // stride + 1
  out_w = (x.shape[2] - kw) // stride + 1
  return (_depthwise if depthwise else _dense)(x, kernel, stride, out_h, out_w)


class Conv(nn.Module):
  """`flax.linen.Conv` with the same params (kernel [kh, kw, C / groups, O], bias
  [O]) and defaults, computed by `conv2d`: a drop-in that keeps checkpoints.

  dtype None computes in the inputs' and params' promoted dtype, as nn.Conv does.
  """
  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Padding = "SAME"
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    size = self.kernel_size
    kh, kw = (size, size) if isinstance(size, int) else tuple(size)
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    if strides[0] != strides[1]:
      raise ValueError(f"Conv {self.name}: strides {strides} must be equal")
    kernel = self.param("kernel", self.kernel_init,
                        (kh, kw, x.shape[-1] // self.feature_group_count, self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    dtype = self.dtype or jnp.result_type(x, kernel, *([bias] if self.use_bias else []))
    y = conv2d(x.astype(dtype), kernel.astype(dtype), strides[0], self.padding,
               self.feature_group_count, self.impl)
    return y + bias.astype(dtype) if self.use_bias else y
