"""Console entry points: funmatch-distill, -train, -eval and -export.

Each takes `--config FILE.py[:key=value,...]`, `--workdir DIR` and any number of
`--config.a.b=value` overrides (ml_collections config_flags; the config is
locked, so a mistyped key is an error, not a new key). User mistakes end in one
line on stderr and exit code 2.
"""
import logging
import os
import sys
from typing import Sequence

USAGE = ("usage: {prog} --config FILE.py[:key=value,...] --workdir DIR "
         "[--config.key=value ...]{extra}")


from funmatch.console import fail, guarded, setup

# Keys that moved: a command line that uses the old name gets the new one.
MOVED_KEYS = {name: f"objective_args.{name}" for name in
              ("temperature", "distance", "ensemble", "label_smoothing")}


def parse(argv: Sequence[str], prog: str, extra_flags: dict[str, str],
          needs_workdir: bool = True):
  """Parses argv into (config, workdir, extras); user errors exit 2 in one line.

  Tools use it too (needs_workdir=False), so every command takes the same
  `--config FILE.py:args --config.a.b=value` overrides.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel

  flag_values = flags.FlagValues()
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "recipe file", flag_values=flag_values, lock_config=True,
      sys_argv=list(argv))
  flags.DEFINE_string("workdir", None, "run directory", flag_values=flag_values)
  extra_flags = {**extra_flags, **_distributed_flags()}  # every CLI can run multi-host
  for name, help_text in extra_flags.items():
    flags.DEFINE_string(name, None, help_text, flag_values=flag_values)
  usage = USAGE.format(prog=prog, extra="".join(f" [--{n} ...]" for n in extra_flags))
  if any(a in ("-h", "--help", "-help") for a in argv[1:]):
    print(usage + "\n\n" + __doc__)
    raise SystemExit(0)
  config_path = _config_path(argv)
  if config_path and not os.path.isfile(config_path):
    fail(f"config file not found: {config_path}")
  try:
    flag_values(list(argv))
    config = config_flag.value
    if config is not None:
      config.get("seed")  # a config that failed to load raises here
  except UserError as e:
    fail(str(e))
  except flags.Error as e:
    fail(f"{_first_line(e)} ({usage})")
  except (AttributeError, KeyError) as e:
    # ml_collections puts the key on the first line and a suggestion on the next.
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    lines = str(e.args[0] if e.args else e).strip().splitlines() or [""]
    key = lines[0].strip("'\"")
    hint = f" ({lines[1].strip()})" if len(lines) > 1 else ""
    if key in MOVED_KEYS:
      hint = f" (it moved to config.{MOVED_KEYS[key]})"
    bad = [a for a in argv if a.startswith("--config.") and key in a]
    fail(f"unknown config key '{key}'" + (f" in {bad[0].split('=')[0]}" if bad else "") +
         hint + "; check the spelling against the recipe file (the config is locked)")
  except (OSError, IOError) as e:
    fail(f"cannot load --config: {_first_line(e)}")
  except Exception as e:  # pylint: disable=broad-except
    fail(f"cannot load --config ({type(e).__name__}: {_first_line(e)}); "
         "check the file and its :arguments")
  if config is None:
    fail(f"--config is required ({usage})")
  if needs_workdir and not flag_values.workdir:
    fail(f"--workdir is required ({usage})")
  extras = {name: flag_values[name].value for name in extra_flags}
  from funmatch import fileio  # pylint: disable=import-outside-toplevel
  try:  # `gs:/b/run` would otherwise become a local folder named 'gs:'
    for what, path in (("--workdir", flag_values.workdir), ("--output", extras.get("output"))):
      if path:
        fileio.check_path(path, what)
  except UserError as e:
    fail(str(e))
  return config, flag_values.workdir, extras


def _config_path(argv: Sequence[str]) -> str | None:
  """The FILE.py of `--config FILE.py[:args]` or `--config=FILE.py[:args]`."""
  for i, arg in enumerate(argv):
    value = None
    if arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith("--config="):
      value = arg.split("=", 1)[1]
    if value is not None:
      return value.split(":", 1)[0]
  return None


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _distributed_flags() -> dict[str, str]:
  from funmatch import distributed  # pylint: disable=import-outside-toplevel
  return distributed.FLAGS


def start_processes(extras: dict[str, str | None]) -> int:
  """Joins the other processes of a multi-host run before any device use.

  Returns this process's id; logs and console output come from process 0, the
  others report only warnings and errors.
  """
  from funmatch import distributed  # pylint: disable=import-outside-toplevel
  process_id, _ = distributed.initialize(extras.get("coordinator_address"),
                                         extras.get("num_processes"),
                                         extras.get("process_id"))
  if process_id != 0:
    logging.getLogger().setLevel(logging.WARNING)
  return process_id


def _train_like(mode: str, prog: str, argv) -> int:
  setup()
  config, workdir, extras = parse(argv, prog, {})

  def main():
    process_id = start_processes(extras)
    from funmatch.train import evaluate, loop  # pylint: disable=import-outside-toplevel
    results = loop.train_and_evaluate(config, workdir, mode)
    if results and process_id == 0:
      print(evaluate.format_table(results), flush=True)

  return guarded(main)


def distill_main(argv=None) -> int:
  """funmatch-distill: distil the configured teacher(s) into the student."""
  return _train_like("distill", "funmatch-distill", argv or sys.argv)


def train_main(argv=None) -> int:
  """funmatch-train: supervised training on labels (teachers, baselines)."""
  return _train_like("train", "funmatch-train", argv or sys.argv)


def _check_reachable(workdir: str, output: str | None) -> None:
  """eval/export (e.g. from a workstation against a pod's bucket): the workdir and
  the output can be reached, before anything is read or written."""
  from funmatch import fileio  # pylint: disable=import-outside-toplevel
  fileio.check_reachable(workdir, "--workdir")
  if output:
    fileio.check_reachable(output, "--output")


def _mode_of(workdir: str) -> str:
  from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel
  from funmatch.train import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  stored = workdir_lib.read_config(workdir)
  if stored is None:
    raise UserError(f"--workdir {workdir} holds no funmatch run (no "
                    f"{workdir_lib.CONFIG_FILE}); point it to a training workdir")
  return stored["mode"]


def _parse_step(text):
  from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel
  if text is None:
    return None
  try:
    return int(text)
  except ValueError:
    raise UserError(f"--step must be an integer, got '{text}'") from None


def eval_main(argv=None) -> int:
  """funmatch-eval: evaluate a checkpoint on the config's eval sets."""
  setup()
  config, workdir, extras = parse(argv or sys.argv, "funmatch-eval",
                                  {"step": "checkpoint step (default: latest)",
                                   "output": "JSON file (default WORKDIR/eval_STEP.json)"})

  def main():
    start_processes(extras)
    import jax  # pylint: disable=import-outside-toplevel
    from funmatch import checkpoint, fileio, parallel  # pylint: disable=import-outside-toplevel
    from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel
    from funmatch.train import build, evaluate  # pylint: disable=import-outside-toplevel
    step = _parse_step(extras["step"])
    _check_reachable(workdir, extras["output"])
    run = build.build(config, _mode_of(workdir), load_student=False)
    if not config.evals:
      raise UserError("the config has no config.evals to evaluate on")
    step, params = checkpoint.restore_params(workdir, step)
    params = jax.device_put(params, parallel.replicated(run.mesh))
    results = {"step": step, **evaluate.Evaluator(run)(params)}
    output = extras["output"] or fileio.join(workdir, f"eval_{step}.json")
    if jax.process_index() == 0:
      print(evaluate.format_table(results), flush=True)
      evaluate.write_json(output, results)
      print(f"wrote {output}", flush=True)

  return guarded(main)


def export_main(argv=None) -> int:
  """funmatch-export: write the student's params (no teachers, no aux) as .npz."""
  setup()
  config, workdir, extras = parse(argv or sys.argv, "funmatch-export",
                                  {"step": "checkpoint step (default: latest)",
                                   "output": "the .npz file to write"})

  def main():
    from funmatch import checkpoint, fileio, models  # pylint: disable=import-outside-toplevel
    from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel
    from funmatch.train import build  # pylint: disable=import-outside-toplevel
    output = extras["output"]
    if not output:
      raise UserError("--output FILE.npz is required")
    if not output.endswith(".npz"):
      raise UserError(f"--output {output} must end in .npz")
    process_id = start_processes(extras)
    _check_reachable(workdir, output)
    if fileio.exists(output):
      raise UserError(f"--output {output} already exists; choose another path or "
                      "remove it first (funmatch never overwrites an export)")
    step = _parse_step(extras["step"])
    build.validate(config, _mode_of(workdir))
    # Orbax reads collectively: every process restores, process 0 alone writes.
    step, params = checkpoint.restore_params(workdir, step)
    if process_id == 0:
      models.save_params(config.student.model, output, params)
      print(f"wrote the student of step {step} to {output}", flush=True)

  return guarded(main)
