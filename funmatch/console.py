"""What every funmatch command (and tool) does at the console.

`setup()` quietens the libraries, sets up logging and the compilation cache; `guarded(main)` runs a
command so that a user's mistake (`UserError`) ends in one line
`funmatch: error: ...` and its exit code (2), never a traceback; `fail()` prints
that line and exits.
"""
import argparse
import logging
import os
import sys
from typing import Callable


def setup(compile_cache: bool = True) -> None:
  """Quiet libraries and funmatch's own log format, before anything heavy is imported.

  compile_cache: point JAX's persistent compilation cache at <cache>/jax (commands
  that compile); funmatch-fetch compiles nothing and leaves JAX alone.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                      datefmt="%H:%M:%S", stream=sys.stderr)
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  # Orbax and TF log routine events as warnings through absl; keep the console
  # for funmatch's own progress and for real errors.
  absl_logging.set_verbosity(absl_logging.ERROR)
  for name in ("absl", "orbax", "jax", "tensorflow"):
    logging.getLogger(name).setLevel(logging.ERROR)
  if not getattr(sys.unraisablehook, "funmatch", False):
    sys.unraisablehook = _drop_closed_loop_noise(sys.unraisablehook)
  if compile_cache:
    from funmatch import cache  # pylint: disable=import-outside-toplevel
    cache.enable_compilation_cache()


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
