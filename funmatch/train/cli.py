"""Console entry points: funmatch-distill, -train, -eval, -export, -predict, -fetch.

The first four take `--config FILE.py[:key=value,...]` (or a shipped recipe's
NAME[:key=value,...]; `--list-configs` lists them), `--workdir DIR` and any number
of `--config.a.b=value` overrides (the config is locked, so a mistyped key is an
error, not a new key). funmatch-predict and funmatch-fetch need no config: a
workdir, export or name says everything. User mistakes end in one line on stderr
and exit code 2.

This module stays light (no JAX, no TensorFlow) so that `--help` and flag
mistakes answer at once; each command imports its heavy body when it runs.
"""
import argparse
import logging
import sys
from typing import Any, Sequence

from funmatch import config_util, distributed, fileio, overrides
from funmatch.console import (ArgumentParser, add_verbose_flag, fail, guarded, print_listing,
                              setup)
from funmatch.errors import UserError
from funmatch.train import workdir as workdir_lib

# Keys that moved: a command line that uses the old name gets the new one.
MOVED_KEYS = {name: f"objective_args.{name}" for name in
              ("temperature", "distance", "ensemble", "label_smoothing")}

OVERRIDES_HELP = (
    "--config.a.b=VALUE (or --config.a.b VALUE) sets one key of the recipe's config; "
    "the value is read as the key's type (true/false, numbers, tuples as Python "
    "literals: --config.student.depth='(1,1,2,2)'). A recipe is a FILE.py or the NAME "
    "of one shipped in funmatch.configs (--list-configs).")


def integer(flag: str):
  """An argparse type: an int, or one line naming the flag."""
  def parse_int(text: str) -> int:
    try:
      return int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{flag}={text!r} must be an integer") from None
  return parse_int


def boolean(text: str) -> bool:
  """An argparse type for `--flag`, `--flag=true|false`."""
  lowered = text.strip().lower()
  if lowered not in ("true", "false", "1", "0", "yes", "no"):
    raise argparse.ArgumentTypeError(f"takes no value or true/false, got {text!r}")
  return lowered in ("true", "1", "yes")


def bool_flag(help_text: str) -> dict[str, Any]:
  """add_argument options of a boolean flag: `--name`, `--name=true|false`."""
  return dict(nargs="?", const=True, default=False, type=boolean, help=help_text)


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
  """Every config-taking command can run multi-host (funmatch.distributed)."""
  help_text = distributed.FLAGS
  parser.add_argument("--coordinator_address", metavar="HOST:PORT",
                      help=help_text["coordinator_address"])
  for name, metavar in (("num_processes", "N"), ("process_id", "I")):
    parser.add_argument(f"--{name}", type=integer(f"--{name}"), metavar=metavar,
                        help=help_text[name])


def config_parser(prog: str, description: str | None = None,
                  extra_flags: dict[str, dict[str, Any]] | None = None) -> ArgumentParser:
  """The flags of a config-taking command: --config, --workdir, --list-configs,
  --verbose, the multi-host flags and `extra_flags` (name -> add_argument options)."""
  parser = ArgumentParser(prog=prog, description=description, epilog=OVERRIDES_HELP,
                          allow_abbrev=False)
  parser.add_argument("--config", metavar="FILE.py|NAME[:key=value,...]",
                      help="the recipe, with its arguments after the colon")
  parser.add_argument("--workdir", metavar="DIR", help="run directory (local or gs://)")
  parser.add_argument("--list-configs", action="store_true",
                      help="list the recipes shipped with funmatch and exit")
  add_verbose_flag(parser)
  add_distributed_flags(parser)
  for name, options in (extra_flags or {}).items():
    parser.add_argument(f"--{name}", **options)
  return parser


def parse(argv: Sequence[str], prog: str, extra_flags: dict[str, dict[str, Any]],
          needs_workdir: bool = True, description: str | None = None):
  """Parses argv into (config, workdir, extras); user errors exit 2 in one line.

  Tools use it too (needs_workdir=False), so every command takes the same
  `--config FILE.py:args --config.a.b=value` overrides. extras holds the values of
  `extra_flags` and of the multi-host flags, by name. Calls console.setup() once
  the flags are read (--verbose) and before the recipe, which imports JAX, loads.
  """
  config_overrides, rest = overrides.split_argv(list(argv[1:]))
  parser = config_parser(prog, description, extra_flags)
  args = parser.parse_args(rest)
  if args.list_configs:
    print_listing(config_util.recipe_table())
  usage = " ".join(parser.format_usage().split()[1:])  # one line
  if not args.config:
    fail(f"--config is required (usage: {usage})")
  if needs_workdir and not args.workdir:
    fail(f"--workdir is required (usage: {usage})")
  setup(verbose=args.verbose)
  try:
    for what, path in (("--workdir", args.workdir), ("--output", getattr(args, "output", None))):
      if path:  # `gs:/b/run` would otherwise become a local folder named 'gs:'
        fileio.check_path(path, what)
    config = config_util.load_config(args.config)
    overrides.apply(config, config_overrides, MOVED_KEYS)
  except UserError as e:
    fail(str(e))
  names = [*(extra_flags or {}), *distributed.FLAGS]
  return config, args.workdir, {name: getattr(args, name) for name in names}


