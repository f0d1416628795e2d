"""Per-device memory of a distillation run: replicated vs FSDP, Adam vs Shampoo.

Counts, for the recipe's teacher and student (default: the paper's BiT-R152x2 ->
BiT-R50x1 at 224px, configs/bit_i1k.py), the bytes each device holds:

* parameters and optimizer state, from `jax.eval_shape` of the funmatch models
  and of the recipe's own optimizer (Adam or Shampoo), each array placed by the
  rule `config.sharding=fsdp` uses (funmatch.parallel.fsdp_spec: the largest
  axis divisible by the fsdp size is split, arrays under fsdp_min_size stay
  whole). Nothing is allocated.
* activations, measured: XLA's memory analysis of a compiled train step (teacher
  forward without gradient, student forward + backward, optimizer update) at two
  small batches on this machine's CPU; the difference per extra image is the
  per-image activation memory, scaled to the per-device batch. XLA on GPU/TPU
  fuses and schedules differently, so read it as an estimate (+-30%).

  python tools/memory_estimate.py                       # the paper's setup
  python tools/memory_estimate.py --devices 8 32 64 --batch 4096 --json out.json
  python tools/memory_estimate.py --no_measure          # parameters/state only
  python tools/memory_estimate.py --recipe configs/timm_teacher_i1k.py:family=swin
"""
import argparse
import json
import os
import sys
import time

GIB = 2 ** 30


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--recipe", default=None,
                 help="recipe file (default: configs/bit_i1k.py of this checkout or "
                      "the installed package)")
  p.add_argument("--batch", type=int, default=4096, help="global batch size")
  p.add_argument("--devices", type=int, nargs="+", default=[8, 32],
                 help="device counts; FSDP splits over all of them (mesh fsdp=N)")
  p.add_argument("--fsdp_min_size", type=int, default=2 ** 14)
  p.add_argument("--measure_batches", type=int, nargs=2, default=[2, 4],
                 help="the two per-device batches compiled to measure activations")
  p.add_argument("--teacher_dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--no_measure", action="store_true",
                 help="skip the compiled activation measurement")
  p.add_argument("--json", default="", help="also write the numbers here")
  return p.parse_args(argv)


def recipe_path(arg):
  if arg:
    return arg
  here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "bit_i1k.py")
  if os.path.exists(here):
    return here
  import funmatch.configs  # pylint: disable=import-outside-toplevel
  return os.path.join(os.path.dirname(funmatch.configs.__file__), "bit_i1k.py")


def load_config(path, optimizer):
  """The recipe at `path` (FILE.py or FILE.py:key=value,... as --config takes)."""
  from funmatch import config_util  # pylint: disable=import-outside-toplevel
  path, _, args = path.partition(":")
  module = config_util.load_recipe(path, os.path.splitext(os.path.basename(path))[0])
  return module.get_config(",".join(filter(None, (args, f"optimizer={optimizer}"))))


def abstract_run(config, teacher_dtype):
  """The recipe's run as the trainer builds it (funmatch.train.build), as shapes only:
  nothing is allocated and no data or weights are read."""
  from funmatch.train import build  # pylint: disable=import-outside-toplevel
  config = config.copy_and_resolve_references()
  for name in config.teachers:
    config[name].dtype = teacher_dtype
  synthetic = build.DataInfo(1000, int(config.input.batch_size), 1.0, 1000)
  return build.build(config, "distill", needs=build.Needs(abstract=True), data=synthetic)


def describe(model_config):
  """'bit 50x1.0', 'swin tiny': the model and its size options as the recipe gives them."""
  options = dict(model_config.items())
  if "depth" in options and "width" in options:
    return f"{model_config.model} {options['depth']}x{options['width']}"
  return f"{model_config.model} {options.get('variant', '')}".rstrip()


def count(tree):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def per_device_bytes(tree, fsdp_size, min_size):
  """Bytes one device holds of `tree` when each array is placed by fsdp_spec."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from funmatch import parallel  # pylint: disable=import-outside-toplevel
  total = 0
  for x in jax.tree.leaves(tree):
    size = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    spec = parallel.fsdp_spec(x.shape, fsdp_size, min_size)
    total += size // fsdp_size if any(a is not None for a in spec) else size
  return total


def optimizer_state(run):
  import jax  # pylint: disable=import-outside-toplevel
  return run.optimizer, jax.eval_shape(run.optimizer.init, run.models.student_params)


def measure_activations(student, teacher, optimizer, student_params, opt_state,
                        teacher_params, res, batches):
  """XLA temp bytes of the compiled step at two batches -> (bytes/image, fixed, seconds)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  def step(params, state, t_params, images):
    teacher_logits, _ = teacher.apply({"params": t_params}, images, train=False)
    teacher_logp = jax.lax.stop_gradient(jax.nn.log_softmax(teacher_logits))

    def loss_fn(p):
      logits, _ = student.apply({"params": p}, images, train=True)
      logp = jax.nn.log_softmax(logits)
      return jnp.mean(jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - logp), -1))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  temps, start = [], time.perf_counter()
  for batch in batches:
    images = jax.ShapeDtypeStruct((batch, res, res, 3), jnp.float32)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        student_params, opt_state, teacher_params, images).compile()
    analysis = compiled.memory_analysis()
    temps.append(int(analysis.temp_size_in_bytes))
  per_image = (temps[1] - temps[0]) / (batches[1] - batches[0])
  fixed = temps[0] - per_image * batches[0]
  return per_image, fixed, time.perf_counter() - start


