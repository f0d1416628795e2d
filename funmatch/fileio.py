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
"""
import atexit
import builtins
import contextlib
import os
import posixpath
import re
import shutil
import tempfile
from typing import IO, Any, Iterator

from funmatch.errors import UserError


def _configure_backends() -> None:
  os.environ.setdefault("EPATH_USE_TF", "false")
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  import fsspec.config  # pylint: disable=import-outside-toplevel
  fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)
  # etils caches its "is TensorFlow installed" answer on the first path it
  # resolves; forget an answer given before the env setting above.
  from etils.epath import gpath  # pylint: disable=import-outside-toplevel
  cached = getattr(gpath, "_is_tf_installed", None)
  if hasattr(cached, "cache_clear"):
    cached.cache_clear()


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
_CHECK_DEADLINE_S = 10.0         # total time retries on transient errors may take


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
  from google.cloud.storage.retry import DEFAULT_RETRY
  # pylint: enable=import-outside-toplevel
  try:
    client = gcs_client()
  except google.auth.exceptions.GoogleAuthError as e:
    raise UserError(f"{what} {path}: no Google Cloud credentials found "
                    f"({one_line(e)}); {AUTH_HELP}") from None
  try:
    blobs = client.list_blobs(bucket_name, prefix=key, max_results=1,
                              timeout=_CHECK_TIMEOUT_S,
                              retry=DEFAULT_RETRY.with_timeout(_CHECK_DEADLINE_S))
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
