"""One writer per workdir: an flock on local disks, a lease object on gs://.

Two runs writing one workdir would interleave checkpoints and metrics. Locally
the kernel's flock on WORKDIR/.lock does it, and dies with the process, so a run
killed with -9 never blocks the next one. Object storage has no locks, and
nothing notices a dead writer, hence a lease:

- WORKDIR/.lock is created only if no object of that name exists (a
  google-cloud-storage upload with if_generation_match=0: GCS creates it for
  exactly one of several racing writers). gcsfs offers no conditional write on a
  *given* generation, which the refresh below needs, so the lease uses
  google-cloud-storage directly.
- It records host, pid, a random token and the time; a background thread
  rewrites it every timeout/6 seconds, each write conditional on the generation
  it wrote last, so once another run has taken the lease over, the old holder's
  next refresh fails and it learns it has lost it (`check()`).
- A second run is refused with one line naming the holder and its heartbeat's
  age. A lease whose last write is older than the timeout (FUNMATCH_LEASE_TIMEOUT
  seconds, default 180) is stale: it is taken over (a conditional write on its
  generation) with a warning. A holder killed with -9 therefore blocks the next
  run for at most the timeout.
- Age is measured from the object's `updated` time, stamped by the storage
  service, so a writer's wrong clock cannot make its lease look fresh; hosts
  need roughly right clocks (GCE/TPU VMs sync theirs), since the reader compares
  with its own.
- A holder on this very host (same hostname and boot id) whose process is gone
  is taken over at once, with a warning: a run killed with -9 and restarted on
  its machine does not wait for the timeout. The lease records the holder's
  process start time (/proc/PID/stat field 22) beside its pid, so a new process
  that reused the pid is not mistaken for the holder.
- Releasing deletes the object, unless another run has taken it over.
- Requests retry by fileio's one policy (FUNMATCH_STORAGE_RETRY_S). A heartbeat
  that still fails after it marks the hold failed: `check()` then ends the run
  with one fileio.StorageError line.

The token makes retries safe: a conditional write whose reply was lost and is
retried gets 412, and reading the token back tells "mine after all" from "lost".
"""
import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Iterator

from funmatch import fileio
from funmatch.errors import UserError

LOCK_FILE = ".lock"
TIMEOUT_ENV = "FUNMATCH_LEASE_TIMEOUT"
DEFAULT_TIMEOUT_S = 180.0
_REQUEST_TIMEOUT_S = (5.0, 15.0)  # (connect, read) per request
_MAX_ACQUIRE_ATTEMPTS = 3


def lease_timeout() -> float:
  """Seconds after its last heartbeat that a lease is stale (env FUNMATCH_LEASE_TIMEOUT)."""
  text = os.environ.get(TIMEOUT_ENV, "").strip()
  if not text:
    return DEFAULT_TIMEOUT_S
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not value > 0:
    raise UserError(f"{TIMEOUT_ENV}={text!r} is not a positive number of seconds; "
                    f"unset it (default {DEFAULT_TIMEOUT_S:g}) or set e.g. 300")
  return value


def _boot_id() -> str:
  """This boot of this machine ('' where the kernel does not say)."""
  try:
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
      return f.read().strip()
  except OSError:
    return ""


