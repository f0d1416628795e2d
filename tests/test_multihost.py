"""Multi-host runs: two processes on localhost equal one process, SIGTERM to one of
them stops both at the same step, bad settings fail in one line, and
tools/launch_tpu.sh builds the right commands.

The two processes (2 simulated CPU devices each, gloo collectives) share one
workdir, as the hosts of a pod share a filesystem; the reference is one process
with 4 devices. All three run at the same time, in subprocesses (a few minutes
on 2 CPU cores). The preempted pair runs after them and must resume to exactly
the uninterrupted pair's final state.
"""
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import TINY_STUDENT_ARG, assert_same_state, free_port, repo_path, run_cli
from funmatch import checkpoint
from funmatch.train import cli, metrics_io

LAUNCH_TPU = repo_path("tools", "launch_tpu.sh")
DISTILL = ("import sys; from funmatch.train import cli; "
           "sys.exit(cli.distill_main(['funmatch-distill', *sys.argv[1:]]))")


def distill_args(teacher_workdir: str, workdir: str) -> list[str]:
  arg = TINY_STUDENT_ARG.replace("steps=30", "steps=5") + f",teacher={teacher_workdir}"
  # Adam's first steps move a weight by about +-lr whatever the size of its
  # gradient, so float noise around a zero gradient (1e-9 vs -1e-9) would differ
  # by 2*lr; a larger eps keeps updates proportional to gradients and the
  # parameter comparison tight (with eps=1e-8 params differ by up to 1.3e-4).
  return ["--config", repo_path("configs", "digits.py") + ":" + arg, "--workdir", workdir,
          "--config.teacher.width=0.5", "--config.log_every_steps=1",
          "--config.eval_every_steps=0", "--config.checkpoint_every_steps=5",
          "--config.optax.eps=1e-3"]


# The two processes also shard the student (params + Adam state) over an fsdp
# axis spanning both, and keep the teacher replicated: both placements cross
# hosts in one run. The reference keeps the default (all replicated).
TWO_PROCESS_SHARDING = ["--config.mesh=(('data', -1), ('fsdp', 4))",
                        "--config.sharding.student=fsdp",
                        "--config.sharding.teachers=replicate",
                        "--config.sharding.fsdp_min_size=64"]


def start(args: list[str], devices: int, log_path: str) -> tuple[subprocess.Popen, object]:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("FUNMATCH_", "SLURM_", "OMPI_"))}  # no real cluster
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", FUNMATCH_INITIALIZATION_TIMEOUT="600")
  log = open(log_path, "w")  # pylint: disable=consider-using-with
  process = subprocess.Popen([sys.executable, "-c", DISTILL, *args], env=env,
                             stdout=log, stderr=subprocess.STDOUT, text=True)
  return process, log


@pytest.fixture(scope="module")
def runs(teacher_workdir, tmp_path_factory):
  """{'one': workdir of 1 process x 4 devices, 'two': of 2 processes x 2, 'logs': ...}."""
  root = tmp_path_factory.mktemp("multihost")
  one, two = str(root / "one"), str(root / "two")
  address = f"localhost:{free_port()}"
  started = [start(distill_args(teacher_workdir, one), 4, str(root / "one.log"))]
  for process_id in (0, 1):
    started.append(start(
        distill_args(teacher_workdir, two) + TWO_PROCESS_SHARDING + [
            "--coordinator_address", address, "--num_processes=2",
            f"--process_id={process_id}"], 2, str(root / f"two{process_id}.log")))
  deadline = time.monotonic() + 1200
  codes = []
  for process, log in started:
    try:
      codes.append(process.wait(timeout=max(deadline - time.monotonic(), 1)))
    except subprocess.TimeoutExpired:
      process.kill()
      codes.append(process.wait())
    log.close()
  logs = {name: (root / f"{name}.log").read_text() for name in ("one", "two0", "two1")}
  assert codes == [0, 0, 0], "\n\n".join(f"== {k}\n{v[-3000:]}" for k, v in logs.items())
  return {"one": one, "two": two, "logs": logs}


