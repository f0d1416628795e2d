"""The bad inputs a user can give the CLI, as data: tests/test_bad_inputs.py runs them.

Every case must end with exit code 2 (the documented code for user errors),
exactly one `funmatch: error:` line, no traceback, and nothing changed in the
targeted workdir. `pytest tests/test_bad_inputs.py --bad-input-table FILE` also
writes the markdown table of docs/reliability.md (input, exit code, message,
workdir changed) to FILE.
"""
import contextlib
import dataclasses
import functools
import os
import shutil
import subprocess
import sys
from typing import Callable, Optional, Sequence

import tfds_testdata
from conftest import (TEACHER_OVERRIDES, TINY_OVERRIDES, TINY_STUDENT_ARG,
                      TINY_TEACHER_ARG, repo_path)

DIGITS = repo_path("configs", "digits.py")
DIGITS_TEACHER = repo_path("configs", "digits_teacher.py")
DIGITS_FAMILY = repo_path("configs", "digits_family.py")


def distill(teacher: str, workdir: str, *extra: str, recipe: str = "") -> list[str]:
  """funmatch-distill arguments for the tiny digits student of `teacher`."""
  return ["--config", f"{DIGITS}:{TINY_STUDENT_ARG},teacher={teacher}{recipe}",
          "--workdir", workdir, "--config.teacher.width=0.5", *TINY_OVERRIDES, *extra]


def teacher_run(workdir: str, *extra: str) -> list[str]:
  """funmatch-train arguments of the tiny digits teacher (conftest's teacher_workdir)."""
  return ["--config", f"{DIGITS_TEACHER}:{TINY_TEACHER_ARG}", "--workdir", workdir,
          *TEACHER_OVERRIDES, *TINY_OVERRIDES, *extra]


def write_bit_npz(path: str, num_classes: int, depth, width: float = 0.5) -> str:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from funmatch.models import bit  # pylint: disable=import-outside-toplevel
  from funmatch.weights import files, layouts  # pylint: disable=import-outside-toplevel
  model = bit.Model(num_classes=num_classes, depth=depth, width=width)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  files.write_npz(path, layouts.file_arrays("bit", params), {})  # official names, no metadata
  return path


def _png(size: int = 16) -> bytes:
  import io  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  buffer = io.BytesIO()
  Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


class _Exploit:
  """Unpickling this would create `path`: proof that loading ran code."""

  def __init__(self, path: str):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


