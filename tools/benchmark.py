"""Where the milliseconds of a distillation step go: teacher, student, data, host.

For one recipe (its models, resolutions and batch) measures, each after a
warm-up (compile) call, `--repeats` times `--steps` calls with a
block_until_ready at the end of each repeat, and reports the median per call:

  teacher_forward     every teacher's forward on a synthetic on-device batch
  student_step        student forward + backward + optimizer update, the
                      teachers' outputs given as fixed inputs (no teacher)
  full_step           the trainer's own jitted step (step.jit_train_step) on a
                      synthetic on-device batch
  full_step_real_data the same step fed by the real tf.data pipeline (skipped,
                      with a note, when the dataset is not prepared)
  host                per-step host overhead: the step on a tiny batch (one
                      example per device, views at most --host_res px),
                      --host_steps dispatched back to back, against the same
                      steps run inside one XLA loop (pure device time)

plus FLOPs from XLA's cost analysis of each compiled function (achieved
FLOP/s = FLOPs / median time), XLA's memory analysis of the compiled step and
the peak memory (device memory_stats() where the backend has them, else the
process's peak RSS). With --bf16_teacher, also the teacher forward in float32
vs bfloat16 and the top-1 agreement of the two on the first eval set.

  python tools/benchmark.py --config configs/digits.py:teacher=/tmp/demo/teacher \
      --steps 20 --bf16_teacher --output /tmp/bench_digits.json
  python tools/benchmark.py --config configs/bit_i1k.py:batch_size=2 --random_teachers \
      --steps 2 --repeats 3 --host_steps 20 --output /tmp/bench_i1k.json

The run is built through the trainer's own stages (funmatch/train/build.py) from
the same `--config FILE.py:args --config.a.b=value` the CLI takes (e.g.
`--config.teacher.dtype=bfloat16`). --random_teachers skips loading the teachers'
weights: they keep random params (nothing zero, so logits are not constant), for
recipes whose teacher weights are not at hand. A recipe whose training data is not
prepared runs on synthetic data only (num_classes from the config, else
--num_classes). Timings are never asserted anywhere; they depend on the machine
and its load.
"""
import json
import os
import platform
import resource
import statistics
import sys
import time

from funmatch import console, timing

SECTIONS = ("teacher_forward", "student_step", "real_data", "host")  # --skip
TARGETS = {"full_over_parts": "<= 1.05", "real_over_synthetic_throughput": ">= 0.95",
           "host_overhead_ms": "well under 1", "bf16_top1_agreement": ">= 0.995",
           "bf16_speedup": ">= 1.5 on GPU"}


def parse_args(argv):
  """(benchmark options, the config) from argv: the config flags as the CLI's."""
  p = console.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True, help="recipe FILE.py[:key=value,...]")
  p.add_argument("--steps", type=int, default=10, help="calls per timed repeat")
  p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
  p.add_argument("--host_steps", type=int, default=100,
                 help="steps dispatched back to back for the host-overhead measurement")
  p.add_argument("--host_res", type=int, default=32,
                 help="largest view resolution of the host-overhead batch (0: the config's)")
  p.add_argument("--host_batch", type=int, default=-1,
                 help="batch of the host-overhead measurement (-1: one example per device; "
                      "0: the config's, which with --host_res 0 reuses the compiled step)")
  p.add_argument("--random_teachers", action="store_true",
                 help="random teacher weights instead of config.<teacher>.init")
  p.add_argument("--num_classes", type=int, default=1000,
                 help="classes when the dataset is not prepared and config.num_classes=0")
  p.add_argument("--bf16_teacher", action="store_true",
                 help="also time the teacher in bfloat16 and measure its top-1 agreement")
  p.add_argument("--agreement_batches", type=int, default=0,
                 help="eval batches for the bf16 agreement (0: the whole eval split)")
  p.add_argument("--skip", default="",
                 help="comma-separated sections to skip: " + ", ".join(SECTIONS))
  p.add_argument("--output", default="", help="write the results as JSON here")
  args, rest = p.parse_known_args(argv)
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    p.error(f"unrecognized arguments: {' '.join(unknown)}")
  from funmatch.train import cli  # pylint: disable=import-outside-toplevel
  config, _, _ = cli.parse(["benchmark", "--config", args.config, *rest],
                           "tools/benchmark.py", {}, needs_workdir=False)
  return args, config