def _start_time(pid: int) -> int | None:
  """The process's start time in clock ticks since boot (/proc/PID/stat field
  22); None if there is no such process (or no /proc)."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
      stat = f.read()
  except OSError:
    return None
  # Field 2 (the command) is in parentheses and may hold spaces: count after it.
  return int(stat.rpartition(")")[2].split()[19])


def _dead_on_this_host(holder: dict[str, Any]) -> bool:
  """True if `holder` ran on this host, in this boot, and its process is gone
  (or its pid now belongs to a process started at another time)."""
  if holder.get("host") != socket.gethostname() or not holder.get("boot_id"):
    return False
  if holder["boot_id"] != _boot_id():
    return False  # a holder from before a reboot would not record this boot's id
  try:
    pid = int(holder["pid"])
  except (KeyError, TypeError, ValueError):
    return False
  if pid == os.getpid():
    return False  # this process holds it (another hold of ours, e.g. a test)
  started = _start_time(pid)
  return started is None or started != holder.get("start_time")


class LocalHold:
  """The flock on a local WORKDIR/.lock; it cannot be lost while held."""

  lost = None

  def check(self) -> None:
    """Raises if another run has taken the workdir over (never, for flock)."""


@contextlib.contextmanager
def hold_workdir(workdir: str, *, timeout_s: float | None = None) -> Iterator[Any]:
  """Holds `workdir` for one writer (flock locally, GcsLease on gs://).

  Yields the hold; a long-running writer calls `hold.check()` now and then
  (e.g. before each checkpoint) to stop if another run has taken it over.
  """
  fileio.check_path(workdir, "--workdir")  # `gs:/b` must not become a local folder
  if fileio.is_remote(workdir):
    if not workdir.startswith("gs://"):
      raise UserError(f"--workdir {workdir}: only gs:// URLs can be workdirs (no "
                      "single-writer lease for other schemes); use gs:// or a path")
    fileio.check_reachable(workdir, "--workdir")
    lease = GcsLease(workdir, timeout_s=timeout_s)
    lease.acquire()
    try:
      yield lease
    finally:
      lease.release()
    return
  with _flock(workdir):
    yield LocalHold()


@contextlib.contextmanager
def _flock(workdir: str) -> Iterator[None]:
  """WORKDIR/.lock held with flock; the kernel frees it when the process dies."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create --workdir {workdir} ({e.strerror or e}); choose a "
                    "writable path") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise UserError(f"--workdir {workdir} is not writable; choose a writable path")
  path = os.path.join(workdir, LOCK_FILE)
  try:
    handle = open(path, "a+")  # pylint: disable=consider-using-with
  except OSError as e:
    raise UserError(f"cannot write {path} ({e.strerror or e}); choose a writable "
                    "--workdir") from None
  try:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "another process"
      raise UserError(f"--workdir {workdir} is in use by another run ({holder}); wait "
                      "for it to finish or stop it, or use another --workdir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
    handle.flush()
    yield
  finally:
    handle.close()  # releases the flock


class GcsLease:
  """The lease object gs://BUCKET/PATH/.lock (module docstring)."""

  def __init__(self, workdir: str, *, timeout_s: float | None = None,
               heartbeat_s: float | None = None, client: Any = None):
    # pylint: disable=import-outside-toplevel
    from google.api_core import exceptions as gexc
    # pylint: enable=import-outside-toplevel
    self._gexc = gexc
    self.workdir = workdir.rstrip("/")
    bucket_name, key = fileio.split_gcs(self.workdir)
    self.path = f"{self.workdir}/{LOCK_FILE}"
    self.timeout_s = float(timeout_s) if timeout_s else lease_timeout()
    self.heartbeat_s = float(heartbeat_s) if heartbeat_s else self.timeout_s / 6
    self._retry = fileio.retry_policy().gcs_retry()
    client = client or fileio.gcs_client()
    self._blob_name = f"{key}/{LOCK_FILE}" if key else LOCK_FILE
    self._bucket = client.bucket(bucket_name)
    self._token = uuid.uuid4().hex
    self._generation: int | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._lock = threading.Lock()  # heartbeat vs release
    self.lost: str | None = None  # why this run no longer holds the lease
    self.failure: fileio.StorageError | None = None  # a heartbeat that kept failing

  # -- the object ----------------------------------------------------------

  def _payload(self) -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "boot_id": _boot_id(), "start_time": _start_time(os.getpid()),
                       "token": self._token, "heartbeat": time.time(),
                       "timeout_s": self.timeout_s})

  def _write(self, if_generation_match: int) -> None:
    """One conditional write; remembers the new generation."""
    blob = self._bucket.blob(self._blob_name)
    blob.upload_from_string(self._payload(), content_type="application/json",
                            if_generation_match=if_generation_match,
                            timeout=_REQUEST_TIMEOUT_S, retry=self._retry)
    self._generation = int(blob.generation)

  def _read(self) -> tuple[Any, dict[str, Any]] | None:
    """(blob with metadata, its JSON) of the current lease, or None if none."""
    blob = self._bucket.get_blob(self._blob_name, timeout=_REQUEST_TIMEOUT_S,
                                 retry=self._retry)
    if blob is None:
      return None
    try:
      data = blob.download_as_bytes(if_generation_match=blob.generation,
                                    timeout=_REQUEST_TIMEOUT_S, retry=self._retry)
      holder = json.loads(data)
    except (self._gexc.NotFound, self._gexc.PreconditionFailed):
      return None  # replaced or deleted while we looked: the caller tries again
    except ValueError:
      holder = {}
    return blob, holder if isinstance(holder, dict) else {}

  # -- acquire / refresh / release -----------------------------------------

  def acquire(self) -> None:
    """Creates the lease, or takes over a stale one; refuses a live holder."""
    with fileio.storage_failures(f"writing the lease {self.path}"):
      self._acquire()
    self._thread = threading.Thread(target=self._heartbeat, name="funmatch-lease",
                                    daemon=True)
    self._thread.start()

  def _acquire(self) -> None:
    gexc = self._gexc
    holder, age = {}, 0.0
    for _ in range(_MAX_ACQUIRE_ATTEMPTS):
      try:
        self._write(if_generation_match=0)
        break
      except gexc.PreconditionFailed:
        pass
      except gexc.Forbidden as e:
        raise UserError(f"--workdir {self.workdir}: cannot create {self.path} "
                        f"({fileio.one_line(e)}); this run needs write access: "
                        f"{fileio.AUTH_HELP}") from None
      current = self._read()
      if current is None:
        continue
      blob, holder = current
      if holder.get("token") == self._token:  # our create went through; the reply got lost
        self._generation = int(blob.generation)
        break
      age = time.time() - blob.updated.timestamp()
      if _dead_on_this_host(holder):
        logging.warning("funmatch: taking over the lease %s of %s: that process ran on "
                        "this host and is gone", self.path, _describe(holder))
      elif age < self.timeout_s:
        raise UserError(self._in_use_message(holder, age))
      else:
        logging.warning("funmatch: taking over the lease %s of %s (its heartbeat is "
                        "%.0f s old, over the %g s timeout): that run died or hangs",
                        self.path, _describe(holder), age, self.timeout_s)
      try:
        self._write(if_generation_match=int(blob.generation))
        break
      except gexc.PreconditionFailed:
        continue  # it was refreshed or taken meanwhile: look again
    else:
      raise UserError(self._in_use_message(holder, age))

  def _in_use_message(self, holder: dict[str, Any], age: float) -> str:
    return (f"--workdir {self.workdir} is in use by another run ({_describe(holder)}, "
            f"heartbeat {age:.0f} s ago); wait for it to finish or stop it, or use "
            f"another --workdir (a run that died is taken over once its heartbeat is "
            f"older than {self.timeout_s:g} s, {TIMEOUT_ENV})")

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      with self._lock:
        if self._stop.is_set():
          return
        self._refresh()
        if self.failure:
          return
        if self.lost:
          logging.error("funmatch: lost the lease %s (%s); this run must stop writing",
                        self.path, self.lost)
          return

  def _refresh(self) -> None:
    gexc = self._gexc
    try:
      self._write(if_generation_match=self._generation)
    except (gexc.PreconditionFailed, gexc.NotFound):
      current = self._read()
      if current is not None and current[1].get("token") == self._token:
        self._generation = int(current[0].generation)  # our retried write had landed
        return
      holder = _describe(current[1]) if current else "nobody: it was deleted"
      self.lost = f"taken over by {holder}"
    except Exception as e:  # pylint: disable=broad-except
      # Transient failures were retried for the policy's whole bound already.
      self.failure = fileio.storage_error(e, f"refreshing the lease {self.path}") or (
          fileio.StorageError(f"{type(e).__name__}: {fileio.one_line(e)}",
                              f"refreshing the lease {self.path}",
                              "check the bucket and the network"))
      # Without heartbeats the lease goes stale and may be taken over: stop
      # writing, as for a lost lease (every process agrees on `lost`).
      self.lost = "its heartbeat kept failing"

  def check(self) -> None:
    """Raises UserError if another run has taken this workdir over, StorageError
    if the heartbeat kept failing."""
    if self.failure:
      raise self.failure
    if self.lost:
      raise UserError(f"--workdir {self.workdir}: this run lost its lease ({self.lost}), "
                      f"probably after it stalled for over {self.timeout_s:g} s; it stops "
                      "so the two runs do not both write; run it again when the other "
                      "has finished")

  def release(self) -> None:
    """Stops the heartbeat and deletes the lease if this run still holds it."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    with self._lock:
      if (self.lost and not self.failure) or self._generation is None:
        return  # (after a failure the lease is still ours: try to delete it)
      gexc = self._gexc
      try:
        current = self._read()
        # Check the token too: a precondition on delete is what protects a new
        # holder on GCS, but some emulators ignore it.
        if current is None or current[1].get("token") != self._token:
          return
        # Some emulators report no generation with the object's metadata.
        generation = current[0].generation or self._generation
        self._bucket.blob(self._blob_name).delete(
            if_generation_match=int(generation), timeout=_REQUEST_TIMEOUT_S,
            retry=self._retry)
      except (gexc.NotFound, gexc.PreconditionFailed):
        pass
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("funmatch: could not delete the lease %s (%s); the next run "
                        "takes it over after %g s", self.path, fileio.one_line(e),
                        self.timeout_s)
      self._generation = None

  def __enter__(self) -> "GcsLease":
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def _describe(holder: dict[str, Any]) -> str:
  return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}"
