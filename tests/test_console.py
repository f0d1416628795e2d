"""The console helpers every command shares (funmatch/console.py)."""
import subprocess
import sys


def test_a_listing_read_by_a_reader_that_stops_early_ends_quietly():
  """`funmatch-distill --list-configs | head -1`: the reader closes the pipe; the
  listing ends with exit code 0 and no BrokenPipeError traceback."""
  code = "from funmatch import console; console.print_listing('recipe line\\n' * 20000)"
  process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
  process.stdout.read(1)  # the listing has started (240 kB: more than a pipe holds)
  process.stdout.close()  # the reader stops early, as head does
  _, err = process.communicate(timeout=60)
  assert process.returncode == 0, err
  assert err == b"", err.decode()


def test_verbose_lets_the_libraries_info_lines_through_and_default_keeps_them_out(monkeypatch):
  import logging  # pylint: disable=import-outside-toplevel
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  from funmatch import console  # pylint: disable=import-outside-toplevel
  names = ("absl", "orbax", "jax", "tensorflow")
  saved = {name: logging.getLogger(name).level for name in names}
  saved_absl = absl_logging.get_verbosity()
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")  # restored after the test
  monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
  try:
    console.setup(compile_cache=False)
    assert {logging.getLogger(n).level for n in names} == {logging.ERROR}
    console.setup(compile_cache=False, verbose=True)
    assert {logging.getLogger(n).level for n in names} == {logging.INFO}
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    console.setup(compile_cache=False)
    assert {logging.getLogger(n).level for n in names} == {logging.INFO}
  finally:
    for name, level in saved.items():
      logging.getLogger(name).setLevel(level)
    absl_logging.set_verbosity(saved_absl)


def test_the_demo_takes_verbose_like_every_command():
  from funmatch.train import demo  # pylint: disable=import-outside-toplevel
  assert demo._parse(["funmatch-demo", "--workdir", "w", "--verbose"]).verbose  # pylint: disable=protected-access
  assert not demo._parse(["funmatch-demo", "--workdir", "w"]).verbose  # pylint: disable=protected-access
