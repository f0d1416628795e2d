"""Why is a BiT-R50x1 forward slower in JAX (XLA:CPU) than in PyTorch (oneDNN)?

Times the forward pass of one BiT-R50x1 (random weights, already standardised,
so only convs, GroupNorm, ReLU, pooling and the head run) under many variants:
XLA:CPU flags, jax options, layouts (NHWC / NCHW), conv implementations (XLA
conv, 1x1 convs as matmuls, im2col + matmul), dtypes, batch sizes, whole-model
jit vs op-by-op, and the same network in PyTorch when torch is installed (it is
not a funmatch dependency: `pip install torch --index-url
https://download.pytorch.org/whl/cpu`).

Every variant runs in its own subprocess (XLA_FLAGS are read once, at start-up),
is warmed up (compiled) first and timed `--repeats` times; the median is
reported. Before timing, each variant's logits are compared with the flax
model's (`funmatch.models.bit`), so a variant that computes something else is
caught.

  python tools/cpu_conv_study.py --output /tmp/cpu_conv.json        # all variants
  python tools/cpu_conv_study.py --only jax_default,torch_nchw --batch 32 --res 64
  python tools/cpu_conv_study.py --list
  python tools/cpu_conv_study.py --layers --cores 1          # every conv shape alone
  python tools/cpu_conv_study.py --benchmark --config configs/digits.py:teacher=DIR ...

--benchmark runs tools/benchmark.py (the arguments after it are its own) with
BiT's convolutions in funmatch.models.conv's matmul form, to measure that change
on whole train steps before the model adopts it.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)

# name -> variant. Keys: framework (jax|torch), impl, dtype, xla_flags, jax_config,
# batch (None: --batch), threads (torch), note.
#   jax impls: flax (funmatch.models.bit, the library's model), lax_nhwc / lax_nchw
#   (the same network written with lax.conv_general_dilated in that layout),
#   dot1x1 (NHWC, 1x1 convs as matmuls), im2col (NHWC, every conv as
#   patches + matmul), eager (flax model op by op, no whole-model jit),
#   convs_only (lax_nhwc without GroupNorm), slices (NHWC, im2col built from k*k
#   strided slices + matmul, 1x1 convs as matmuls).
#   hybrid (the native conv, slices only where the input is smaller than the window).
#   grad=True: d(sum of logits)/d(params), a training step's forward + backward.
#   torch impls: nchw, channels_last, convs_only.
VARIANTS = {
    "jax_default": dict(framework="jax", impl="flax"),
    "jax_lax_nhwc": dict(framework="jax", impl="lax_nhwc"),
    "jax_lax_nchw": dict(framework="jax", impl="lax_nchw"),
    "jax_convs_only": dict(framework="jax", impl="convs_only"),
    "jax_dot1x1": dict(framework="jax", impl="dot1x1"),
    "jax_im2col": dict(framework="jax", impl="im2col"),
    "jax_eager": dict(framework="jax", impl="eager"),
    "jax_slices": dict(framework="jax", impl="slices"),
    "jax_hybrid": dict(framework="jax", impl="hybrid"),
    "train_jax_hybrid": dict(framework="jax", impl="hybrid", grad=True),
    "jax_slices_bf16": dict(framework="jax", impl="slices", dtype="bfloat16"),
    "jax_im2col_bf16": dict(framework="jax", impl="im2col", dtype="bfloat16"),
    "jax_im2col_batch8": dict(framework="jax", impl="im2col", batch=8),
    "jax_im2col_batch128": dict(framework="jax", impl="im2col", batch=128),
    "train_jax_default": dict(framework="jax", impl="flax", grad=True),
    "train_jax_im2col": dict(framework="jax", impl="im2col", grad=True),
    "train_jax_slices": dict(framework="jax", impl="slices", grad=True),
    "train_jax_dot1x1": dict(framework="jax", impl="dot1x1", grad=True),
    "train_torch": dict(framework="torch", impl="nchw", grad=True),
    "jax_bf16": dict(framework="jax", impl="flax", dtype="bfloat16"),
    "jax_precision_bf16": dict(framework="jax", impl="flax",
                               jax_config={"jax_default_matmul_precision": "bfloat16"}),
    "jax_precision_highest": dict(framework="jax", impl="flax",
                                  jax_config={"jax_default_matmul_precision": "highest"}),
    "xla_onednn": dict(framework="jax", impl="flax", xla_flags="--xla_cpu_use_onednn=true"),
    "xla_onednn_nchw": dict(framework="jax", impl="lax_nchw",
                            xla_flags="--xla_cpu_use_onednn=true"),
    "xla_onednn_custom_call": dict(
        framework="jax", impl="flax",
        xla_flags="--xla_cpu_experimental_onednn_custom_call=true"),
    "xla_onednn_fusions": dict(
        framework="jax", impl="flax",
        xla_flags="--xla_cpu_use_onednn=true "
                  "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce"),
    "xla_onednn_dot1x1": dict(
        framework="jax", impl="dot1x1",
        xla_flags="--xla_cpu_use_onednn=true "
                  "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce"),
    "xla_onednn_bf16": dict(framework="jax", impl="flax", dtype="bfloat16",
                            xla_flags="--xla_cpu_use_onednn=true"),
    "xla_no_xnnpack": dict(framework="jax", impl="flax", xla_flags="--xla_cpu_use_xnnpack=false"),
    "xla_xnn_fusions": dict(framework="jax", impl="flax",
                            xla_flags="--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce"),
    "xla_xnn_fusions_dot1x1": dict(
        framework="jax", impl="dot1x1",
        xla_flags="--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce"),
    "xla_xnn_graph_greedy": dict(
        framework="jax", impl="flax",
        xla_flags="--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"),
    "xla_ynn_fusions": dict(framework="jax", impl="flax",
                            xla_flags="--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce"),
    # What XLA:CPU 0.10 does with convs and dots (read from the compiled HLO): both
    # become YNNPACK custom fusions ("individual_convolution", "individual_dot" in the
    # ynn fusion list); removing them from the list falls back to XLA's own (Eigen)
    # kernels; oneDNN takes dots (not convs) with the flags below.
    "xla_eigen_conv": dict(
        framework="jax", impl="flax",
        xla_flags="--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"),
    "xla_ynn_add_fusions": dict(
        framework="jax", impl="flax",
        xla_flags="--xla_cpu_experimental_ynn_fusion_type=+dot,+eltwise,+reduce"),
    "slices_eigen_dot": dict(
        framework="jax", impl="slices",
        xla_flags="--xla_cpu_experimental_ynn_fusion_type=-individual_dot"),
    "slices_onednn_dot": dict(
        framework="jax", impl="slices",
        xla_flags="--xla_cpu_use_onednn=true "
                  "--xla_cpu_experimental_onednn_fusion_type=individual_dot"),
    "slices_ynn_add_fusions": dict(
        framework="jax", impl="slices",
        xla_flags="--xla_cpu_experimental_ynn_fusion_type=+dot,+eltwise,+reduce"),
    "slices_fast_math": dict(framework="jax", impl="slices",
                             xla_flags="--xla_cpu_enable_fast_math=true"),
    "xla_single_thread_eigen": dict(framework="jax", impl="flax",
                                    xla_flags="--xla_cpu_multi_thread_eigen=false"),
    "xla_fast_math": dict(framework="jax", impl="flax", xla_flags="--xla_cpu_enable_fast_math=true"),
    "xla_vector_width_512": dict(framework="jax", impl="flax",
                                 xla_flags="--xla_cpu_prefer_vector_width=512"),
    "xla_max_isa_avx2": dict(framework="jax", impl="flax", xla_flags="--xla_cpu_max_isa=AVX2"),
    "xla_fast_runtime": dict(framework="jax", impl="flax",
                             xla_flags="--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME"),
    "xla_no_thunk_runtime": dict(framework="jax", impl="flax",
                                 xla_flags="--xla_cpu_use_thunk_runtime=false"),
    "xla_no_fusion_emitters": dict(framework="jax", impl="flax",
                                   xla_flags="--xla_cpu_use_fusion_emitters=false"),
    "jax_batch8": dict(framework="jax", impl="flax", batch=8),
    "jax_batch128": dict(framework="jax", impl="flax", batch=128),
    "torch_nchw": dict(framework="torch", impl="nchw"),
    "torch_channels_last": dict(framework="torch", impl="channels_last"),
    "torch_convs_only": dict(framework="torch", impl="convs_only"),
    "torch_bf16": dict(framework="torch", impl="nchw", dtype="bfloat16"),
    "torch_1thread": dict(framework="torch", impl="nchw", threads=1),
    "torch_batch8": dict(framework="torch", impl="nchw", batch=8),
    "torch_batch128": dict(framework="torch", impl="nchw", batch=128),
}


TORCH_REFERENCE = VARIANTS["torch_nchw"]
TORCH_TRAIN_REFERENCE = VARIANTS["train_torch"]


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
  p.add_argument("--list", action="store_true", help="list the variants and exit")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--res", type=int, default=64)
  p.add_argument("--depth", type=int, default=50)
  p.add_argument("--width", type=float, default=1.0)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--cores", type=int, default=0,
                 help="pin every variant to the first N CPUs (torch uses N threads); "
                      "0: all CPUs")
  p.add_argument("--unpaired", action="store_true",
                 help="do not time the PyTorch reference alongside each variant (with 2+ "
                      "threads, the two runtimes' idle-spinning thread pools slow each "
                      "other down)")
  p.add_argument("--timeout", type=int, default=900, help="seconds per variant")
  p.add_argument("--xla_flags", default="",
                 help="extra XLA_FLAGS for every jax variant (e.g. to try one more flag)")
  p.add_argument("--output", default="", help="write the results as JSON here")
  p.add_argument("--layers", action="store_true",
                 help="time every conv shape of the network alone (XLA conv, XLA "
                      "matmul/im2col, torch) instead of the variants")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  return p.parse_args(argv)


# ---------------------------------------------------------------------------
# Parameters shared by every implementation.


def make_params(depth, width, num_classes=1000):
  """Random BiT params, kernels pre-standardised, head random (not zero): numpy."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from funmatch.models import bit  # pylint: disable=import-outside-toplevel
  model = bit.Model(num_classes=num_classes, depth=depth, width=width)
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
                   ["params"])()
  params = bit.prestandardize(params)
  rng = np.random.default_rng(0)
  head = params["head"]["conv2d"]
  params["head"]["conv2d"] = {
      "kernel": rng.normal(0, head["kernel"].shape[2] ** -0.5,
                           head["kernel"].shape).astype(np.float32),
      "bias": np.zeros(head["bias"].shape, np.float32)}
  return jax.tree.map(np.asarray, params)


