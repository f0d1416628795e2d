"""funmatch.fileio: the same behaviour on a local disk and on gs:// (emulator)."""
import json
import os
import subprocess
import sys
import uuid

import pytest

from funmatch import fileio
from funmatch.errors import UserError
from conftest import repo_path


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
  """A fresh, empty directory: under tmp_path, or a new prefix in the emulator."""
  if request.param == "local":
    return str(tmp_path)
  gcs = request.getfixturevalue("gcs")
  return f"{gcs.root}/{uuid.uuid4().hex[:12]}"


def test_write_read_list_and_remove(root):
  run = fileio.join(root, "run")
  fileio.makedirs(run)
  config = fileio.join(run, "config.json")
  assert not fileio.exists(config)
  fileio.write_atomic(config, json.dumps({"seed": 1}))
  fileio.makedirs(fileio.join(run, "checkpoints", "10"))
  with fileio.open(fileio.join(run, "checkpoints", "10", "data"), "wb") as f:
    f.write(b"\x00" * 100)
  assert fileio.isfile(config) and not fileio.isdir(config)
  assert fileio.isdir(run) and fileio.isdir(fileio.join(run, "checkpoints"))
  assert json.loads(fileio.read_text(config)) == {"seed": 1}
  assert fileio.listdir(run) == ["checkpoints", "config.json"]
  assert fileio.scandir(run) == [("checkpoints", True), ("config.json", False)]
  assert fileio.abspath(run) == run  # tmp_path is absolute; a URL stays as it is
  assert fileio.getsize(fileio.join(run, "checkpoints", "10", "data")) == 100
  assert fileio.basename(config) == "config.json" and fileio.dirname(config) == run
  fileio.remove(config)
  assert not fileio.exists(config)
  with pytest.raises(FileNotFoundError):
    fileio.remove(config)
  fileio.rmtree(fileio.join(run, "checkpoints"))
  assert not fileio.exists(fileio.join(run, "checkpoints", "10", "data"))
  assert not fileio.isdir(fileio.join(run, "checkpoints"))


def test_append_keeps_earlier_rows_and_shows_flushed_ones(root):
  """metrics.jsonl: each flush publishes every row so far; reopening appends."""
  fileio.makedirs(root)
  path = fileio.join(root, "metrics.jsonl")
  with fileio.open(path, "a") as f:
    f.write('{"step": 1}\n')
    f.flush()
    assert fileio.read_text(path) == '{"step": 1}\n'
    f.write('{"step": 2}\n')
  with fileio.open(path, "a") as f:
    f.write('{"step": 3}\n')
  assert fileio.read_text(path).splitlines() == ['{"step": 1}', '{"step": 2}', '{"step": 3}']
  with fileio.open(path, "ab") as f:
    f.write(b'{"step": 4}\n')
  assert fileio.read_bytes(path).count(b"\n") == 4


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(root):
  fileio.makedirs(root)
  path = fileio.join(root, "eval_10.json")
  fileio.write_atomic(path, "old")
  with pytest.raises(RuntimeError):
    with fileio.atomic_open(path, "w") as f:
      f.write("half of the new")
      raise RuntimeError("killed mid-write")
  assert fileio.read_text(path) == "old"
  assert fileio.listdir(root) == ["eval_10.json"]  # no temp file left behind


def test_gcs_open_for_writing_publishes_nothing_on_an_error(gcs):
  """A gcsfs file would upload what it has when a `with` block fails; ours not."""
  path = f"{gcs.root}/{uuid.uuid4().hex[:12]}/new.json"
  with pytest.raises(RuntimeError):
    with fileio.open(path, "w") as f:
      f.write("half")
      raise RuntimeError("killed mid-write")
  assert not fileio.exists(path)


def test_move_directory_aside(root):
  """checkpoints/<step> -> checkpoints/corrupt-<step>-<time>, recursively."""
  step = fileio.join(root, "checkpoints", "20")
  fileio.makedirs(fileio.join(step, "default"))
  fileio.write_atomic(fileio.join(step, "_CHECKPOINT_METADATA"), "{}")
  fileio.write_atomic(fileio.join(step, "default", "array"), b"\x01" * 1000)
  aside = fileio.join(root, "checkpoints", "corrupt-20-20250101T000000")
  fileio.move(step, aside)
  assert not fileio.exists(step)
  assert fileio.listdir(fileio.join(root, "checkpoints")) == ["corrupt-20-20250101T000000"]
  assert fileio.read_bytes(fileio.join(aside, "default", "array")) == b"\x01" * 1000
  fileio.write_atomic(fileio.join(root, "x"), "x")
  with pytest.raises(FileExistsError):
    fileio.move(fileio.join(root, "x"), aside)