# ---------------------------------------------------------------------------
# The run: the trainer's build stages, with stand-ins for what is missing.


def _available_data(config, args, notes):
  """(config with the eval sets that exist, DataInfo, whether the data exists).

  Without funmatch.data (no TensorFlow, as on a GPU machine with JAX only) the
  run gets synthetic data and no eval sets; nothing imports TensorFlow then.
  """
  import ml_collections  # pylint: disable=import-outside-toplevel
  from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel
  from funmatch.train import build  # pylint: disable=import-outside-toplevel
  config = config.copy_and_resolve_references()
  num_classes = int(config.num_classes or args.num_classes)
  synthetic = build.DataInfo(num_classes, int(config.input.batch_size), 1.0,
                             int(config.total_steps) or 1)
  try:
    from funmatch.data import sources  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    notes.append(f"funmatch.data does not import ({e}); synthetic data only, "
                 f"{num_classes} classes, no eval sets")
    config.evals = ml_collections.ConfigDict()
    return config, synthetic, False
  evals = {}
  for name in list(config.evals.keys()):
    try:
      evals[name] = sources.open_source(config.evals[name], f"evals.{name}")
    except UserError as e:
      notes.append(f"eval set '{name}' not available ({e}); dropped")
      config.evals = ml_collections.ConfigDict(
          {k: v for k, v in config.evals.items() if k != name})
  try:  # each split is opened once: the run takes the sources opened here
    train = sources.open_source(config.input, where="input")
    data = build.data_info(config, train, evals)
    build.check_eval_classes(evals, data.num_classes)
  except UserError as e:
    notes.append(f"training data not available ({e}); synthetic data only, "
                 f"{num_classes} classes")
    return config, synthetic, False
  return config, data, True


def make_run(config, args, notes):
  """(run, config actually built, data_available): the trainer's one build, with
  synthetic data where the data is missing and random teachers if asked."""
  from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel
  from funmatch.train import build  # pylint: disable=import-outside-toplevel
  build.validate(config, "distill")  # config mistakes first, before any data is probed
  config, data, data_available = _available_data(config, args, notes)
  if args.random_teachers:
    notes.append("teachers have random weights (--random_teachers)")
  else:
    for name in config.teachers or ():
      if not config[name].init:
        raise UserError(f"config.{name}.init is empty: give the recipe its teacher (e.g. "
                        f"--config {args.config.split(':')[0]}:teacher=PATH) or pass "
                        "--random_teachers to time random weights")
  needs = build.Needs(teacher_weights="random" if args.random_teachers else "init")
  return build.build(config, "distill", needs=needs, data=data), config, data_available


# ---------------------------------------------------------------------------
# Measuring.


class _GivenOutputs:
  """Stands in for a teacher in make_train_step: its 'params' are its outputs.

  So the student step runs exactly the trainer's code with the teacher's
  `(logits, taps)` passed in as fixed inputs instead of computed.
  """

  def apply(self, variables, images, train=False, rngs=None):
    del images, train, rngs
    return variables["params"]


def compile_info(jitted, *example_args):
  """(compiled executable, FLOPs, bytes accessed, memory analysis) of `jitted`.

  Also remembers the compile time in `compile_info.seconds`.
  """
  start = time.perf_counter()
  compiled = jitted.lower(*example_args).compile()
  compile_info.seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    merged = {}
    for part in cost:
      for key, value in (part or {}).items():
        merged[key] = merged.get(key, 0.0) + value
    cost = merged
  cost = cost or {}
  memory = None
  try:
    analysis = compiled.memory_analysis()
    if analysis is not None:
      memory = {key: int(getattr(analysis, key)) for key in (
          "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
          "temp_size_in_bytes", "generated_code_size_in_bytes")
                if hasattr(analysis, key)}
  except Exception:  # pylint: disable=broad-except
    memory = None
  flops = cost.get("flops")
  return compiled, (float(flops) if flops is not None and flops >= 0 else None), \
      cost.get("bytes accessed"), memory


