"""Exact resume from ArrayRecord TFDS through the trainer: kill -9, resume, and resume
with another process count; streaming still trains and says it is not exact.

The runs distil conftest's tiny digits teacher (10 classes) on the `jpeg_tfds`
dataset (tests/tfds_testdata.py: 40 JPEGs of 3 classes in 3 ArrayRecord shards)
with config.num_classes=10, out-of-domain as configs/food_sun.py does: function
matching never reads the labels, and no teacher is trained for these tests. Batch 8
(5 steps an epoch), 16 steps, a checkpoint every 4; subprocesses with 2 CPU devices
in all, as a user or a scheduler starts them:

  reference  1 process x 2 devices, uninterrupted
  killed     1 process x 2 devices, kill -9 two steps past a checkpoint
  same       a copy of `killed`, resumed by 1 process x 2 devices
  two        a copy of `killed`, resumed by 2 processes x 1 device (gloo)

tests/recording_worker.py writes down the example ids of every batch the pipeline
hands the trainer; they are compared with the reference's, step by step.
"""
import logging
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import recording_worker
import tfds_testdata
from conftest import (TINY_STUDENT_ARG, assert_same_state, cpu_process_env, free_port,
                      repo_path, run_cli, wait_all)
from funmatch import checkpoint
from funmatch.data import pipeline
from funmatch.train import cli, metrics_io

STEPS, CHECKPOINT_EVERY, BATCH, SEED = 16, 4, 8, 0
WORKER = repo_path("tests", "recording_worker.py")


def distill_args(teacher, data_dir, workdir, *extra, steps=STEPS):
  recipe = TINY_STUDENT_ARG.replace("steps=30", f"steps={steps}").replace(
      "batch_size=64", f"batch_size={BATCH}") + f",teacher={teacher}"
  return ["--config", repo_path("configs", "digits.py") + ":" + recipe,
          "--workdir", workdir, "--config.teacher.width=0.5", "--config.num_classes=10",
          "--config.input.source=tfds", f"--config.input.name={tfds_testdata.NAME}",
          f"--config.input.data_dir={data_dir}", f"--config.seed={SEED}",
          "--config.log_every_steps=1", "--config.eval_every_steps=0",
          f"--config.checkpoint_every_steps={CHECKPOINT_EVERY}",
          "--config.evals.test.max_examples=64", *extra]


def start(args, ids_prefix, devices, log_path, delay_s=0.0):
  """The recording worker in its own process with `devices` CPU devices."""
  log = open(log_path, "w")  # pylint: disable=consider-using-with
  process = subprocess.Popen([sys.executable, WORKER, ids_prefix, str(delay_s), *args],
                             env=cpu_process_env(devices), stdout=log,
                             stderr=subprocess.STDOUT, text=True)
  return process, log, log_path


def finish(started):
  """Waits for every process (tests/conftest.py's wait_all); all must succeed."""
  codes = wait_all([process for process, _, _ in started])
  for _, log, _ in started:
    log.close()
  logs = [open(path).read() for _, _, path in started]  # pylint: disable=consider-using-with
  assert codes == [0] * len(started), "\n\n".join(text[-3000:] for text in logs)
  return logs


def logged_losses(workdir):
  """{step: train/loss} of every logged step (a resumed run redoes a few)."""
  try:
    rows = metrics_io.read_metrics(workdir)
  except FileNotFoundError:
    return {}
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def kill_past_a_checkpoint(process, workdir, timeout=600):
  """kill -9 once a checkpoint is saved and two more steps are logged."""
  deadline = time.monotonic() + timeout
  while True:
    saved = checkpoint.saved_steps(workdir)
    if saved and max(logged_losses(workdir), default=0) >= saved[-1] + 2:
      break
    assert process[0].poll() is None, "the run finished before the kill point"
    assert time.monotonic() < deadline, "kill point never reached"
    time.sleep(0.003)
  process[0].send_signal(signal.SIGKILL)
  assert process[0].wait(timeout=120) == -signal.SIGKILL
  process[1].close()
  return saved[-1]


