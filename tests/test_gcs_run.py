"""A run on gs:// end to end, against the Cloud Storage emulator the session starts.

The tiny digits student of conftest is distilled with `--workdir gs://BUCKET/...`
from a teacher workdir on gs://, stopped and killed with -9 in the middle, refused
to a second writer meanwhile, resumed at once (taking over the lease of the dead
run on this host, without waiting for its timeout), and must
end bit-identical to the uninterrupted local-disk run (`student_workdir`). Then
funmatch-eval and funmatch-export work on the gs:// workdir, tools/plot_metrics.py
reads its metrics from there, TensorBoard's events are there, and a damaged
checkpoint on gs:// is moved aside (copy, then delete) and redone exactly.

What the emulator cannot stand in for (TensorFlow's own GCS filesystem: TFDS
examples and streamed image-folder files on gs://) is listed in docs/cloud.md.
"""
import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid

import fsspec
import numpy as np
import pytest

import bad_inputs
from conftest import assert_same_state, repo_path, run_cli, distill_args
from funmatch import checkpoint, fileio, lease
from funmatch.train import cli, metrics_io

DISTILL = ("import sys; from funmatch.train import cli; "
           "sys.exit(cli.distill_main(['funmatch-distill', *sys.argv[1:]]))")
STEPS = 30  # conftest's tiny student: checkpoints at 10, 20, 30; logs every 5


def upload_tree(local_dir: str, url: str) -> str:
  """Copies a local workdir to `url` (not its flock file, which is local state)."""
  for directory, _, files in os.walk(local_dir):
    for name in files:
      if name != lease.LOCK_FILE:
        path = os.path.join(directory, name)
        fileio.upload_file(path, fileio.join(url, os.path.relpath(path, local_dir)))
  return url


def truncate_arrays(url: str) -> None:
  """Cuts every Orbax array object under `url` to 10 bytes (a damaged save)."""
  fs, key = fsspec.core.url_to_fs(url)
  for name in fs.find(key):
    if name.split("/")[-2] == "d":
      with fs.open(name, "wb") as f:
        f.write(b"0123456789")


def relative_objects(url: str) -> dict[str, int]:
  """{path below `url`: size} of every object under `url`."""
  fs, key = fsspec.core.url_to_fs(url)
  return {name[len(key):]: info["size"] for name, info in fs.find(key, detail=True).items()}


def logged_steps(workdir):
  try:
    return [r["step"] for r in metrics_io.read_metrics(workdir) if "train/loss" in r]
  except FileNotFoundError:
    return []


