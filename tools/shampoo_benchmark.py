"""Adam vs Shampoo on digits distillation: accuracy vs steps and step time.

For each optimizer and each learning rate of its grid, distils the digits
teacher into the digits student (configs/digits.py) for --steps steps,
evaluating test top-1 every --eval_every steps. The best learning rate of each
optimizer is the one with the highest final test top-1 (ties: the higher mean
over the last three evaluations). Reports how many steps the best Shampoo run
needs to reach the best Adam run's final accuracy, and the train-step time of
each optimizer measured on one fixed batch over whole recompute periods.

  python tools/shampoo_benchmark.py --teacher /tmp/demo/teacher \
      --workdir /tmp/shampoo_bench --output docs/shampoo_digits.json \
      --plot docs/shampoo_digits.png

--teacher is a funmatch-train workdir of configs/digits_teacher.py (the demo
leaves one in DIR/teacher); without it the teacher is trained first.
"""
import argparse
import json
import os
import sys
import time

from funmatch import timing



def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="one sub-directory per run goes here")
  p.add_argument("--teacher", default="", help="funmatch-train workdir of the digits teacher")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--eval_every", type=int, default=20)
  p.add_argument("--adam_lrs", default="0.001,0.003,0.01")
  p.add_argument("--shampoo_lrs", default="0.001,0.003,0.01")
  p.add_argument("--compute_steps", type=int, default=10,
                 help="Shampoo's preconditioning_compute_steps")
  p.add_argument("--timing_periods", type=int, default=5,
                 help="recompute periods timed per optimizer")
  p.add_argument("--timing_only", action="store_true",
                 help="skip the grid; time both optimizers at the first lr of their grids")
  p.add_argument("--output", default="", help="write the results as JSON here")
  p.add_argument("--plot", default="", help="write test top-1 vs steps as a PNG here")
  return p.parse_args(argv)


def recipe(teacher: str, steps: int, optimizer: str, lr: float, eval_every: int,
           compute_steps: int):
  from funmatch.configs import digits  # pylint: disable=import-outside-toplevel
  c = digits.get_config(f"teacher={teacher},steps={steps},optimizer={optimizer}")
  c.lr = lr
  c.eval_every_steps = eval_every
  c.log_every_steps = eval_every
  c.checkpoint_every_steps = steps
  if optimizer == "shampoo":
    c.optax.preconditioning_compute_steps = compute_steps
  return c


def ensure_teacher(workdir: str, teacher: str) -> str:
  if teacher:
    return teacher
  from funmatch.configs import digits_teacher  # pylint: disable=import-outside-toplevel
  from funmatch.train import loop  # pylint: disable=import-outside-toplevel
  teacher = os.path.join(workdir, "teacher")
  loop.train_and_evaluate(digits_teacher.get_config(), teacher, "train")
  return teacher


def accuracy_curve(workdir: str) -> list[tuple[int, float]]:
  from funmatch.train import metrics_io  # pylint: disable=import-outside-toplevel
  return [(r["step"], r["test/student_top1"]) for r in metrics_io.read_metrics(workdir)
          if "test/student_top1" in r]


def run_grid(args, teacher):
  from funmatch.train import loop  # pylint: disable=import-outside-toplevel
  runs = []
  for optimizer, lrs in (("adam", args.adam_lrs), ("shampoo", args.shampoo_lrs)):
    for lr in (float(x) for x in lrs.split(",")):
      workdir = os.path.join(args.workdir, f"{optimizer}_lr{lr:g}")
      start = time.time()
      loop.train_and_evaluate(recipe(teacher, args.steps, optimizer, lr, args.eval_every,
                                     args.compute_steps), workdir, "distill")
      curve = accuracy_curve(workdir)
      runs.append(dict(optimizer=optimizer, lr=lr, workdir=workdir, curve=curve,
                       final_top1=curve[-1][1], wall_seconds=round(time.time() - start, 1)))
      print(f"{optimizer:8s} lr {lr:<8g} final test top-1 {curve[-1][1]:.4f} "
            f"({runs[-1]['wall_seconds']:.0f} s)", flush=True)
  return runs


def best_run(runs, optimizer):
  def key(run):
    return run["final_top1"], sum(a for _, a in run["curve"][-3:])
  return max((r for r in runs if r["optimizer"] == optimizer), key=key)


def first_step_reaching(curve, target):
  return next((step for step, acc in curve if acc >= target), None)


