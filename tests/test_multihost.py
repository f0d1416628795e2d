"""Multi-host runs: two processes on localhost equal one process bit for bit, SIGTERM
to one of them stops both at the same step, bad settings fail in one line, and
tools/launch_tpu.sh builds the right commands.

The runs are tests/multiprocess_runs.py's scenario (conftest's `multiprocess_runs`,
shared with tests/test_tfds_resume.py). The two processes (1 simulated CPU device
each, gloo collectives) share one workdir, as the hosts of a pod share a
filesystem; the reference is one process with 2 devices and the same mesh. With
two devices either way every reduction adds two numbers, which is exact in any
order, so the runs agree to the bit. The pair resumes a 1-process run killed at
step 4 or 8 (`two`), is stopped by SIGTERM to process 1 after its first step, and
is resumed by a second pair. The pairs share the persistent compilation cache
(funmatch/process_cache.py): the second pair loads the train step the first
compiled.
"""
import os
import re
import shlex
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from conftest import TINY_STUDENT_ARG, assert_same_state, free_port, repo_path, run_cli
from funmatch import checkpoint
from funmatch.train import cli, metrics_io
from multiprocess_runs import AGREE_EVERY, CHECKPOINT_EVERY, KEEP_CHECKPOINTS, STEPS

LAUNCH_TPU = repo_path("tools", "launch_tpu.sh")


@pytest.fixture(scope="module")
def runs(multiprocess_runs):
  """The scenario's reference (1 process x 2 devices) as `one` and its pair
  (2 processes x 1 device) as `two`, stopped and resumed."""
  paths = multiprocess_runs["paths"]
  return {**multiprocess_runs, "one": paths["reference"], "two": paths["two"]}


def _logs(runs, *names):
  return "\n\n".join(f"== {name}\n{runs['logs'][name][-3000:]}" for name in names)


def test_sigterm_to_one_process_stops_both_at_the_same_step(runs):
  assert runs["codes"]["stopped"] == [0, 0], _logs(runs, "two_stopped0", "two_stopped1")
  logs = [runs["logs"][f"two_stopped{i}"] for i in (0, 1)]
  stopped = [re.findall(r"funmatch: (SIGTERM received[^:]*): saved a checkpoint at step (\d+)",
                        log) for log in logs]
  assert stopped[0] == [("SIGTERM received by process 1", stopped[1][0][1])], logs[0][-3000:]
  assert stopped[1] == [("SIGTERM received", stopped[0][0][1])], logs[1][-3000:]
  step = int(stopped[0][0][1])
  # At an agreement step, after the steps the pair resumed, before the end.
  assert step % AGREE_EVERY == 0 and runs["resumed_from"] < step < STEPS
  assert runs["saved_when_stopped"] == [*runs["saved_when_killed"], step][-KEEP_CHECKPOINTS:]


def test_preempted_two_process_run_ends_bit_identical_to_one_process(runs):
  """Params, optimizer state, rng and step: across hosts and through the resume."""
  assert runs["codes"]["reference"] == [0], _logs(runs, "reference")
  assert runs["codes"]["resumed"] == [0, 0], _logs(runs, "two_resumed0", "two_resumed1")
  assert checkpoint.saved_steps(runs["two"])[-1] == STEPS
  assert_same_state(runs["two"], runs["one"], STEPS)


def _train_rows(workdir):
  return [r for r in metrics_io.read_metrics(workdir) if "train/loss" in r]


def test_two_processes_log_the_one_process_metrics(runs):
  one = _train_rows(runs["one"])
  # The killed run's rows, then the stopped pair's and the resumed pair's: the
  # last row of a step is the one kept.
  two = {r["step"]: r for r in _train_rows(runs["two"])}
  assert [r["step"] for r in one] == sorted(two) == list(range(1, STEPS + 1))
  for key in ("train/loss", "train/grad_norm", "train/update_norm"):
    assert [two[r["step"]][key] for r in one] == [r[key] for r in one], key
  # The final eval reads its split on both hosts and reduces over all devices.
  final_one, final_two = metrics_io.read_metrics(runs["one"])[-1], \
      metrics_io.read_metrics(runs["two"])[-1]
  evals = sorted(k for k in final_one if k.startswith("test/") and k != "test/seconds")
  assert evals and evals == sorted(k for k in final_two
                                   if k.startswith("test/") and k != "test/seconds")
  assert final_one["test/seconds"] > 0 and final_two["test/seconds"] > 0
  assert [final_two[k] for k in evals] == [final_one[k] for k in evals]


def test_two_processes_write_the_same_checkpoint_and_layout(runs):
  every = list(range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY))
  assert checkpoint.saved_steps(runs["one"]) == every[-KEEP_CHECKPOINTS:]
  step_one, params_one = checkpoint.restore_params(runs["one"])
  step_two, params_two = checkpoint.restore_params(runs["two"])
  assert step_one == step_two == STEPS
  assert jax.tree.structure(params_one) == jax.tree.structure(params_two)
  for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_two)):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a))

  def layout(workdir):
    return sorted({"events.out.tfevents" if n.startswith("events.out.tfevents") else n
                   for n in os.listdir(workdir)})
  assert layout(runs["one"]) == layout(runs["two"])
  assert "metrics.jsonl" in layout(runs["two"]) and "config.json" in layout(runs["two"])


