"""Plots one or more workdirs' metrics.jsonl (the shape of the paper's Figure 3).

Three panels against epochs: the student's test top-1 (with each run's teacher
as a dashed horizontal line), student-teacher top-1 agreement, and the training
loss. One curve per workdir.

  python tools/plot_metrics.py /tmp/fm_a gs://bucket/fm_b --labels "FM,fixed" \
      --output curves.png [--eval test]

Workdirs and --output may be paths or gs:// URLs (funmatch.fileio).
"""
import argparse
import io
import sys


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("workdirs", nargs="+", help="workdirs holding metrics.jsonl")
  p.add_argument("--labels", default="", help="comma-separated curve labels (default: names)")
  p.add_argument("--eval", default="test", help="which eval set's metrics to plot")
  p.add_argument("--output", required=True, help="PNG file to write")
  p.add_argument("--title", default="")
  return p.parse_args(argv)


def load_curves(workdir: str, eval_name: str) -> dict:
  """Epoch-indexed curves of one run: top1, agreement, loss, teacher_top1."""
  from funmatch import fileio  # pylint: disable=import-outside-toplevel
  from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel
  from funmatch.train import metrics_io  # pylint: disable=import-outside-toplevel
  fileio.check_reachable(workdir, "workdir")
  if not fileio.exists(fileio.join(workdir, metrics_io.METRICS_FILE)):
    raise UserError(f"{workdir} has no metrics.jsonl; pass the workdir of a funmatch run")
  rows = metrics_io.read_metrics(workdir)
  train = [r for r in rows if "train/loss" in r]
  # epochs per step, from the logged train rows (eval rows carry only the step).
  per_step = train[-1]["epoch"] / train[-1]["step"] if train else 0.0
  key = f"{eval_name}/student_top1"
  evals = [r for r in rows if key in r]
  if not evals:
    raise UserError(f"{workdir} has no '{key}' metric; choose --eval from the run's "
                    "config.evals")
  teacher = [r[f"{eval_name}/teacher_top1"] for r in evals
             if f"{eval_name}/teacher_top1" in r]
  return dict(
      top1=[(r["step"] * per_step, r[key]) for r in evals],
      agreement=[(r["step"] * per_step, r[f"{eval_name}/agreement_top1"]) for r in evals
                 if f"{eval_name}/agreement_top1" in r],
      loss=[(r["epoch"], r["train/loss"]) for r in train],
      teacher_top1=teacher[-1] if teacher else None)


def plot(curves: dict[str, dict], output: str, title: str = "") -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, (label, run) in enumerate(curves.items()):
    color = colors[i % len(colors)]
    for ax, name in zip(axes, ("top1", "agreement", "loss")):
      if run[name]:
        xs, ys = zip(*run[name])
        scale = 1.0 if name == "loss" else 100.0
        ax.plot(xs, [scale * y for y in ys], color=color, marker="." if len(xs) < 30 else None,
                label=label)
    if run["teacher_top1"] is not None:
      axes[0].axhline(100 * run["teacher_top1"], color=color, linestyle="--", linewidth=0.8)
  for ax, ylabel in zip(axes, ("student test top-1 (%) [dashed: teacher]",
                               "student-teacher top-1 agreement (%)", "train loss")):
    ax.set_xlabel("epochs")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  axes[2].set_yscale("log")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  from funmatch import fileio  # pylint: disable=import-outside-toplevel
  image = io.BytesIO()
  fig.savefig(image, format="png", dpi=110)
  plt.close(fig)
  fileio.write_atomic(output, image.getvalue())


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from funmatch import console, fileio  # pylint: disable=import-outside-toplevel
  from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel
  labels = args.labels.split(",") if args.labels else [
      fileio.basename(w.rstrip("/")) for w in args.workdirs]

  def run():
    console.require_module("matplotlib", "plot")
    fileio.check_reachable(args.output, "--output")
    if len(labels) != len(args.workdirs):
      raise UserError(f"--labels has {len(labels)} names for {len(args.workdirs)} workdirs")
    curves = {label: load_curves(w, args.eval) for label, w in zip(labels, args.workdirs)}
    plot(curves, args.output, args.title)
    print(f"wrote {args.output}")

  return console.guarded(run)


if __name__ == "__main__":
  sys.exit(main())