def time_steps(teacher: str, optimizer: str, lr: float, compute_steps: int, periods: int):
  """Seconds per train step on one fixed batch, averaged over whole recompute periods.

  Starts after Shampoo's first preconditioner (step > start_preconditioning_step)
  so every timed period holds exactly one recompute, as in a long run.
  """
  from funmatch import parallel  # pylint: disable=import-outside-toplevel
  from funmatch.data import pipeline  # pylint: disable=import-outside-toplevel
  from funmatch.train import build, state as state_lib, step as step_lib  # pylint: disable=import-outside-toplevel
  config = recipe(teacher, 10_000, optimizer, lr, 0, compute_steps)
  run = build.build(config, "distill")
  state = state_lib.init_state(run)
  batch = next(pipeline.make_train_iterator(
      run.data.train_source, run.plan.views, seed=0, start_step=0,
      sharding=parallel.batch_sharding(run.mesh), crops=run.plan.crops))
  train_step = step_lib.jit_train_step(run, state)
  warmup = 20 if optimizer == "adam" else int(config.optax.start_preconditioning_step) + 1
  carried = {"state": state}

  def one_step():  # carries the (donated) state from step to step, as the trainer does
    carried["state"], metrics = train_step(carried["state"], batch, run.teacher_params)
    return metrics

  steps = periods * compute_steps
  measured = timing.time_calls(one_step, steps, warmup=warmup)
  return dict(seconds_per_step=measured.seconds, timed_steps=steps,
              compile_and_warmup_seconds=round(measured.warmup_seconds, 1))


def step_time_ratio(timing) -> float:
  return timing["shampoo"]["seconds_per_step"] / timing["adam"]["seconds_per_step"]


def report_timing(timing, compute_steps: int) -> None:
  for name, t in timing.items():
    print(f"{name:8s} {1000 * t['seconds_per_step']:.1f} ms/step over {t['timed_steps']} steps")
  print(f"step-time ratio Shampoo/Adam (recompute every {compute_steps}): "
        f"{step_time_ratio(timing):.2f}x")


def plot(runs, best, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = {"adam": "tab:blue", "shampoo": "tab:red"}
  for run in runs:
    steps, acc = zip(*run["curve"])
    is_best = run is best[run["optimizer"]]
    ax.plot(steps, [100 * a for a in acc], color=colors[run["optimizer"]],
            linewidth=2.0 if is_best else 0.8, alpha=1.0 if is_best else 0.5,
            label=f"{run['optimizer']} lr {run['lr']:g}" + (" (best)" if is_best else ""))
  ax.axhline(100 * best["adam"]["final_top1"], color="gray", linestyle="--", linewidth=0.8,
             label="best Adam, final")
  ax.set_xlabel("step")
  ax.set_ylabel("student test top-1 (%)")
  ax.set_ylim(bottom=max(0, 100 * min(a for r in runs for _, a in r["curve"][2:]) - 2))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title("digits function matching: Adam vs Shampoo")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from funmatch import console  # pylint: disable=import-outside-toplevel
  console.setup()
  if args.plot:
    console.guarded(lambda: console.require_module("matplotlib", "plot"))
  teacher = ensure_teacher(args.workdir, args.teacher)
  if args.timing_only:
    lrs = {"adam": float(args.adam_lrs.split(",")[0]),
           "shampoo": float(args.shampoo_lrs.split(",")[0])}
    report_timing({name: time_steps(teacher, name, lr, args.compute_steps,
                                    args.timing_periods) for name, lr in lrs.items()},
                  args.compute_steps)
    return 0
  runs = run_grid(args, teacher)
  best = {name: best_run(runs, name) for name in ("adam", "shampoo")}
  target = best["adam"]["final_top1"]
  reach = first_step_reaching(best["shampoo"]["curve"], target)
  timing = {name: time_steps(teacher, name, best[name]["lr"], args.compute_steps,
                             args.timing_periods) for name in ("adam", "shampoo")}
  ratio = step_time_ratio(timing)
  result = dict(
      steps=args.steps, eval_every=args.eval_every, compute_steps=args.compute_steps,
      runs=runs, best_lr={k: v["lr"] for k, v in best.items()},
      adam_final_top1=target, shampoo_final_top1=best["shampoo"]["final_top1"],
      shampoo_steps_to_adam_final=reach,
      adam_steps_to_adam_final=first_step_reaching(best["adam"]["curve"], target),
      timing=timing, step_time_ratio=ratio)
  print()
  print(f"{'optimizer':9s} {'lr':>7s} {'final top-1':>11s}  curve (step: top-1)")
  for run in runs:
    points = " ".join(f"{s}:{100 * a:.1f}" for s, a in run["curve"][4::5])
    print(f"{run['optimizer']:9s} {run['lr']:7g} {100 * run['final_top1']:10.2f}%  {points}")
  print(f"best Adam: lr {best['adam']['lr']:g}, final {100 * target:.2f}% at step {args.steps}")
  print(f"best Shampoo: lr {best['shampoo']['lr']:g}, reaches it at step {reach} "
        f"(final {100 * best['shampoo']['final_top1']:.2f}%)")
  report_timing(timing, args.compute_steps)
  if args.output:
    with open(args.output, "w") as f:
      json.dump(result, f, indent=1)
  if args.plot:
    plot(runs, best, args.plot)
  return 0


if __name__ == "__main__":
  sys.exit(main())
