"""Never lose a day of training: kill -9 and resume, SIGTERM, corrupt checkpoints, locks.

conftest's tiny label-training run (`labels_args`: digits labels at 16px, 20 steps)
is interrupted at several points, each time resumed with the same command, and must end bit-identical
(params and optimizer state) to an uninterrupted run.
"""
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import bad_inputs
import conftest
from conftest import run_cli
from funmatch import checkpoint, lease
from funmatch.errors import UserError
from funmatch.train import cli, metrics_io
from funmatch.train import workdir as workdir_lib

STEPS = conftest.LABELS_STEPS
CHECKPOINT_EVERY = conftest.LABELS_CHECKPOINT_EVERY
train_args = conftest.labels_args


def start(workdir):
  """funmatch-train in its own process, as a user (or a scheduler) would start it."""
  code = ("import sys; from funmatch.train import cli; "
          "sys.exit(cli.train_main(['funmatch-train', *sys.argv[1:]]))")
  return subprocess.Popen([sys.executable, "-c", code, *train_args(workdir)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def logged_steps(workdir):
  try:
    return [r["step"] for r in metrics_io.read_metrics(workdir) if "train/loss" in r]
  except FileNotFoundError:
    return []


def tmp_checkpoints(workdir):
  directory = checkpoint.checkpoint_dir(workdir)
  return [n for n in os.listdir(directory) if "tmp" in n] if os.path.isdir(directory) else []


def kill_when(process, condition, sig=signal.SIGKILL, timeout=240):
  """Sends `sig` as soon as `condition()` holds (polled every few ms)."""
  deadline = time.monotonic() + timeout
  while not condition():
    assert process.poll() is None, f"finished before the kill point:\n{process.stdout.read()}"
    assert time.monotonic() < deadline, "kill point never reached"
    time.sleep(0.003)
  process.send_signal(sig)
  output, _ = process.communicate(timeout=120)
  return process.returncode, output


def assert_same_state(workdir, reference):
  conftest.assert_same_state(workdir, reference, STEPS)


@pytest.fixture
def reference(labels_reference):
  """The uninterrupted run (conftest's, shared with test_faults.py)."""
  return labels_reference


def test_killed_and_preempted_runs_resume_bit_identically(reference, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  # 1-2. kill -9 mid-run, after some steps, while the first checkpoint is being
  # written (Orbax's temporary directory): no checkpoint is complete, so the
  # next run starts from scratch (and its temporary directory is skipped).
  code, out = kill_when(start(workdir), lambda: tmp_checkpoints(workdir))
  assert code == -signal.SIGKILL, out
  assert logged_steps(workdir)  # it had trained
  before_checkpoints = checkpoint.saved_steps(workdir)
  # 3. kill -9 between checkpoints: two steps after the next finished one.
  last = max(checkpoint.saved_steps(workdir), default=0)
  seen = len(logged_steps(workdir))

  def past_a_new_checkpoint():
    new = [s for s in checkpoint.saved_steps(workdir) if s > last]
    return new and max(logged_steps(workdir)[seen:] or [0]) >= max(new) + 2

  code, out = kill_when(start(workdir), past_a_new_checkpoint)
  assert code == -signal.SIGKILL, out
  assert last < max(checkpoint.saved_steps(workdir)) < STEPS
  # 4. SIGTERM (preemption) in this process: checkpoint at the current step, exit 0.
  previous = signal.signal(signal.SIGTERM, lambda *_: None)  # if it lands after the run
  seen = len(logged_steps(workdir))
  sender = threading.Thread(target=_send_sigterm_after_next_log, args=(workdir, seen))
  sender.start()
  try:
    code, out, err = run_cli(cli.train_main, train_args(workdir), capsys)
  finally:
    sender.join()
    signal.signal(signal.SIGTERM, previous)
  assert code == 0, err
  assert "SIGTERM received: saved a checkpoint at step" in out
  stopped = int(out.split("saved a checkpoint at step ")[1].split(";")[0])
  assert stopped < STEPS and max(checkpoint.saved_steps(workdir)) == stopped
  # 5. The same command once more finishes the run.
  code, out, err = run_cli(cli.train_main, train_args(workdir), capsys)
  assert code == 0, err
  assert before_checkpoints == []  # run 1 died before its first checkpoint
  assert_same_state(workdir, reference)


def _send_sigterm_after_next_log(workdir, seen, timeout=240):
  deadline = time.monotonic() + timeout
  while len(logged_steps(workdir)) <= seen and time.monotonic() < deadline:
    time.sleep(0.003)
  os.kill(os.getpid(), signal.SIGTERM)


def test_corrupt_latest_checkpoint_falls_back_and_is_kept(reference, tmp_path, capsys,
                                                         caplog):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  latest = os.path.join(checkpoint.checkpoint_dir(workdir), str(STEPS))
  bad_inputs.truncate_checkpoint_arrays(latest)
  with caplog.at_level(logging.WARNING):
    code, _, err = run_cli(cli.train_main, train_args(workdir), capsys)
  assert code == 0, err
  previous = STEPS - CHECKPOINT_EVERY
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(f"[{STEPS}]" in w and f"resuming from step {previous}" in w
             for w in warnings), warnings
  # Kept (moved aside, not deleted), and the run redid the lost steps exactly.
  aside = [n for n in os.listdir(checkpoint.checkpoint_dir(workdir))
           if n.startswith(f"corrupt-{STEPS}-")]
  assert len(aside) == 1
  assert checkpoint.saved_steps(workdir)[-1] == STEPS
  assert_same_state(workdir, reference)


def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(reference, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  bad_inputs.truncate_checkpoint_arrays(checkpoint.checkpoint_dir(workdir))
  code, _, err = run_cli(cli.train_main, train_args(workdir), capsys)
  errors = [line for line in err.splitlines() if line.startswith("funmatch: error:")]
  assert code == 2 and len(errors) == 1, err
  assert "no checkpoint in" in errors[0] and checkpoint.checkpoint_dir(workdir) in errors[0]
  assert checkpoint.saved_steps(workdir) == checkpoint.saved_steps(reference)


def test_second_run_on_a_workdir_in_use_refuses(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from funmatch import lease; "
       "hold = lease.hold_workdir(sys.argv[1]); hold.__enter__(); print('held', flush=True); "
       "time.sleep(600)", workdir], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    code, _, err = run_cli(cli.train_main, train_args(workdir), capsys)
    errors = [line for line in err.splitlines() if line.startswith("funmatch: error:")]
    assert code == 2 and len(errors) == 1, err
    assert "in use by another run" in errors[0] and f"pid {holder.pid}" in errors[0]
    assert workdir in errors[0]
  finally:
    holder.kill()  # like kill -9: the kernel drops the lock with the process
    holder.wait()
  with lease.hold_workdir(workdir):  # a dead holder never blocks the next run
    pass


def test_resume_logs_the_changed_keys(tmp_path, caplog):
  from funmatch import config_util  # pylint: disable=import-outside-toplevel
  config = config_util.base_config()
  config.total_steps = 20
  workdir = str(tmp_path)
  workdir_lib.write_config(workdir, config, "train")
  config.total_steps = 30
  with caplog.at_level(logging.INFO):
    workdir_lib.check_resumable(workdir, config, "train")
  assert "resuming with changed total_steps: 20 -> 30" in caplog.text


def test_workdirs_older_than_the_data_and_eval_keys_resume(tmp_path, caplog):
  """A config.json written before input.random_access and evals.<name>.every_steps /
  max_examples existed resumes; the new keys are logged as changes."""
  import json  # pylint: disable=import-outside-toplevel
  from funmatch import config_util  # pylint: disable=import-outside-toplevel
  config = config_util.base_config()
  config.evals.test = config_util.eval_config("digits", "test", 64)
  workdir = str(tmp_path)
  workdir_lib.write_config(workdir, config, "train")
  path = tmp_path / workdir_lib.CONFIG_FILE
  stored = json.loads(path.read_text())
  del stored["config"]["input"]["random_access"]
  for key in ("every_steps", "max_examples"):
    del stored["config"]["evals"]["test"][key]
  path.write_text(json.dumps(stored))
  config.input.random_access = True
  config.evals.test.every_steps = 100
  with caplog.at_level(logging.INFO):
    workdir_lib.check_resumable(workdir, config, "train")
  assert "resuming with changed input.random_access: '<absent>' -> True" in caplog.text
  assert "resuming with changed evals.test.every_steps: '<absent>' -> 100" in caplog.text
  config.input.crop = "random"  # not resumable: it changes the run
  with pytest.raises(UserError, match="holds another run"):
    workdir_lib.check_resumable(workdir, config, "train")


def test_resume_accepts_another_conv_impl(tmp_path, caplog):
  """conv_impl only says how convolutions run: a run from before the option, or one
  started on another backend, resumes."""
  import json  # pylint: disable=import-outside-toplevel
  from funmatch import config_util  # pylint: disable=import-outside-toplevel
  config = config_util.base_config()
  workdir = str(tmp_path)
  workdir_lib.write_config(workdir, config, "train")
  path = tmp_path / workdir_lib.CONFIG_FILE
  stored = json.loads(path.read_text())
  for model in ("student", "teacher"):
    del stored["config"][model]["conv_impl"]  # written before the option existed
  path.write_text(json.dumps(stored))
  config.student.conv_impl = "xla"
  with caplog.at_level(logging.INFO):
    workdir_lib.check_resumable(workdir, config, "train")
  assert "resuming with changed student.conv_impl: '<absent>' -> 'xla'" in caplog.text
