"""funmatch.lease: one writer per workdir (flock locally, a lease object on gs://)."""
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from funmatch import fileio, lease
from funmatch.errors import UserError
from conftest import repo_path


def _workdir(gcs) -> str:
  return f"{gcs.root}/{uuid.uuid4().hex[:12]}/run"


def _wait_for(condition, what: str, limit_s: float = 60.0):
  """Polls `condition` (a guard against hanging, not a timing assertion)."""
  deadline = time.monotonic() + limit_s
  while True:
    result = condition()
    if result:
      return result
    assert time.monotonic() < deadline, f"gave up waiting for {what}"
    time.sleep(0.05)


def test_local_workdir_is_flocked(tmp_path):
  workdir = str(tmp_path / "run")
  with lease.hold_workdir(workdir) as hold:
    hold.check()
    with pytest.raises(UserError, match=f"in use by another run \\(host .* pid {os.getpid()}\\)"):
      with lease.hold_workdir(workdir):
        pass
  with lease.hold_workdir(workdir):  # released: the next run gets it
    pass


def test_second_writer_is_refused_until_the_first_releases(gcs):
  workdir = _workdir(gcs)
  with lease.hold_workdir(workdir, timeout_s=60) as hold:
    assert fileio.exists(f"{workdir}/.lock")
    with pytest.raises(UserError) as refused:
      with lease.hold_workdir(workdir, timeout_s=60):
        pass
    message = str(refused.value)
    assert f"--workdir {workdir} is in use by another run" in message
    assert re.search(f"host {socket.gethostname()} pid {os.getpid()}, heartbeat \\d+ s ago",
                     message)
    hold.check()
  assert not fileio.exists(f"{workdir}/.lock")  # released = deleted
  with lease.hold_workdir(workdir, timeout_s=60):
    pass


def test_heartbeat_keeps_a_live_lease_fresh(gcs):
  """A holder that outlives the timeout keeps the lease: its heartbeats refresh it."""
  workdir = _workdir(gcs)
  with lease.GcsLease(workdir, timeout_s=1.5, heartbeat_s=0.1) as first:
    generation = first._generation
    _wait_for(lambda: first._generation != generation, "a heartbeat")
    time.sleep(1.7)  # longer than the timeout; heartbeats continue meanwhile
    with pytest.raises(UserError, match="in use by another run"):
      lease.GcsLease(workdir, timeout_s=1.5).acquire()
    first.check()


def test_stale_lease_is_taken_over_and_the_old_holder_learns_it(gcs, caplog):
  workdir = _workdir(gcs)
  frozen = lease.GcsLease(workdir, timeout_s=0.5, heartbeat_s=3600)  # never beats
  frozen.acquire()
  time.sleep(0.6)
  with caplog.at_level(logging.WARNING):
    with lease.GcsLease(workdir, timeout_s=0.5, heartbeat_s=0.1) as taker:
      assert "taking over the lease" in caplog.text
      frozen._refresh()  # its next heartbeat
      assert frozen.lost and "taken over by host" in frozen.lost
      with pytest.raises(UserError, match="lost its lease"):
        frozen.check()
      frozen.release()  # must not delete the new holder's lease
      assert fileio.exists(f"{workdir}/.lock")
      taker.check()
  assert not fileio.exists(f"{workdir}/.lock")


_HOLD_FOREVER = """
import sys, time
from funmatch import lease
with lease.hold_workdir(sys.argv[1]):
  print("held", flush=True)
  time.sleep(600)
"""


def test_holder_killed_on_this_host_is_taken_over_at_once(gcs, caplog):
  workdir = _workdir(gcs)
  holder = subprocess.Popen([sys.executable, "-c", _HOLD_FOREVER, workdir],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": repo_path()})
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"pid {holder.pid}, heartbeat"):
      with lease.hold_workdir(workdir):  # alive: refused as before
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with caplog.at_level(logging.WARNING):
    with lease.hold_workdir(workdir):  # no wait for the timeout
      pass
  assert f"pid {holder.pid}: that process ran on this host and is gone" in caplog.text


