"""Mesh sharding: 8 simulated devices give the 1-device loss trajectory for
replicated and FSDP states, arrays sit where config.sharding says, and a
checkpoint written on one mesh restores on another."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import repo_path, run_cli
from funmatch import checkpoint, parallel
from funmatch.weights import layouts
from funmatch.train import cli, metrics_io
from mesh_worker import config_args


def _env(devices: int) -> dict:
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
          "JAX_PLATFORMS": "cpu"}


def _losses(workdir: str) -> list[float]:
  return [r["train/loss"] for r in metrics_io.read_metrics(workdir) if "train/loss" in r]


def test_fsdp_spec_splits_the_largest_divisible_axis():
  assert parallel.fsdp_spec((3, 3, 16, 64), 4, 0) == P(None, None, None, "fsdp")
  assert parallel.fsdp_spec((64, 16), 4, 0) == P("fsdp")
  assert parallel.fsdp_spec((6, 10), 4, 0) == P()          # nothing divisible
  assert parallel.fsdp_spec((8, 8), 4, 0) == P("fsdp")     # tie: the first axis
  assert parallel.fsdp_spec((64, 16), 4, 2048) == P()      # under the size threshold
  assert parallel.fsdp_spec((64, 16), 1, 0) == P()         # no fsdp axis to split over


@pytest.fixture(scope="module")
def mesh_runs(teacher_workdir, tmp_path_factory):
  """Two 8-device runs in a subprocess and, while it runs, a 1-device run in this
  process."""
  out = tmp_path_factory.mktemp("mesh")
  reference = str(out / "one_device")
  with open(out / "worker.log", "w+") as log, subprocess.Popen(
      [sys.executable, repo_path("tests", "mesh_worker.py"), teacher_workdir, str(out),
       "replicate=data:-1/replicate", "fsdp=data:2,fsdp:4/fsdp"],
      env=_env(8), stdout=log, stderr=subprocess.STDOUT) as worker:
    try:
      assert cli.distill_main(["funmatch-distill", *config_args(
          teacher_workdir, reference, "data:-1", "replicate")]) == 0
      worker.wait(timeout=900)
    finally:
      worker.kill()
    log.seek(0)
    assert worker.returncode == 0, log.read()[-3000:]
  return out, reference


@pytest.mark.parametrize("variant", ["replicate", "fsdp"])
def test_eight_devices_match_one_device(mesh_runs, variant):
  out, reference = mesh_runs
  expected, got = _losses(reference), _losses(str(out / variant))
  assert len(expected) == len(got) == 5
  np.testing.assert_allclose(got, expected, rtol=2e-4)


def test_array_shardings_follow_the_config(mesh_runs):
  out, _ = mesh_runs
  replicated = json.load(open(out / "replicate.json"))
  assert all(entry["spec"] == [] for entry in replicated.values())
  fsdp = json.load(open(out / "fsdp.json"))
  sharded = 0
  for path, entry in fsdp.items():
    shape, spec = entry["shape"], entry["spec"]
    expected = parallel.fsdp_spec(shape, 4, 64)
    assert spec == [str(a) for a in expected], path
    sharded += "fsdp" in spec
  # Student params, their Adam moments and the teacher's kernels are all split.
  assert sharded > 0
  assert any("fsdp" in e["spec"] for p, e in fsdp.items() if p.startswith("['teacher']"))
  assert any("fsdp" in e["spec"] for p, e in fsdp.items() if p.startswith("['opt_state']"))
  assert fsdp["['step']"]["spec"] == []


def test_checkpoint_from_one_mesh_restores_on_another(mesh_runs, teacher_workdir, capsys):
  out, _ = mesh_runs
  # Written by 8 devices with FSDP, restored there (sharded) and here (1 device):
  # the same numbers, bit for bit.
  step, restored = checkpoint.restore_params(str(out / "fsdp"))
  assert step == 5
  on_eight = np.load(out / "fsdp_params.npz")
  on_one = layouts.flat_params(restored)
  assert sorted(on_one) == sorted(on_eight.files) and on_one
  for name, value in on_one.items():
    np.testing.assert_array_equal(value, on_eight[name], err_msg=name)
  # The 8-device FSDP run resumes in this 1-device process and goes on.
  workdir = str(out / "fsdp")
  args = config_args(teacher_workdir, workdir, "data:-1", "replicate")
  args[1] = args[1].replace("steps=5", "steps=6")
  code, _, err = run_cli(cli.distill_main, args, capsys)
  assert code == 0, err
  assert checkpoint.saved_steps(workdir)[-1] == 6


@pytest.mark.parametrize("overrides,message", [
    (["--config.sharding.student=zero3"], "unknown config.sharding.student='zero3'"),
    (["--config.sharding.teachers=fsdp"], "needs an 'fsdp' axis in config.mesh"),
    (["--config.mesh=(('data', 3),)"], "config.mesh"),
])
def test_bad_sharding_config_is_one_line(teacher_workdir, tmp_path, capsys, overrides,
                                         message):
  workdir = str(tmp_path / "run")
  args = config_args(teacher_workdir, workdir, "data:-1", "replicate")
  code, _, err = run_cli(cli.distill_main, [*args, *overrides], capsys)
  assert code == 2
  lines = [line for line in err.strip().splitlines() if line.startswith("funmatch: error")]
  assert len(lines) == 1 and message in lines[0], err
  assert not os.path.exists(workdir)


def test_batch_not_divisible_by_the_devices_is_one_line(teacher_workdir, tmp_path):
  workdir = str(tmp_path / "run")
  args = config_args(teacher_workdir, workdir, "data:-1", "replicate")
  args[1] = args[1].replace("batch_size=64", "batch_size=60")
  result = subprocess.run(["funmatch-distill", *args], env=_env(8), capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      "funmatch: error: config.input.batch_size=60 is not divisible by the 8 devices; "
      "use a multiple of 8")
  assert not os.path.exists(workdir)
