"""Storage that fails in the middle of a run: real faults, one line, exact resume.

conftest's tiny label-training run (`labels_args`: 16px, 20 steps, a checkpoint
every 4) meets faults the kernel, the emulator or a proxy really produces, no mocks:
- on a local disk (a tmpfs the test mounts): the disk fills up while checkpoint 8
  is written; then, mid-run, the checkpoints directory is remounted read-only;
  then, mid-run, the disk fills up while metrics are written;
- on gs://: Cloud Storage answers 503 for longer than the retry bound
  (tests/storage_proxy.py in front of the emulator), then a 503 burst shorter
  than the bound; and a bucket deleted mid-run.
A fault "mid-run" is exact: it is made as the run prints a given step, before
the run goes on (the test is its terminal); through the proxy, it strikes as a
given request arrives. Each fault ends in one
`funmatch: error:` line with exit code 4 and no traceback, and the same command
afterwards ends bit-identical to the uninterrupted run (`labels_reference`).
kill -9 and an immediate restart on gs:// are in test_gcs_run.py.
"""
import contextlib
import errno
import io
import os
import shutil
import subprocess
import sys
import uuid

import pytest

import bad_inputs
import conftest
from conftest import labels_args as train_args, repo_path, run_cli
from funmatch import checkpoint, fileio
from funmatch.train import cli, metrics_io

STEPS = conftest.LABELS_STEPS
GCS_LOG_EVERY = 5  # each log step uploads metrics.jsonl and the events: fewer on gs://
TRAIN = ("import sys; from funmatch.train import cli; "
         "sys.exit(cli.train_main(['funmatch-train', *sys.argv[1:]]))")
ROWS = bad_inputs.FAULT_ROWS  # (fault, exit code, its line, resumed bit-identically)


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


def start(workdir):
  """funmatch-train in its own process, as a user would start it."""
  return subprocess.Popen([sys.executable, "-c", TRAIN, *train_args(workdir)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "PYTHONPATH": repo_path()})


class FaultAtStep(io.TextIOBase):
  """The terminal of an in-process run: as the run prints `step N/...`, and
  before it goes on, `make_fault()` breaks the storage (exactly mid-run)."""

  def __init__(self, terminal, step, make_fault):
    super().__init__()
    self._terminal, self._line, self._make_fault = terminal, f"step {step}/", make_fault
    self.made = False

  def write(self, text):
    if not self.made and text.startswith(self._line):
      self.made = True
      self._make_fault()
    return self._terminal.write(text)

  def flush(self):
    self._terminal.flush()


def fault_mid_run(workdir, make_fault, at_step, capsys):
  """(exit code, stderr) of funmatch-train in this process, `make_fault()` made
  as it prints step `at_step`."""
  terminal = FaultAtStep(sys.stdout, at_step, make_fault)
  with contextlib.redirect_stdout(terminal):
    code, _, err = run_cli(cli.train_main, train_args(workdir), capsys)
  assert terminal.made, err[-3000:]
  return code, err


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