def _plant(workdir: str, **holder) -> None:
  """A lease object as another run would have written it."""
  import json  # pylint: disable=import-outside-toplevel
  fileio.write_atomic(f"{workdir}/.lock", json.dumps(
      {"host": socket.gethostname(), "pid": os.getppid(), "boot_id": lease._boot_id(),
       "start_time": lease._start_time(os.getppid()), "token": "theirs", **holder}))


def test_a_holder_on_another_host_blocks_until_the_timeout(gcs, monkeypatch):
  workdir = _workdir(gcs)
  monkeypatch.setenv(lease.TIMEOUT_ENV, "3")
  _plant(workdir, host="another-vm", pid=12345)  # its pid means nothing here
  with pytest.raises(UserError, match="host another-vm pid 12345, heartbeat"):
    with lease.hold_workdir(workdir):
      pass

  def takes_over():
    try:
      with lease.hold_workdir(workdir):
        return True
    except UserError:
      return False

  _wait_for(takes_over, "the other host's lease to go stale")


def test_a_reused_pid_is_not_taken_for_the_holder(gcs, caplog):
  """The pid is alive (our parent), but started at another time than the holder
  recorded: the holder is gone, its pid reused."""
  workdir = _workdir(gcs)
  _plant(workdir)  # a live process on this host: refused
  with pytest.raises(UserError, match=f"pid {os.getppid()}, heartbeat"):
    with lease.hold_workdir(workdir, timeout_s=60):
      pass
  _plant(workdir, start_time=lease._start_time(os.getppid()) - 1)
  with caplog.at_level(logging.WARNING):
    with lease.hold_workdir(workdir, timeout_s=60):
      pass
  assert "that process ran on this host and is gone" in caplog.text
  _plant(workdir, boot_id="an-earlier-boot", pid=2 ** 22 + 1)  # no such pid, but
  with pytest.raises(UserError, match="in use by another run"):  # not this boot
    with lease.hold_workdir(workdir, timeout_s=60):
      pass


def test_a_heartbeat_that_keeps_failing_ends_the_run_in_one_line(gcs, monkeypatch):
  """Cloud Storage answers 503 to every lease refresh for longer than the retry
  bound (a proxy in front of the emulator): check() raises the StorageError."""
  import storage_proxy  # pylint: disable=import-outside-toplevel
  proxy = storage_proxy.StorageProxy(gcs.url)
  try:
    for key, value in proxy.environment(gcs.environment()).items():
      monkeypatch.setenv(key, value)
    monkeypatch.setenv(fileio.RETRY_ENV, "1")
    workdir = _workdir(gcs)
    with lease.GcsLease(workdir, timeout_s=60, heartbeat_s=0.1) as held:
      outage = proxy.fail(r"^POST /upload/.*ifGenerationMatch=[1-9]")  # refreshes
      _wait_for(lambda: held.failure, "the heartbeat to give up")
      assert held.lost  # so metrics stop and every process of a run agrees to stop
      with pytest.raises(fileio.StorageError) as failed:
        held.check()
      proxy.clear()
    assert str(failed.value).startswith(
        f"too many retries (storage kept failing for 1 s) while refreshing the lease "
        f"{workdir}/.lock; check the network")
    assert failed.value.exit_code == fileio.STORAGE_EXIT_CODE and outage.answered > 1
    assert not fileio.exists(f"{workdir}/.lock")  # still released
  finally:
    proxy.stop()


def test_bad_timeout_setting_is_one_line(monkeypatch):
  monkeypatch.setenv(lease.TIMEOUT_ENV, "soon")
  with pytest.raises(UserError, match="FUNMATCH_LEASE_TIMEOUT='soon' is not a positive"):
    lease.lease_timeout()


def test_gcs_workdir_is_checked_before_anything_is_written(gcs):
  with pytest.raises(UserError, match="bucket gs://no-such-bucket does not exist"):
    with lease.hold_workdir("gs://no-such-bucket/run"):
      pass
  with pytest.raises(UserError, match="two slashes"):
    with lease.hold_workdir("gs:/bucket/run"):
      pass
