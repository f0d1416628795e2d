"""Shared fixtures: tiny digits runs made once per test session."""
import os
import sys
import tempfile

import pytest

# One JAX compilation cache for the whole session and the subprocesses it starts:
# many tests compile the same tiny models and steps.
os.environ.setdefault("FUNMATCH_CACHE", os.path.join(tempfile.gettempdir(),
                                                     "funmatch-test-cache"))
os.environ.setdefault("PYTHONUNBUFFERED", "1")
from funmatch import cache  # pylint: disable=wrong-import-position

cache.enable_compilation_cache()

# Tiny models at 16px keep every end-to-end test fast on 2 CPU cores.
TINY_TEACHER_ARG = "steps=40,batch_size=64,res=16"
TINY_STUDENT_ARG = "steps=30,batch_size=64,res=16,teacher_res=16"
TINY_OVERRIDES = ("--config.log_every_steps=5", "--config.eval_every_steps=0",
                  "--config.checkpoint_every_steps=10")
TEACHER_OVERRIDES = ("--config.student.width=0.5", "--config.lr=0.003",
                     "--config.schedule.warmup_steps=10")


def pytest_addoption(parser):
  parser.addoption("--bad-input-table", default="",
                   help="write the markdown table of tests/bad_inputs.py's rows here")


def pytest_sessionfinish(session):
  """Appends the storage faults' rows (bad_inputs.FAULT_ROWS, from test_faults.py and
  test_gcs_run.py) to --bad-input-table, after the bad-input rows."""
  path = session.config.getoption("--bad-input-table")
  bad_inputs = sys.modules.get("bad_inputs")  # imported by the tests that add rows
  if path and bad_inputs and bad_inputs.FAULT_ROWS:
    with open(path, "a") as f:
      f.write("\n" + bad_inputs.fault_table(bad_inputs.FAULT_ROWS))


def repo_path(*parts: str) -> str:
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), *parts)


def run_cli(main, args, capsys):
  """Runs a console entry point in-process; returns (exit code, stdout, stderr)."""
  try:
    code = main(["prog", *args])
  except SystemExit as e:
    code = e.code
  captured = capsys.readouterr()
  return code or 0, captured.out, captured.err


# One tiny label-training run (configs/digits_labels.py at 16px, a checkpoint every
# 4 steps, a metrics line every step) that test_reliability.py and test_faults.py
# interrupt in many ways; each interrupted run must end bit-identical to
# `labels_reference`, the uninterrupted one, made once. 20 steps leave room for
# their kill points, and for 4 KiB of metrics after a disk fills up.
LABELS_STEPS = 20
LABELS_CHECKPOINT_EVERY = 4


def labels_args(workdir, log_every_steps=1):
  """funmatch-train arguments of that run in `workdir` (how often it logs leaves
  its state as it is: on gs://, where each log step uploads the metrics, less)."""
  return ["--config", repo_path("configs", "digits_labels.py") +
          f":steps={LABELS_STEPS},batch_size=32,res=16", "--workdir", workdir,
          f"--config.log_every_steps={log_every_steps}", "--config.eval_every_steps=0",
          f"--config.checkpoint_every_steps={LABELS_CHECKPOINT_EVERY}",
          "--config.evals.test.max_examples=64"]


@pytest.fixture(scope="session")
def labels_reference(tmp_path_factory):
  """The uninterrupted run of labels_args (read it, never write to it)."""
  from funmatch.train import cli
  workdir = str(tmp_path_factory.mktemp("labels_reference") / "run")
  assert cli.train_main(["funmatch-train", *labels_args(workdir)]) == 0
  return workdir


@pytest.fixture(scope="session")
def teacher_workdir(tmp_path_factory):
  """A tiny BiT teacher trained on digits labels with funmatch-train."""
  from funmatch.train import cli
  workdir = str(tmp_path_factory.mktemp("runs") / "teacher")
  code = cli.train_main(["funmatch-train", "--config",
                         repo_path("configs", "digits_teacher.py") + ":" + TINY_TEACHER_ARG,
                         "--workdir", workdir, *TEACHER_OVERRIDES, *TINY_OVERRIDES])
  assert code == 0
  return workdir


@pytest.fixture(scope="session")
def vit_teacher_workdir(tmp_path_factory):
  """A tiny ViT teacher (configs/digits_vit_teacher.py) trained on digits labels
  (the teacher of the TinyMIM, ViTKD and OFA-KD tests)."""
  from funmatch.train import cli
  workdir = str(tmp_path_factory.mktemp("runs") / "vit_teacher")
  code = cli.train_main(["funmatch-train", "--config",
                         repo_path("configs", "digits_vit_teacher.py") +
                         ":steps=30,batch_size=64,res=16",
                         "--workdir", workdir, "--config.lr=0.003",
                         "--config.schedule.warmup_steps=5", *TINY_OVERRIDES])
  assert code == 0
  return workdir


