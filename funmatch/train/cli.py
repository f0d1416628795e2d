"""Console entry points: funmatch-distill, -train, -eval, -export, -predict, -fetch.

The first four take `--config FILE.py[:key=value,...]`, `--workdir DIR` and any
number of `--config.a.b=value` overrides (ml_collections config_flags; the config
is locked, so a mistyped key is an error, not a new key). funmatch-predict and
funmatch-fetch need no config: a workdir, export or name says everything. User
mistakes end in one line on stderr and exit code 2.
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
    from funmatch.train import build  # pylint: disable=import-outside-toplevel
    build.validate(config, mode)  # config mistakes fail before TensorFlow is imported
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


def _parse_bool(name: str, text) -> bool:
  from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel
  if text is None:
    return False
  lowered = str(text).strip().lower()
  if lowered not in ("", "true", "false", "1", "0", "yes", "no"):
    raise UserError(f"--{name} takes no value or true/false, got '{text}'")
  return lowered in ("", "true", "1", "yes")


def eval_main(argv=None) -> int:
  """funmatch-eval: evaluate a checkpoint on the config's eval sets.

  Needs the eval sets and the teachers' weights (none with --student_only), not
  the training data.
  """
  setup()
  argv = [("--student_only=true" if a == "--student_only" else a)
          for a in (argv or sys.argv)]
  config, workdir, extras = parse(argv, "funmatch-eval",
                                  {"step": "checkpoint step (default: latest)",
                                   "output": "JSON file (default WORKDIR/eval_STEP.json)",
                                   "student_only": "evaluate the student alone (no teacher)"})

  def main():
    start_processes(extras)
    import jax  # pylint: disable=import-outside-toplevel
    from funmatch import fileio, parallel  # pylint: disable=import-outside-toplevel
    from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel
    from funmatch.train import build, evaluate  # pylint: disable=import-outside-toplevel
    step = _parse_step(extras["step"])
    student_only = _parse_bool("student_only", extras["student_only"])
    _check_reachable(workdir, extras["output"])
    mode = _mode_of(workdir)
    if not config.evals:
      raise UserError("the config has no config.evals to evaluate on")
    run, step = build.build_eval(config, mode, workdir, step, student_only=student_only)
    params = jax.device_put(run.models.student_params, parallel.replicated(run.mesh))
    results = {"step": step, **evaluate.Evaluator(run)(params)}
    output = extras["output"] or fileio.join(workdir, f"eval_{step}.json")
    if jax.process_index() == 0:
      print(evaluate.format_table(results), flush=True)
      evaluate.write_json(output, results)
      print(f"wrote {output}", flush=True)

  return guarded(main)


def _export_format(output: str, requested) -> str:
  """--format, or the one --output's suffix names."""
  from funmatch.weights import layouts  # pylint: disable=import-outside-toplevel
  from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel
  if requested:
    layouts.check_format(requested, output)
    return requested
  for format_name in ("npz", "safetensors"):
    if output.endswith(layouts.SUFFIXES[format_name]):
      return format_name
  raise UserError(f"--output {output} must end in .npz or .safetensors (the format "
                  "follows the suffix; --format timm writes a .safetensors)")


def export_main(argv=None) -> int:
  """funmatch-export: write the student's params (no teachers, no aux) with metadata."""
  setup()
  config, workdir, extras = parse(argv or sys.argv, "funmatch-export",
                                  {"step": "checkpoint step (default: latest)",
                                   "output": "the file to write (.npz or .safetensors)",
                                   "format": "npz | safetensors | timm (default: the "
                                             "--output suffix's)"})

  def main():
    from funmatch import fileio  # pylint: disable=import-outside-toplevel
    from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel
    from funmatch.train import build  # pylint: disable=import-outside-toplevel
    from funmatch.weights.stored import StoredModel  # pylint: disable=import-outside-toplevel
    output = extras["output"]
    if not output:
      raise UserError("--output FILE.npz (or .safetensors) is required")
    format_name = _export_format(output, extras["format"])
    process_id = start_processes(extras)
    _check_reachable(workdir, output)
    if fileio.exists(output):
      raise UserError(f"--output {output} already exists; choose another path or "
                      "remove it first (funmatch never overwrites an export)")
    step = _parse_step(extras["step"])
    build.validate(config, _mode_of(workdir))
    # Orbax reads collectively: every process restores, process 0 alone writes.
    stored = StoredModel.from_workdir(workdir, step)
    if process_id == 0:
      stored.export(output, format_name)
      print(f"wrote the student of step {stored.step} to {output} ({format_name})",
            flush=True)

  return guarded(main)


def fetch_main(argv=None) -> int:
  """funmatch-fetch: download published weights into the cache (needs network)."""
  setup(compile_cache=False)
  from funmatch.console import ArgumentParser  # pylint: disable=import-outside-toplevel
  parser = ArgumentParser(
      prog="funmatch-fetch",
      description="Downloads published weights by name into $FUNMATCH_CACHE/weights "
      "(default ~/.cache/funmatch/weights), where config.<model>.init=NAME finds them. "
      "Without names, lists the known ones.")
  parser.add_argument("names", nargs="*", metavar="NAME")
  parser.add_argument("--source", default="bucket", choices=("bucket", "hub"),
                      help="the public bucket's https mirror (default) or the timm hub")
  parser.add_argument("--sha256", default="", help="expected digest (one name only)")
  parser.add_argument("--force", action="store_true", help="download even if cached")
  args = parser.parse_args((argv or sys.argv)[1:])

  def main():
    from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel
    from funmatch.weights import catalog  # pylint: disable=import-outside-toplevel
    if not args.names:
      print(catalog.table(), flush=True)
      return 0
    if args.sha256 and len(args.names) > 1:
      raise UserError("--sha256 checks one file: give one NAME with it")
    for name in args.names:
      catalog.entry(name)  # every name is known before anything is downloaded
    for name in args.names:
      catalog.fetch(name, args.source, args.sha256, args.force,
                    progress=lambda line: print(line, flush=True))
    return 0

  return guarded(main)


def predict_main(argv=None) -> int:
  """funmatch-predict: classify image files with a student (workdir, export or name)."""
  setup()
  from funmatch.console import ArgumentParser  # pylint: disable=import-outside-toplevel
  parser = ArgumentParser(
      prog="funmatch-predict",
      description="Classifies .jpg/.png images with a trained student and prints the "
      "top classes; --output writes them as JSON. Needs neither the teacher nor the "
      "training data.")
  parser.add_argument("--model", required=True,
                      help="a workdir, a funmatch export or a published name")
  parser.add_argument("--images", required=True, nargs="+", help="image files or folders")
  parser.add_argument("--topk", type=int, default=5)
  parser.add_argument("--output", default="", help="JSON file to write")
  parser.add_argument("--step", type=int, default=None, help="workdir checkpoint step")
  args = parser.parse_args((argv or sys.argv)[1:])

  def main():
    from funmatch import predict  # pylint: disable=import-outside-toplevel
    return predict.run(args.model, args.images, args.topk, args.output, args.step)

  return guarded(main)
