"""funmatch's distillation step against the same step in PyTorch + timm, side by side.

For each configuration, one process times (a) the trainer's own jitted step
(`step.jit_train_step`, built by tools/benchmark.py from the recipe, random
teachers, synthetic on-device data) and (b) the same step in PyTorch with timm's
ResNetV2 (BiT: StdConv2d + GroupNorm(32), 'fixed' stem, as `resnetv2_50x1_bit`
builds it): mixup with one shared Beta(p, p) coefficient (folded to
max(a, 1 - a)) and the batch rolled by one, the teacher's eval forward frozen
under no_grad, the student's train forward, KL(teacher || student) at T=1,
backward, global-norm clipping and an AdamW step. Repeats alternate between the
two so both see the same machine load; torch gets as many threads as XLA:CPU
uses (the cores this process may run on). On a busy machine (load above the core
count) libgomp's spinning threads can make torch 10-30x slower; --omp_wait_policy
PASSIVE keeps it sane there (on a quiet machine leave the default, which is what
PyTorch users get). Prints ms/step, images/s and the
ratio funmatch / PyTorch images/s (> 1: funmatch is faster), of the medians and of
the best repeats (on a busy machine the least disturbed estimate).

  python tools/peer_step.py                         # both configurations
  python tools/peer_step.py --only r50x1_64 --conv_impl xla --output /tmp/peer.json

Configurations: `r50x1_64` is a BiT-R50x1 teacher -> BiT [1,1,1,1]x1 student at
64px, batch 32 (configs/bit_i1k.py, 1000 classes); `digits` is the digits demo's
models (configs/digits.py: teacher [1,1,2,2]x1, student [1,1,1,1]x0.5, 16px,
batch 128, 10 classes).

torch and timm are not funmatch dependencies; install them for this tool only:
  pip install torch==2.13.0 && pip install timm --no-deps && pip install huggingface_hub safetensors pyyaml
timm imports torchvision when it loads, but ResNetV2 uses none of it: without a
working torchvision, a stand-in module is registered so that timm imports.
"""
import argparse
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import statistics
import sys
import types

from funmatch import timing

HERE = os.path.dirname(os.path.abspath(__file__))
INSTALL = ("pip install torch==2.13.0 && pip install timm --no-deps && "
           "pip install huggingface_hub safetensors pyyaml")

# name -> (recipe, config overrides); the overrides make the recipe the named setup.
CONFIGS = {
    "r50x1_64": ("configs/bit_i1k.py:batch_size=32", [
        "--config.teacher.depth=50", "--config.teacher.width=1.0",
        "--config.student.depth=(1,1,1,1)", "--config.student.width=1.0",
        "--config.teacher.res=64", "--config.student.res=64"]),
    "digits": ("configs/digits.py", []),
}


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--only", default=",".join(CONFIGS),
                 help=f"comma-separated configurations ({', '.join(CONFIGS)})")
  p.add_argument("--conv_impl", default="", choices=["", "auto", "xla", "matmul"],
                 help="funmatch's conv implementation for every model (default: the "
                      "recipe's, i.e. auto)")
  p.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
  p.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
  p.add_argument("--omp_wait_policy", default="", choices=["", "PASSIVE", "ACTIVE"],
                 help="OMP_WAIT_POLICY for torch's OpenMP threads (default: as set, else "
                      "libgomp's spinning); PASSIVE on a busy machine, see the docstring")
  p.add_argument("--output", default="", help="write the results as JSON here")
  return p.parse_args(argv)


