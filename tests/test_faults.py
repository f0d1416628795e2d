"""Storage that fails in the middle of a run: real faults, one line, exact resume.

One tiny label-training run (configs/digits_labels.py at 16px, 8 steps, a
checkpoint every 4) meets faults the kernel or a proxy really produces, no mocks:
- a disk that fills up (a tmpfs with room for one checkpoint, not two), then a
  checkpoints directory the OS makes read-only (a read-only bind remount);
- on gs://: kill -9 and an immediate restart on this host (the dead run's lease is
  taken over at once), then Cloud Storage answering 503 for longer than the retry
  bound (tests/storage_proxy.py in front of the emulator), then a 503 burst
  shorter than the bound.
Each fault ends in one `funmatch: error:` line with exit code 4 and no
traceback, and the same command afterwards ends bit-identical to one
uninterrupted run (`reference`, shared by all tests here).
"""
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

import bad_inputs
import conftest
from conftest import repo_path, run_cli
from funmatch import checkpoint, fileio
from funmatch.train import cli, metrics_io

STEPS = 8
CHECKPOINT_EVERY = 4
TRAIN = ("import sys; from funmatch.train import cli; "
         "sys.exit(cli.train_main(['funmatch-train', *sys.argv[1:]]))")


def train_args(workdir):
  return ["--config", repo_path("configs", "digits_labels.py") +
          f":steps={STEPS},batch_size=32,res=16", "--workdir", workdir,
          "--config.log_every_steps=1", "--config.eval_every_steps=0",
          f"--config.checkpoint_every_steps={CHECKPOINT_EVERY}",
          "--config.evals.test.max_examples=64"]


def start(workdir, env=None):
  """funmatch-train in its own process, as a user would start it."""
  return subprocess.Popen([sys.executable, "-c", TRAIN, *train_args(workdir)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**(env or os.environ), "PYTHONPATH": repo_path()})


# (fault, exit code, its line, resumed bit-identically) for the bad-input sweep's
# table (`--bad-input-table FILE` appends them to FILE; docs/reliability.md).
ROWS = []


@pytest.fixture(scope="module", autouse=True)
def table(request):
  yield
  path = request.config.getoption("--bad-input-table")
  if path and ROWS:
    with open(path, "a") as f:
      f.write("\n" + bad_inputs.fault_table(ROWS))


def _resumed(names):
  """Marks the rows of `names` resumed (after their bit-identity check passed)."""
  for i, row in enumerate(ROWS):
    if row[0] in names:
      ROWS[i] = (*row[:3], True)


def the_error(code, output, fault):
  """The one `funmatch: error:` line of a storage fault (exit code 4, no traceback)."""
  errors = [line for line in output.splitlines() if line.startswith("funmatch: error:")]
  assert code == fileio.STORAGE_EXIT_CODE and len(errors) == 1, output[-3000:]
  assert "Traceback" not in output and "Exception ignored" not in output, output[-3000:]
  ROWS.append((fault, code, errors[0], False))
  return errors[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  assert cli.train_main(["funmatch-train", *train_args(workdir)]) == 0
  return workdir


def _mount(*args):
  subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def tmpfs(path, size_bytes):
  """A tmpfs of `size_bytes` mounted at `path` (root only; skips where impossible)."""
  os.makedirs(path, exist_ok=True)
  try:
    _mount("-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", path)
  except (OSError, subprocess.CalledProcessError) as e:
    pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): "
                f"{getattr(e, 'stderr', '') or e}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-R", "-l", path], check=False, capture_output=True)


def _size(directory):
  return sum(os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(directory) for f in files)


