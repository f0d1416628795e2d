"""The paper's teaching-mode study (its Figure 3) on digits, in one command.

Distils the digits teacher into the digits student with each teaching mode
(fixed, independent, consistent, function_matching) at a short and a long
schedule, trains the same student on labels alone at both schedules, then
prints a markdown table (test top-1 and agreement), writes JSON, and plots
the long runs with tools/plot_metrics.py. Everything but the teaching mode
(and the label baseline's objective) is the recipe in configs/digits.py.

  python tools/reproduce_teaching.py --teacher /tmp/demo/teacher \
      --workdir /tmp/teaching --short 100 --long 1000 \
      --output docs/reproduction.json --plot docs/reproduction.png
"""
import argparse
import json
import os
import sys
import time

MODES = ("fixed", "independent", "consistent", "function_matching")


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="one sub-directory per run goes here")
  p.add_argument("--teacher", default="",
                 help="funmatch-train workdir of configs/digits_teacher.py (default: train one)")
  p.add_argument("--short", type=int, default=100, help="steps of the short schedule")
  p.add_argument("--long", type=int, default=1000, help="steps of the long schedule")
  p.add_argument("--evals_per_run", type=int, default=10)
  p.add_argument("--output", default="")
  p.add_argument("--plot", default="")
  return p.parse_args(argv)


def configure(c, steps: int, evals_per_run: int):
  # The recipe's 100 warmup steps would outlast a short run: cap warmup at 20%.
  c.schedule.warmup_steps = min(c.schedule.warmup_steps, steps // 5)
  c.eval_every_steps = max(steps // evals_per_run, 1)
  c.log_every_steps = max(steps // 20, 1)
  c.checkpoint_every_steps = steps
  return c


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from funmatch.configs import digits, digits_labels, digits_teacher  # pylint: disable=import-outside-toplevel
  from funmatch import console  # pylint: disable=import-outside-toplevel
  from funmatch.train import loop, metrics_io  # pylint: disable=import-outside-toplevel
  console.setup()
  if args.plot:
    console.guarded(lambda: console.require_module("matplotlib", "plot"))
  teacher = args.teacher
  if not teacher:
    teacher = os.path.join(args.workdir, "teacher")
    loop.train_and_evaluate(digits_teacher.get_config(), teacher, "train")

  rows = []
  for steps, schedule in ((args.short, "short"), (args.long, "long")):
    for mode in (*MODES, "labels"):
      workdir = os.path.join(args.workdir, f"{mode}_{steps}")
      start = time.time()
      if mode == "labels":
        config = digits_labels.get_config(f"steps={steps}")
        loop.train_and_evaluate(configure(config, steps, args.evals_per_run), workdir, "train")
      else:
        config = digits.get_config(f"teacher={teacher},steps={steps},teaching={mode}")
        loop.train_and_evaluate(configure(config, steps, args.evals_per_run), workdir,
                                "distill")
      final = [r for r in metrics_io.read_metrics(workdir) if "test/student_top1" in r][-1]
      rows.append(dict(mode=mode, schedule=schedule, steps=steps, workdir=workdir,
                       epochs=round(steps * config.input.batch_size / 1352, 1),
                       top1=final["test/student_top1"],
                       agreement=final.get("test/agreement_top1"),
                       teacher_top1=final.get("test/teacher_top1"),
                       wall_seconds=round(time.time() - start, 1)))
      print(f"{mode:18s} {steps:6d} steps: test top-1 {100 * rows[-1]['top1']:.2f}%",
            flush=True)

  teacher_top1 = next(r["teacher_top1"] for r in rows if r["teacher_top1"] is not None)
  print(f"\nteacher test top-1: {100 * teacher_top1:.2f}%\n")
  print(f"| mode | top-1, {args.short} steps | agreement | top-1, {args.long} steps | agreement |")
  print("|---|---|---|---|---|")
  for mode in (*MODES, "labels"):
    cells = []
    for schedule in ("short", "long"):
      row = next(r for r in rows if r["mode"] == mode and r["schedule"] == schedule)
      agreement = "-" if row["agreement"] is None else f"{100 * row['agreement']:.2f}%"
      cells += [f"{100 * row['top1']:.2f}%", agreement]
    print(f"| {mode} | " + " | ".join(cells) + " |")
  if args.output:
    with open(args.output, "w") as f:
      json.dump(dict(teacher_top1=teacher_top1, runs=rows), f, indent=1)
  if args.plot:
    import plot_metrics  # pylint: disable=import-outside-toplevel
    long_runs = [r for r in rows if r["schedule"] == "long"]
    curves = {r["mode"]: plot_metrics.load_curves(r["workdir"], "test") for r in long_runs}
    plot_metrics.plot(curves, args.plot, f"digits, {args.long} steps: teaching modes")
  return 0


if __name__ == "__main__":
  sys.exit(main())