@pytest.fixture(scope="module")
def runs(teacher_workdir, jpeg_tfds, tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds_resume")
  data_dir = jpeg_tfds["array_record"]
  paths = {name: str(root / name) for name in ("reference", "killed", "same", "two")}

  def args(name):
    return distill_args(teacher_workdir, data_dir, paths[name])

  def ids(name):
    return str(root / f"{name}.ids")

  # The reference and the run to kill side by side; the slowed batches (0.3 s each)
  # leave time to kill two steps past a checkpoint. Two copies of the killed workdir
  # then resume: one with as many processes (while the reference finishes), one
  # with two processes of one device each (gloo), alone: gloo gives up when the two
  # reach their first collective more than 30 s apart, which a loaded machine can
  # cause.
  reference = start(args("reference"), ids("reference"), 2, str(root / "reference.log"))
  killed = start(args("killed"), ids("killed"), 2, str(root / "killed.log"), delay_s=0.3)
  resumed_from = kill_past_a_checkpoint(killed, paths["killed"])
  killed_log = open(killed[2]).read()  # pylint: disable=consider-using-with
  shutil.copytree(paths["killed"], paths["same"])
  shutil.copytree(paths["killed"], paths["two"])
  same = start(args("same"), ids("same"), 2, str(root / "same.log"))
  _, same_log = finish([reference, same])
  address = f"localhost:{free_port()}"
  two = [start(args("two") + ["--coordinator_address", address, "--num_processes=2",
                              f"--process_id={process_id}"],
               ids("two"), 1, str(root / f"two{process_id}.log"))
         for process_id in (0, 1)]
  logs = [same_log, *finish(two)]
  return {"paths": paths, "resumed_from": resumed_from, "killed_log": killed_log,
          "logs": dict(zip(("same", "two0", "two1"), logs)),
          "ids": {name: recording_worker.read_ids(ids(name)) for name in paths}}


def test_the_runs_read_array_record_files_by_index(runs):
  assert "ArrayRecord files read by index" in runs["killed_log"]
  assert "resume is exact" in runs["killed_log"]
  assert f"resumed from the checkpoint at step {runs['resumed_from']}" in \
      runs["logs"]["same"]
  assert 0 < runs["resumed_from"] < STEPS - 2


def test_reference_batches_are_the_index_stream(runs):
  """What the trainer got is the (seed, step) stream: epoch permutations of 40."""
  stream = np.concatenate([
      pipeline.epoch_permutation(SEED, e, tfds_testdata.NUM_TRAIN).numpy()
      for e in range(4)])
  reference = runs["ids"]["reference"]
  assert sorted(reference)[:STEPS] == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):
    assert reference[step] == stream[(step - 1) * BATCH:step * BATCH].tolist(), step


@pytest.mark.parametrize("resumed", ["same", "two"])
def test_killed_and_resumed_runs_saw_the_reference_batches(runs, resumed):
  """Every step's global batch, before the kill and after the resume (on one or
  two processes), holds the reference's examples in the reference's order."""
  reference, before, after = (runs["ids"][name] for name in ("reference", "killed",
                                                             resumed))
  start_step = runs["resumed_from"]
  assert min(after) == start_step + 1 and set(range(start_step + 1, STEPS + 1)) <= set(after)
  assert set(range(1, start_step + 3)) <= set(before)  # trained past the checkpoint
  for step, ids in [*before.items(), *after.items()]:
    if step <= STEPS:  # batches read ahead past the end were never trained
      assert ids == reference[step], step


@pytest.mark.parametrize("resumed", ["same", "two"])
def test_redone_steps_have_the_reference_losses(runs, resumed):
  """The steps logged by the killed run, redone after the resume, and the rest:
  every loss equals the reference's bit for bit."""
  reference = logged_losses(runs["paths"]["reference"])
  assert sorted(reference) == list(range(1, STEPS + 1))
  killed = logged_losses(runs["paths"]["killed"])
  assert max(killed) >= runs["resumed_from"] + 2
  resumed = logged_losses(runs["paths"][resumed])  # the killed run's rows + its own
  assert sorted(resumed) == list(range(1, STEPS + 1))
  for step, loss in [*killed.items(), *resumed.items()]:
    assert loss == reference[step], (step, loss, reference[step])


@pytest.mark.parametrize("resumed", ["same", "two"])
def test_final_state_is_bit_identical_to_the_uninterrupted_run(runs, resumed):
  """Params and optimizer state. With two devices either way, every all-reduce sums
  two numbers, which is exact in any order: gloo across processes gives the bits of
  one process."""
  assert_same_state(runs["paths"][resumed], runs["paths"]["reference"], STEPS)


def test_the_two_process_eval_counts_each_example_once(runs):
  final = [r for r in metrics_io.read_metrics(runs["paths"]["two"]) if "test/kl" in r][-1]
  reference = [r for r in metrics_io.read_metrics(runs["paths"]["reference"])
               if "test/kl" in r][-1]
  assert final["test/examples"] == reference["test/examples"] == 64  # max_examples
  assert final["test/student_top1"] == reference["test/student_top1"]


def test_streaming_trains_and_says_resume_is_not_exact(teacher_workdir, jpeg_tfds,
                                                       tmp_path, capsys, caplog):
  workdir = str(tmp_path / "run")
  for steps in (3, 5):  # the second run resumes from the first's last checkpoint
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="funmatch"):
      code, out, err = run_cli(cli.distill_main, distill_args(
          teacher_workdir, jpeg_tfds["tfrecord"], workdir, steps=steps), capsys)
    assert code == 0, err
    assert f"step {steps}/{steps}" in out
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("TFRecord files streamed" in w and "resume is NOT exact" in w
               and "convert_format" in w for w in warnings), warnings
  assert sorted(logged_losses(workdir)) == [1, 2, 3, 4, 5]
  assert checkpoint.saved_steps(workdir)[-1] == 5
