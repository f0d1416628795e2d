"""Runs the funmatch CLI against bad inputs; prints one table row per input.

  python tools/badinput_sweep.py [--in-process] [--only SUBSTRING]

Every row must show exit code 2 (the documented code for user errors), exactly one
`funmatch: error:` line, no traceback, and nothing changed in the targeted workdir.
The exit status is 1 if any row fails. `CASES` is also the case list of
tests/test_bad_inputs.py, which runs the cases in-process.
"""
import argparse
import contextlib
import dataclasses
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(REPO, "configs", "digits.py")
DIGITS_TEACHER = os.path.join(REPO, "configs", "digits_teacher.py")
# The tiny 16px runs of tests/conftest.py.
TINY_TEACHER_ARG = "steps=40,batch_size=64,res=16"
TINY_STUDENT_ARG = "steps=30,batch_size=64,res=16,teacher_res=16"
TINY_OVERRIDES = ("--config.log_every_steps=5", "--config.eval_every_steps=0",
                  "--config.checkpoint_every_steps=10")
TEACHER_OVERRIDES = ("--config.student.width=0.5", "--config.lr=0.003",
                     "--config.schedule.warmup_steps=10")


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
  model = bit.Model(num_classes=num_classes, depth=depth, width=width)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  bit.save_npz(path, params)
  return path


def _png(size: int = 16) -> bytes:
  import io  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  buffer = io.BytesIO()
  Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


class Bench:
  """The files and workdirs the cases point at, made on first use under `root`.

  `trained` is a finished funmatch-train workdir of `teacher_run`; without one the
  bench trains it (about half a minute).
  """

  def __init__(self, root: str, trained: Optional[str] = None):
    self.root = root
    self._trained = trained
    self._held = contextlib.ExitStack()

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

  # ---- data ----
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
    from funmatch.train import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
    path = self._path("locked")
    self._held.enter_context(workdir_lib.lock(path))
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
  tool: str  # distill | train | eval | export
  args: Callable[[Bench, str], list[str]]  # (bench, fresh workdir path) -> argv
  match: str  # must appear in the error line
  workdir: Callable[[Bench, str], str] = lambda bench, run: run  # what must not change
  env: Optional[dict[str, str]] = None  # cases that need their own process


def _d(*extra, recipe=""):
  return lambda b, run: distill(b.teacher, run, *extra, recipe=recipe)


def truncate_checkpoint_arrays(directory: str) -> None:
  """Cuts every Orbax array file under `directory` to 10 bytes (a damaged save)."""
  for dirpath, _, files in os.walk(directory):
    if os.path.basename(dirpath) == "d":  # Orbax/OCDBT data files
      for name in files:
        os.truncate(os.path.join(dirpath, name), 10)


def _folder(attr):
  return lambda b, run: distill(b.teacher, run, "--config.input.source=folder",
                                f"--config.input.root={getattr(b, attr)}")


def _teacher(attr):
  return lambda b, run: distill(getattr(b, attr), run)


def _on(attr):
  return lambda b, run: getattr(b, attr)


CASES = [
    # Config keys, types and values.
    Case("unknown config key", "distill", _d("--config.student.detph=3"), "detph"),
    Case("wrong value type (lr=fast)", "distill", _d("--config.lr=fast"), "config.lr"),
    Case("wrong value type (seed=1.5)", "distill", _d("--config.seed=1.5"), "config.seed"),
    Case("unknown teaching mode", "distill", _d("--config.teaching=telepathy"),
         "config.teaching"),
    Case("teacher without config", "distill",
         _d("--config.teachers=('teacher','assistant')"), "config.assistant"),
    Case("unknown distance", "distill", _d("--config.distance=cosine"), "config.distance"),
    Case("unknown optimizer", "distill", _d("--config.optax_name=lion"), "config.optax_name"),
    Case("zero steps", "distill", _d("--config.total_steps=0", "--config.total_epochs=0"),
         "total_"),
    Case("batch size 0", "distill", _d("--config.input.batch_size=0"), "batch_size"),
    Case("negative mixup probability", "distill", _d("--config.mixup.p=-0.5"),
         "config.mixup.p"),
    Case("unknown dtype", "distill", _d("--config.student.dtype=float8"), "dtype"),
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
    # Teacher files.
    Case("missing teacher file", "distill",
         lambda b, run: distill(os.path.join(b.root, "nope.npz"), run), "nope.npz"),
    Case("garbage teacher .npz", "distill", _teacher("garbage_npz"), "corrupt.npz"),
    Case("truncated teacher .npz", "distill", _teacher("truncated_npz"), "truncated.npz"),
    Case("teacher .npz of another depth", "distill", _teacher("r26"), "does not fit"),
    Case("teacher head with 5 classes", "distill", _teacher("five_classes"), "5 classes"),
    Case("teacher workdir with corrupt checkpoints", "distill",
         _teacher("corrupt_trained"), "cannot read the checkpoint"),
    # Data.
    Case("TFDS dataset not prepared", "distill",
         lambda b, run: distill(b.teacher, run, "--config.input.source=tfds",
                                "--config.input.name=mnist",
                                f"--config.input.data_dir={b.empty}"), "mnist"),
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
]


def snapshot(path: str):
  """Every file under `path` with size and mtime (None if it does not exist)."""
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


def in_process_runner(tool, args, env=None):
  """The CLI's entry point in this process (faster; cases with `env` need a subprocess)."""
  import io  # pylint: disable=import-outside-toplevel
  from funmatch.train import cli  # pylint: disable=import-outside-toplevel
  if env:
    return subprocess_runner(tool, args, env)
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      code = getattr(cli, f"{tool}_main")([f"funmatch-{tool}", *args])
    except SystemExit as e:
      code = e.code
  return code or 0, out.getvalue(), err.getvalue()


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--in-process", action="store_true",
                      help="call the entry points in this process (faster)")
  parser.add_argument("--only", default="", help="run the cases whose name has this")
  parser.add_argument("--trained", default=None,
                      help="a finished workdir of the tiny digits teacher to reuse")
  options = parser.parse_args()
  runner = in_process_runner if options.in_process else subprocess_runner
  cases = [c for c in CASES if options.only in c.name]
  rows = []
  with tempfile.TemporaryDirectory(prefix="funmatch-sweep-") as root:
    bench = Bench(root, options.trained)
    try:
      for i, case in enumerate(cases):
        start = time.perf_counter()
        rows.append(run_case(case, bench, os.path.join(root, f"case{i}", "run"), runner))
        print(f"[{i + 1}/{len(cases)}] {case.name}: exit {rows[-1].code} "
              f"({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
    finally:
      bench.close()
  print("| # | input | exit | message | workdir changed | ok |")
  print("|---|---|---|---|---|---|")
  for i, row in enumerate(rows, 1):
    message = row.message.removeprefix("funmatch: error: ").replace(root, "$TMP")
    message = message.replace("|", "\\|") + (" (+ a traceback)" if row.traceback else "")
    print(f"| {i} | {row.name} | {row.code} | {message} | "
          f"{'yes' if row.changed else 'no'} | {'ok' if row.ok else 'FAIL'} |")
  failed = [r.name for r in rows if not r.ok]
  print(f"\n{len(rows) - len(failed)}/{len(rows)} rows ok" +
        (f"; failed: {', '.join(failed)}" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
