"""One path layer for every file funmatch reads or writes: local disks and gs://.

Users keep workdirs, teachers and data in Cloud Storage and get preempted, so the
product must not care whether a path is `/data/run` or `gs://bucket/run`. Local
paths keep exactly today's os/shutil behaviour (os.replace, os.rename, errno
messages); URLs (`gs://`, and any scheme etils.epath/fsspec knows) go through
`etils.epath` on its fsspec backend (gcsfs for gs://), plus fsspec itself for
the two things epath cannot do safely: uploads that never publish half a file,
and server-side copies.

Object storage differs from a disk in three ways this module hides:
- No rename: `move` copies every object, checks each copy, and only then deletes
  the source; a failed copy leaves the source untouched (and removes the partial
  copy).
- No append: `open(path, "a")` on a URL keeps the file's bytes in a local temp
  file and re-uploads the whole object on every `flush()` and on `close()`. Each
  upload is one atomic PUT, so a reader (or a run killed mid-write) only ever
  sees a complete earlier version, never a torn line. The cost is O(file size)
  per flush, fine for metrics.jsonl (a few MB at most) flushed at log steps;
  writes between flushes are lost if the process dies, as with any buffer. We
  chose this over GCS compose: compose needs a temporary object per append, stops
  at 1024 components, and exists only on GCS.
- Writes are atomic: `open(path, "w")` / `atomic_open` / `write_atomic` on a URL
  write a local temp file and upload it in one request on successful close (an
  exception discards it); locally they write beside the target and os.replace.

TensorFlow must not be imported outside funmatch/data, but etils.epath picks
TensorFlow's gfile for gs:// whenever TensorFlow is installed. Importing this
module therefore selects the fsspec backend (EPATH_USE_TF=false) for the whole
process, including Orbax, which resolves its paths through epath. It also turns
off gcsfs's gRPC bucket-type probe (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false;
funmatch needs nothing from zonal/HNS buckets, and the probe costs a control-
plane call per operation when it cannot tell, ~60 s against an emulator) and
gcsfs's listing cache (listings must see objects that tensorstore, Orbax and
other hosts wrote). Both env settings are defaults a user may override.
Import this module before anything resolves a gs:// path (checkpoint.py does).

Storage that fails mid-run is stated here once too: `retry_policy()` is the one retry
policy of every gs:// request (google-cloud-storage, gcsfs and tensorstore, which
Orbax writes arrays through), and `storage_error` turns what a disk or Cloud
Storage refused into a `StorageError`: one line naming the path, the cause in
plain words and what to do (exit code 4).
"""
import asyncio
import atexit
import builtins
import contextlib
import dataclasses
import errno
import os
import random
import time
import posixpath
import re
import shutil
import tempfile
from typing import IO, Any, Callable, Iterator

from funmatch.errors import UserError


# --------------------------------------------------------------------------
# Storage failures: one retry policy, one line when storage refuses for good.
# --------------------------------------------------------------------------

RETRY_ENV = "FUNMATCH_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 300.0
STORAGE_EXIT_CODE = 4
# Words that mark a request given up on after the retry bound (our gcsfs retry's
# message); tensorstore and google-cloud-storage say it their own ways, below.
RETRIES_EXHAUSTED = "still failing after retrying for"
_BUCKET_NOT_FOUND = "bucket not found"