class Bench:
  """The files and workdirs the cases point at, made on first use under `root`.

  `trained` is a finished funmatch-train workdir of `teacher_run`; without one the
  bench trains it (about half a minute). `jpeg_tfds` is conftest's fixture of the
  same name (tests/tfds_testdata.py); without one the bench prepares it. `bucket`
  is gs://BUCKET of a Cloud Storage emulator (tests/gcs_emulator.py) for the
  gs:// cases.
  """

  def __init__(self, root: str, trained: Optional[str] = None,
               jpeg_tfds: Optional[dict[str, str]] = None, bucket: Optional[str] = None):
    self.root = root
    self._trained = trained
    self._jpeg_tfds = jpeg_tfds
    self._bucket = bucket
    self._held = contextlib.ExitStack()

  def gs(self, name: str) -> str:
    """A fresh gs:// location in the emulator's bucket, named after `name`."""
    assert self._bucket, "the gs:// cases need Bench(bucket=...)"
    return f"{self._bucket}/{os.path.basename(self.root)}/{name}"

  def close(self) -> None:
    self._held.close()

  def _path(self, *parts: str) -> str:
    path = os.path.join(self.root, *parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path

  def _text_file(self, name: str, text: str) -> str:
    path = self._path(name)
    with open(path, "w") as f:
      f.write(text)
    return path

  def _folder(self, name: str, files: dict[str, bytes]) -> str:
    """An image-folder root with `files` ("class/file.png": bytes; "class/" = empty)."""
    root = self._path(name)
    os.makedirs(root, exist_ok=True)
    for rel, data in files.items():
      os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
      if not rel.endswith("/"):
        with open(os.path.join(root, rel), "wb") as f:
          f.write(data)
    return root

  # ---- teachers ----
  @functools.cached_property
  def teacher(self) -> str:
    return write_bit_npz(self._path("teacher.npz"), 10, [1, 1, 2, 2])

  @functools.cached_property
  def r26(self) -> str:
    return write_bit_npz(self._path("r26.npz"), 10, 26)

  @functools.cached_property
  def five_classes(self) -> str:
    return write_bit_npz(self._path("five.npz"), 5, [1, 1, 2, 2])

  @functools.cached_property
  def garbage_npz(self) -> str:
    path = self._path("corrupt.npz")
    with open(path, "wb") as f:
      f.write(b"PK\x03\x04 this zip ends too early")
    return path

  @functools.cached_property
  def truncated_npz(self) -> str:
    path = self._path("truncated.npz")
    with open(self.teacher, "rb") as f:
      data = f.read()
    with open(path, "wb") as f:
      f.write(data[:len(data) // 2])
    return path

  @functools.cached_property
  def timm_wide(self) -> str:
    """A timm ResNetV2 state dict (safetensors) twice as wide as the teacher config."""
    import functools as ft  # pylint: disable=import-outside-toplevel,reimported
    from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
    import timm_import  # pylint: disable=import-outside-toplevel
    timm = timm_import.import_timm()
    network = timm.models.resnetv2.ResNetV2(
        layers=[1, 1, 2, 2], width_factor=1, stem_type="fixed", num_classes=10,
        conv_layer=ft.partial(timm.layers.StdConv2d, eps=1e-8))
    path = self._path("timm_wide.safetensors")
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, path)
    return path

  @functools.cached_property
  def pickled_pth(self) -> str:
    import torch  # pylint: disable=import-outside-toplevel
    path = self._path("pickled.pth")
    torch.save({"stem.conv.weight": torch.zeros(2),
                "extra": _Exploit(self._path("executed.marker"))}, path)
    return path

  @functools.cached_property
  def pickled_npz(self) -> str:
    import numpy as np  # pylint: disable=import-outside-toplevel
    path = self._path("pickled.npz")
    np.savez(path, kernel=np.array([_Exploit(self._path("executed.marker"))],
                                   dtype=object))
    return path

  # ---- data ----
  @functools.cached_property
  def bad_image(self) -> str:
    return self._folder("bad_image", {"a/ok.png": _png(), "a/broken.png": b"\x89PNG cut"})

  @functools.cached_property
  def empty(self) -> str:
    return self._folder("empty", {})

  @functools.cached_property
  def empty_class(self) -> str:
    return self._folder("empty_class", {"cat/a.png": _png(), "dog/": b""})

  @functools.cached_property
  def garbage_jpg(self) -> str:
    return self._folder("garbage_jpg", {"cat/broken.jpg":
                                        b"\xff\xd8\xff\xe0 definitely not a jpeg"})

  @functools.cached_property
  def truncated_png(self) -> str:
    png = _png(64)
    return self._folder("truncated_png", {"cat/ok.png": _png(),
                                          "dog/cut.png": png[:len(png) // 2]})

  @functools.cached_property
  def zero_byte_jpg(self) -> str:
    return self._folder("zero_byte_jpg", {"cat/ok.png": _png(), "dog/empty.jpg": b""})

  # ---- TFDS (ArrayRecord / TFRecord) ----
  @functools.cached_property
  def jpeg_tfds(self) -> dict[str, str]:
    if self._jpeg_tfds is None:
      self._jpeg_tfds = tfds_testdata.prepare_all(self._path("jpeg_tfds", ""))
    return self._jpeg_tfds

  def _damaged_copy(self, name: str, damage: Callable[[str], None]) -> str:
    """A copy of the ArrayRecord dataset with train shard 1 damaged by `damage`."""
    data_dir = tfds_testdata.copy_dataset(self.jpeg_tfds["array_record"],
                                          self._path(name))
    damage(tfds_testdata.shard_path(data_dir, "array_record", 1))
    return data_dir

  @functools.cached_property
  def missing_shard(self) -> str:
    return self._damaged_copy("missing_shard", os.remove)

  @functools.cached_property
  def truncated_shard(self) -> str:
    """Cut in half: the record index at the file's end is gone."""
    return self._damaged_copy("truncated_shard",
                              lambda path: os.truncate(path, os.path.getsize(path) // 2))

  @functools.cached_property
  def garbled_shard(self) -> str:
    """Header and record index intact, a record near the start overwritten: the
    up-front check passes, a read finds it (by its chunk checksum). The tiny run's
    first batch (64 > 40 examples) reads every record."""
    def garble(path):
      with open(path, "r+b") as f:
        f.seek(100)
        f.write(bytes(range(200)))
    return self._damaged_copy("garbled_shard", garble)

  # ---- a ConvNeXt / Swin teacher ----
  @functools.cached_property
  def swin_teacher(self) -> str:
    """digits_family_teacher.py's Swin with random weights: no training, no compile."""
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from funmatch import config_util, models  # pylint: disable=import-outside-toplevel
    from funmatch.weights import layouts  # pylint: disable=import-outside-toplevel
    recipe = config_util.load_recipe(DIGITS, "digits_family_teacher")
    options = {k: v for k, v in recipe.model("swin", 32).items()
               if k not in models.MODEL_META_KEYS}
    model = models.get_model("swin", 10, **options)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3)))
    params = jax.tree.map(lambda s: np.full(s.shape, 0.01, np.float32), shapes["params"])
    path = self._path("swin_teacher.safetensors")
    layouts.save_params("swin", path, params, resolution=32, format="safetensors",
                        options=options)
    return path

  # ---- configs ----
  @functools.cached_property
  def broken_config(self) -> str:
    return self._text_file("broken_config.py", "def get_config(:\n  return None\n")

  # ---- workdirs ----
  @functools.cached_property
  def regular_file(self) -> str:
    return self._text_file("a_file", "not a directory\n")

  @functools.cached_property
  def readonly_parent(self) -> str:
    """A directory the user cannot write in (root ignores modes: /proc then)."""
    if os.geteuid() == 0:
      return "/proc"
    path = self._path("readonly")
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o500)
    return path

  @functools.cached_property
  def trained(self) -> str:
    if self._trained is None:
      from funmatch.train import cli  # pylint: disable=import-outside-toplevel
      workdir = self._path("trained")
      with contextlib.redirect_stdout(sys.stderr):
        assert cli.train_main(["funmatch-train", *teacher_run(workdir)]) == 0
      self._trained = workdir
    return self._trained

  @functools.cached_property
  def corrupt_trained(self) -> str:
    """A copy of `trained` whose every checkpoint has cut-short array files."""
    workdir = self._path("corrupt_trained")
    shutil.copytree(self.trained, workdir)
    truncate_checkpoint_arrays(os.path.join(workdir, "checkpoints"))
    return workdir

  @functools.cached_property
  def locked(self) -> str:
    """A fresh workdir whose lock this process holds (as a running job would)."""
    from funmatch import lease  # pylint: disable=import-outside-toplevel
    path = self._path("locked")
    self._held.enter_context(lease.hold_workdir(path))
    return path

  @functools.cached_property
  def export_exists(self) -> str:
    path = self._path("exists.npz")
    with open(path, "wb") as f:
      f.write(b"an earlier export\n")
    return path


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  tool: str  # distill | train | eval | export | predict | fetch
  args: Callable[[Bench, str], list[str]]  # (bench, fresh workdir path) -> argv
  match: str  # must appear in the error line
  workdir: Callable[[Bench, str], str] = lambda bench, run: run  # what must not change
  env: Optional[dict[str, str]] = None  # cases that need their own process


def _d(*extra, recipe=""):
  return lambda b, run: distill(b.teacher, run, *extra, recipe=recipe)


def _family(*extra, recipe=""):
  """funmatch-distill of configs/digits_family.py from the bench's Swin teacher."""
  return lambda b, run: ["--config", f"{DIGITS_FAMILY}:family=swin,teacher={b.swin_teacher},"
                         f"steps=30,batch_size=64{recipe}", "--workdir", run,
                         *TINY_OVERRIDES, *extra]


def truncate_checkpoint_arrays(directory: str) -> None:
  """Cuts every Orbax array file under `directory` to 10 bytes (a damaged save)."""
  for dirpath, _, files in os.walk(directory):
    if os.path.basename(dirpath) == "d":  # Orbax/OCDBT data files
      for name in files:
        os.truncate(os.path.join(dirpath, name), 10)


def _folder(attr):
  return lambda b, run: distill(b.teacher, run, "--config.input.source=folder",
                                f"--config.input.root={getattr(b, attr)}")


def _tfds(attr, *extra):
  """Distillation from a TFDS dataset of bench.jpeg_tfds (3 classes, so the run takes
  the 10-class digits teacher's class count: the food_sun.py way)."""
  def args(b, run):
    data_dir = getattr(b, attr) if not attr.startswith("jpeg:") else \
        b.jpeg_tfds[attr.removeprefix("jpeg:")]
    return distill(b.teacher, run, "--config.input.source=tfds",
                   f"--config.input.name={tfds_testdata.NAME}",
                   f"--config.input.data_dir={data_dir}", "--config.num_classes=10",
                   *extra)
  return args


# The damaged file of the ArrayRecord cases (messages name its full path).
SHARD_1 = f"{tfds_testdata.NAME}-train.array_record-00001-of-{tfds_testdata.NUM_SHARDS:05d}"


def _teacher(attr):
  return lambda b, run: distill(getattr(b, attr), run)


def _on(attr):
  return lambda b, run: getattr(b, attr)


# No credentials at all, and none of the emulator's settings: what a user sees on
# a laptop or VM where nobody ran `gcloud auth application-default login`.
NO_CREDENTIALS = {"STORAGE_EMULATOR_HOST": "", "TENSORSTORE_GCS_HTTP_URL": "",
                  "GOOGLE_AUTH_TOKEN_FOR_TESTING": "",
                  "GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/funmatch-key.json",
                  "CLOUDSDK_CONFIG": "/nonexistent/gcloud", "NO_GCE_CHECK": "true",
                  "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"}


CASES = [
    # Config keys, types and values.
    Case("unknown config key", "distill", _d("--config.student.detph=3"), "detph"),
    Case("wrong value type (lr=fast)", "distill", _d("--config.lr=fast"), "config.lr"),
    Case("wrong value type (seed=1.5)", "distill", _d("--config.seed=1.5"), "config.seed"),
    Case("unknown teaching mode", "distill", _d("--config.teaching=telepathy"),
         "config.teaching"),
    Case("teacher without config", "distill",
         _d("--config.teachers=('teacher','assistant')"), "config.assistant"),
    Case("unknown distance", "distill", _d("--config.objective_args.distance=cosine"),
         "config.objective_args.distance"),
    Case("a key that moved (temperature)", "distill", _d("--config.temperature=2.0"),
         "moved to config.objective_args.temperature"),
    Case("unknown weight-decay mode", "distill", _d("--config.wd_mode=l2"), "config.wd_mode"),
    Case("unknown optimizer", "distill", _d("--config.optax_name=lion"), "config.optax_name"),
    Case("zero steps", "distill", _d("--config.total_steps=0", "--config.total_epochs=0"),
         "total_"),
    Case("batch size 0", "distill", _d("--config.input.batch_size=0"), "batch_size"),
    Case("negative mixup probability", "distill", _d("--config.mixup.p=-0.5"),
         "config.mixup.p"),
    Case("unknown dtype", "distill", _d("--config.student.dtype=float8"), "dtype"),
    Case("negative eval cadence", "distill", _d("--config.evals.test.every_steps=-1"),
         "config.evals.test.every_steps=-1"),
    Case("negative eval size", "distill", _d("--config.evals.test.max_examples=-5"),
         "config.evals.test.max_examples=-5"),
    Case("unknown conv implementation", "distill", _d("--config.student.conv_impl=cudnn"),
         "config.student.conv_impl='cudnn'"),
    Case("unknown data source", "distill", _d("--config.input.source=s3"),
         "input.source"),
    Case("unknown digits split", "distill", _d("--config.input.split=validation"),
         "input.split"),
    Case("image size too small (4px)", "distill", _d("--config.input.image_size=4"),
         "image_size"),
    Case("student resolution 0", "distill", _d("--config.student.res=0"), "student.res"),
    Case("shampoo block size 0", "distill",
         _d("--config.optax.block_size=0", recipe=",optimizer=shampoo"), "block_size=0"),
    Case("shampoo negative epsilon", "distill",
         _d("--config.optax.matrix_epsilon=-1e-6", recipe=",optimizer=shampoo"),
         "matrix_epsilon"),
    Case("shampoo unknown graft", "distill",
         _d("--config.optax.graft_type=lion", recipe=",optimizer=shampoo"),
         "graft_type='lion'"),
    Case("unknown recipe argument", "distill",
         lambda b, run: ["--config", f"{DIGITS}:tacher=x", "--workdir", run], "tacher"),
    Case("missing config file", "distill",
         lambda b, run: ["--config", os.path.join(b.root, "nope.py"), "--workdir", run],
         "nope.py"),
    Case("config file with a syntax error", "distill",
         lambda b, run: ["--config", b.broken_config, "--workdir", run], "--config"),
    Case("batch not divisible by 2 devices", "distill", _d("--config.input.batch_size=63"),
         "2 devices", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                           "JAX_PLATFORMS": "cpu"}),
    # ConvNeXt / Swin options.
    Case("unknown Swin variant", "distill", _family("--config.teacher.variant=huge"),
         "Swin variant='huge' is unknown; use one of tiny, small, base, large"),
    Case("unknown ConvNeXt variant", "distill",
         _family("--config.student.variant=mega", recipe=",student=convnext"),
         "ConvNeXt variant='mega' is unknown; use one of atto, femto, pico, nano, tiny"),
    Case("Swin windows that do not fit the image size", "distill",
         _family("--config.teacher.img_size=48"),
         "Swin img_size=48 does not fit window_size=2 with patch_size=2"),
    Case("Swin teacher for ViTKD's ViT tokens", "distill",
         _family(recipe=",student=vit,objective=vitkd"),
         "distils ViT tokens, but config.teacher is a model without the tap(s) block0"),
    # Teacher files.
    Case("missing teacher file", "distill",
         lambda b, run: distill(os.path.join(b.root, "nope.npz"), run), "nope.npz"),
    Case("garbage teacher .npz", "distill", _teacher("garbage_npz"), "corrupt.npz"),
    Case("truncated teacher .npz", "distill", _teacher("truncated_npz"), "truncated.npz"),
    Case("teacher .npz of another depth", "distill", _teacher("r26"), "does not fit"),
    Case("teacher head with 5 classes", "distill", _teacher("five_classes"), "5 classes"),
    Case("teacher workdir with corrupt checkpoints", "distill",
         _teacher("corrupt_trained"), "cannot read the checkpoint"),
    Case("teacher timm file of another width", "distill", _teacher("timm_wide"),
         "shape clashes (head.fc.weight file [10, 2048, 1, 1] vs model [10, 1024, 1, 1]"),
    Case("teacher .pth holding pickled objects", "distill", _teacher("pickled_pth"),
         "holds pickled Python objects"),
    Case("teacher .npz holding pickled objects", "distill", _teacher("pickled_npz"),
         "holds pickled Python objects"),
    Case("teacher sha256 mismatch", "distill",
         lambda b, run: distill(b.teacher, run, "--config.teacher.init_sha256=" + "0" * 64),
         "but config.teacher.init_sha256 is 000"),
    # Weight names.
    Case("unknown weight name", "distill", lambda b, run: distill("BiT-M-R50x9", run),
         "known names: FunMatch-224px-i1k82.8"),
    Case("weight name not in the cache (offline)", "distill",
         lambda b, run: distill("FunMatch-teacher-224px-i1k", run),
         "run `funmatch-fetch FunMatch-teacher-224px-i1k`"),
    Case("fetch an unknown name", "fetch", lambda b, run: ["BiT-X-R1x1"], "known names"),
    Case("fetch while offline", "fetch", lambda b, run: ["FunMatch-160px-i1k80.5"],
         "cannot download", env={"FUNMATCH_WEIGHTS_MIRROR": "http://127.0.0.1:9"}),
    # Data.
    Case("TFDS dataset not prepared", "distill",
         lambda b, run: distill(b.teacher, run, "--config.input.source=tfds",
                                "--config.input.name=mnist",
                                f"--config.input.data_dir={b.empty}"), "mnist"),
    Case("TFRecord-only TFDS with random_access=True", "distill",
         _tfds("jpeg:tfrecord", "--config.input.random_access=True"),
         "input.random_access=True but TFDS"),
    Case("missing ArrayRecord shard", "distill", _tfds("missing_shard"),
         f"{SHARD_1} is missing"),
    Case("truncated ArrayRecord shard", "distill", _tfds("truncated_shard"),
         f"{SHARD_1} is damaged"),
    Case("garbled ArrayRecord shard (found by reading)", "distill",
         _tfds("garbled_shard"), f"{SHARD_1} is damaged"),
    Case("image folder without classes", "distill", _folder("empty"), "no class"),
    Case("empty class folder (empty split)", "distill", _folder("empty_class"),
         "dog has no"),
    Case("missing image folder", "distill",
         lambda b, run: distill(b.teacher, run, "--config.input.source=folder",
                                f"--config.input.root={b.root}/nope"), "nope"),
    Case("garbage .jpg", "distill", _folder("garbage_jpg"), "broken.jpg"),
    Case("truncated .png", "distill", _folder("truncated_png"), "cut.png"),
    Case("zero-byte .jpg", "distill", _folder("zero_byte_jpg"), "empty.jpg"),
    # Workdirs.
    Case("workdir is a regular file", "distill",
         lambda b, run: distill(b.teacher, b.regular_file), "is a file",
         workdir=_on("regular_file")),
    Case("workdir under a regular file", "distill",
         lambda b, run: distill(b.teacher, os.path.join(b.regular_file, "run")),
         "cannot create --workdir", workdir=lambda b, run: os.path.join(b.regular_file, "run")),
    Case("workdir in a read-only directory", "distill",
         lambda b, run: distill(b.teacher, os.path.join(b.readonly_parent, "funmatch-run")),
         "cannot create --workdir",
         workdir=lambda b, run: os.path.join(b.readonly_parent, "funmatch-run")),
    Case("workdir holding another run", "train",
         lambda b, run: teacher_run(b.trained, "--config.student.width=1.0"),
         "holds another run", workdir=_on("trained")),
    Case("workdir in use by another run", "distill",
         lambda b, run: distill(b.teacher, b.locked), "in use by another run",
         workdir=_on("locked")),
    Case("distill config given to funmatch-train", "train", _d(), "funmatch-distill"),
    Case("train config given to funmatch-distill", "distill",
         lambda b, run: teacher_run(run), "funmatch-train"),
    # Eval and export.
    Case("eval of an empty workdir", "eval", _d(), "no funmatch run"),
    Case("eval of corrupt checkpoints", "eval",
         lambda b, run: teacher_run(b.corrupt_trained), "cannot read the checkpoint",
         workdir=_on("corrupt_trained")),
    Case("eval --step=abc", "eval", lambda b, run: teacher_run(b.trained, "--step=abc"),
         "--step", workdir=_on("trained")),
    Case("eval --step of no checkpoint", "eval",
         lambda b, run: teacher_run(b.trained, "--step=999"), "step 999",
         workdir=_on("trained")),
    Case("export --output not .npz", "export",
         lambda b, run: teacher_run(b.trained, f"--output={b.root}/student.txt"), ".npz",
         workdir=_on("trained")),
    Case("export over an existing file", "export",
         lambda b, run: teacher_run(b.trained, f"--output={b.export_exists}"),
         "already exists", workdir=_on("trained")),
    Case("export --format onnx", "export",
         lambda b, run: teacher_run(b.trained, "--format=onnx",
                                    f"--output={b.root}/student.onnx"), "'onnx'",
         workdir=_on("trained")),
    Case("export --format timm to .npz", "export",
         lambda b, run: teacher_run(b.trained, "--format=timm",
                                    f"--output={b.root}/student.npz"), ".safetensors",
         workdir=_on("trained")),
    # Predict.
    Case("predict an image that does not decode", "predict",
         lambda b, run: ["--model", b.trained, "--images", b.bad_image], "broken.png",
         workdir=_on("trained")),
    Case("predict with a model that does not exist", "predict",
         lambda b, run: ["--model", os.path.join(b.root, "nope"), "--images", b.bad_image],
         "nope"),
    Case("predict --topk 0", "predict",
         lambda b, run: ["--model", b.trained, "--images", b.bad_image, "--topk", "0"],
         "--topk", workdir=_on("trained")),
    # Cloud Storage (the emulator; nothing may appear in the bucket either).
    Case("gs:// workdir in a bucket that does not exist", "distill",
         lambda b, run: distill(b.teacher, "gs://funmatch-no-such-bucket/run"),
         "bucket gs://funmatch-no-such-bucket does not exist",
         workdir=lambda b, run: "gs://funmatch-no-such-bucket/run"),
    Case("gs:// workdir without credentials", "distill",
         lambda b, run: distill(b.teacher, b.gs("no_credentials")),
         "no Google Cloud credentials found", workdir=lambda b, run: b.gs("no_credentials"),
         env=NO_CREDENTIALS),
    Case("gs:// teacher file that does not exist", "distill",
         lambda b, run: distill(b.gs("nope.npz"), b.gs("missing_teacher")),
         "nope.npz", workdir=lambda b, run: b.gs("missing_teacher")),
    Case("malformed URL (one slash)", "distill",
         lambda b, run: distill(b.teacher, "gs:/funmatch-test/run"), "two slashes",
         workdir=lambda b, run: os.path.abspath("gs:")),
    Case("gs:// TFDS data_dir with no prepared dataset", "distill",
         lambda b, run: distill(b.teacher, b.gs("unprepared_run"),
                                "--config.input.source=tfds", "--config.input.name=mnist",
                                f"--config.input.data_dir={b.gs('tfds')}"),
         "is not prepared", workdir=lambda b, run: b.gs("")),
]


def snapshot(path: str):
  """Every file under `path` with size and mtime (None if it does not exist)."""
  if "://" in path:
    return _remote_snapshot(path)
  if not os.path.exists(path):
    return None
  if not os.path.isdir(path):
    stat = os.stat(path)
    return {"": (stat.st_size, stat.st_mtime_ns)}
  found = {}
  for root, dirs, files in os.walk(path):
    for name in files + dirs:
      full = os.path.join(root, name)
      stat = os.stat(full)
      found[os.path.relpath(full, path)] = (
          None if name in dirs else stat.st_size, stat.st_mtime_ns)
  return found


def _remote_snapshot(url: str):
  """Every object under `url` with size and generation (None if there is none)."""
  import fsspec  # pylint: disable=import-outside-toplevel
  fs, key = fsspec.core.url_to_fs(url)
  try:
    found = fs.find(key.rstrip("/"), detail=True)
  except (FileNotFoundError, OSError):  # e.g. the bucket does not exist
    return None
  return {name: (info["size"], info.get("generation")) for name, info in found.items()} or None


@dataclasses.dataclass
class Row:
  name: str
  code: int
  message: str  # the error line(s), or the tail of stderr
  errors: int  # number of `funmatch: error:` lines
  traceback: bool
  changed: bool
  matched: bool

  @property
  def ok(self) -> bool:
    return (self.code == 2 and self.errors == 1 and not self.traceback
            and not self.changed and self.matched)


Runner = Callable[[str, Sequence[str], Optional[dict]], tuple[int, str, str]]


def run_case(case: Case, bench: Bench, run: str, runner: Runner) -> Row:
  """Runs one case with `runner(tool, argv, env) -> (code, stdout, stderr)`."""
  args = case.args(bench, run)
  target = case.workdir(bench, run)
  before = snapshot(target)
  code, out, err = runner(case.tool, args, case.env)
  errors = [line for line in err.splitlines() if line.startswith("funmatch: error:")]
  message = " | ".join(errors) if errors else (err.strip().splitlines() or [""])[-1]
  return Row(case.name, code, message, len(errors),
             "Traceback" in out or "Traceback" in err, snapshot(target) != before,
             any(case.match in line for line in errors))


def subprocess_runner(tool, args, env=None):
  """The CLI in a fresh Python process, as a user would run it."""
  code = ("import sys; from funmatch.train import cli; "
          f"sys.exit(cli.{tool}_main(['funmatch-{tool}', *sys.argv[1:]]))")
  result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          text=True, env=dict(os.environ, **(env or {})), timeout=600,
                          check=False)
  return result.returncode, result.stdout, result.stderr


def markdown_table(rows: Sequence[Row]) -> str:
  """One row per case: input, exit code, the message, workdir changed, ok."""
  lines = ["| # | input | exit | message | workdir changed | ok |",
           "|---|---|---|---|---|---|"]
  for i, row in enumerate(rows, 1):
    message = row.message.removeprefix("funmatch: error: ").replace("|", "\\|")
    message += " (+ a traceback)" if row.traceback else ""
    lines.append(f"| {i} | {row.name} | {row.code} | {message} | "
                 f"{'yes' if row.changed else 'no'} | {'ok' if row.ok else 'FAIL'} |")
  return "\n".join(lines) + "\n"


# The storage faults mid-run that tests meet (test_faults.py, test_gcs_run.py):
# (fault, exit code, its line, resumed bit-identically); conftest appends their
# table to --bad-input-table at the end of the session.
FAULT_ROWS: list[tuple[str, int, str, bool]] = []


def fault_table(rows: Sequence[tuple[str, int, str, bool]]) -> str:
  """tests/test_faults.py's storage faults mid-run: fault, exit code (4), the one
  line, and whether the same command then resumed bit-identically."""
  lines = ["| # | fault during a run | exit | message | resumed bit-identically |",
           "|---|---|---|---|---|"]
  for i, (name, code, message, resumed) in enumerate(rows, 1):
    message = message.removeprefix("funmatch: error: ").replace("|", "\\|")
    lines.append(f"| {i} | {name} | {code} | {message} | {'yes' if resumed else 'no'} |")
  return "\n".join(lines) + "\n"
