"""funmatch-demo: the embedded default, end to end on scikit-learn's digits.

Trains a BiT teacher on labels (or reuses the one in WORKDIR/teacher), distils
it into a much smaller BiT student with function matching (WORKDIR/student),
evaluates both on the digits test split, prints a table and writes
WORKDIR/summary.json. No network, a few minutes on a laptop CPU.
"""
import argparse
import json
import sys
import time

from funmatch import console, fileio


def _parse(argv):
  parser = argparse.ArgumentParser(prog="funmatch-demo", description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="where the two runs and summary go")
  parser.add_argument("--teacher_steps", type=int, default=None,
                      help="override the teacher's training steps")
  parser.add_argument("--student_steps", type=int, default=None,
                      help="override the student's distillation steps")
  console.add_verbose_flag(parser)
  return parser.parse_args(argv[1:])


def _recipe_arg(**values) -> str:
  return ",".join(f"{k}={v}" for k, v in values.items() if v is not None)


def param_count(model_config, num_classes: int = 10) -> int:
  """The model's parameter count. Shapes are enough: eval_shape traces the init
  without compiling or running it."""
  import jax  # pylint: disable=import-outside-toplevel
  from clu import parameter_overview  # pylint: disable=import-outside-toplevel
  from funmatch.train import build  # pylint: disable=import-outside-toplevel
  shapes = jax.eval_shape(lambda: build.build_model(model_config, num_classes, "model")[1])
  return int(parameter_overview.count_parameters(shapes))


def run_demo(workdir: str, teacher_steps: int | None = None,
             student_steps: int | None = None) -> dict:
  """Runs teacher training + distillation; returns the summary dict."""
  import jax  # pylint: disable=import-outside-toplevel
  from funmatch.configs import digits, digits_teacher  # pylint: disable=import-outside-toplevel
  from funmatch.train import evaluate, loop  # pylint: disable=import-outside-toplevel
  start = time.time()
  teacher_dir = fileio.join(workdir, "teacher")
  student_dir = fileio.join(workdir, "student")
  teacher_config = digits_teacher.get_config(_recipe_arg(steps=teacher_steps))
  student_config = digits.get_config(_recipe_arg(teacher=teacher_dir, steps=student_steps))

  print(f"== 1/2: training the BiT teacher on digits labels in {teacher_dir}", flush=True)
  loop.train_and_evaluate(teacher_config, teacher_dir, "train")
  print(f"== 2/2: function matching into the student in {student_dir}", flush=True)
  results = loop.train_and_evaluate(student_config, student_dir, "distill")

  summary = {
      "teacher_top1": results["test/teacher_top1"],
      "student_top1": results["test/student_top1"],
      "agreement_top1": results["test/agreement_top1"],
      "teacher_params": param_count(student_config.teacher),
      "student_params": param_count(student_config.student),
      "wall_seconds": round(time.time() - start, 1),
  }
  if jax.process_index() == 0:
    print("\n" + evaluate.format_table(summary), flush=True)
    path = fileio.join(workdir, "summary.json")
    fileio.write_atomic(path, json.dumps(summary, indent=2))
    print(f"wrote {path}", flush=True)
  return summary


def main(argv=None) -> int:
  args = _parse(argv or sys.argv)
  console.setup(verbose=args.verbose)
  return console.guarded(lambda: run_demo(args.workdir, args.teacher_steps,
                                      args.student_steps) and 0)