def _fill(path):
  """Writes `path` until its file system has no page left."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
  try:
    while True:
      os.write(fd, bytes(1 << 20))
  except OSError as e:
    if e.errno != errno.ENOSPC:
      raise
  finally:
    os.close(fd)


def test_full_disk_read_only_and_full_again_mid_run_resume_bit_identically(
    labels_reference, tmp_path, capsys):
  kept_by_reference = checkpoint.saved_steps(labels_reference)[0]  # all the same size
  one_checkpoint = _size(os.path.join(checkpoint.checkpoint_dir(labels_reference),
                                      str(kept_by_reference)))
  assert one_checkpoint > 0
  with tmpfs(str(tmp_path / "disk"), int(one_checkpoint * 1.5)) as disk:
    workdir = os.path.join(disk, "run")
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
    # The checkpoints move to a roomy disk, bind-mounted in their place: this
    # disk keeps the metrics only, and the OS can make the checkpoints read-only.
    roomy = str(tmp_path / "checkpoints")
    shutil.move(directory, roomy)
    os.mkdir(directory)
    _mount("--bind", roomy, directory)
    # 2. Mid-run (step 5 of a run resumed at 4) the OS makes them read-only.
    code, err = fault_mid_run(
        workdir, lambda: _mount("-o", "remount,bind,ro", directory), 5, capsys)
    assert the_error(code, err, "checkpoints remounted read-only mid-run") == (
        f"funmatch: error: the file system is read-only while saving checkpoint 8 to "
        f"{directory}; the last complete checkpoint is step 4; make it writable again "
        "(e.g. remount it read-write) and run the same command to resume")
    assert checkpoint.saved_steps(workdir) == [4]
    # 3. Writable again; mid-run the disk of the metrics fills up (the
    # checkpoints, elsewhere, still fit): a metrics write is the one refused.
    _mount("-o", "remount,bind,rw", directory)
    filler = os.path.join(disk, "filler")
    code, err = fault_mid_run(workdir, lambda: _fill(filler), 5, capsys)
    kept = max(checkpoint.saved_steps(workdir))
    assert the_error(code, err, "disk full while writing metrics mid-run") == (
        f"funmatch: error: no space left on device while writing metrics to {workdir}; "
        f"the last complete checkpoint is step {kept}; free space and run the same "
        "command to resume")
    logged = [r["step"] for r in metrics_io.read_metrics(workdir) if "train/loss" in r]
    assert logged[-1] < STEPS  # it stopped at the write, before the end
    # 4. Space freed: the same command finishes the run exactly.
    os.remove(filler)
    code, _, err = run_cli(cli.train_main, train_args(workdir), capsys)
    assert code == 0, err
    conftest.assert_same_state(workdir, labels_reference, STEPS)
  _resumed({"disk full while saving a checkpoint", "checkpoints remounted read-only mid-run",
            "disk full while writing metrics mid-run"})


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


def test_gcs_outage_then_503_burst_resume_bit_identically(labels_reference, proxied_gcs,
                                                          monkeypatch, capsys):
  gcs, proxy = proxied_gcs
  workdir = f"{gcs.root}/{uuid.uuid4().hex[:12]}/run"
  directory = checkpoint.checkpoint_dir(workdir)
  # 1. Cloud Storage answers 503 to checkpoint 8's array writes for longer than
  # the retry bound (3 s): one line; checkpoint 4 stays the last complete one.
  monkeypatch.setenv(fileio.RETRY_ENV, "3")
  outage = proxy.fail(r"uploadType=media&name=[^&]*checkpoints%2F8%2F")
  code, _, err = run_cli(cli.train_main, train_args(workdir, GCS_LOG_EVERY), capsys)
  error = the_error(code, err, "gs://: 503 for longer than the retry bound (3 s)")
  assert error == (
      "funmatch: error: too many retries (storage kept failing for 3 s) while saving "
      f"checkpoint 8 to {directory}; the last complete checkpoint is step 4; check the "
      "network and the storage service, or allow longer (FUNMATCH_STORAGE_RETRY_S, "
      "default 300 s) and run the same command to resume"), error
  assert outage.answered > 1  # tensorstore retried before it gave up
  assert checkpoint.saved_steps(workdir) == [4]
  assert not fileio.exists(f"{workdir}/.lock")  # released
  # 2. A burst of 503s on every kind of request, shorter than the bound: the run
  # only takes longer, and ends exactly as the uninterrupted one.
  proxy.clear()
  monkeypatch.setenv(fileio.RETRY_ENV, "6")
  bursts = [proxy.fail(r"uploadType=media&name=[^&]*checkpoints", 2),  # tensorstore
            proxy.fail(r"uploadType=(resumable|multipart)", 2),  # gcsfs, the lease
            proxy.fail(r"/download/", 2)]  # reads
  code, _, err = run_cli(cli.train_main, train_args(workdir, GCS_LOG_EVERY), capsys)
  assert code == 0, err
  assert [b.answered for b in bursts] == [2, 2, 2]
  assert checkpoint.saved_steps(workdir)[-1] == STEPS
  conftest.assert_same_state(workdir, labels_reference, STEPS)
  assert max(r["step"] for r in metrics_io.read_metrics(workdir)) == STEPS
  _resumed({"gs://: 503 for longer than the retry bound (3 s)"})
  ROWS.append(("gs://: a burst of 503s within the retry bound", 0, "(none: it took longer)",
               True))


def test_gcs_bucket_deleted_mid_run_names_the_bucket(proxied_gcs, capsys):
  gcs, proxy = proxied_gcs
  name = f"deleted-{uuid.uuid4().hex[:12]}"
  workdir = f"{gcs.create_bucket(name)}/run"
  # As checkpoint 8's first upload arrives, the bucket goes, with all it held.
  deletion = proxy.before(r"uploadType=media&name=[^&]*checkpoints%2F8%2F",
                          lambda: gcs.delete_bucket(name))
  code, _, err = run_cli(cli.train_main, train_args(workdir, GCS_LOG_EVERY), capsys)
  error = the_error(code, err, "gs://: the bucket deleted mid-run")
  assert deletion.answered == 1
  assert error.startswith(f"funmatch: error: the bucket gs://{name} does not exist "
                          f"(deleted?) while "), error
  # Which write meets the missing bucket first (a metrics upload, or the
  # checkpoint's arrays) is the storage's race; either is named.
  doing = error.split(" while ", 1)[1].split(";")[0]
  assert doing in (f"writing metrics to {workdir}",
                   f"saving checkpoint 8 to {checkpoint.checkpoint_dir(workdir)}"), error
  assert error.endswith(
      f"; nothing of the run is left there; create gs://{name} again (the run then "
      "starts over) or copy the workdir back and run the same command to resume"), error


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