def units_of(params):
  """[(stage, unit params, stride)] in order."""
  out = []
  for stage in range(1, 5):
    block = params[f"block{stage}"]
    for i, name in enumerate(sorted(block)):
      out.append((block[name], (1 if stage == 1 else 2) if i == 0 else 1))
  return out


# ---------------------------------------------------------------------------
# JAX implementations.


# While a list, every conv of the lax-written network appends (x shape, kernel
# shape, stride) to it when traced (used by --layers).
CONV_LOG = None


def make_jax_conv(impl, dtype):
  """conv(x, kernel HWIO, stride) with BiT's padding, in the layout/impl asked."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax import lax  # pylint: disable=import-outside-toplevel
  nchw = impl == "lax_nchw"

  def conv(x, kernel, stride):
    if CONV_LOG is not None:
      CONV_LOG.append((tuple(x.shape), tuple(kernel.shape), stride))
    k = kernel.shape[0]
    before = (k - 1) // 2
    padding = [(before, k - 1 - before)] * 2
    kernel = kernel.astype(dtype)
    if impl == "hybrid":
      # The native conv, except where the input is smaller than the window (a 3x3
      # conv on 2x2 or 1x1 maps), which XLA:CPU runs ~100x below its speed.
      small = x.shape[1] < k or x.shape[2] < k
      return make_jax_conv("slices" if small else "lax_nhwc", dtype)(x, kernel, stride)
    if impl in ("dot1x1", "im2col", "slices") and k == 1:
      if stride > 1:
        x = x[:, ::stride, ::stride, :]
      return jnp.einsum("nhwc,co->nhwo", x, kernel[0, 0])
    if impl == "slices":
      # im2col from k*k strided slices of the padded input: features (kh, kw, C)
      # match the HWIO kernel's order, and the gradient is pads and adds.
      n, h, w, _ = x.shape
      out_h, out_w = -(-h // stride), -(-w // stride)
      xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
      patches = jnp.concatenate(
          [xp[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
           for i in range(k) for j in range(k)], axis=-1)
      return jnp.einsum("nhwp,po->nhwo", patches, kernel.reshape(-1, kernel.shape[-1]))
    if impl == "im2col":
      patches = lax.conv_general_dilated_patches(
          x, (k, k), (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
      # patches' features are ordered (C, kh, kw); the kernel is (kh, kw, C, O).
      flat = kernel.transpose(2, 0, 1, 3).reshape(-1, kernel.shape[-1])
      return jnp.einsum("nhwp,po->nhwo", patches, flat)
    if nchw:
      return lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=("NCHW", "HWIO", "NCHW"))
    return lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

  return conv


def jax_forward_fn(impl, dtype_name):
  """forward(params, images NHWC) -> logits for a lax-written BiT."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax import lax  # pylint: disable=import-outside-toplevel
  dtype = jnp.dtype(dtype_name)
  nchw = impl == "lax_nchw"
  use_gn = impl != "convs_only"
  conv = make_jax_conv(impl, dtype)

  def group_norm(x, p):
    if not use_gn:
      return x
    x32 = x.astype(jnp.float32)
    if nchw:
      n, c, h, w = x.shape
      g = x32.reshape(n, 32, c // 32, h, w)
      axes, shape = (2, 3, 4), (1, c, 1, 1)
    else:
      n, h, w, c = x.shape
      g = x32.reshape(n, h, w, 32, c // 32)
      axes, shape = (1, 2, 4), (1, 1, 1, c)
    g = g - g.mean(axes, keepdims=True)
    g = g / jnp.sqrt(jnp.mean(jnp.square(g), axes, keepdims=True) + 1e-5)
    y = g.reshape(x.shape) * p["scale"].reshape(shape) + p["bias"].reshape(shape)
    return y.astype(dtype)

  def preact(x, p):
    return jax.nn.relu(group_norm(x, p["group_norm"]))

  def forward(params, images):
    x = images.astype(dtype)
    if nchw:
      x = x.transpose(0, 3, 1, 2)
    x = conv(x, params["root_block"]["standardized_conv2d"]["kernel"], 2)
    pad = ((0, 0), (0, 0), (1, 1), (1, 1)) if nchw else ((0, 0), (1, 1), (1, 1), (0, 0))
    x = jnp.pad(x, pad)
    window = (1, 1, 3, 3) if nchw else (1, 3, 3, 1)
    strides = (1, 1, 2, 2) if nchw else (1, 2, 2, 1)
    x = lax.reduce_window(x, -jnp.inf, lax.max, window, strides, "VALID")
    for unit, stride in units_of(params):
      h = preact(x, unit["a"])
      shortcut = x
      if "proj" in unit["a"]:
        shortcut = conv(h, unit["a"]["proj"]["standardized_conv2d"]["kernel"], stride)
      y = conv(h, unit["a"]["standardized_conv2d"]["kernel"], 1)
      y = conv(preact(y, unit["b"]), unit["b"]["standardized_conv2d"]["kernel"], stride)
      y = conv(preact(y, unit["c"]), unit["c"]["standardized_conv2d"]["kernel"], 1)
      x = y + shortcut
    x = preact(x, params)
    pooled = x.astype(jnp.float32).mean((2, 3) if nchw else (1, 2))
    head = params["head"]["conv2d"]
    return pooled @ head["kernel"][0, 0] + head["bias"]

  return forward


def jax_call(variant, args, params, images):
  """(call() -> logits as numpy after blocking, flax reference logits)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from funmatch.models import bit  # pylint: disable=import-outside-toplevel
  for key, value in (variant.get("jax_config") or {}).items():
    jax.config.update(key, value)
  impl = variant["impl"]
  dtype = variant.get("dtype", "float32")
  model = bit.Model(num_classes=1000, depth=args.depth, width=args.width,
                    dtype=jnp.dtype(dtype), standardize_weights=False)
  if impl in ("flax", "eager"):
    forward = lambda p, x: model.apply({"params": p}, x)[0]
  else:
    forward = jax_forward_fn(impl, dtype)
  params = jax.device_put(params)
  images = jax.device_put(images)
  extract = lambda out: out
  if variant.get("grad"):  # a training step's work: d(sum of logits)/d(every param)
    value = forward
    forward = lambda p, x: jax.grad(lambda p: jnp.sum(value(p, x)))(p)
    # Every gradient is an output (so none is optimised away); the root conv's,
    # the deepest one, is compared with the reference.
    extract = lambda grads: grads["root_block"]["standardized_conv2d"]["kernel"]
  fn = forward if impl == "eager" else jax.jit(forward)
  reference_model = bit.Model(num_classes=1000, depth=args.depth, width=args.width,
                              standardize_weights=False)
  reference_fn = lambda p, x: reference_model.apply({"params": p}, x)[0]
  if variant.get("grad"):
    reference_fn = lambda p, x: jax.grad(lambda p: jnp.sum(
        reference_model.apply({"params": p}, x)[0]))(p)["root_block"][
            "standardized_conv2d"]["kernel"]
  with jax.default_matmul_precision("highest"):
    reference = np.asarray(jax.jit(reference_fn)(params, images))
  return (lambda: np.asarray(extract(jax.block_until_ready(fn(params, images))), np.float32),
          reference)


# ---------------------------------------------------------------------------
# PyTorch implementation (the same network, the same weights).


def torch_call(variant, params, images):
  """call() -> logits as numpy, for the same network in PyTorch."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  threads = int(variant.get("threads", 0) or len(os.sched_getaffinity(0)))
  impl = variant["impl"]
  dtype = getattr(torch, variant.get("dtype", "float32"))
  channels_last = impl == "channels_last"
  fmt = torch.channels_last if channels_last else torch.contiguous_format

  grad = bool(variant.get("grad"))

  def kernel(k):  # HWIO -> OIHW
    return torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1))).to(
        dtype).contiguous(memory_format=fmt).requires_grad_(grad)

  def conv(x, k, stride):
    return F.conv2d(x, k, stride=stride, padding=k.shape[-1] // 2)

  root = kernel(params["root_block"]["standardized_conv2d"]["kernel"])
  units = []
  for unit, stride in units_of(params):
    u = {"stride": stride}
    for sub in "abc":
      u[sub] = kernel(unit[sub]["standardized_conv2d"]["kernel"])
      gn = unit[sub]["group_norm"]
      u[sub + "_gn"] = (torch.from_numpy(gn["scale"]).to(dtype).requires_grad_(grad),
                        torch.from_numpy(gn["bias"]).to(dtype).requires_grad_(grad))
    if "proj" in unit["a"]:
      u["proj"] = kernel(unit["a"]["proj"]["standardized_conv2d"]["kernel"])
    units.append(u)
  final_gn = (torch.from_numpy(params["group_norm"]["scale"]).to(dtype),
              torch.from_numpy(params["group_norm"]["bias"]).to(dtype))
  head_w = torch.from_numpy(params["head"]["conv2d"]["kernel"][0, 0]).requires_grad_(grad)
  head_b = torch.from_numpy(params["head"]["conv2d"]["bias"])

  def preact(x, gn):
    if impl == "convs_only":
      return F.relu(x)
    return F.relu(F.group_norm(x, 32, gn[0], gn[1], eps=1e-5))

  def forward(images_nchw):
    x = conv(images_nchw, root, 2)
    x = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, 2)
    for u in units:
      h = preact(x, u["a_gn"])
      shortcut = conv(h, u["proj"], u["stride"]) if "proj" in u else x
      y = conv(h, u["a"], 1)
      y = conv(preact(y, u["b_gn"]), u["b"], u["stride"])
      y = conv(preact(y, u["c_gn"]), u["c"], 1)
      x = y + shortcut
    x = preact(x, final_gn)
    return x.float().mean((2, 3)) @ head_w + head_b

  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(dtype)
  x = x.contiguous(memory_format=fmt)

  def call():
    torch.set_num_threads(threads)  # global: set per call, variants share a process
    if grad:
      root.grad = None
      forward(x).sum().backward()
      return root.grad.float().numpy().transpose(2, 3, 1, 0)  # OIHW -> HWIO
    with torch.inference_mode():
      return forward(x).float().numpy()

  return call