def free_port() -> int:
  """A TCP port nobody listens on now (a coordinator's, in multi-process tests)."""
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# Variables that would make a test subprocess join a real cluster.
CLUSTER_ENV = ("FUNMATCH_COORDINATOR_ADDRESS", "FUNMATCH_NUM_PROCESSES",
               "FUNMATCH_PROCESS_ID", "FUNMATCH_DISTRIBUTED")


def cpu_process_env(devices: int) -> dict:
  """The environment of a test subprocess with `devices` simulated CPU devices and
  no cluster settings from this machine (the compile cache and the rest are kept)."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_")) and k not in CLUSTER_ENV}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", FUNMATCH_INITIALIZATION_TIMEOUT="600")
  return env


def wait_all(processes, timeout: float = 900) -> list[int]:
  """The exit codes of `processes`. Once one fails (or time runs out) the others
  are killed: a multi-process run whose peer died would wait for it."""
  import time  # pylint: disable=import-outside-toplevel
  deadline = time.monotonic() + timeout
  while any(p.poll() is None for p in processes):
    if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in processes):
      for p in processes:
        if p.poll() is None:
          p.kill()
      break
    time.sleep(0.2)
  return [p.wait() for p in processes]


def train_state(workdir, step):
  """Every array of the train state saved at `step` (a path or gs://), by its key."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from funmatch import checkpoint, fileio
  path = fileio.join(checkpoint.checkpoint_dir(workdir), str(step), "default")
  with ocp.PyTreeCheckpointer() as checkpointer:
    # As host arrays: the state may have been saved from another device count.
    tree = checkpointer.metadata(path).item_metadata.tree
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)))
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(restored)[0]}


def assert_same_state(workdir, reference, step):
  """Params, optimizer state, rng and step of `step` equal the reference's, bit for bit."""
  import numpy as np
  want, got = train_state(reference, step), train_state(workdir, step)
  assert sorted(got) == sorted(want)
  assert any("opt_state" in key for key in want)
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def distill_args(teacher, workdir, *extra, steps=None):
  """funmatch-distill arguments: the tiny digits student of `teacher`."""
  arg = TINY_STUDENT_ARG + f",teacher={teacher}"
  if steps:
    arg = arg.replace("steps=30", f"steps={steps}")
  return ["--config", repo_path("configs", "digits.py") + ":" + arg,
          "--workdir", workdir, "--config.teacher.width=0.5", *TINY_OVERRIDES, *extra]


@pytest.fixture(scope="session")
def student_workdir(teacher_workdir, tmp_path_factory):
  """A tiny BiT student distilled from `teacher_workdir` with funmatch-distill."""
  from funmatch.train import cli
  workdir = str(tmp_path_factory.mktemp("student") / "run")
  assert cli.distill_main(["funmatch-distill", *distill_args(teacher_workdir, workdir)]) == 0
  return workdir


@pytest.fixture(scope="session")
def jpeg_tfds(tmp_path_factory):
  """One small TFDS dataset of JPEGs, prepared as ArrayRecord, as TFRecord and as
  both: {'array_record', 'tfrecord', 'both', 'jpegs': dir} (tests/tfds_testdata.py)."""
  import tfds_testdata  # pylint: disable=import-outside-toplevel
  return tfds_testdata.prepare_all(str(tmp_path_factory.mktemp("jpeg_tfds")))


@pytest.fixture(scope="session")
def multiprocess_runs(teacher_workdir, jpeg_tfds, tmp_path_factory):
  """tests/multiprocess_runs.py's scenario (one process and two; killed, stopped,
  resumed), shared by test_tfds_resume.py and test_multihost.py."""
  import multiprocess_runs as scenario  # pylint: disable=import-outside-toplevel
  return scenario.run_all(teacher_workdir, jpeg_tfds["array_record"],
                          str(tmp_path_factory.mktemp("multiprocess")))


@pytest.fixture(scope="session")
def gcs():
  """A Cloud Storage emulator for the whole session (tests/gcs_emulator.py);
  `gcs.root` is gs://BUCKET, and the environment points every layer at it."""
  from gcs_emulator import running_emulator  # pylint: disable=import-outside-toplevel
  with running_emulator() as emulator:
    yield emulator
