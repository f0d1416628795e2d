"""2-D convolution, fast on every backend: on CPU as im2col + one matmul.

XLA:CPU (jaxlib 0.10) runs a convolution whose input is smaller than its window
(a 3x3 conv on a 2x2 or 1x1 map: BiT's last stages at 64px and below, all the
digits models) about 100x below its usual speed, and its conv gradients are
slower than its matmuls (docs/benchmarks.md, "CPU convolution study"). So on CPU
a k x k conv here is: pad, take the k*k strided slices of the input,
concatenate them on the channel axis (features ordered (kh, kw, C), the HWIO
kernel's own order) and multiply by the kernel reshaped to [k*k*C, O]; a 1x1
conv is a plain matmul. It is the same function; its gradient is pads, slices
and matmuls. On one core this takes a BiT-R50x1 at 64px, batch 32, from 4.6x
PyTorch's forward time to 1.06x, and forward+backward from 4.4x to 1.4x; at
224px, forward 1.08x -> 1.14x, forward+backward 1.64x -> 1.44x. GPU and TPU keep
the native convolution (cuDNN / the TPU's conv units).

`impl` (or the FUNMATCH_CONV environment variable) picks: 'auto' (matmul on
CPU, the native conv elsewhere), 'xla' (always the native conv) or 'matmul'.
"""
import os
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "xla", "matmul")
ENV_VAR = "FUNMATCH_CONV"


def resolve_impl(impl: str | None = None) -> str:
  """'xla' or 'matmul' for `impl` (default: $FUNMATCH_CONV, else 'auto')."""
  impl = impl or os.environ.get(ENV_VAR, "") or "auto"
  if impl not in IMPLS:
    raise ValueError(f"conv impl {impl!r} (from {ENV_VAR} or the caller) is not one of "
                     f"{', '.join(IMPLS)}")
  if impl == "auto":
    return "matmul" if jax.default_backend() == "cpu" else "xla"
  return impl


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1,
           padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
           impl: str | None = None) -> jax.Array:
  """`lax.conv_general_dilated(x, kernel, (stride, stride), padding)`, NHWC / HWIO.

  x: [N, H, W, C]; kernel: [kh, kw, C, O]; padding: ((top, bottom), (left, right)).
  The result has x's dtype promoted with the kernel's, like the native conv.
  """
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if resolve_impl(impl) == "xla":
    return lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
  kh, kw, channels, features = kernel.shape
  if x.shape[-1] != channels:
    raise ValueError(f"conv2d: input has {x.shape[-1]} channels, the kernel {channels}")
  if any(padding[0]) or any(padding[1]):
    x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  _, height, width, _ = x.shape
  out_h = (height - kh) // stride + 1
  out_w = (width - kw) // stride + 1
  if kh == kw == 1:
    patches = x[:, :stride * (out_h - 1) + 1:stride, :stride * (out_w - 1) + 1:stride]
  else:
    patches = jnp.concatenate(
        [x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
         for i in range(kh) for j in range(kw)], axis=-1)
  return jnp.einsum("nhwp,po->nhwo", patches, kernel.reshape(kh * kw * channels, features))