# ---------------------------------------------------------------------------
# Driver.


def timed_calls(calls, repeats):
  """Times the calls round-robin (so every call sees the same machine load).

  Returns {name: (wall seconds list, process CPU seconds list, first call s, logits)}.
  """
  out = {}
  for name, call in calls.items():
    start = time.perf_counter()
    logits = call()  # compiles / warms up
    out[name] = ([], [], time.perf_counter() - start, logits)
  for name, call in calls.items():
    call()  # a second warm-up call (first-touch allocations, thread pools)
  for _ in range(repeats):
    for name, call in calls.items():
      cpu, start = time.process_time(), time.perf_counter()
      call()
      out[name][0].append(time.perf_counter() - start)
      out[name][1].append(time.process_time() - cpu)
  return out


def worker(args):
  if args.cores:  # before jax and torch size their thread pools
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])
  import numpy as np  # pylint: disable=import-outside-toplevel
  variant = VARIANTS[args.worker]
  batch = variant.get("batch") or args.batch
  params = make_params(args.depth, args.width)
  images = np.random.default_rng(1).uniform(-1, 1, (batch, args.res, args.res, 3)).astype(
      np.float32)
  calls = {}
  reference = None
  if variant["framework"] == "torch":
    calls["variant"] = torch_call(variant, params, images)
  else:
    calls["variant"], reference = jax_call(variant, args, params, images)
  torch_reference = TORCH_TRAIN_REFERENCE if variant.get("grad") else TORCH_REFERENCE
  if torch_available() and not args.unpaired and variant not in (
      TORCH_REFERENCE, TORCH_TRAIN_REFERENCE):
    calls["torch"] = torch_call(torch_reference, params, images)
  load_before = os.getloadavg()[0]
  timings = timed_calls(calls, args.repeats)
  walls, cpus, first_call, logits = timings["variant"]
  if reference is None:  # computed after timing torch, so XLA's threads are not about
    _, reference = jax_call(dict(framework="jax", impl="flax", grad=variant.get("grad")),
                            args, params, images)
  scale = float(np.abs(reference).max()) or 1.0
  max_rel_diff = float(np.abs(logits - reference).max()) / scale
  if variant.get("impl") == "convs_only":
    max_rel_diff = None  # a different function on purpose
  median = statistics.median(walls)
  result = dict(
      name=args.worker, batch=batch, res=args.res, median_s=median, min_s=min(walls),
      cpu_s=statistics.median(cpus), per_image_ms=1000 * median / batch,
      first_call_s=first_call, max_rel_diff_vs_flax=max_rel_diff, times=walls,
      load_average=[load_before, os.getloadavg()[0]])
  if "torch" in timings:
    torch_walls = timings["torch"][0]
    result["torch_median_s"] = statistics.median(torch_walls)
    result["torch_min_s"] = min(torch_walls)
    # Paired ratios: each variant call against the torch call right after it.
    result["vs_torch"] = statistics.median(w / t for w, t in zip(walls, torch_walls))
  elif variant in (TORCH_REFERENCE, TORCH_TRAIN_REFERENCE):
    result["vs_torch"] = 1.0
  print(json.dumps(result))
  return 0


