"""What every funmatch command (and tool) does at the console.

`setup()` quietens the libraries, sets up logging and the compilation cache; `guarded(main)` runs a
command so that a user's mistake (`UserError`) ends in one line
`funmatch: error: ...` and its exit code (2), never a traceback; `fail()` prints
that line and exits. `--verbose` (every command) or FUNMATCH_VERBOSE=1 lets the
libraries' info lines through.
"""
import argparse
import contextlib
import functools
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
from typing import Callable

VERBOSE_ENV = "FUNMATCH_VERBOSE"

# What TensorFlow's C++ libraries print on import through absl before anything can
# configure them (TF_CPP_MIN_LOG_LEVEL does not reach absl's own logging): the
# "before absl::InitializeLog()" notice and glog-style INFO lines such as oneDNN's.
_NATIVE_NOISE = re.compile(r"WARNING: All log messages before absl::InitializeLog\(\)"
                           r"|I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ ]+:\d+\] ")


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--verbose", action="store_true",
                      help=f"show the libraries' info lines too (or set {VERBOSE_ENV}=1)")


def verbose_requested(flag: bool = False) -> bool:
  return flag or os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def setup(compile_cache: bool = True, verbose: bool = False) -> None:
  """Quiet libraries and funmatch's own log format, before anything heavy is imported.

  compile_cache: point JAX's persistent compilation cache at <cache>/jax (commands
  that compile); funmatch-fetch compiles nothing and leaves JAX alone.
  verbose: keep TensorFlow's, absl's, Orbax's and JAX's info lines.
  """
  verbose = verbose_requested(verbose)
  # Read by TensorFlow's C++ logging when it loads: must be set before its import.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")
  if not verbose:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    _filter_native_lines_of_import("tensorflow")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                      datefmt="%H:%M:%S", stream=sys.stderr)
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  # Orbax and TF log routine events as warnings through absl; keep the console
  # for funmatch's own progress and for real errors.
  absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.ERROR)
  for name in ("absl", "orbax", "jax", "tensorflow"):
    logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
  if not getattr(sys.unraisablehook, "funmatch", False):
    sys.unraisablehook = _drop_closed_loop_noise(sys.unraisablehook)
  if compile_cache:
    from funmatch import cache  # pylint: disable=import-outside-toplevel
    cache.enable_compilation_cache()


def _filter_native_lines_of_import(name: str) -> None:
  """The first `import name` (wherever it happens) runs under `native_lines_filtered`."""
  if name not in sys.modules and not any(isinstance(f, _FilteredImport) and f.name == name
                                         for f in sys.meta_path):
    sys.meta_path.insert(0, _FilteredImport(name))


class _FilteredImport(importlib.abc.MetaPathFinder):
  """Finds `name` through the other finders, once, and wraps its module's execution."""

  def __init__(self, name: str):
    self.name = name

  def find_spec(self, fullname, path=None, target=None):
    if fullname != self.name:
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(fullname)
    if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
      spec.loader.exec_module = functools.partial(_exec_filtered, spec.loader.exec_module)
    return spec


def _exec_filtered(exec_module, module) -> None:
  with native_lines_filtered():
    exec_module(module)


@contextlib.contextmanager
def native_lines_filtered():
  """Drops the C++ libraries' start-up notices and INFO lines written to file
  descriptor 2 meanwhile; their warnings and errors (and Python's) are replayed."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors="replace").splitlines(keepends=True):
        if not _NATIVE_NOISE.match(line):
          sys.stderr.write(line)
      sys.stderr.flush()


def _drop_closed_loop_noise(previous):
  """Reads still in flight when an Orbax restore fails report to an asyncio loop
  that is already closed; harmless, but their tracebacks would follow the one-line
  error. Everything else goes to the previous hook."""
  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and "Event loop is closed" in str(unraisable.exc_value)):
      previous(unraisable)
  hook.funmatch = True
  return hook


def print_listing(text: str) -> None:
  """Prints a listing to stdout; a reader that stops early (`| head`) ends it quietly,
  as with any Unix listing, instead of a BrokenPipeError traceback."""
  try:
    print(text, flush=True)
  except BrokenPipeError:
    # Python flushes stdout again at exit; point it at /dev/null so that fails silently.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  raise SystemExit(0)


def fail(message: str, code: int = 2) -> None:
  print(f"funmatch: error: {message}", file=sys.stderr, flush=True)
  raise SystemExit(code)


def guarded(main: Callable[[], int | None]) -> int:
  """Runs `main`, turning user errors into one line and exit code 2 (or theirs)."""
  from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel
  try:
    return main() or 0
  except UserError as e:
    fail(str(e), getattr(e, "exit_code", 2))
  except KeyboardInterrupt:
    fail("interrupted", 130)
  return 0


def require_module(module: str, extra: str) -> None:
  """A one-line error naming the extra to install when an optional `module` is missing."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel
  if importlib.util.find_spec(module) is None:
    raise UserError(f"this needs the optional package '{module}': "
                    f"pip install 'funmatch[{extra}]'")


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage mistakes end like every other user error: one line, exit 2."""

  def error(self, message: str) -> None:
    fail(f"{message} (usage: {' '.join(self.format_usage().split()[1:])})")