# ---------------------------------------------------------------------------
# torch + timm, imported only here.


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Serves `torchvision.*` imports with placeholder modules whose every name is a
  placeholder class: timm imports torchvision names at load time that ResNetV2
  never touches."""

  def find_spec(self, name, path, target=None):
    del path, target
    if name == "torchvision" or name.startswith("torchvision."):
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    import torch  # pylint: disable=import-outside-toplevel

    class Placeholder(type):
      def __getattr__(cls, attr):
        if attr.startswith("__"):
          raise AttributeError(attr)
        return Placeholder(attr, (), {})

    class Module(types.ModuleType):
      def __getattr__(self, attr):
        if attr.startswith("__"):
          raise AttributeError(attr)
        return Placeholder(attr, (torch.nn.Module,), {})

    module = Module(spec.name)
    module.__path__ = []
    return module

  def exec_module(self, module):
    del module


def import_torch():
  """(torch, timm's resnetv2 module), or SystemExit naming what to install."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise SystemExit(f"peer_step: PyTorch is not installed; {INSTALL}") from None
  if importlib.util.find_spec("timm") is None:
    raise SystemExit(f"peer_step: timm is not installed; {INSTALL}")
  try:
    import torchvision  # pylint: disable=import-outside-toplevel,unused-import
  except Exception:  # pylint: disable=broad-except  (missing, or built for another torch)
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[name]
    sys.meta_path.insert(0, _TorchvisionStandIn())
  try:
    from timm.models import resnetv2  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit(f"peer_step: timm does not import ({e}); {INSTALL}") from None
  return torch, resnetv2


def torch_bit(resnetv2, depth, width: float, num_classes: int):
  """timm's BiT ResNetV2 (what `resnetv2_50x1_bit` builds) of the given depth, width."""
  from funmatch.models import bit  # pylint: disable=import-outside-toplevel
  from timm.layers import StdConv2d  # pylint: disable=import-outside-toplevel
  return resnetv2.ResNetV2(layers=list(bit.block_counts(depth)), width_factor=width,
                           num_classes=num_classes, stem_type="fixed",
                           conv_layer=functools.partial(StdConv2d, eps=1e-8))


class TorchStep:
  """The function-matching step in PyTorch; `__call__()` runs one step."""

  def __init__(self, torch, resnetv2, config, num_classes: int, seed: int = 0):
    self.torch = torch
    torch.manual_seed(seed)
    self.teacher = torch_bit(resnetv2, config.teacher.depth, config.teacher.width,
                             num_classes).eval().requires_grad_(False)
    self.student = torch_bit(resnetv2, config.student.depth, config.student.width,
                             num_classes).train()
    self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=float(config.lr),
                                       weight_decay=float(config.wd))
    self.clip = float(config.get("grad_clip_norm") or 0.0)
    self.mixup_p = float(config.mixup.p)
    self.beta = torch.distributions.Beta(self.mixup_p, self.mixup_p)
    batch = int(config.input.batch_size)
    uniform = lambda res: torch.rand(batch, 3, res, res) * 2 - 1
    self.teacher_images = uniform(int(config.teacher.res))
    self.student_images = (self.teacher_images if config.student.res == config.teacher.res
                           else uniform(int(config.student.res)))

  def params(self, which: str) -> int:
    return sum(p.numel() for p in getattr(self, which).parameters())

  def __call__(self):
    torch = self.torch
    a = self.beta.sample()
    a = torch.maximum(a, 1 - a)
    mix = lambda x: a * x + (1 - a) * torch.roll(x, 1, dims=0)
    with torch.no_grad():
      teacher_logits = self.teacher(mix(self.teacher_images))
    student_logits = self.student(mix(self.student_images))
    loss = torch.nn.functional.kl_div(torch.log_softmax(student_logits, -1),
                                      torch.log_softmax(teacher_logits, -1),
                                      reduction="batchmean", log_target=True)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if self.clip:
      torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.clip)
    self.optimizer.step()
    return loss


# ---------------------------------------------------------------------------
# funmatch, built by tools/benchmark.py exactly as the trainer builds it.


def load_benchmark_tool():
  """tools/benchmark.py as a module: it builds the run exactly as the trainer does."""
  if HERE not in sys.path:  # run as a script, tools/ is already there
    sys.path.insert(0, HERE)
  import benchmark  # pylint: disable=import-outside-toplevel  (after the torch check)
  return benchmark


class FunmatchStep:
  """The trainer's jitted step on a synthetic batch; `__call__()` dispatches one step."""

  def __init__(self, bench, recipe: str, sets, conv_impl: str):
    from clu import parameter_overview  # pylint: disable=import-outside-toplevel
    from funmatch.train import state as state_lib, step as step_lib  # pylint: disable=import-outside-toplevel
    repo = os.path.dirname(HERE)
    sets = list(sets)
    if conv_impl:
      sets += [f"--config.student.conv_impl={conv_impl}",
               f"--config.teacher.conv_impl={conv_impl}"]
    args, config = bench.parse_args(["--config", os.path.join(repo, recipe),
                                     "--random_teachers", *sets])
    self.notes = []
    self.run, self.config, _ = bench.make_run(config, args, self.notes)
    run = self.run
    self.batch = bench.synthetic_batch(run, int(self.config.input.batch_size))
    state = state_lib.init_state(run)
    self.stepper = bench.Stepper(step_lib.jit_train_step(run, state), state, self.batch,
                                 run.teacher_params)
    self.student_params = int(parameter_overview.count_parameters(run.models.student_params))
    self.teacher_params = int(parameter_overview.count_parameters(run.teacher_params))
    self.block = timing.block_until_ready

  def __call__(self):
    return self.stepper()