def layers_worker(args):
  """Per conv shape of the network: XLA conv vs matmul forms vs PyTorch, alone."""
  global CONV_LOG  # pylint: disable=global-statement
  if args.cores:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])
  import collections  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  params = make_params(args.depth, args.width)
  images = np.zeros((args.batch, args.res, args.res, 3), np.float32)
  CONV_LOG = []
  jax.eval_shape(jax_forward_fn("lax_nhwc", "float32"), params, images)
  shapes, CONV_LOG = collections.Counter(CONV_LOG), None
  rng = np.random.default_rng(0)
  impls = {"xla_conv": make_jax_conv("lax_nhwc", jnp.float32),
           "xla_matmul": make_jax_conv("im2col", jnp.float32)}
  rows = []
  for (x_shape, k_shape, stride), count in shapes.items():
    x = rng.standard_normal(x_shape, np.float32)
    kernel = rng.standard_normal(k_shape, np.float32)
    calls = {}
    for name, conv in impls.items():
      fn = jax.jit(lambda x, k, conv=conv, stride=stride: conv(x, k, stride))
      xd, kd = jax.device_put(x), jax.device_put(kernel)
      calls[name] = lambda fn=fn, xd=xd, kd=kd: jax.block_until_ready(fn(xd, kd))
    if torch_available():
      import torch  # pylint: disable=import-outside-toplevel
      import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
      threads = len(os.sched_getaffinity(0))
      for name, fmt in (("torch", torch.contiguous_format),
                        ("torch_channels_last", torch.channels_last)):
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).contiguous(
            memory_format=fmt)
        kt = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))).contiguous(
            memory_format=fmt)

        def call(xt=xt, kt=kt, stride=stride, pad=k_shape[0] // 2):
          torch.set_num_threads(threads)
          with torch.inference_mode():
            return F.conv2d(xt, kt, stride=stride, padding=pad)

        calls[name] = call
    timings = timed_calls(calls, args.repeats)
    out_hw = -(-x_shape[1] // stride)
    gflop = 2 * x_shape[0] * out_hw * out_hw * k_shape[0] * k_shape[1] * k_shape[2] * \
        k_shape[3] / 1e9
    row = dict(x=list(x_shape), kernel=list(k_shape), stride=stride, count=count,
               gflop=gflop, ms={name: 1000 * statistics.median(t[0])
                                for name, t in timings.items()})
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def print_layers(rows):
  names = list(rows[0]["ms"])
  print(f"{'input NHWC':18s} {'kernel HWIO':16s} {'s':>1s} {'n':>2s} {'GFLOP':>6s} " +
        " ".join(f"{n[:19]:>19s}" for n in names))
  totals = dict.fromkeys(names, 0.0)
  for row in rows:
    for n in names:
      totals[n] += row["count"] * row["ms"][n]
    print(f"{'x'.join(map(str, row['x'])):18s} {'x'.join(map(str, row['kernel'])):16s} "
          f"{row['stride']:1d} {row['count']:2d} {row['gflop']:6.3f} " +
          " ".join(f"{row['ms'][n]:10.2f} ms {1000 * row['gflop'] / row['ms'][n]:4.0f}"
                   for n in names))
  gflop = sum(r["count"] * r["gflop"] for r in rows)
  print(f"{'all convs (x count)':38s} {gflop:7.3f} " +
        " ".join(f"{totals[n]:10.1f} ms {1000 * gflop / totals[n]:4.0f}" for n in names))
  print("(each cell: median ms per call, then GFLOP/s)")
  return totals


def describe(variant):
  parts = [variant["framework"], variant["impl"], variant.get("dtype", "float32")]
  if variant.get("xla_flags"):
    parts.append(variant["xla_flags"])
  if variant.get("jax_config"):
    parts.append(json.dumps(variant["jax_config"]))
  if variant.get("threads"):
    parts.append(f"{variant['threads']} thread(s)")
  if variant.get("grad"):
    parts.append("forward+backward")
  return " ".join(parts)


def torch_available() -> bool:
  import importlib.util  # pylint: disable=import-outside-toplevel
  return importlib.util.find_spec("torch") is not None


def run_benchmark_with_matmul_conv(benchmark_args):
  """tools/benchmark.py with every NHWC/HWIO lax conv (BiT's StdConv) as im2col + matmul."""
  import runpy  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from funmatch.models import conv  # pylint: disable=import-outside-toplevel
  native = jax.lax.conv_general_dilated

  def matmul_conv(x, kernel, window_strides, padding, *args, dimension_numbers=None,
                  **kwargs):
    if (dimension_numbers == ("NHWC", "HWIO", "NHWC") and not args and not kwargs
        and window_strides[0] == window_strides[1] and not isinstance(padding, str)):
      return conv.conv2d(x, kernel, window_strides[0], padding, impl="matmul")
    return native(x, kernel, window_strides, padding, *args,
                  dimension_numbers=dimension_numbers, **kwargs)

  jax.lax.conv_general_dilated = matmul_conv
  path = os.path.join(os.path.dirname(HERE), "benchmark.py")
  sys.argv = [path, *benchmark_args]
  runpy.run_path(path, run_name="__main__")
  return 0


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["--benchmark"]:
    return run_benchmark_with_matmul_conv(argv[1:])
  args = parse_args(argv)
  if args.worker:
    return worker(args)
  if args.layers:
    if args.xla_flags:
      os.environ["XLA_FLAGS"] = " ".join(
          f for f in (os.environ.get("XLA_FLAGS", ""), args.xla_flags) if f)
    print(f"BiT-R{args.depth}x{args.width:g} convs at {args.res}px, batch {args.batch}, "
          f"{args.cores or os.cpu_count()} of {os.cpu_count()} CPUs, XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r}; median of {args.repeats}", flush=True)
    rows = layers_worker(args)
    totals = print_layers(rows)
    if args.output:
      with open(args.output, "w") as f:
        json.dump(dict(rows=rows, totals_ms=totals, xla_flags=os.environ.get("XLA_FLAGS", ""),
                       batch=args.batch, res=args.res, cores=args.cores), f, indent=1)
    return 0
  if args.list:
    for name, variant in VARIANTS.items():
      print(f"{name:26s} {describe(variant)}")
    return 0
  names = [n for n in args.only.split(",") if n] or list(VARIANTS)
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    print(f"cpu_conv_study: error: unknown variant(s) {', '.join(unknown)}; "
          "see --list", file=sys.stderr)
    return 2
  has_torch = torch_available()
  results = []
  print(f"BiT-R{args.depth}x{args.width:g} forward, {args.res}px, batch {args.batch} "
        f"(unless the variant says), median of {args.repeats}; "
        f"{args.cores or os.cpu_count()} of {os.cpu_count()} CPUs")
  print(f"{'variant':26s} {'batch':>5s} {'median s':>9s} {'min s':>7s} {'ms/img':>7s} "
        f"{'vs torch':>8s} {'torch s':>7s} {'load':>5s} {'rel diff':>8s}  what")
  for name in names:
    variant = VARIANTS[name]
    if variant["framework"] == "torch" and not has_torch:
      results.append(dict(name=name, skipped="torch is not installed"))
      print(f"{name:26s} skipped: torch is not installed")
      continue
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    flags = " ".join(f for f in (env.get("XLA_FLAGS", ""), args.xla_flags,
                                 variant.get("xla_flags", "")) if f)
    if flags:
      env["XLA_FLAGS"] = flags
    cmd = [sys.executable, HERE, "--worker", name, "--batch", str(args.batch),
           "--res", str(args.res), "--depth", str(args.depth), "--width", str(args.width),
           "--repeats", str(args.repeats), "--cores", str(args.cores)]
    if args.unpaired:
      cmd.append("--unpaired")
    try:
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                            timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
      results.append(dict(name=name, error=f"timed out after {args.timeout} s"))
      print(f"{name:26s} timed out")
      continue
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
      error = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
      results.append(dict(name=name, error=error, describe=describe(variant)))
      print(f"{name:26s} failed: {error}")
      continue
    result = json.loads(lines[-1])
    result["describe"] = describe(variant)
    results.append(result)
    ratio = f"{result['vs_torch']:.2f}x" if "vs_torch" in result else "-"
    torch_s = f"{result['torch_median_s']:.3f}" if "torch_median_s" in result else "-"
    diff = result["max_rel_diff_vs_flax"]
    diff_text = "n/a" if diff is None else f"{diff:.0e}"
    print(f"{name:26s} {result['batch']:5d} {result['median_s']:9.3f} {result['min_s']:7.3f} "
          f"{result['per_image_ms']:7.2f} {ratio:>8s} {torch_s:>7s} "
          f"{max(result['load_average']):5.1f} {diff_text:>8s}  {describe(variant)}",
          flush=True)
  if args.output:
    import jax  # pylint: disable=import-outside-toplevel
    import jaxlib  # pylint: disable=import-outside-toplevel
    meta = dict(jax=jax.__version__, jaxlib=jaxlib.__version__, cpus=os.cpu_count(),
                cores=args.cores or os.cpu_count(),
                batch=args.batch, res=args.res, depth=args.depth, width=args.width,
                repeats=args.repeats)
    if has_torch:
      import torch  # pylint: disable=import-outside-toplevel
      meta["torch"] = torch.__version__
    with open(args.output, "w") as f:
      json.dump(dict(meta=meta, results=results), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
