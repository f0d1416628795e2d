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


def parse(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel
  flag_values = flags.FlagValues()
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "recipe file", flag_values=flag_values, lock_config=True)
  flags.DEFINE_string("workdir", None, "a funmatch workdir to probe", flag_values=flag_values)
  flags.DEFINE_bool("random_init", False, "probe the randomly initialised student",
                    flag_values=flag_values)
  flags.DEFINE_string("step", None, "checkpoint step (default: latest)",
                      flag_values=flag_values)
  flags.DEFINE_string("output", None, "append the result as a JSON line to this file",
                      flag_values=flag_values)
  usage = ("usage: linear_probe.py --config FILE.py[:args] (--workdir DIR | --random_init) "
           "[--step N] [--output FILE] [--config.key=value ...]")
  if any(a in ("-h", "--help") for a in argv[1:]):
    print(usage + "\n\n" + __doc__)
    raise SystemExit(0)
  try:
    flag_values(list(argv))
    config = config_flag.value
  except UserError as e:
    _fail(str(e))
  except flags.Error as e:
    _fail(f"{str(e).strip().splitlines()[0]}\n{usage}")
  except Exception as e:  # pylint: disable=broad-except  (a config that does not load)
    _fail(f"cannot load --config ({type(e).__name__}: {str(e).strip().splitlines()[0]})")
  if config is None:
    _fail(f"--config is required\n{usage}")
  if bool(flag_values.workdir) == bool(flag_values.random_init):
    _fail("give exactly one of --workdir DIR (a trained student) and --random_init")
  step = flag_values.step
  if step is not None:
    try:
      step = int(step)
    except ValueError:
      _fail(f"--step must be an integer, got '{step}'")
  return config, flag_values.workdir, step, flag_values.output


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
  from funmatch import console  # pylint: disable=import-outside-toplevel
  from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel
  console.setup()
  config, workdir, step, output = parse(argv)
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