@pytest.fixture(scope="module")
def preempted(runs, teacher_workdir, tmp_path_factory):
  """The 'two' run again, with SIGTERM to process 1 alone after step 1, then resumed.

  Processes agree every 2 steps here (config.preemption_check_every_steps).
  """
  root = tmp_path_factory.mktemp("preempted")
  workdir = str(root / "run")
  args = distill_args(teacher_workdir, workdir) + TWO_PROCESS_SHARDING + [
      "--config.preemption_check_every_steps=2"]

  def start_both(name):
    address = f"localhost:{free_port()}"
    return [start(args + ["--coordinator_address", address, "--num_processes=2",
                          f"--process_id={i}"], 2, str(root / f"{name}{i}.log"))
            for i in (0, 1)]

  def finish(started, name):
    codes = []
    for process, log in started:
      try:
        codes.append(process.wait(timeout=900))
      except subprocess.TimeoutExpired:
        process.kill()
        codes.append(process.wait())
      log.close()
    return codes, [(root / f"{name}{i}.log").read_text() for i in (0, 1)]

  started = start_both("stopped")
  deadline = time.monotonic() + 900
  while not _train_rows_or_none(workdir):
    assert all(p.poll() is None for p, _ in started), "a process ended before step 1"
    assert time.monotonic() < deadline, "step 1 never logged"
    time.sleep(0.01)
  started[1][0].send_signal(signal.SIGTERM)  # process 1 only
  stopped_codes, stopped_logs = finish(started, "stopped")
  saved_when_stopped = checkpoint.saved_steps(workdir)
  resumed_codes, resumed_logs = finish(start_both("resumed"), "resumed")
  return {"workdir": workdir, "stopped": (stopped_codes, stopped_logs),
          "saved_when_stopped": saved_when_stopped, "resumed": (resumed_codes, resumed_logs)}


def _train_rows_or_none(workdir):
  try:
    return _train_rows(workdir)
  except FileNotFoundError:
    return None


def test_sigterm_to_one_process_stops_both_at_the_same_step(preempted):
  codes, logs = preempted["stopped"]
  assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
  stopped = [re.findall(r"funmatch: (SIGTERM received[^:]*): saved a checkpoint at step (\d+)",
                        log) for log in logs]
  assert stopped[0] == [("SIGTERM received by process 1", stopped[1][0][1])], logs[0][-3000:]
  assert stopped[1] == [("SIGTERM received", stopped[0][0][1])], logs[1][-3000:]
  step = int(stopped[0][0][1])
  assert step % 2 == 0 and step < 5  # at an agreement step, before the end
  assert preempted["saved_when_stopped"] == [step]


def test_preempted_two_process_run_resumes_bit_identically(preempted, runs):
  codes, logs = preempted["resumed"]
  assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
  assert checkpoint.saved_steps(preempted["workdir"])[-1] == 5
  assert_same_state(preempted["workdir"], runs["two"], 5)


def _train_rows(workdir):
  return [r for r in metrics_io.read_metrics(workdir) if "train/loss" in r]


def test_two_processes_match_one_process_with_as_many_devices(runs):
  one, two = _train_rows(runs["one"]), _train_rows(runs["two"])
  assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4, 5]
  for key in ("train/loss", "train/grad_norm", "train/update_norm"):
    np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one],
                               rtol=1e-5, atol=1e-6, err_msg=key)
  # The final eval reads its split on both hosts and reduces over all devices.
  final_one, final_two = metrics_io.read_metrics(runs["one"])[-1], \
      metrics_io.read_metrics(runs["two"])[-1]
  evals = sorted(k for k in final_one if k.startswith("test/") and k != "test/seconds")
  assert evals and evals == sorted(k for k in final_two
                                   if k.startswith("test/") and k != "test/seconds")
  assert final_one["test/seconds"] > 0 and final_two["test/seconds"] > 0
  np.testing.assert_allclose([final_two[k] for k in evals], [final_one[k] for k in evals],
                             rtol=1e-5, atol=1e-6)


def test_two_processes_write_the_same_checkpoint_and_layout(runs):
  assert checkpoint.saved_steps(runs["one"]) == checkpoint.saved_steps(runs["two"]) == [5]
  step_one, params_one = checkpoint.restore_params(runs["one"])
  step_two, params_two = checkpoint.restore_params(runs["two"])
  assert step_one == step_two == 5
  assert jax.tree.structure(params_one) == jax.tree.structure(params_two)
  for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_two)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)

  def layout(workdir):
    return sorted("events.out.tfevents" if n.startswith("events.out.tfevents") else n
                  for n in os.listdir(workdir))
  assert layout(runs["one"]) == layout(runs["two"])
  assert "metrics.jsonl" in layout(runs["two"]) and "config.json" in layout(runs["two"])