def peak_memory():
  """{'device_peak_bytes': ... or None, 'rss_peak_bytes': ...}."""
  import jax  # pylint: disable=import-outside-toplevel
  device_peak = None
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      device_peak = max(device_peak or 0, int(stats["peak_bytes_in_use"]))
  rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  return {"device_peak_bytes": device_peak, "rss_peak_bytes": int(rss_kib) * 1024}


def synthetic_batch(run, batch_size: int, views=None, seed: int = 0):
  """{'images': {view: U(-1, 1)}, 'label'} made on device, sharded like real batches."""
  import jax  # pylint: disable=import-outside-toplevel
  from funmatch import parallel  # pylint: disable=import-outside-toplevel
  views = views or run.plan.views

  def make(rng):
    keys = jax.random.split(rng, len(views) + 1)
    images = {name: jax.random.uniform(key, (batch_size, res, res, 3), minval=-1.0,
                                       maxval=1.0)
              for key, (name, res) in zip(keys[1:], sorted(views.items()))}
    label = jax.random.randint(keys[0], (batch_size,), 0, run.num_classes)
    return {"images": images, "label": label}

  return jax.jit(make, out_shardings=parallel.batch_sharding(run.mesh))(
      jax.random.PRNGKey(seed))


class Stepper:
  """Calls a donating step function, carrying the state from call to call."""

  def __init__(self, step_fn, state, batch, teacher_params, batches=None):
    self.step_fn, self.state, self.batch = step_fn, state, batch
    self.teacher_params, self.batches = teacher_params, batches

  def __call__(self):
    batch = next(self.batches) if self.batches is not None else self.batch
    self.state, metrics = self.step_fn(self.state, batch, self.teacher_params)
    return metrics


def teacher_forward_fn(teachers):
  """jit(teacher_params, images) -> {teacher: logits}, as the step computes them."""
  import jax  # pylint: disable=import-outside-toplevel
  from funmatch.train import step as step_lib  # pylint: disable=import-outside-toplevel
  return jax.jit(lambda params, images: {
      name: out[0] for name, out in step_lib.teacher_outputs(teachers, params,
                                                             images).items()})


def measure_teacher(run, batch, args, results):
  fn = teacher_forward_fn(run.teachers)
  compiled, flops, _, _ = compile_info(fn, run.teacher_params, batch["images"])
  call = lambda: compiled(run.teacher_params, batch["images"])
  first = timing.first_call_seconds(call)
  results["timings"]["teacher_forward"] = {"compile_s": compile_info.seconds,
                                 **timing.repeated(call, args.steps, args.repeats),
                                           "first_call_s": first}
  results["flops"]["teacher_forward"] = flops
  return fn


def measure_student(run, batch, args, results):
  import jax  # pylint: disable=import-outside-toplevel
  from funmatch.train import state as state_lib, step as step_lib  # pylint: disable=import-outside-toplevel
  teacher_outs = jax.jit(lambda params, images: step_lib.teacher_outputs(
      run.teachers, params, images))(run.teacher_params, batch["images"])
  given = {name: _GivenOutputs() for name in run.teachers}
  step_fn = jax.jit(step_lib.make_train_step(
      run.student, given, run.objective, run.optimizer, run.schedule, run.num_classes,
      run.plan.mixup), donate_argnums=(0,))
  state = state_lib.init_state(run)
  compiled, flops, _, _ = compile_info(step_fn, state, batch, teacher_outs)
  stepper = Stepper(compiled, state, batch, teacher_outs)
  first = timing.first_call_seconds(stepper)
  results["timings"]["student_step"] = {"compile_s": compile_info.seconds,
                                 **timing.repeated(stepper, args.steps, args.repeats),
                                        "first_call_s": first}
  results["flops"]["student_step"] = flops


def measure_full_step(run, batch, args, results):
  from funmatch.train import state as state_lib, step as step_lib  # pylint: disable=import-outside-toplevel
  state = state_lib.init_state(run)
  step_fn = step_lib.jit_train_step(run, state)
  _, flops, bytes_accessed, memory = compile_info(step_fn, state, batch, run.teacher_params)
  # Timed through the jitted function itself (its cache holds the executable just
  # compiled), exactly as the trainer calls it.
  stepper = Stepper(step_fn, state, batch, run.teacher_params)
  first = timing.first_call_seconds(stepper)
  results["timings"]["full_step"] = {"compile_s": compile_info.seconds,
                                 **timing.repeated(stepper, args.steps, args.repeats),
                                     "first_call_s": first}
  results["flops"]["full_step"] = flops
  results["flops"]["full_step_bytes_accessed"] = bytes_accessed
  results["memory"]["full_step_xla"] = memory
  return step_fn, stepper


