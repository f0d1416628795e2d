"""Exact resume from ArrayRecord TFDS through the trainer: kill -9, resume, and resume
with another process count; streaming still trains and says it is not exact.

The runs are tests/multiprocess_runs.py's scenario (conftest's `multiprocess_runs`,
shared with tests/test_multihost.py): the tiny digits student on the `jpeg_tfds`
dataset (40 JPEGs in 3 ArrayRecord shards), batch 8, 16 steps, a checkpoint every
4, in subprocesses with 2 CPU devices in all:

  reference  1 process x 2 devices, uninterrupted
  killed     1 process x 2 devices, kill -9 two steps past a checkpoint
  same       a copy of `killed`, resumed by 1 process x 2 devices
  two        a copy of `killed`, resumed by 2 processes x 1 device (gloo); SIGTERM'd
             once on the way and resumed again (tests/test_multihost.py's concern)

tests/recording_worker.py writes down the example ids of every batch the pipeline
hands the trainer; they are compared with the reference's, step by step.
"""
import logging

import numpy as np
import pytest

import tfds_testdata
from conftest import assert_same_state, run_cli
from funmatch import checkpoint
from funmatch.data import pipeline
from funmatch.train import cli, metrics_io
from multiprocess_runs import BATCH, SEED, STEPS, distill_args, logged_losses


@pytest.fixture(scope="module")
def runs(multiprocess_runs):
  """The scenario, every run of it successful; the batches of `two` are the resumed
  pair's over the stopped pair's (which read a few past its stop)."""
  runs, codes = multiprocess_runs, multiprocess_runs["codes"]
  assert [*codes["reference"], *codes["same"], *codes["stopped"], *codes["resumed"]] == \
      [0] * 6, "\n\n".join(text[-3000:] for text in runs["logs"].values())
  ids = {name: runs["ids"][name] for name in ("reference", "killed", "same")}
  ids["two"] = {**runs["ids"]["two_stopped"], **runs["ids"]["two_resumed"]}
  return {**runs, "killed_log": runs["logs"]["killed"], "ids": ids}


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