def test_only_process_0_prints_progress_and_the_table(runs):
  zero, other = runs["logs"]["two0"], runs["logs"]["two1"]
  assert "step 5/5" in zero and "test/student_top1" in zero
  assert "step 1/5" not in other and "test/student_top1" not in other


# ---------------------------------------------------------------------------
# Bad settings: one line, exit 2, before anything touches JAX or the workdir.


def _bad(tmp_path, capsys, monkeypatch, flags, env=None):
  for key in list(os.environ):
    if key.startswith(("FUNMATCH_", "SLURM_", "OMPI_")):  # no real cluster here
      monkeypatch.delenv(key)
  for key, value in (env or {}).items():
    monkeypatch.setenv(key, value)
  workdir = str(tmp_path / "run")
  # The teacher is never loaded: the settings are checked first.
  args = distill_args(str(tmp_path / "no_teacher"), workdir) + flags
  code, _, err = run_cli(cli.distill_main, args, capsys)
  lines = [l for l in err.splitlines() if l.startswith("funmatch: error:")]
  assert code == 2, err
  assert len(lines) == 1 and "Traceback" not in err, err
  assert not os.path.exists(workdir)
  return lines[0]


@pytest.mark.parametrize("flags, env, expected", [
    (["--num_processes=2", "--process_id=0"], None, "needs --coordinator_address"),
    ([], {"FUNMATCH_NUM_PROCESSES": "2", "FUNMATCH_PROCESS_ID": "1"},
     "needs --coordinator_address"),
    (["--coordinator_address=localhost:1234", "--num_processes=2"], None,
     "needs --process_id"),
    (["--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=2"],
     None, "--process_id=2 is outside [0, 2)"),
    (["--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=-1"],
     None, "outside [0, 2)"),
    (["--coordinator_address=localhost", "--num_processes=2", "--process_id=1"], None,
     "is not HOST:PORT"),
    (["--coordinator_address=localhost:http", "--num_processes=2", "--process_id=1"],
     None, "no valid port"),
    (["--coordinator_address=localhost:1234", "--num_processes=two", "--process_id=1"],
     None, "--num_processes='two' must be an integer"),
    (["--coordinator_address=localhost:1234", "--process_id=1"], None,
     "--num_processes is required"),
    ([], {"FUNMATCH_DISTRIBUTED": "yes"}, "must be 'auto' or 'off'"),
    ([], {"FUNMATCH_DISTRIBUTED": "auto"}, "jax.distributed failed"),
], ids=["no-coordinator", "env-no-coordinator", "no-process-id", "id-too-big",
        "id-negative", "no-port", "bad-port", "count-not-int", "no-count", "bad-mode",
        "auto-without-cluster"])
def test_bad_distributed_settings(tmp_path, capsys, monkeypatch,
                                  flags, env, expected):
  line = _bad(tmp_path, capsys, monkeypatch, flags, env)
  assert expected in line, line


def test_unreachable_coordinator_is_one_line(tmp_path, capsys, monkeypatch):
  address = f"localhost:{free_port()}"  # nobody listens there
  line = _bad(tmp_path, capsys, monkeypatch,
              [f"--coordinator_address={address}", "--num_processes=2",
               "--process_id=1"], {"FUNMATCH_INITIALIZATION_TIMEOUT": "2"})
  assert f"cannot reach the coordinator at {address} within 2 s" in line, line


def test_coordinator_port_in_use_is_one_line(tmp_path, capsys, monkeypatch):
  with socket.socket() as busy:
    busy.bind(("", 0))
    busy.listen()
    port = busy.getsockname()[1]
    line = _bad(tmp_path, capsys, monkeypatch,
                [f"--coordinator_address=localhost:{port}", "--num_processes=2",
                 "--process_id=0"])
  assert f"port {port} is already in use" in line, line


def test_coordinator_on_another_machine_is_one_line(tmp_path, capsys, monkeypatch):
  # 192.0.2.1 (TEST-NET-1) is never an address of this machine.
  line = _bad(tmp_path, capsys, monkeypatch,
              ["--coordinator_address=192.0.2.1:1234", "--num_processes=2",
               "--process_id=0"])
  assert "does not name this machine" in line, line