class Warnings(logging.Handler):
  """Collects the warnings logged while it is attached to the root logger."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def call(main, args):
  """A console entry point in-process: (exit code, stdout, stderr, warnings)."""
  out, err, warnings = io.StringIO(), io.StringIO(), Warnings()
  logging.getLogger().addHandler(warnings)
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        code = main(["prog", *args]) or 0
      except SystemExit as e:
        code = e.code or 0
  finally:
    logging.getLogger().removeHandler(warnings)
  return code, out.getvalue(), err.getvalue(), warnings.messages


@pytest.fixture(scope="module")
def gcs_run(gcs, teacher_workdir):
  """The interrupted and resumed gs:// run, and what each stage reported."""
  root = f"{gcs.root}/{uuid.uuid4().hex[:12]}"
  teacher = upload_tree(teacher_workdir, f"{root}/teacher")
  workdir = f"{root}/run"
  args = distill_args(teacher, workdir)
  seen = {"root": root, "teacher": teacher, "workdir": workdir, "args": args}
  with pytest.MonkeyPatch.context() as patch:
    # A lease fresh for 10 minutes: the second writer must find it in use, and the
    # resume right after the kill takes it over only because its holder ran on
    # this host and is gone (no wait for the timeout).
    patch.setenv(lease.TIMEOUT_ENV, "600")
    first = subprocess.Popen([sys.executable, "-c", DISTILL, *args],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
      deadline = time.monotonic() + 600
      while not (10 in checkpoint.saved_steps(workdir) and
                 max(logged_steps(workdir), default=0) >= 15):
        assert first.poll() is None, f"ended early:\n{first.stdout.read()}"
        assert time.monotonic() < deadline, "the run never got past step 15"
        time.sleep(0.1)
      first.send_signal(signal.SIGSTOP)  # frozen mid-run: it cannot finish meanwhile
      seen["second_writer"] = call(cli.distill_main, args)
    finally:
      first.send_signal(signal.SIGKILL)
      seen["first_output"] = first.communicate(timeout=60)[0]
    seen["first_code"] = first.returncode
    seen["killed_after"] = (checkpoint.saved_steps(workdir), logged_steps(workdir))
    seen["resume"] = call(cli.distill_main, args)
  return seen


def test_gcs_run_killed_and_resumed_equals_the_local_run(gcs_run, student_workdir):
  workdir = gcs_run["workdir"]
  assert gcs_run["first_code"] == -signal.SIGKILL, gcs_run["first_output"][-3000:]
  saved, logged = gcs_run["killed_after"]
  assert 10 in saved and STEPS not in saved and 15 <= max(logged) < STEPS
  code, out, err, warnings = gcs_run["resume"]
  assert code == 0, err[-3000:]
  assert any(f"taking over the lease {workdir}/.lock" in w and
             "that process ran on this host and is gone" in w for w in warnings), warnings
  assert f"step {STEPS}/{STEPS}" in out
  assert checkpoint.saved_steps(workdir) == [10, 20, 30]
  assert_same_state(workdir, student_workdir, STEPS)
  # The resumed run's metrics continue the killed run's in the same object.
  steps = logged_steps(workdir)
  assert steps[0] == 5 and steps[-1] == STEPS and set(steps) == {5, 10, 15, 20, 25, 30}
  assert not fileio.exists(f"{workdir}/.lock")  # released at the end
  bad_inputs.FAULT_ROWS.append((
      "gs://: kill -9, restarted at once on the same host", code,
      "(a warning: the lease's holder ran on this host and is gone)", True))


def test_gcs_second_writer_is_refused_naming_the_holder(gcs_run):
  code, _, err, _ = gcs_run["second_writer"]
  errors = [l for l in err.splitlines() if l.startswith("funmatch: error:")]
  assert code == 2 and len(errors) == 1, err[-3000:]
  assert f"--workdir {gcs_run['workdir']} is in use by another run" in errors[0]
  assert "pid" in errors[0] and "FUNMATCH_LEASE_TIMEOUT" in errors[0]


def test_gcs_tensorboard_events_are_in_the_bucket(gcs_run, tmp_path):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  workdir = gcs_run["workdir"]
  names = [n for n in fileio.listdir(workdir) if n.startswith(metrics_io.EVENTS_PREFIX)]
  assert len(names) == 2  # the killed run's and the resumed run's
  steps = set()
  for name in names:
    local = tmp_path / name
    local.write_bytes(fileio.read_bytes(fileio.join(workdir, name)))
    for event in tf.compat.v1.train.summary_iterator(str(local)):
      if any(v.tag == "train/loss" for v in event.summary.value):
        steps.add(event.step)
  assert {5, 10, 15, 20, 25, 30} <= steps


def test_gcs_eval_export_and_plot_from_the_bucket(gcs_run, capsys):
  workdir, root = gcs_run["workdir"], gcs_run["root"]
  config = gcs_run["args"][:2] + ["--config.teacher.width=0.5"]
  code, out, err = run_cli(cli.eval_main, [*config, "--workdir", workdir], capsys)
  assert code == 0, err
  results = json.loads(fileio.read_text(f"{workdir}/eval_{STEPS}.json"))
  final = metrics_io.read_metrics(workdir)[-1]  # the run's own final eval
  assert results["step"] == STEPS and results["test/examples"] == 445
  assert results["test/student_top1"] == pytest.approx(final["test/student_top1"])

  export = f"{root}/export/student.npz"
  code, out, err = run_cli(cli.export_main, [*config, "--workdir", workdir,
                                             f"--output={export}"], capsys)
  assert code == 0, err
  import funmatch  # pylint: disable=import-outside-toplevel
  from funmatch.weights import files, layouts  # pylint: disable=import-outside-toplevel
  _, params = checkpoint.restore_params(workdir)
  exported, expected = files.read(export).arrays, layouts.file_arrays("bit", params)
  assert sorted(exported) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), np.uint8)
  from_bucket = funmatch.load_student(workdir).predict(images)  # the gs:// workdir
  np.testing.assert_allclose(funmatch.load_student(export).predict(images), from_bucket,
                             rtol=1e-5, atol=1e-5)
  code, _, err = run_cli(cli.export_main, [*config, "--workdir", workdir,
                                           f"--output={export}"], capsys)
  assert code == 2 and "already exists" in err

  sys.path.insert(0, repo_path("tools"))
  try:
    import plot_metrics  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  curves = plot_metrics.load_curves(workdir, "test")
  assert len(curves["loss"]) == len(logged_steps(workdir))  # steps redone after the kill too
  assert curves["top1"] == [(pytest.approx(STEPS * 64 / 1352), final["test/student_top1"])]
  plot = f"{root}/plots/curves.png"
  assert plot_metrics.main([workdir, "--output", plot]) == 0
  assert fileio.read_bytes(plot).startswith(b"\x89PNG")


def test_gcs_damaged_checkpoint_is_moved_aside_and_redone(gcs, teacher_workdir,
                                                          student_workdir, capsys, caplog):
  workdir = upload_tree(student_workdir, f"{gcs.root}/{uuid.uuid4().hex[:12]}/run")
  damaged = f"{checkpoint.checkpoint_dir(workdir)}/{STEPS}"
  truncate_arrays(damaged)
  objects = relative_objects(damaged)
  with caplog.at_level(logging.WARNING):
    code, _, err = run_cli(cli.distill_main, distill_args(teacher_workdir, workdir), capsys)
  assert code == 0, err
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(f"[{STEPS}]" in w and "resuming from step 20" in w for w in warnings), warnings
  names = fileio.listdir(checkpoint.checkpoint_dir(workdir))
  aside = [n for n in names if n.startswith(f"corrupt-{STEPS}-")]
  assert len(aside) == 1 and {"10", "20", "30"} <= set(names)
  # Kept whole: every object of the damaged step, under its new name.
  assert relative_objects(f"{checkpoint.checkpoint_dir(workdir)}/{aside[0]}") == objects
  assert_same_state(workdir, student_workdir, STEPS)



def test_metrics_of_a_run_that_lost_its_lease_are_never_published(gcs):
  """Its whole-file uploads would replace the new holder's metrics.jsonl."""
  workdir = f"{gcs.root}/{uuid.uuid4().hex[:12]}/run"
  holds = True
  writer = metrics_io.make_writer(workdir, hold=type("Hold", (), {
      "lost": property(lambda self: None if holds else "taken over")})())
  writer.write_scalars(1, {"train/loss": 1.0})
  writer.flush()
  assert logged_steps(workdir) == [1]
  holds = False
  writer.write_scalars(2, {"train/loss": 0.5})
  writer.flush()
  writer.close()
  assert logged_steps(workdir) == [1]
  events = [n for n in fileio.listdir(workdir) if n.startswith(metrics_io.EVENTS_PREFIX)]
  assert len(events) == 1