def test_gcs_move_deletes_nothing_when_a_copy_fails(gcs, monkeypatch):
  step = f"{gcs.root}/{uuid.uuid4().hex[:12]}/checkpoints/30"
  names = ["_CHECKPOINT_METADATA", "default/a", "default/b", "default/c"]
  for name in names:
    fileio.write_atomic(f"{step}/{name}", name)
  real_copy, copies = fileio._copy_object, []

  def copy_then_fail(fs, key, new_key):
    if len(copies) == 2:
      raise OSError("503 Service Unavailable")
    real_copy(fs, key, new_key)
    copies.append(new_key)

  monkeypatch.setattr(fileio, "_copy_object", copy_then_fail)
  target = step.replace("/30", "/corrupt-30")
  with pytest.raises(OSError, match="503"):
    fileio.move(step, target)
  assert [fileio.read_text(f"{step}/{n}") for n in names] == names  # source intact
  assert not fileio.exists(target)  # the partial copy was cleaned up


def test_malformed_urls_are_user_errors():
  for path, culprit in [("gs:/bucket/run", "two slashes"), ("gs://", "names no bucket"),
                        ("gs:///run", "names no bucket"),
                        ("gs://My_Bucket/run", "not a valid bucket name")]:
    with pytest.raises(UserError, match=culprit) as e:
      fileio.check_reachable(path, "--workdir")
    assert str(e.value).startswith(f"--workdir {path}")
  fileio.check_reachable("/tmp/somewhere", "--workdir")  # local: nothing to check


def test_unknown_bucket_is_one_line(gcs):
  with pytest.raises(UserError, match="bucket gs://no-such-bucket does not exist"):
    fileio.check_reachable("gs://no-such-bucket/run", "--workdir")
  fileio.check_reachable(f"{gcs.root}/not/written/yet", "--workdir")
  assert not fileio.exists(f"{gcs.root}/not")  # the check wrote nothing


def test_permission_denied_names_the_fix(gcs, monkeypatch):
  """The emulator has no IAM: fake the 403 the real service answers."""
  from google.api_core import exceptions as gexc
  from google.cloud import storage

  def forbidden(*args, **kwargs):
    raise gexc.Forbidden("caller does not have storage.objects.list access")

  monkeypatch.setattr(storage.Client, "list_blobs", forbidden)
  with pytest.raises(UserError, match="permission denied.*gcloud auth application-default login"):
    fileio.check_reachable(f"{gcs.root}/run", "--workdir")


_CHECK_WITHOUT_CREDENTIALS = """
import sys
from funmatch import fileio
from funmatch.errors import UserError
try:
  fileio.check_reachable("gs://some-bucket/run", "--workdir")
except UserError as e:
  print(e)
  sys.exit(2)
print("reachable?!")
"""


def test_no_credentials_fails_fast_in_one_line(tmp_path):
  """No emulator, no ADC file, no metadata server: one line, no hang (the
  subprocess timeout only guards against a hang; it is not a measurement)."""
  env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": repo_path(),
         "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
         "NO_GCE_CHECK": "true",  # a CI machine on GCE must not find its own account
         "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"}
  result = subprocess.run([sys.executable, "-c", _CHECK_WITHOUT_CREDENTIALS], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 2, result.stdout + result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1, result.stdout
  assert lines[0].startswith("--workdir gs://some-bucket/run: no Google Cloud credentials")
  assert "gcloud auth application-default login" in lines[0]
  assert "GOOGLE_APPLICATION_CREDENTIALS" in lines[0]


_IMPORTS_NO_TENSORFLOW = """
import sys
import orbax.checkpoint as ocp
from etils import epath
assert not epath.Path("/tmp").is_dir() or True  # etils caches its TF answer here
from funmatch import fileio
root = sys.argv[1]
fileio.write_atomic(root + "/x.txt", "x")
assert fileio.read_text(root + "/x.txt") == "x" and fileio.listdir(root) == ["x.txt"]
fileio.check_reachable(root, "--workdir")
import jax.numpy as jnp
with ocp.CheckpointManager(root + "/checkpoints") as manager:
  manager.save(1, args=ocp.args.StandardSave({"w": jnp.ones(3)}))
  manager.wait_until_finished()
print("tensorflow imported" if "tensorflow" in sys.modules else "no tensorflow")
"""


def test_gcs_io_and_orbax_do_not_import_tensorflow(gcs):
  """etils.epath would pick TensorFlow's gfile for gs:// (TF is installed here):
  importing fileio must switch it to fsspec, even after etils resolved a path."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("EPATH_USE_TF", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")}
  result = subprocess.run(
      [sys.executable, "-c", _IMPORTS_NO_TENSORFLOW, f"{gcs.root}/{uuid.uuid4().hex[:12]}"],
      capture_output=True, text=True, timeout=120, check=False,
      env={**env, "PYTHONPATH": repo_path()})
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == "no tensorflow"