class StorageError(UserError):
  """A disk or bucket refused a write (or kept failing) in the middle of a run:
  `{cause} while {doing}[; {kept}]; {advice} and run the same command to resume`."""

  exit_code = STORAGE_EXIT_CODE

  def __init__(self, cause: str, doing: str, advice: str, kept: str = ""):
    self.cause, self.doing, self.advice, self.kept = cause, doing, advice, kept
    kept = f"; {kept}" if kept else ""
    super().__init__(f"{cause} while {doing}{kept}; {advice} and run the same "
                     "command to resume")

  def keeping(self, kept: str) -> "StorageError":
    """The same failure, saying what survived (e.g. the last complete checkpoint)."""
    return StorageError(self.cause, self.doing, self.advice, self.kept or kept)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
  """Exponential backoff with jitter, bounded by a total time.

  Every transient gs:// failure (429, 5xx, a dropped connection) is retried
  after delay(0), delay(1), ... until `total_s` would be exceeded; then the
  request fails and the run ends with one line (StorageError). A 503 burst
  shorter than `total_s` therefore costs time, never the run.
  """

  total_s: float
  initial_s: float = 1.0
  max_delay_s: float = 32.0
  multiplier: float = 2.0

  def delay(self, attempt: int) -> float:
    """Seconds to wait before retry `attempt` (0-based): the exponential step,
    jittered down to half of it so that many clients do not retry in step."""
    step = min(self.initial_s * self.multiplier ** attempt, self.max_delay_s)
    return step * random.uniform(0.5, 1.0)

  def max_retries(self) -> int:
    """How many retries fit in `total_s` (for clients that count retries)."""
    spent, retries = 0.0, 0
    while True:
      spent += min(self.initial_s * self.multiplier ** retries, self.max_delay_s)
      if spent > self.total_s:
        return max(retries, 1)
      retries += 1

  def gcs_retry(self):
    """The policy as a google-cloud-storage `retry=` argument."""
    from google.cloud.storage.retry import DEFAULT_RETRY  # pylint: disable=import-outside-toplevel
    return DEFAULT_RETRY.with_delay(initial=self.initial_s, maximum=self.max_delay_s,
                                    multiplier=self.multiplier).with_timeout(self.total_s)

  def tensorstore_context(self) -> dict[str, Any]:
    """The policy as tensorstore context resources (its gcs driver doubles the
    delay from initial_delay up to max_delay, with jitter, max_retries times)."""
    return {"gcs_request_retries": {"max_retries": self.max_retries(),
                                    "initial_delay": f"{self.initial_s}s",
                                    "max_delay": f"{self.max_delay_s}s"}}


def retry_policy() -> RetryPolicy:
  """The policy, its bound from FUNMATCH_STORAGE_RETRY_S (seconds, default 300); short
  bounds start with shorter delays so that they still retry a few times."""
  text = os.environ.get(RETRY_ENV, "").strip()
  try:
    total = float(text) if text else DEFAULT_RETRY_S
  except ValueError:
    total = -1.0
  if not total > 0:
    raise UserError(f"{RETRY_ENV}={text!r} is not a positive number of seconds; unset "
                    f"it (default {DEFAULT_RETRY_S:g}) or set e.g. 600")
  return RetryPolicy(total_s=total, initial_s=min(1.0, total / 8))


