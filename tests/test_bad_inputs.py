"""Every user mistake: exit code 2, one 'funmatch: error:' line, workdir untouched.

The cases are those of tools/badinput_sweep.py, run in-process here (cases that
need their own environment, e.g. two simulated devices, run in a subprocess).
"""
import sys

import pytest

from conftest import repo_path, run_cli
from funmatch.train import cli

sys.path.insert(0, repo_path("tools"))
import badinput_sweep as sweep  # pylint: disable=wrong-import-position


@pytest.fixture(scope="module")
def bench(tmp_path_factory, teacher_workdir):
  made = sweep.Bench(str(tmp_path_factory.mktemp("bench")), trained=teacher_workdir)
  yield made
  made.close()


def test_sweep_has_at_least_30_cases_with_unique_names():
  names = [case.name for case in sweep.CASES]
  assert len(names) >= 30 and len(set(names)) == len(names)


@pytest.mark.parametrize("case", sweep.CASES, ids=[case.name for case in sweep.CASES])
def test_bad_input(case, bench, tmp_path, capsys):
  def runner(tool, args, env):
    if env:
      return sweep.subprocess_runner(tool, args, env)
    return run_cli(getattr(cli, f"{tool}_main"), args, capsys)

  row = sweep.run_case(case, bench, str(tmp_path / "run"), runner)
  assert row.code == 2, row
  assert row.errors == 1 and not row.traceback, row
  assert row.matched, (case.match, row.message)
  assert not row.changed, row