def test_only_process_0_prints_progress_and_the_table(runs):
  logs, first = runs["logs"], f"step {runs['resumed_from'] + 1}/{STEPS}"
  assert first in logs["two_stopped0"] and first not in logs["two_stopped1"]
  last = f"step {STEPS}/{STEPS}"
  assert last in logs["two_resumed0"] and "test/student_top1" in logs["two_resumed0"]
  assert last not in logs["two_resumed1"] and "test/student_top1" not in logs["two_resumed1"]


def distill_args(teacher_workdir: str, workdir: str) -> list[str]:
  """A two-process run's arguments but for the distributed flags a test adds."""
  arg = TINY_STUDENT_ARG.replace("steps=30", "steps=5") + f",teacher={teacher_workdir}"
  return ["--config", repo_path("configs", "digits.py") + ":" + arg, "--workdir", workdir,
          "--config.teacher.width=0.5", "--config.log_every_steps=1",
          "--config.eval_every_steps=0", "--config.checkpoint_every_steps=5",
          "--config.optax.eps=1e-3", "--config.preemption_check_every_steps=2"]


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
  cache broke two-process CPU resumes), so CPU runs of processes that cannot share
  it (on several machines) skip it."""
  from funmatch import distributed  # pylint: disable=import-outside-toplevel
  assert jax.default_backend() == "cpu"
  before = jax.config.jax_enable_compilation_cache
  try:
    jax.config.update("jax_enable_compilation_cache", True)
    distributed._no_compilation_cache_on_cpu()  # pylint: disable=protected-access
    assert not jax.config.jax_enable_compilation_cache
  finally:
    jax.config.update("jax_enable_compilation_cache", before)


class _Device:  # what the accelerator hash reads of a jax Device
  platform, device_kind = "cpu", "cpu"

  def __init__(self, device_id, process_index):
    self.id, self.process_index = device_id, process_index


def _accelerator_hash(hash_fn, devices):
  import hashlib  # pylint: disable=import-outside-toplevel
  digest = hashlib.sha256()
  hash_fn(digest, np.array(devices, dtype=object))
  return digest.hexdigest()


def test_programs_spanning_processes_get_one_key_in_every_process():
  """The key of a program over both processes' devices names only the global
  devices; a program over one process's own devices keeps JAX's own key."""
  from funmatch import process_cache  # pylint: disable=import-outside-toplevel
  seen = []

  def jax_hash(hash_obj, accelerators):  # JAX's: a per-process topology fingerprint
    seen.append([d.id for d in accelerators.flat])
    hash_obj.update(b"fingerprint of this process")

  patched = process_cache._global_devices_hash(jax_hash)  # pylint: disable=protected-access
  both = [_Device(0, 0), _Device(2048, 1)]
  key = _accelerator_hash(patched, both)
  assert key == _accelerator_hash(patched, [_Device(0, 0), _Device(2048, 1)])
  assert key != _accelerator_hash(patched, [_Device(0, 0), _Device(1, 0), _Device(2048, 1)])
  assert key != _accelerator_hash(jax_hash, both) and not seen[:-1]
  assert _accelerator_hash(patched, [_Device(2048, 1)]) == _accelerator_hash(
      jax_hash, [_Device(2048, 1)])
  assert seen == [[0, 2048], [2048], [2048]]


def test_programs_of_one_process_bypass_the_cache_in_a_multi_process_run():
  """Process 0 would find them from single-process runs and process 1 not."""
  from funmatch import process_cache  # pylint: disable=import-outside-toplevel
  get_key = process_cache._spanning_processes_only(  # pylint: disable=protected-access
      lambda options, backend, computation, devices: "key")
  assert get_key(None, None, None, np.array([_Device(0, 0), _Device(2048, 1)])) == "key"
  assert get_key(None, None, None, np.array([_Device(2048, 1)])) is None
  assert get_key(None, None, None, np.array([_Device(0, 0), _Device(1, 0)])) is None


class _KeyValueStore:  # jax.distributed's client, for what process_cache asks of it
  def __init__(self, values):
    self.values = dict(values)

  def key_value_set(self, key, value):
    self.values[key] = value

  def blocking_key_value_get(self, key, timeout_ms):
    del timeout_ms
    return self.values[key]


def test_processes_share_compiled_programs_only_all_on_one_machine():
  from funmatch import process_cache  # pylint: disable=import-outside-toplevel
  here = (f"{socket.gethostname()}|"
          f"{os.path.realpath(jax.config.jax_compilation_cache_dir)}")
  agree = process_cache._all_processes_here  # pylint: disable=protected-access
  assert agree(_KeyValueStore({"funmatch/process_cache/1": here}), 0, 2)
  assert not agree(_KeyValueStore({"funmatch/process_cache/1": "other-host" + here}), 0, 2)
  store = _KeyValueStore({})
  assert agree(store, 0, 1) and store.values == {"funmatch/process_cache/0": here}
