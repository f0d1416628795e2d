"""The multi-process runs of the test suite, made once per session and shared by
tests/test_tfds_resume.py (exact resume from ArrayRecord) and tests/test_multihost.py
(two processes equal one): each subprocess start costs tens of seconds on 2 CPU
cores, so one scenario serves every test that asserts something about it.

Every run distils conftest's tiny digits teacher (10 classes) on the `jpeg_tfds`
dataset (tests/tfds_testdata.py: 40 JPEGs of 3 classes in 3 ArrayRecord shards)
with config.num_classes=10, out-of-domain as configs/food_sun.py does: function
matching never reads the labels. Batch 8 (5 steps an epoch), 16 steps, a checkpoint
every 4; the processes agree on a stop every 2 steps. The student (params + Adam
state) is sharded over an fsdp axis of 2 devices, the teacher replicated, so with
two processes both placements cross hosts. Subprocesses with 2 CPU devices in all,
as a user or a scheduler starts them (tests/recording_worker.py, which writes down
the example ids of every batch the pipeline hands the trainer):

  reference  1 process x 2 devices, uninterrupted
  killed     1 process x 2 devices, kill -9 two steps past a checkpoint
  same       a copy of `killed`, resumed by 1 process x 2 devices
  two        a copy of `killed`, resumed by 2 processes x 1 device (gloo), SIGTERM'd
             through process 1 after its first step ("stopped"), then resumed by the
             same command ("resumed")

With two devices either way every reduction adds two numbers, which is exact in
any order: gloo across processes gives the bits of one process. Adam's first
steps move a weight by about +-lr whatever the size of its gradient; a larger
eps keeps updates proportional to gradients, so a difference in the reductions
would show in the params, not vanish in noise. The pairs share compiled programs
through the persistent compilation cache (funmatch/process_cache.py).
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import recording_worker
import tfds_testdata
from conftest import TINY_STUDENT_ARG, cpu_process_env, free_port, repo_path, wait_all
from funmatch import checkpoint
from funmatch.train import metrics_io

STEPS, CHECKPOINT_EVERY, BATCH, SEED, AGREE_EVERY = 16, 4, 8, 0, 2
KEEP_CHECKPOINTS = 3  # config_util's default
WORKER = repo_path("tests", "recording_worker.py")
# The slowed runs wait this long before handing over each batch: time to stop
# them between two given steps.
SLOW_S = 0.3
# config.mesh and config.sharding: see the module docstring.
SHARDING = ("--config.mesh=(('data', -1), ('fsdp', 2))", "--config.sharding.student=fsdp",
            "--config.sharding.teachers=replicate", "--config.sharding.fsdp_min_size=64")


def distill_args(teacher, data_dir, workdir, *extra, steps=STEPS):
  """funmatch-distill arguments of the tiny student on the TFDS data in data_dir."""
  recipe = TINY_STUDENT_ARG.replace("steps=30", f"steps={steps}").replace(
      "batch_size=64", f"batch_size={BATCH}") + f",teacher={teacher}"
  return ["--config", repo_path("configs", "digits.py") + ":" + recipe,
          "--workdir", workdir, "--config.teacher.width=0.5", "--config.num_classes=10",
          "--config.input.source=tfds", f"--config.input.name={tfds_testdata.NAME}",
          f"--config.input.data_dir={data_dir}", f"--config.seed={SEED}",
          "--config.log_every_steps=1", "--config.eval_every_steps=0",
          f"--config.checkpoint_every_steps={CHECKPOINT_EVERY}",
          "--config.evals.test.max_examples=64", *extra]


def scenario_args(teacher, data_dir, workdir):
  return distill_args(teacher, data_dir, workdir, "--config.optax.eps=1e-3",
                      f"--config.preemption_check_every_steps={AGREE_EVERY}", *SHARDING)


def start(args, ids_prefix, devices, log_path, delay_s=0.0):
  """The recording worker in its own process with `devices` CPU devices."""
  log = open(log_path, "w")  # pylint: disable=consider-using-with
  process = subprocess.Popen([sys.executable, WORKER, ids_prefix, str(delay_s), *args],
                             env=cpu_process_env(devices), stdout=log,
                             stderr=subprocess.STDOUT, text=True)
  return process, log


def start_pair(args, ids_prefix, log_prefix, delay_s=0.0):
  """Two processes of one device each, joined through a coordinator."""
  address = f"localhost:{free_port()}"
  return [start(args + ["--coordinator_address", address, "--num_processes=2",
                        f"--process_id={i}"], ids_prefix, 1, f"{log_prefix}{i}.log",
                delay_s=delay_s) for i in (0, 1)]


def finish(started) -> list[int]:
  """The exit codes (tests/conftest.py's wait_all: a failed peer ends the others)."""
  codes = wait_all([process for process, _ in started])
  for _, log in started:
    log.close()
  return codes


def train_rows(workdir) -> int:
  """How many train rows metrics.jsonl holds (a resumed run appends to them)."""
  try:
    return sum("train/loss" in r for r in metrics_io.read_metrics(workdir))
  except FileNotFoundError:
    return 0


def logged_losses(workdir):
  """{step: train/loss} of every logged step (a resumed run redoes a few)."""
  try:
    rows = metrics_io.read_metrics(workdir)
  except FileNotFoundError:
    return {}
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _wait_for(condition, started, what, timeout=900):
  deadline = time.monotonic() + timeout
  while not condition():
    assert all(p.poll() is None for p, _ in started), f"a run ended before {what}"
    assert time.monotonic() < deadline, f"{what} never came"
    time.sleep(0.003)


def kill_past_a_checkpoint(started, workdir) -> int:
  """kill -9 once a checkpoint is saved and two more steps are logged; the step of
  that checkpoint."""
  def past_a_checkpoint():
    saved = checkpoint.saved_steps(workdir)
    return saved and max(logged_losses(workdir), default=0) >= saved[-1] + 2
  _wait_for(past_a_checkpoint, [started], "the kill point")
  saved = checkpoint.saved_steps(workdir)
  process, log = started
  process.send_signal(signal.SIGKILL)
  assert process.wait(timeout=120) == -signal.SIGKILL
  log.close()
  return saved[-1]


def run_all(teacher, data_dir, root) -> dict:
  """Runs the scenario in `root`; every path, log, exit code and batch of it."""
  names = ("reference", "killed", "same", "two")
  paths = {name: os.path.join(root, name) for name in names}

  def path(name):
    return os.path.join(root, name)

  def args(name):
    return scenario_args(teacher, data_dir, paths[name])

  # The reference and the run to kill side by side; the slowed batches leave time
  # to kill two steps past a checkpoint.
  reference = start(args("reference"), path("reference.ids"), 2, path("reference.log"))
  killed = start(args("killed"), path("killed.ids"), 2, path("killed.log"), delay_s=SLOW_S)
  resumed_from = kill_past_a_checkpoint(killed, paths["killed"])
  saved_when_killed = checkpoint.saved_steps(paths["killed"])
  shutil.copytree(paths["killed"], paths["same"])
  shutil.copytree(paths["killed"], paths["two"])
  # Two copies of the killed workdir resume: one with as many processes, one with
  # two processes of one device each, slowed so that SIGTERM to process 1 after
  # its first step lands before the second agreement step.
  same = start(args("same"), path("same.ids"), 2, path("same.log"))
  stopped = start_pair(args("two"), path("two_stopped.ids"), path("two_stopped"),
                       delay_s=SLOW_S)
  copied_rows = train_rows(paths["two"])
  _wait_for(lambda: train_rows(paths["two"]) > copied_rows, stopped,
            "the stopped pair's first step")
  stopped[1][0].send_signal(signal.SIGTERM)  # process 1 only
  codes = {"stopped": finish(stopped)}
  saved_when_stopped = checkpoint.saved_steps(paths["two"])
  codes["reference"], codes["same"] = ([code] for code in finish([reference, same]))
  codes["killed"] = [-signal.SIGKILL]
  # The same command again, alone: gloo gives up when two processes reach their
  # first collective more than 30 s apart, which a loaded machine can cause.
  codes["resumed"] = finish(start_pair(args("two"), path("two_resumed.ids"),
                                       path("two_resumed")))
  logs = {name[:-len(".log")]: open(path(name)).read()  # pylint: disable=consider-using-with
          for name in os.listdir(root) if name.endswith(".log")}
  ids = {name: recording_worker.read_ids(path(f"{name}.ids"))
         for name in ("reference", "killed", "same", "two_stopped", "two_resumed")}
  return {"paths": paths, "codes": codes, "logs": logs, "ids": ids,
          "resumed_from": resumed_from, "saved_when_killed": saved_when_killed,
          "saved_when_stopped": saved_when_stopped}