def measure_real_data(run, config, step_fn, stepper, args, results):
  from funmatch import parallel  # pylint: disable=import-outside-toplevel
  from funmatch.data import pipeline  # pylint: disable=import-outside-toplevel
  batches = pipeline.make_train_iterator(
      run.data.train_source, run.plan.views, seed=int(config.seed), start_step=0,
      sharding=parallel.batch_sharding(run.mesh), crops=run.plan.crops)
  real = Stepper(step_fn, stepper.state, None, run.teacher_params, batches=batches)
  stepper.state = None  # donated onwards
  first = timing.first_call_seconds(real)  # starts the pipeline (and compiles if the batch differs)
  for _ in range(2):  # let the tf.data and device prefetch buffers fill
    real()
  results["timings"]["full_step_real_data"] = {
      **timing.repeated(real, args.steps, args.repeats), "first_call_s": first}
  real.state = real.batches = None  # frees the state and stops the input pipeline


def measure_host(run, step_fn, args, results):
  """Per-step host overhead: steps dispatched one by one vs inside one XLA loop.

  `step_fn` is the trainer's jitted step (compiled again only for a new batch shape).
  """
  import jax  # pylint: disable=import-outside-toplevel
  from funmatch.train import state as state_lib, step as step_lib  # pylint: disable=import-outside-toplevel
  views = {name: (min(res, args.host_res) if args.host_res else res)
           for name, res in run.plan.views.items()}
  batch_size = {-1: run.mesh.devices.size, 0: int(run.config.input.batch_size)}.get(
      args.host_batch, args.host_batch)
  batch = synthetic_batch(run, batch_size, views, seed=1)
  n = args.host_steps
  stepper = Stepper(step_fn, state_lib.init_state(run), batch, run.teacher_params)
  timing.first_call_seconds(stepper)
  timing.block_until_ready(stepper())
  raw_step = step_lib.make_train_step(run.student, run.teachers, run.objective,
                                      run.optimizer, run.schedule, run.num_classes,
                                      run.plan.mixup)

  def many_steps(state, batch, teacher_params):
    return jax.lax.fori_loop(0, n, lambda i, s: raw_step(s, batch, teacher_params)[0], state)

  looped = jax.jit(many_steps, donate_argnums=(0,))
  loop_state = state_lib.init_state(run)
  loop_state = looped(loop_state, batch, run.teacher_params)
  timing.block_until_ready(loop_state)
  dispatch, pipelined, device, faults, sys_s = [], [], [], [], []
  for _ in range(args.repeats):
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    out = None
    for _ in range(n):
      out = stepper()
    dispatched = time.perf_counter()
    timing.block_until_ready(out)
    done = time.perf_counter()
    after = resource.getrusage(resource.RUSAGE_SELF)
    faults.append((after.ru_minflt - usage.ru_minflt) / n)
    sys_s.append((after.ru_stime - usage.ru_stime) / n)
    dispatch.append((dispatched - start) / n)
    pipelined.append((done - start) / n)
    start = time.perf_counter()
    loop_state = looped(loop_state, batch, run.teacher_params)
    timing.block_until_ready(loop_state)
    device.append((time.perf_counter() - start) / n)
  ms = lambda xs: 1000 * statistics.median(xs)
  results["timings"]["host"] = {
      "batch_size": batch_size, "views": views, "steps": n, "repeats": args.repeats,
      "dispatch_ms": ms(dispatch), "wall_per_step_ms": ms(pipelined),
      "device_per_step_ms": ms(device),
      "overhead_ms": ms(pipelined) - ms(device),
      # Page faults and kernel time per dispatched step: on CPU, fresh temp buffers
      # every execution (the XLA loop reuses its own) are part of the overhead.
      "minor_faults_per_step": statistics.median(faults), "sys_ms_per_step": ms(sys_s)}


