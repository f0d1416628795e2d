"""The linear probe of a student: trained (a workdir's checkpoint) or randomly initialised.

  python tools/linear_probe.py --config configs/digits_seed.py --random_init
  python tools/linear_probe.py --config configs/digits_seed.py:teacher=/tmp/t --workdir /tmp/s

Fits the probe of funmatch/train/probe.py (standardised frozen features of the
student's probe tap, multinomial logistic regression by L-BFGS) on the config's
training split and prints `<eval>/linear_probe_top1` for each of config.evals.
--random_init probes the student exactly as a run of this config starts (the
trainer's init, seed 0, ignoring config.student.init): SEED's "before" number.
--workdir probes the student of its latest checkpoint (or --step). --output FILE
appends the result as one JSON line. Both may be paths or gs:// URLs. Bad input:
one line on stderr, exit code 2.
"""
import json
import sys

from funmatch.console import fail as _fail
from funmatch.train import cli


def parse(argv):
  """(config, workdir, step, output): the trainer's --config/--config.a.b parsing."""
  config, workdir, extras = cli.parse(
      list(argv), "linear_probe.py",
      {"random_init": dict(action="store_true", help="probe the randomly initialised student"),
       "step": cli.STEP_FLAG,
       "output": dict(help="append the result as a JSON line to this file")},
      needs_workdir=False, description=__doc__.splitlines()[0])
  if bool(workdir) == bool(extras["random_init"]):
    _fail("give exactly one of --workdir DIR (a trained student) and --random_init")
  return config, workdir, extras["step"], extras["output"]


def run(config, workdir, step) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from funmatch import checkpoint, fileio, parallel  # pylint: disable=import-outside-toplevel
  from funmatch.data import sources  # pylint: disable=import-outside-toplevel
  from funmatch.distill import objectives  # pylint: disable=import-outside-toplevel
  from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel
  from funmatch.train import build, probe  # pylint: disable=import-outside-toplevel
  if not config.evals:
    raise UserError("the config has no config.evals to report the probe on")
  if workdir:
    fileio.check_reachable(workdir, "--workdir")
    if not fileio.isdir(workdir):
      raise UserError(f"--workdir {workdir} does not exist")
  objective = objectives.make_objective(config)
  mesh = parallel.make_mesh(config)
  num_classes = int(config.num_classes or
                    sources.open_source(config.input, where="input").num_classes)
  student, params = build.build_model(config.student, num_classes, "student",
                                      seed=int(config.seed))
  if workdir:
    step, params = checkpoint.restore_params(workdir, step)
  params = jax.device_put(params, parallel.replicated(mesh))
  linear_probe = probe.LinearProbe(student, config, int(config.student.res), mesh,
                                   num_classes, tap=objective.probe_tap)
  results = linear_probe(params)
  return {"student": workdir or "random_init", "step": step if workdir else 0, **results}


def main(argv=None) -> int:
  argv = sys.argv if argv is None else argv
  from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel
  config, workdir, step, output = parse(argv)  # sets the console up (console.setup)
  try:
    if output:
      from funmatch import fileio  # pylint: disable=import-outside-toplevel
      fileio.check_reachable(output, "--output")
    results = run(config, workdir, step)
  except UserError as e:
    _fail(str(e))
  for key, value in results.items():
    if key.endswith("linear_probe_top1"):
      print(f"{key}: {value:.4f}", flush=True)
  line = json.dumps(results, sort_keys=True)
  print(line, flush=True)
  if output:
    from funmatch import fileio  # pylint: disable=import-outside-toplevel
    with fileio.open(output, "a") as f:  # on gs://: one re-upload of the whole file
      f.write(line + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