def gib(n):
  return f"{n / GIB:.2f}"


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  import jax  # pylint: disable=import-outside-toplevel
  path = recipe_path(args.recipe)
  adam_config = load_config(path, "adam")
  shampoo_config = load_config(path, "shampoo")
  adam_run = abstract_run(adam_config, args.teacher_dtype)
  teacher_name = adam_config.teachers[0]
  student, teacher = adam_run.student, adam_run.teachers[teacher_name]
  s_res, t_res = int(adam_config.student.res), int(adam_config[teacher_name].res)
  student_params = adam_run.models.student_params
  teacher_params = adam_run.teacher_params[teacher_name]
  adam, adam_state = optimizer_state(adam_run)
  _, shampoo_state = optimizer_state(abstract_run(shampoo_config, args.teacher_dtype))
  n_student, n_teacher = count(student_params), count(teacher_params)

  print(f"recipe {os.path.relpath(path)}: teacher {describe(adam_config[teacher_name])} at "
        f"{t_res}px ({args.teacher_dtype} activations, float32 params), student "
        f"{describe(adam_config.student)} at {s_res}px; "
        f"global batch {args.batch}; jax {jax.__version__}")
  print(f"params: teacher {n_teacher / 1e6:.1f}M, student {n_student / 1e6:.1f}M; "
        f"Adam state {count(adam_state) * 4 / n_student:.1f} B/param, Shampoo state "
        f"{sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shampoo_state)) / n_student:.1f}"
        " B/param (block 128)")

  per_image = fixed = None
  if not args.no_measure:
    per_image, fixed, seconds = measure_activations(
        student, teacher, adam, student_params, adam_state, teacher_params, s_res,
        args.measure_batches)
    print(f"activations (XLA:CPU memory analysis of the compiled step at per-device "
          f"batch {args.measure_batches[0]} and {args.measure_batches[1]}, "
          f"{seconds:.0f} s to compile): {per_image / 2 ** 20:.1f} MiB per image + "
          f"{fixed / GIB:.2f} GiB fixed (gradients, optimizer temporaries)")

  rows = []
  for devices in args.devices:
    if args.batch % devices:
      print(f"skipping {devices} devices: batch {args.batch} does not split evenly")
      continue
    local_batch = args.batch // devices
    for strategy in ("replicate", "fsdp"):
      n = devices if strategy == "fsdp" else 1
      teacher_b = per_device_bytes(teacher_params, n, args.fsdp_min_size)
      params_b = per_device_bytes(student_params, n, args.fsdp_min_size)
      adam_b = params_b + per_device_bytes(adam_state, n, args.fsdp_min_size)
      shampoo_b = params_b + per_device_bytes(shampoo_state, n, args.fsdp_min_size)
      row = dict(devices=devices, strategy=strategy, local_batch=local_batch,
                 teacher=teacher_b, student_adam=adam_b, student_shampoo=shampoo_b)
      if per_image is not None:
        row["activations"] = per_image * local_batch + fixed
        row["total_adam"] = teacher_b + adam_b + row["activations"]
        row["total_shampoo"] = teacher_b + shampoo_b + row["activations"]
      rows.append(row)

  header = ["devices", "sharding", "batch/device", "teacher params", "student+Adam",
            "student+Shampoo"]
  if per_image is not None:
    header += ["activations", "total (Adam)", "total (Shampoo)"]
  print("\nGiB per device (teacher and student groups both replicated or both FSDP "
        "over all devices):\n")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for r in rows:
    cells = [str(r["devices"]), r["strategy"], str(r["local_batch"]), gib(r["teacher"]),
             gib(r["student_adam"]), gib(r["student_shampoo"])]
    if per_image is not None:
      cells += [gib(r["activations"]), gib(r["total_adam"]), gib(r["total_shampoo"])]
    print("| " + " | ".join(cells) + " |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(teacher_params=n_teacher, student_params=n_student,
                     activation_bytes_per_image=per_image, activation_bytes_fixed=fixed,
                     rows=rows), f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