def start_processes(extras: dict[str, Any]) -> int:
  """Joins the other processes of a multi-host run before any device use.

  Returns this process's id; logs and console output come from process 0, the
  others report only warnings and errors.
  """
  process_id, _ = distributed.initialize(extras.get("coordinator_address"),
                                         extras.get("num_processes"),
                                         extras.get("process_id"))
  if process_id != 0:
    logging.getLogger().setLevel(logging.WARNING)
  return process_id


def _commands():
  """The command bodies (the trainer and JAX; TensorFlow once the config is valid),
  imported only once the flags and the config are known to be right."""
  from funmatch.train import commands  # pylint: disable=import-outside-toplevel
  return commands


def _train_like(mode: str, prog: str, argv, description: str) -> int:
  config, workdir, extras = parse(argv, prog, {}, description=description)

  def main():
    process_id = start_processes(extras)
    _commands().train(config, workdir, mode, show=process_id == 0)

  return guarded(main)


def distill_main(argv=None) -> int:
  """funmatch-distill: distil the configured teacher(s) into the student."""
  return _train_like("distill", "funmatch-distill", argv or sys.argv, distill_main.__doc__)


def train_main(argv=None) -> int:
  """funmatch-train: supervised training on labels (teachers, baselines)."""
  return _train_like("train", "funmatch-train", argv or sys.argv, train_main.__doc__)


def _check_reachable(workdir: str, output: str | None) -> None:
  """eval/export (e.g. from a workstation against a pod's bucket): the workdir and
  the output can be reached, before anything is read or written."""
  fileio.check_reachable(workdir, "--workdir")
  if output:
    fileio.check_reachable(output, "--output")


def _mode_of(workdir: str) -> str:
  stored = workdir_lib.read_config(workdir)
  if stored is None:
    raise UserError(f"--workdir {workdir} holds no funmatch run (no "
                    f"{workdir_lib.CONFIG_FILE}); point it to a training workdir")
  return stored["mode"]


STEP_FLAG = dict(type=integer("--step"), default=None, help="checkpoint step (default: latest)")


def eval_main(argv=None) -> int:
  """funmatch-eval: evaluate a checkpoint on the config's eval sets.

  Needs the eval sets and the teachers' weights (none with --student_only), not
  the training data.
  """
  config, workdir, extras = parse(
      argv or sys.argv, "funmatch-eval",
      {"step": STEP_FLAG,
       "output": dict(help="JSON file (default WORKDIR/eval_STEP.json)"),
       "student_only": bool_flag("evaluate the student alone (no teacher)")},
      description=eval_main.__doc__)

  def main():
    start_processes(extras)
    _check_reachable(workdir, extras["output"])
    mode = _mode_of(workdir)
    if not config.evals:
      raise UserError("the config has no config.evals to evaluate on")
    _commands().evaluate(config, workdir, mode, extras["step"], extras["output"],
                         student_only=extras["student_only"])

  return guarded(main)


def _export_format(output: str, requested) -> str:
  """--format, or the one --output's suffix names."""
  from funmatch.weights import layouts  # pylint: disable=import-outside-toplevel  (JAX: export only)
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
  config, workdir, extras = parse(
      argv or sys.argv, "funmatch-export",
      {"step": STEP_FLAG,
       "output": dict(help="the file to write (.npz or .safetensors)"),
       "format": dict(choices=("npz", "safetensors", "timm"),
                      help="default: the --output suffix's")},
      description=export_main.__doc__)

  def main():
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
    step = extras["step"]
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
  add_verbose_flag(parser)
  args = parser.parse_args((argv or sys.argv)[1:])
  setup(compile_cache=False, verbose=args.verbose)

  def main():
    from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel
    from funmatch.weights import catalog  # pylint: disable=import-outside-toplevel
    if not args.names:
      print_listing(catalog.table())
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
  add_verbose_flag(parser)
  args = parser.parse_args((argv or sys.argv)[1:])
  setup(verbose=args.verbose)

  def main():
    from funmatch import predict  # pylint: disable=import-outside-toplevel
    return predict.run(args.model, args.images, args.topk, args.output, args.step)

  return guarded(main)