def test_full_disk_then_read_only_checkpoints_resume_bit_identically(reference, tmp_path,
                                                                    capsys):
  one_checkpoint = _size(os.path.join(checkpoint.checkpoint_dir(reference), "4"))
  disk = tmp_path / "disk"
  with tmpfs(str(disk), int(one_checkpoint * 1.5)):
    workdir = str(disk / "run")
    directory = checkpoint.checkpoint_dir(workdir)
    # 1. The disk fills up while checkpoint 8 is written (its own process: the
    # noise of Orbax's threads and coroutines would show at interpreter exit).
    process = start(workdir)
    output, _ = process.communicate(timeout=600)
    assert the_error(process.returncode, output, "disk full while saving a checkpoint") == (
        f"funmatch: error: no space left on device while saving checkpoint 8 to "
        f"{directory}; the last complete checkpoint is step 4; free space and run the "
        "same command to resume")
    assert checkpoint.saved_steps(workdir) == [4]
    # 2. Space is freed, but the OS now refuses writes to the checkpoints.
    _mount("-o", f"remount,size={one_checkpoint * 4}", str(disk))
    _mount("--bind", directory, directory)
    _mount("-o", "remount,bind,ro", directory)
    code, _, err = run_cli(cli.train_main, train_args(workdir), capsys)
    error = the_error(code, err, "checkpoints directory remounted read-only")
    assert "the file system is read-only while saving checkpoint 8 to" in error, error
    assert "the last complete checkpoint is step 4" in error
    assert checkpoint.saved_steps(workdir) == [4]
    # 3. Writable again: the same command finishes the run exactly.
    subprocess.run(["umount", directory], check=True)
    code, _, err = run_cli(cli.train_main, train_args(workdir), capsys)
    assert code == 0, err
    conftest.assert_same_state(workdir, reference, STEPS)
  _resumed({"disk full while saving a checkpoint", "checkpoints directory remounted read-only"})


@pytest.fixture
def proxied_gcs(gcs, monkeypatch):
  """The session's emulator behind a fresh StorageProxy: every client in this
  process and its children talks to the proxy."""
  from funmatch import gcs_retry  # pylint: disable=import-outside-toplevel
  import storage_proxy  # pylint: disable=import-outside-toplevel
  proxy = storage_proxy.StorageProxy(gcs.url)
  for key, value in proxy.environment(gcs.environment()).items():
    monkeypatch.setenv(key, value)
  gcs_retry.RetryingGCSFileSystem.clear_instance_cache()  # built with the old URL
  try:
    yield gcs, proxy
  finally:
    proxy.stop()
    gcs_retry.RetryingGCSFileSystem.clear_instance_cache()


def _wait_for(condition, process, what, limit_s=300):
  deadline = time.monotonic() + limit_s
  while not condition():
    assert process.poll() is None, f"exited before {what}:\n{process.stdout.read()}"
    assert time.monotonic() < deadline, f"gave up waiting for {what}"
    time.sleep(0.05)


def test_gcs_kill9_outage_and_503_burst_resume_bit_identically(reference, proxied_gcs,
                                                               monkeypatch, capsys, caplog):
  gcs, proxy = proxied_gcs
  workdir = f"{gcs.root}/{uuid.uuid4().hex[:12]}/run"
  directory = checkpoint.checkpoint_dir(workdir)
  # 1. kill -9 once checkpoint 4 is complete; the restart follows at once, with no
  # wait for the lease timeout: its holder ran on this host and is gone.
  monkeypatch.setenv(fileio.RETRY_ENV, "3")
  process = start(workdir)
  try:
    _wait_for(lambda: checkpoint.saved_steps(workdir), process, "checkpoint 4")
  finally:
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=120)
  assert checkpoint.saved_steps(workdir) == [4]  # killed before it saved step 8
  # 2. Cloud Storage answers 503 to checkpoint 8's array writes for longer than
  # the retry bound (3 s): one line; checkpoint 4 stays the last complete one.
  outage = proxy.fail(r"uploadType=media&name=[^&]*checkpoints%2F8%2F")
  with caplog.at_level(logging.WARNING):
    code, _, err = run_cli(cli.train_main, train_args(workdir), capsys)
  assert any("that process ran on this host and is gone" in r.getMessage()
             for r in caplog.records), caplog.text
  error = the_error(code, err, "gs://: 503 for longer than the retry bound (3 s)")
  assert error == (
      "funmatch: error: too many retries (storage kept failing for 3 s) while saving "
      f"checkpoint 8 to {directory}; the last complete checkpoint is step 4; check the "
      "network and the storage service, or allow longer (FUNMATCH_STORAGE_RETRY_S, "
      "default 300 s) and run the same command to resume"), error
  assert outage.answered > 1  # tensorstore retried before it gave up
  assert checkpoint.saved_steps(workdir) == [4]
  assert not fileio.exists(f"{workdir}/.lock")  # released
  # 3. A burst of 503s on every kind of request, shorter than the bound: the run
  # only takes longer, and ends exactly as the uninterrupted one.
  proxy.clear()
  monkeypatch.setenv(fileio.RETRY_ENV, "60")
  bursts = [proxy.fail(r"uploadType=media&name=[^&]*checkpoints", 2),  # tensorstore
            proxy.fail(r"uploadType=(resumable|multipart)", 2),  # gcsfs, the lease
            proxy.fail(r"/download/", 2)]  # reads
  code, _, err = run_cli(cli.train_main, train_args(workdir), capsys)
  assert code == 0, err
  assert [b.answered for b in bursts] == [2, 2, 2]
  assert checkpoint.saved_steps(workdir) == [4, 8]
  conftest.assert_same_state(workdir, reference, STEPS)
  assert max(r["step"] for r in metrics_io.read_metrics(workdir)) == STEPS
  _resumed({"gs://: 503 for longer than the retry bound (3 s)"})
  ROWS.append(("gs://: kill -9, restarted at once on the same host", 0,
               "(a warning: the lease's holder ran on this host and is gone)", True))
  ROWS.append(("gs://: a burst of 503s within the retry bound", 0, "(none: it took longer)",
               True))