async def retrying(request: Callable[..., Any], *args: Any,
                   transient: Callable[[BaseException], bool], **kwargs: Any) -> Any:
  """Awaits `request(*args, **kwargs)`, retrying `transient` failures with
  retry_policy(); past its bound raises OSError naming how long it tried."""
  policy = retry_policy()
  deadline = time.monotonic() + policy.total_s
  for attempt in range(1 << 30):
    try:
      return await request(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      if not transient(e):
        raise
      wait = policy.delay(attempt)
      if time.monotonic() + wait > deadline:
        raise OSError(f"Cloud Storage is {RETRIES_EXHAUSTED} {policy.total_s:g} s "
                      f"({RETRY_ENV}); last answer: {type(e).__name__}: "
                      f"{one_line(e)}") from e
      await asyncio.sleep(wait)
  raise AssertionError("unreachable")


# (errno, words that mean it in messages of tensorstore/gcsfs/google-cloud, cause,
# what to do); the first that matches an error, or any error it was raised from,
# wins. The words are specific on purpose: an error that is not about storage (a
# peer process gone, a bug) must stay what it is.
_CAUSES = (
    (errno.ENOSPC, ("no space left on device", "os_error_code='28'"),
     "no space left on device", "free space"),
    (errno.EDQUOT, ("disk quota exceeded", "os_error_code='122'"),
     "disk quota exceeded", "free space or raise the quota"),
    (errno.EROFS, ("read-only file system", "os_error_code='30'"),
     "the file system is read-only", "make it writable again (e.g. remount it read-write)"),
    (errno.EACCES, ("permission denied", "os_error_code='13'", "forbidden:",
                    "http_response_code='403'"),
     "permission denied", "give this run write access there"),
    (None, ("the specified bucket does not exist", "bucket does not exist",
            "no such bucket"),
     _BUCKET_NOT_FOUND, "create the bucket or fix the path"),
    (None, ("too many requests", "ratelimit", "rate limit", "http_response_code='429'",
            "quota exceeded", "quotaexceeded"),
     "Cloud Storage quota exceeded (429 Too Many Requests)",
     "wait, lower the request rate or raise the quota"),
    # Ours (gcs_retry), tensorstore's ("All 3 retry attempts failed") and
    # google-api-core's ("Timeout of 300.0s exceeded, last exception: ...").
    (None, (RETRIES_EXHAUSTED, "retry attempts failed", "s exceeded, last exception"),
     "too many retries (storage kept failing)",
     f"check the network and the storage service, or allow longer ({RETRY_ENV}, "
     f"default {DEFAULT_RETRY_S:g} s)"),
)


def _chain(e: BaseException) -> Iterator[BaseException]:
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def storage_cause(e: BaseException) -> tuple[str, str] | None:
  """(cause in plain words, what to do) when `e` says storage refused, else None."""
  chain = list(_chain(e))
  for code, words, cause, advice in _CAUSES:
    codes = {code, errno.EPERM} if code == errno.EACCES else {code}
    if code is not None and any(isinstance(x, OSError) and x.errno in codes
                                for x in chain):
      return cause, advice
    text = " ".join(f"{type(x).__name__} {x}" for x in chain).lower()
    if any(w in text for w in words):
      if cause.startswith("too many"):
        cause = f"too many retries (storage kept failing for {retry_policy().total_s:g} s)"
      return cause, advice
  return None


def storage_error(e: BaseException, doing: str, kept: str = "",
                  path: Any = None) -> StorageError | None:
  """The one line for `e` met while `doing` (e.g. 'saving checkpoint 20 to
  W/checkpoints'), or None when `e` is not a storage failure (a bug stays one).
  `kept` says what survived, e.g. 'the last complete checkpoint is step 10'.
  `path` (where it was written) lets a gs:// failure whose words say nothing
  (an emulator's bare 404) be checked against the bucket itself."""
  if isinstance(e, StorageError):
    return e.keeping(kept)
  if isinstance(e, UserError):
    return None  # a mistake with its own line (a diverged loss, a bad file)
  found = storage_cause(e)
  bucket = missing_bucket(path) if path is not None and (
      found is None or found[0] == _BUCKET_NOT_FOUND) else None
  if bucket:
    return StorageError(f"the bucket {bucket} does not exist (deleted?)", doing,
                        f"create {bucket} again (the run then starts over) or copy the "
                        "workdir back", "nothing of the run is left there")
  if found is None:
    return None
  return StorageError(found[0], doing, found[1], kept)


def missing_bucket(path: Any) -> str | None:
  """'gs://BUCKET' when `path` is on gs:// and its bucket is gone, else None (a
  local path, a bucket that exists, or one that cannot be asked about now)."""
  if not str(path).startswith("gs://"):
    return None
  name = split_gcs(str(path))[0]
  try:
    found = gcs_client().lookup_bucket(name, timeout=_CHECK_TIMEOUT_S, retry=(
        retry_policy().gcs_retry().with_timeout(min(retry_policy().total_s,
                                                    _CHECK_DEADLINE_S))))
  except Exception:  # pylint: disable=broad-except  (unreachable: say what we know)
    return None
  return None if found is not None else f"gs://{name}"


@contextlib.contextmanager
def storage_failures(doing: str | Callable[[], str],
                     kept: Callable[[], str] = lambda: "",
                     path: Any = None) -> Iterator[None]:
  """Turns a storage failure inside the block into its StorageError line."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, UserError) and not isinstance(e, StorageError):
      raise
    error = storage_error(e, doing() if callable(doing) else doing, kept(), path)
    if error is None:
      raise
    raise error from None


def _configure_backends() -> None:
  os.environ.setdefault("EPATH_USE_TF", "false")
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  import fsspec  # pylint: disable=import-outside-toplevel
  import fsspec.config  # pylint: disable=import-outside-toplevel
  fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)
  # etils caches its "is TensorFlow installed" answer on the first path it
  # resolves; forget an answer given before the env setting above.
  from etils.epath import gpath  # pylint: disable=import-outside-toplevel
  cached = getattr(gpath, "_is_tf_installed", None)
  if hasattr(cached, "cache_clear"):
    cached.cache_clear()
  # gcsfs retries 6 times on its own schedule; its subclass in gcs_retry retries by
  # retry_policy() instead (imported when a gs:// path is first resolved).
  fsspec.register_implementation("gs", "funmatch.gcs_retry.RetryingGCSFileSystem",
                                 clobber=True)
  fsspec.register_implementation("gcs", "funmatch.gcs_retry.RetryingGCSFileSystem",
                                 clobber=True)


_configure_backends()

from etils import epath  # pylint: disable=wrong-import-position

# A scheme followed by one slash or none (`gs:/bucket`, `gs:bucket`): a typo that
# would otherwise become a local folder named `gs:`.
_MALFORMED_URL = re.compile(r"^(gs|gcs|s3|az|hf):(?!//)", re.IGNORECASE)
# Bucket names: https://cloud.google.com/storage/docs/buckets#naming
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def is_remote(path: Any) -> bool:
  """True for URLs (gs://bucket/x, s3://...), False for local paths."""
  return "://" in os.fspath(path)


def join(path: Any, *parts: str) -> str:
  """`os.path.join` for local paths, '/'-joining for URLs."""
  path = os.fspath(path)
  if is_remote(path):
    return posixpath.join(path, *parts)
  return os.path.join(path, *parts)


def abspath(path: Any) -> str:
  """Local paths made absolute (and ~ expanded); URLs unchanged (os.path.abspath
  would turn gs://b/run into ./gs:/b/run)."""
  path = os.fspath(path)
  if is_remote(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def dirname(path: Any) -> str:
  path = os.fspath(path)
  if is_remote(path):
    return posixpath.dirname(path.rstrip("/"))
  return os.path.dirname(path)


def basename(path: Any) -> str:
  path = os.fspath(path)
  if is_remote(path):
    return posixpath.basename(path.rstrip("/"))
  return os.path.basename(path)


def check_path(path: Any, what: str) -> str:
  """Refuses malformed URLs (`gs:/b`, `gs://`, `gs://Bad_Name`); returns the path."""
  path = os.fspath(path)
  if _MALFORMED_URL.match(path):
    scheme = path.split(":", 1)[0]
    raise UserError(f"{what} {path} is not a valid URL; write it as "
                    f"{scheme}://BUCKET/PATH (two slashes)")
  if path.startswith("gs://"):
    bucket = split_gcs(path)[0]
    if not bucket:
      raise UserError(f"{what} {path} names no bucket; write it as gs://BUCKET/PATH")
    if not _BUCKET_NAME.match(bucket) or ".." in bucket:
      raise UserError(f"{what} {path}: {bucket!r} is not a valid bucket name (3-222 "
                      "lowercase letters, digits, '-', '_', '.'); fix the bucket name")
  return path


def split_gcs(path: str) -> tuple[str, str]:
  """('bucket', 'key/inside') of a gs:// URL."""
  rest = os.fspath(path)[len("gs://"):]
  bucket, _, key = rest.partition("/")
  return bucket, key


# --------------------------------------------------------------------------
# Queries.
# --------------------------------------------------------------------------


def exists(path: Any) -> bool:
  if is_remote(path):
    return epath.Path(path).exists()
  return os.path.exists(path)


def isdir(path: Any) -> bool:
  """Locally a directory; on object storage a prefix that holds objects."""
  if is_remote(path):
    return epath.Path(path).is_dir()
  return os.path.isdir(path)


def isfile(path: Any) -> bool:
  if is_remote(path):
    return epath.Path(path).is_file()
  return os.path.isfile(path)


def listdir(path: Any) -> list[str]:
  """Names (not paths) inside a directory, sorted."""
  if is_remote(path):
    return sorted(p.name for p in epath.Path(path).iterdir())
  return sorted(os.listdir(path))


def scandir(path: Any) -> list[tuple[str, bool]]:
  """(name, is_directory) of each entry of a directory, sorted by name; one
  listing request on object storage (not one per entry, as listdir + isdir)."""
  if is_remote(path):
    fs, key = _fs(os.fspath(path))
    entries = fs.ls(key.rstrip("/"), detail=True)
    found = {posixpath.basename(e["name"].rstrip("/")): e["type"] == "directory"
             for e in entries}
    return sorted((name, is_dir) for name, is_dir in found.items() if name)
  with os.scandir(path) as entries:
    return sorted((e.name, e.is_dir()) for e in entries)


def getsize(path: Any) -> int:
  if is_remote(path):
    return int(epath.Path(path).stat().length)
  return os.path.getsize(path)


def version(path: Any) -> tuple[int, str]:
  """(size, a token that changes with every rewrite) of a file: the mtime
  locally, the object's generation on GCS; for caching checks of a file."""
  if is_remote(path):
    fs, key = _fs(os.fspath(path))
    info = fs.info(key)
    token = info.get("generation") or info.get("updated") or info.get("mtime") or ""
    return int(info["size"]), str(token)
  stat = os.stat(path)
  return stat.st_size, str(stat.st_mtime_ns)


# --------------------------------------------------------------------------
# Reading and writing.
# --------------------------------------------------------------------------


def makedirs(path: Any) -> None:
  """Creates a local directory and its parents; nothing to do on object storage.

  Buckets have no directories (a prefix exists once an object is under it),
  and gcsfs's makedirs would create a missing *bucket*: never do that for a user.
  """
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


# pylint: disable-next=redefined-builtin
def open(path: Any, mode: str = "r", **kwargs: Any) -> IO[Any]:
  """`builtins.open` for local paths; for URLs reads stream and writes are atomic.

  On a URL, 'w'/'wb' publish the file on close (nothing on an exception) and
  'a'/'ab' re-upload the whole file on each flush() and on close() (module doc).
  `kwargs` (buffering, encoding, ...) apply to local files.
  """
  if not is_remote(path):
    return builtins.open(path, mode, **kwargs)  # pylint: disable=consider-using-with
  path = os.fspath(path)
  if "+" in mode or "x" in mode:
    raise ValueError(f"mode {mode!r} is not supported for {path}")
  if mode.startswith("r"):
    return epath.Path(path).open(mode)
  return _UploadOnClose(path, binary="b" in mode, append=mode.startswith("a"))


def read_text(path: Any) -> str:
  with open(path, "r") as f:
    return f.read()


def read_bytes(path: Any) -> bytes:
  with open(path, "rb") as f:
    return f.read()


# (url, size, version) -> its local copy; see local_copy.
_DOWNLOADS: dict[tuple[str, int, str], str] = {}


def local_copy(path: Any) -> str:
  """A local file with `path`'s bytes: `path` itself when local; for a URL, one
  download per object version, kept in a temporary directory until the process
  exits. For readers that need a local file (safetensors maps it, torch and zip
  archives seek in it); a weights file read twice (its header, then its arrays)
  is downloaded once."""
  path = os.fspath(path)
  if not is_remote(path):
    return path
  key = (path, *version(path))
  if key not in _DOWNLOADS:
    directory = tempfile.mkdtemp(prefix="funmatch-download-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    local = os.path.join(directory, basename(path))
    fs, remote = _fs(path)
    fs.get_file(remote, local)
    _DOWNLOADS[key] = local
  return _DOWNLOADS[key]


@contextlib.contextmanager
def atomic_open(path: Any, mode: str = "w") -> Iterator[IO[Any]]:
  """A file that appears at `path` whole when the block ends, or not at all.

  Locally: a temp file beside `path`, then os.replace. On a URL: one upload on
  success (a single object PUT is atomic on GCS). An exception leaves any
  previous file at `path` untouched and no temp file behind.
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open mode must be 'w' or 'wb', not {mode!r}")
  path = os.fspath(path)
  with storage_failures(f"writing {path}"):  # e.g. an eval JSON on a full disk
    with _atomic_open(path, mode) as f:
      yield f


@contextlib.contextmanager
def _atomic_open(path: str, mode: str) -> Iterator[IO[Any]]:
  if is_remote(path):
    f = _UploadOnClose(path, binary=mode == "wb", append=False)
    with f:
      yield f
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, mode) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_atomic(path: Any, data: str | bytes) -> None:
  """Writes `data` to `path` atomically (see `atomic_open`)."""
  with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)


class _UploadOnClose:
  """A writable file for a URL, staged in a local temp file.

  close() (and, in append mode, flush()) uploads the whole staged file as one
  object; leaving a `with` block on an exception discards it instead.
  """

  def __init__(self, path: str, *, binary: bool, append: bool):
    self.name = path
    self._append = append
    self._staged = tempfile.NamedTemporaryFile(  # pylint: disable=consider-using-with
        mode="w+b" if binary else "w+", suffix=".funmatch-upload", delete=False,
        **({} if binary else {"encoding": "utf-8", "newline": ""}))
    self._closed = False
    try:
      if append and exists(path):
        with epath.Path(path).open("rb") as source:
          data = source.read()
        self._staged.write(data if binary else data.decode("utf-8"))
    except BaseException:
      self.discard()
      raise

  @property
  def closed(self) -> bool:
    return self._closed

  def write(self, data):
    return self._staged.write(data)

  def writelines(self, lines) -> None:
    self._staged.writelines(lines)

  # np.savez takes only objects with read() for files, and zipfile seeks back
  # to write member headers: both act on the staged bytes.
  def read(self, size: int = -1):
    return self._staged.read(size)

  def seekable(self) -> bool:
    return True

  def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
    return self._staged.seek(offset, whence)

  def tell(self) -> int:
    return self._staged.tell()

  def flush(self) -> None:
    self._staged.flush()
    if self._append and not self._closed:
      _upload(self._staged.name, self.name)

  def close(self) -> None:
    if self._closed:
      return
    try:
      self._staged.flush()
      _upload(self._staged.name, self.name)
    finally:
      self.discard()

  def discard(self) -> None:
    """Drops the staged bytes without uploading them."""
    self._closed = True
    self._staged.close()
    with contextlib.suppress(OSError):
      os.remove(self._staged.name)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
    else:
      self.discard()


def _fs(path: str):
  """(fsspec filesystem, path as that filesystem spells it) for a URL."""
  import fsspec  # pylint: disable=import-outside-toplevel
  return fsspec.core.url_to_fs(path)


def _upload(local_path: str, url: str) -> None:
  # gcsfs's put_file is one simple upload (< 5 MB) or one resumable upload
  # finalised at the end: the object appears whole or not at all.
  fs, remote = _fs(url)
  fs.put_file(local_path, remote)


def upload_file(local_path: Any, path: Any) -> None:
  """Publishes a local file at `path` whole (one upload on object storage, a
  copy beside the target and a rename locally)."""
  local_path, path = os.fspath(local_path), os.fspath(path)
  if is_remote(path):
    _upload(local_path, path)
    return
  with atomic_open(path, "wb") as target, builtins.open(local_path, "rb") as source:
    shutil.copyfileobj(source, target)


# --------------------------------------------------------------------------
# Removing and moving.
# --------------------------------------------------------------------------


def remove(path: Any) -> None:
  """Deletes one file (FileNotFoundError if it is missing)."""
  if is_remote(path):
    if not isfile(path):
      raise FileNotFoundError(f"no file at {path}")
    epath.Path(path).unlink()
  else:
    os.remove(path)


def rmtree(path: Any) -> None:
  """Deletes a directory and everything under it."""
  if is_remote(path):
    if not isdir(path):
      raise FileNotFoundError(f"no directory at {path}")
    epath.Path(path).rmtree()
  else:
    shutil.rmtree(path)


def move(source: Any, target: Any) -> None:
  """Renames a file or directory; `target` must not exist.

  Locally os.rename. On object storage (which cannot rename): copy every object
  server-side, check that each copy exists with the source's size, and only then
  delete the sources. If any copy fails, the partial copy is removed and the
  source is left as it was.
  """
  source, target = os.fspath(source), os.fspath(target)
  if exists(target):
    raise FileExistsError(f"cannot move {source} to {target}: the target exists")
  if is_remote(source) != is_remote(target):
    raise ValueError(f"cannot move between a disk and object storage: {source} -> {target}")
  if not is_remote(source):
    os.rename(source, target)
    return
  fs, source_key = _fs(source)
  _, target_key = _fs(target)
  source_key, target_key = source_key.rstrip("/"), target_key.rstrip("/")
  if fs.isfile(source_key):
    pairs = [(source_key, target_key)]
  else:
    pairs = [(key, target_key + key[len(source_key):])
             for key in fs.find(source_key) if key.startswith(source_key + "/")]
  if not pairs:
    raise FileNotFoundError(f"nothing to move at {source}")
  copied = []
  try:
    for key, new_key in pairs:
      _copy_object(fs, key, new_key)
      copied.append(new_key)
    for key, new_key in pairs:
      if fs.info(new_key)["size"] != fs.info(key)["size"]:
        raise OSError(f"copy of {key} to {new_key} has the wrong size")
  except BaseException:
    with contextlib.suppress(Exception):
      if copied:
        fs.rm(copied)
    raise
  fs.rm([key for key, _ in pairs])


def _copy_object(fs, key: str, new_key: str) -> None:
  """One server-side object copy (a seam for tests that simulate failures)."""
  fs.copy(key, new_key)


# --------------------------------------------------------------------------
# Reachability.
# --------------------------------------------------------------------------

AUTH_HELP = ("authenticate with `gcloud auth application-default login`, or set "
             "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or on a "
             "TPU/GCE VM give the VM a service account with storage access and the "
             "cloud-platform (or devstorage.read_write) scope")
_CHECK_TIMEOUT_S = (5.0, 15.0)  # (connect, read): fail in seconds, not minutes
# The retry policy's bound, capped: a start-up check fails in seconds, not minutes.
_CHECK_DEADLINE_S = 10.0


def check_reachable(path: Any, what: str) -> None:
  """Checks a gs:// path can be listed with this process's credentials.

  Raises UserError (one line naming `what`, the path and the fix) for a
  malformed URL, missing credentials, a missing bucket or no permission. Only
  lists (at most one object); writes nothing. Local paths and other schemes
  are only checked for a malformed URL.
  """
  path = check_path(path, what)
  if not path.startswith("gs://"):
    return
  bucket_name, key = split_gcs(path)
  # pylint: disable=import-outside-toplevel
  from google.api_core import exceptions as gexc
  import google.auth.exceptions
  # pylint: enable=import-outside-toplevel
  try:
    client = gcs_client()
  except google.auth.exceptions.GoogleAuthError as e:
    raise UserError(f"{what} {path}: no Google Cloud credentials found "
                    f"({one_line(e)}); {AUTH_HELP}") from None
  try:
    blobs = client.list_blobs(bucket_name, prefix=key, max_results=1,
                              timeout=_CHECK_TIMEOUT_S,
                              retry=retry_policy().gcs_retry().with_timeout(
                                  min(retry_policy().total_s, _CHECK_DEADLINE_S)))
    next(iter(blobs), None)
  except gexc.NotFound:
    raise UserError(f"{what} {path}: bucket gs://{bucket_name} does not exist (or "
                    "is not visible to these credentials); check the bucket name") from None
  except (gexc.Forbidden, gexc.Unauthorized) as e:
    # pylint: disable-next=protected-access
    account = getattr(client._credentials, "service_account_email", None)
    who = f" for {account}" if isinstance(account, str) and "@" in account else ""
    raise UserError(f"{what} {path}: permission denied{who} ({one_line(e)}); grant "
                    f"storage access to gs://{bucket_name}, or {AUTH_HELP}") from None
  except google.auth.exceptions.GoogleAuthError as e:
    raise UserError(f"{what} {path}: the Google Cloud credentials do not work "
                    f"({one_line(e)}); {AUTH_HELP}") from None
  except (gexc.GoogleAPIError, OSError, ValueError) as e:
    raise UserError(f"{what} {path}: cannot reach Cloud Storage ({type(e).__name__}: "
                    f"{one_line(e)}); check the network and the URL") from None


def gcs_client():
  """A google-cloud-storage client: anonymous against an emulator
  (STORAGE_EMULATOR_HOST), else Application Default Credentials."""
  # pylint: disable=import-outside-toplevel
  import google.auth
  from google.auth.credentials import AnonymousCredentials
  from google.cloud import storage
  # pylint: enable=import-outside-toplevel
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "emulator"),
                          credentials=AnonymousCredentials())
  credentials, project = google.auth.default(
      scopes=["https://www.googleapis.com/auth/devstorage.read_write"])
  return storage.Client(project=project or "unknown", credentials=credentials)


def one_line(e: BaseException) -> str:
  """An exception's message on one line, at most 200 characters (for UserErrors)."""
  return " ".join(str(e).split())[:200]