def compare(name, bench, torch, resnetv2, args):
  from funmatch.models import conv  # pylint: disable=import-outside-toplevel
  recipe, sets = CONFIGS[name]
  ours = FunmatchStep(bench, recipe, sets, args.conv_impl)
  theirs = TorchStep(torch, resnetv2, ours.config, ours.run.num_classes)
  compile_s = timing.first_call_seconds(ours, ours.block)  # compile + first step
  theirs()  # first step (allocations)
  times = {"funmatch": [], "pytorch": []}
  for _ in range(args.repeats):  # alternate, so both see the same load
    times["funmatch"].append(timing.time_calls(ours, args.steps, block=ours.block).seconds)
    times["pytorch"].append(timing.time_calls(theirs, args.steps, block=None).seconds)
  batch = int(ours.config.input.batch_size)
  result = {"recipe": recipe, "sets": sets, "batch_size": batch, "views": ours.run.plan.views,
            "num_classes": ours.run.num_classes, "funmatch_compile_s": compile_s,
            "conv_impl": {m: conv.resolve_impl(ours.config[m].conv_impl)
                          for m in ("student", "teacher")},
            "params": {"funmatch": {"student": ours.student_params,
                                    "teacher": ours.teacher_params},
                       "pytorch": {"student": theirs.params("student"),
                                   "teacher": theirs.params("teacher")}},
            "notes": ours.notes}
  for side, per_step in times.items():
    result[side] = {**timing.summary_ms(per_step),
                    "img_per_s": batch / statistics.median(per_step)}
  result["funmatch_over_pytorch_img_per_s"] = (result["pytorch"]["median_ms"]
                                               / result["funmatch"]["median_ms"])
  # Best repeat against best repeat: on a busy machine the least disturbed estimate.
  result["funmatch_over_pytorch_best"] = (result["pytorch"]["min_ms"]
                                          / result["funmatch"]["min_ms"])
  return result


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  names = [n for n in args.only.split(",") if n]
  unknown = sorted(set(names) - set(CONFIGS))
  if unknown:
    raise SystemExit(f"peer_step: unknown configuration(s) {', '.join(unknown)}; "
                     f"choose from {', '.join(CONFIGS)}")
  if args.omp_wait_policy:  # read once, when torch's OpenMP runtime starts
    os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
  torch, resnetv2 = import_torch()
  cpus = len(os.sched_getaffinity(0))
  torch.set_num_threads(cpus)
  bench = load_benchmark_tool()
  from funmatch import console  # pylint: disable=import-outside-toplevel
  console.setup()
  machine = bench.machine_info()
  machine.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                 omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""),
                 timm=importlib.import_module("timm").__version__)
  results = {"machine": machine, "steps": args.steps, "repeats": args.repeats,
             "configs": {}}
  print(f"{'config':10s} {'conv':>7s} {'funmatch ms':>12s} {'(best)':>7s} {'img/s':>8s} "
        f"{'pytorch ms':>11s} {'(best)':>7s} {'img/s':>8s} {'funmatch/pytorch':>17s} "
        f"{'(best)':>7s}")
  for name in names:
    r = results["configs"][name] = compare(name, bench, torch, resnetv2, args)
    ours, theirs = r["funmatch"], r["pytorch"]
    print(f"{name:10s} {r['conv_impl']['student']:>7s} {ours['median_ms']:12.1f} "
          f"{ours['min_ms']:7.1f} {ours['img_per_s']:8.1f} {theirs['median_ms']:11.1f} "
          f"{theirs['min_ms']:7.1f} {theirs['img_per_s']:8.1f} "
          f"{r['funmatch_over_pytorch_img_per_s']:17.3f} "
          f"{r['funmatch_over_pytorch_best']:7.3f}", flush=True)
  machine["load_average_end"] = list(os.getloadavg())
  print(f"load average {machine['load_average']} -> {machine['load_average_end']}; "
        f"{cpus} cores, torch threads {machine['torch_threads']}")
  if max(machine["load_average"][0], machine["load_average_end"][0]) > cpus:
    note = ("busy machine (load average above the core count): timings are indicative, "
            "PyTorch's especially (its OpenMP threads spin; try --omp_wait_policy PASSIVE)")
    results["notes"] = [note]
    print(f"note: {note}")
  if args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
      json.dump(results, f, indent=1, sort_keys=True)
    print(f"wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