def test_the_retry_policy_is_bounded_and_configurable(monkeypatch):
  monkeypatch.setenv(fileio.RETRY_ENV, "20")
  policy = fileio.retry_policy()
  assert policy.total_s == 20 and policy.max_retries() == 4  # 1 + 2 + 4 + 8 <= 20 s
  steps = [min(policy.initial_s * 2 ** i, policy.max_delay_s) for i in range(8)]
  for attempt, step in enumerate(steps):
    assert step / 2 <= policy.delay(attempt) <= step  # jittered, never above the step
  assert policy.tensorstore_context() == {"gcs_request_retries": {
      "max_retries": 4, "initial_delay": "1.0s", "max_delay": "32.0s"}}
  assert policy.gcs_retry()._timeout == 20  # pylint: disable=protected-access
  monkeypatch.setenv(fileio.RETRY_ENV, "soon")
  with pytest.raises(fileio.UserError, match="FUNMATCH_STORAGE_RETRY_S='soon' is not a"):
    fileio.retry_policy()


def test_storage_causes_are_said_in_plain_words():
  def cause(e):
    return fileio.storage_cause(e)[0]
  assert cause(OSError(28, "No space left on device")) == "no space left on device"
  assert cause(OSError(30, "Read-only file system")) == "the file system is read-only"
  assert cause(PermissionError(13, "Permission denied")) == "permission denied"
  # tensorstore's words, raised by Orbax as ValueError
  assert cause(ValueError("RESOURCE_EXHAUSTED: ... Failed to write 13250560 bytes to "
                          "file 17: No space left on device [os_error_code='28']")) == \
      "no space left on device"
  try:
    try:
      raise OSError("Forbidden: b/o\nno storage.objects.create access")
    except OSError as inner:
      raise RuntimeError("save failed") from inner
  except RuntimeError as outer:
    assert cause(outer) == "permission denied"  # found in the chain
  assert cause(ValueError("ABORTED: All 3 retry attempts failed: ... "
                          "[http_response_code='503']")).startswith("too many retries")
  assert cause(ValueError("ABORTED: All 3 retry attempts failed: ... "
                          "[http_response_code='429']")).startswith("Cloud Storage quota")
  assert fileio.storage_cause(ValueError("a bug")) is None
  # A peer process gone is not a storage failure, whatever its words.
  assert fileio.storage_cause(RuntimeError("UNAVAILABLE: failed to connect (503)")) is None
  assert fileio.storage_error(fileio.UserError("a mistake"), "x") is None