def _eval_batches(run, limit):
  """(name, iterator over the first eval set's batches, at most `limit`) or (None, None)."""
  import itertools  # pylint: disable=import-outside-toplevel
  from funmatch.train import evaluate  # pylint: disable=import-outside-toplevel
  if not run.config.get("evals"):
    return None, None
  eval_sets = evaluate.make_eval_sets(run)
  if not eval_sets:
    return None, None
  name, batches = next(iter(eval_sets.items()))
  return name, itertools.islice(iter(batches), limit or None)


def measure_bf16_teacher(run, teacher_fn, batch, args, results):
  """Teacher forward in float32 vs bfloat16, and their top-1 agreement.

  `teacher_fn` is the configured teachers' forward, compiled already (or None).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  modules = {
      "float32": {name: m.clone(dtype=jnp.float32) for name, m in run.teachers.items()},
      "bfloat16": {name: m.clone(dtype=jnp.bfloat16) for name, m in run.teachers.items()}}
  out = {"configured_dtypes": {name: jnp.dtype(m.dtype).name
                               for name, m in run.teachers.items()}}
  fns = {}
  for dtype, teachers in modules.items():
    same = all(jnp.dtype(m.dtype) == jnp.dtype(dtype) for m in run.teachers.values())
    # The configured teachers' forward was compiled already: reuse it.
    fns[dtype] = teacher_fn if same and teacher_fn else teacher_forward_fn(teachers)
    call = lambda fn=fns[dtype]: fn(run.teacher_params, batch["images"])
    first = timing.first_call_seconds(call)
    out[dtype] = {**timing.repeated(call, args.steps, args.repeats), "first_call_s": first}
  out["speedup"] = out["float32"]["median_ms"] / out["bfloat16"]["median_ms"]
  eval_name, batches = _eval_batches(run, args.agreement_batches)
  if batches is None:
    out["agreement_data"] = "synthetic batch (no eval set available)"
    batches = [{**batch, "mask": np.ones(batch["label"].shape, bool)}]
  else:
    out["agreement_data"] = f"eval set '{eval_name}'"
  agree = total = 0
  agree_per = {name: 0 for name in run.teachers}
  for eval_batch in batches:
    logits = {dtype: jax.device_get(fns[dtype](run.teacher_params, eval_batch["images"]))
              for dtype in fns}
    mask = np.asarray(jax.device_get(eval_batch["mask"]), bool)
    total += int(mask.sum())
    top = {dtype: {name: np.argmax(np.asarray(l, np.float32), -1) for name, l in ls.items()}
           for dtype, ls in logits.items()}
    all_agree = np.ones(mask.shape, bool)
    for name in run.teachers:
      same = top["float32"][name] == top["bfloat16"][name]
      agree_per[name] += int((same & mask).sum())
      all_agree &= same
    agree += int((all_agree & mask).sum())
  out["examples"] = total
  out["top1_agreement"] = agree / max(total, 1)
  out["top1_agreement_per_teacher"] = {k: v / max(total, 1) for k, v in agree_per.items()}
  results["bf16_teacher"] = out


# ---------------------------------------------------------------------------
# Report.


def machine_info():
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  cpu_model = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu_model = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu_model)
  except OSError:
    pass
  devices = jax.devices()
  return {"backend": jax.default_backend(), "device_kind": devices[0].device_kind,
          "device_count": len(devices), "process_count": jax.process_count(),
          "cpu_model": cpu_model, "cpus": len(os.sched_getaffinity(0)),
          "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "load_average": list(os.getloadavg())}


def derive(results):
  t = results["timings"]
  median = lambda key: (t.get(key) or {}).get("median_ms")
  ratios = {}
  if median("full_step") and median("teacher_forward") is not None and median("student_step"):
    ratios["full_over_parts"] = median("full_step") / (
        median("teacher_forward") + median("student_step"))
  if median("full_step") and median("full_step_real_data"):
    ratios["real_over_synthetic_throughput"] = median("full_step") / median(
        "full_step_real_data")
  if t.get("host"):
    ratios["host_overhead_ms"] = t["host"]["overhead_ms"]
    ratios["host_dispatch_ms"] = t["host"]["dispatch_ms"]
  if results.get("bf16_teacher"):
    ratios["bf16_speedup"] = results["bf16_teacher"]["speedup"]
    ratios["bf16_top1_agreement"] = results["bf16_teacher"]["top1_agreement"]
  results["ratios"] = ratios
  flops = results["flops"]
  achieved = {}
  for key in ("teacher_forward", "student_step", "full_step"):
    if flops.get(key) and median(key):
      # Cost analysis counts one device's program; the step runs on all of them.
      achieved[key] = flops[key] * results["machine"]["device_count"] / (median(key) / 1000)
  flops["achieved_flops_per_s"] = achieved
  batch_size = results["batch_size"]
  results["throughput_img_per_s"] = {
      key: batch_size / (median(key) / 1000) for key in (
          "teacher_forward", "student_step", "full_step", "full_step_real_data")
      if median(key)}


def print_table(results):
  t, flops = results["timings"], results["flops"]
  print(f"\n{results['config']}  batch {results['batch_size']}  views {results['views']}  "
        f"({results['machine']['backend']}: {results['machine']['device_count']} x "
        f"{results['machine']['device_kind']})")
  print(f"{'measurement':22s} {'median ms':>10s} {'min ms':>9s} {'img/s':>9s} {'GFLOP':>9s} "
        f"{'GFLOP/s':>9s} {'compile s':>9s}")
  for key in ("teacher_forward", "student_step", "full_step", "full_step_real_data"):
    row = t.get(key)
    if not row:
      print(f"{key:22s} {'skipped':>10s}  {results['skipped'].get(key, '')}")
      continue
    gflop = flops.get(key) if key != "full_step_real_data" else flops.get("full_step")
    achieved = (gflop * results["machine"]["device_count"] / (row["median_ms"] / 1000)
                if gflop else None)
    print(f"{key:22s} {row['median_ms']:10.2f} {row['min_ms']:9.2f} "
          f"{results['batch_size'] / (row['median_ms'] / 1000):9.1f} "
          f"{(gflop or 0) / 1e9:9.2f} {(achieved or 0) / 1e9:9.1f} "
          f"{row.get('compile_s', row['first_call_s']):9.1f}")
  host = t.get("host")
  if host:
    print(f"host: {host['steps']} steps at batch {host['batch_size']}, views {host['views']}: "
          f"dispatch {host['dispatch_ms']:.3f} ms/step, wall {host['wall_per_step_ms']:.3f}, "
          f"device (XLA loop) {host['device_per_step_ms']:.3f} -> overhead "
          f"{host['overhead_ms']:.3f} ms/step ({host['minor_faults_per_step']:.0f} page faults, "
          f"{host['sys_ms_per_step']:.2f} ms kernel time per step)")
  elif "host" in results["skipped"]:
    print(f"host: skipped: {results['skipped']['host']}")
  bf16 = results.get("bf16_teacher")
  if bf16:
    print(f"bf16 teacher: float32 {bf16['float32']['median_ms']:.2f} ms, bfloat16 "
          f"{bf16['bfloat16']['median_ms']:.2f} ms ({bf16['speedup']:.2f}x); top-1 agreement "
          f"{100 * bf16['top1_agreement']:.2f}% on {bf16['examples']} examples "
          f"({bf16['agreement_data']})")
  memory = results["memory"]
  peak = memory.get("device_peak_bytes")
  print("peak memory: " + (f"device {peak / 2**20:.0f} MiB, " if peak else "") +
        f"process RSS {memory['rss_peak_bytes'] / 2**20:.0f} MiB" +
        (f"; XLA temp of the step {memory['full_step_xla']['temp_size_in_bytes'] / 2**20:.0f}"
         " MiB" if (memory.get("full_step_xla") or {}).get("temp_size_in_bytes") is not None
         else ""))
  ratios = results["ratios"]
  print("ratios (target):")
  for key, value in ratios.items():
    print(f"  {key:32s} {value:10.4f}  ({TARGETS.get(key, '-')})")
  for note in results["notes"]:
    print(f"note: {note}")


def _progress(start, text):
  print(f"[{time.perf_counter() - start:5.0f} s] {text}", flush=True)


def benchmark(args, config):
  start = time.perf_counter()
  import jax  # pylint: disable=import-outside-toplevel
  from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel
  for name, value in (("--steps", args.steps), ("--repeats", args.repeats),
                      ("--host_steps", args.host_steps)):
    if value < 1:
      raise UserError(f"{name}={value} must be >= 1")
  if args.host_res < 0 or args.num_classes < 1 or args.agreement_batches < 0 \
      or args.host_batch < -1:
    raise UserError("--host_res and --agreement_batches must be >= 0, --host_batch >= -1, "
                    "--num_classes >= 1")
  skip = {s for s in args.skip.split(",") if s}
  unknown = skip - set(SECTIONS)
  if unknown:
    raise UserError(f"--skip {','.join(sorted(unknown))}: choose from {', '.join(SECTIONS)}")
  notes = []
  run, config, data_available = make_run(config, args, notes)
  _progress(start, "built the run")
  if not run.teachers:
    raise UserError("the config has no teachers (config.teachers is empty); the "
                    "benchmark measures distillation recipes")
  batch_size = int(config.input.batch_size)
  results = {"config": args.config, "overrides": list(args.overrides),
             "batch_size": batch_size, "views": dict(run.plan.views), "teachers": sorted(run.teachers),
             "random_teachers": bool(args.random_teachers), "data_available": data_available,
             "machine": machine_info(), "timings": {}, "flops": {}, "memory": {},
             "skipped": {}, "notes": notes}
  batch = synthetic_batch(run, batch_size)
  teacher_fn = None
  if "teacher_forward" in skip:
    results["skipped"]["teacher_forward"] = "--skip teacher_forward"
  else:
    teacher_fn = measure_teacher(run, batch, args, results)
    results["memory"]["after_teacher_forward"] = peak_memory()
    _progress(start, "teacher_forward: "
              f"{results['timings']['teacher_forward']['median_ms']:.2f} ms")
  if "student_step" in skip:
    results["skipped"]["student_step"] = "--skip student_step"
  else:
    measure_student(run, batch, args, results)
    results["memory"]["after_student_step"] = peak_memory()
    _progress(start, f"student_step: {results['timings']['student_step']['median_ms']:.2f} ms")
  step_fn, stepper = measure_full_step(run, batch, args, results)
  results["memory"]["after_full_step"] = peak_memory()
  _progress(start, f"full_step: {results['timings']['full_step']['median_ms']:.2f} ms")
  if "real_data" in skip:
    results["skipped"]["full_step_real_data"] = "--skip real_data"
  elif not data_available:
    results["skipped"]["full_step_real_data"] = "the training data is not prepared"
  else:
    measure_real_data(run, config, step_fn, stepper, args, results)
    results["memory"]["after_real_data"] = peak_memory()
    _progress(start, f"full_step_real_data: "
              f"{results['timings']['full_step_real_data']['median_ms']:.2f} ms")
  stepper.state = None
  if "host" in skip:
    results["skipped"]["host"] = "--skip host"
  else:
    try:
      measure_host(run, step_fn, args, results)
    except (TypeError, ValueError, UserError) as e:  # e.g. a model of one resolution (Swin)
      results["skipped"]["host"] = (
          f"the step does not run on the host-overhead batch ({type(e).__name__}: "
          f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); try "
          "--host_res 0 (the config's resolutions) or --host_batch 0")
  del step_fn, stepper
  if "host" in results["timings"]:
    _progress(start, f"host overhead: {results['timings']['host']['overhead_ms']:.3f} ms/step")
  if args.bf16_teacher:
    measure_bf16_teacher(run, teacher_fn, batch, args, results)
    _progress(start, "bf16 teacher")
  results["wall_s"] = time.perf_counter() - start
  results["memory"].update(peak_memory())
  results["machine"]["load_average_end"] = list(os.getloadavg())
  derive(results)
  print_table(results)
  if args.output and jax.process_index() == 0:
    directory = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(directory, exist_ok=True)
    with open(args.output, "w") as f:
      json.dump(results, f, indent=1, sort_keys=True)
    print(f"wrote {args.output}")
  return results


def main(argv=None):
  console.setup()
  argv = sys.argv[1:] if argv is None else argv
  args, config = parse_args(argv)
  args.overrides = [a for a in argv if a.startswith("--config.")]
  return console.guarded(lambda: benchmark(args, config) and 0)


if __name__ == "__main__":
  sys.exit(main())
