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