# ---------------------------------------------------------------------------
# tools/launch_tpu.sh (bash only: --dry_run prints the gcloud commands).


def launch(*args, env=None):
  return subprocess.run(["bash", LAUNCH_TPU, *args], capture_output=True, text=True,
                        timeout=60, check=False, env=env)


def test_launch_tpu_dry_run_prints_the_commands():
  result = launch("my-pod", "us-central2-b", "--project", "proj", "--setup", "jax[tpu]",
                  "--name", "run1", "--dry_run", "--", "funmatch-distill", "--config",
                  "configs/bit_i1k.py:teacher=gs://b/t", "--workdir", "gs://b/run1")
  assert result.returncode == 0, result.stderr
  lines = [shlex.split(line) for line in result.stdout.splitlines()]
  assert len(lines) == 2  # setup, then start
  for words in lines:
    assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod"]
    assert {"--zone=us-central2-b", "--worker=all", "--project=proj"} <= set(words)
  setup = lines[0][lines[0].index("--command") + 1]
  assert "pip install -U jax\\[tpu\\]" in setup
  command = lines[1][lines[1].index("--command") + 1]
  assert "nohup" in command and "FUNMATCH_DISTRIBUTED=auto" in command
  assert ("funmatch-distill --config configs/bit_i1k.py:teacher=gs://b/t --workdir "
          "gs://b/run1") in command
  assert "$HOME/funmatch_logs/run1-$(hostname).log" in command


def test_launch_tpu_remote_command_runs_the_exact_arguments(tmp_path):
  """What each worker runs, run here: arguments arrive unchanged, output in the log."""
  tricky = ["a b", "c'd", "$HOME", "e\"f"]
  result = launch("pod", "zone", "--name", "t", "--dry_run", "--", "sh", "-c",
                  'printf "%s|" "$FUNMATCH_DISTRIBUTED" "$@"', "sh", *tricky)
  assert result.returncode == 0, result.stderr
  words = shlex.split(result.stdout.splitlines()[-1])
  remote = words[words.index("--command") + 1]
  home = tmp_path / "home"
  home.mkdir()
  started = subprocess.run(["bash", "-c", remote], capture_output=True, text=True,
                           timeout=60, check=False,
                           env={"HOME": str(home), "PATH": os.environ["PATH"]})
  assert started.returncode == 0 and "started on" in started.stdout, started
  log = home / "funmatch_logs" / f"t-{socket.gethostname()}.log"
  for _ in range(100):  # the command runs in the background
    if log.exists() and log.read_text():
      break
    time.sleep(0.1)
  assert log.read_text() == "auto|" + "|".join(tricky) + "|"


@pytest.mark.parametrize("args, expected", [
    ([], "TPU_NAME and ZONE are required"),
    (["my-pod"], "TPU_NAME and ZONE are required"),
    (["my-pod", "zone", "--dry_run"], "no command to run"),
    (["my-pod", "zone", "--bogus", "--", "x"], "unknown option '--bogus'"),
    (["my-pod", "--dry_run", "--", "x"], "ZONE is missing"),
    (["my-pod", "zone", "--project"], "--project needs a value"),
    (["my-pod", "zone", "--mount", "b", "--", "x"], "give funmatch gs://BUCKET/... paths"),
])
def test_launch_tpu_missing_arguments_exit_2_with_usage(args, expected):
  result = launch(*args)
  assert result.returncode == 2
  assert expected in result.stderr and "usage:" in result.stderr
  assert result.stdout == ""


def test_multi_process_cpu_runs_compile_afresh():
  """Executables from the persistent cache time out gloo's first collective (a warm
  cache broke two-process CPU resumes), so CPU runs of several processes skip it."""
  from funmatch import distributed  # pylint: disable=import-outside-toplevel
  assert jax.default_backend() == "cpu"
  before = jax.config.jax_enable_compilation_cache
  try:
    jax.config.update("jax_enable_compilation_cache", True)
    distributed._no_compilation_cache_on_cpu()  # pylint: disable=protected-access
    assert not jax.config.jax_enable_compilation_cache
  finally:
    jax.config.update("jax_enable_compilation_cache", before)
