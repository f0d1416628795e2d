"""Every user mistake: exit code 2, one 'funmatch: error:' line, workdir untouched.

The cases are tests/bad_inputs.py, run in-process here (cases that need their own
environment, e.g. two simulated devices, run in a subprocess). With
`--bad-input-table FILE` the session also writes the markdown table of every row.
"""
import pytest

import bad_inputs
from conftest import run_cli
from funmatch.train import cli

ROWS = []


@pytest.fixture(scope="module")
def bench(tmp_path_factory, teacher_workdir, jpeg_tfds, gcs):
  made = bad_inputs.Bench(str(tmp_path_factory.mktemp("bench")), trained=teacher_workdir,
                          jpeg_tfds=jpeg_tfds, bucket=gcs.root)
  yield made
  made.close()


@pytest.fixture(scope="module", autouse=True)
def table(request):
  yield
  path = request.config.getoption("--bad-input-table")
  if path and ROWS:
    with open(path, "w") as f:
      f.write(bad_inputs.markdown_table(ROWS))


def test_there_are_at_least_30_cases_with_unique_names():
  names = [case.name for case in bad_inputs.CASES]
  assert len(names) >= 30 and len(set(names)) == len(names)


@pytest.mark.parametrize("case", bad_inputs.CASES, ids=[c.name for c in bad_inputs.CASES])
def test_bad_input(case, bench, tmp_path, capsys):
  def runner(tool, args, env):
    if env:
      return bad_inputs.subprocess_runner(tool, args, env)
    return run_cli(getattr(cli, f"{tool}_main"), args, capsys)

  row = bad_inputs.run_case(case, bench, str(tmp_path / "run"), runner)
  ROWS.append(row)
  assert row.code == 2, row
  assert row.errors == 1 and not row.traceback, row
  assert row.matched, (case.match, row.message)
  assert not row.changed, row
