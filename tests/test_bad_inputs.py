"""Every user mistake: exit code 2, one 'funmatch: error:' line, workdir untouched."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_OVERRIDES, TINY_STUDENT_ARG, TINY_TEACHER_ARG, repo_path, run_cli
from funmatch.models import bit
from funmatch.train import cli

DIGITS = repo_path("configs", "digits.py")
DIGITS_TEACHER = repo_path("configs", "digits_teacher.py")


def snapshot(path):
  """Every file under `path` with size and mtime (None if it does not exist)."""
  if not os.path.exists(path):
    return None
  found = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      stat = os.stat(full)
      found[os.path.relpath(full, path)] = (stat.st_size, stat.st_mtime_ns)
  return found


def assert_clean_failure(main, args, workdir, capsys, match):
  before = snapshot(workdir)
  code, out, err = run_cli(main, args, capsys)
  assert code == 2, (code, out, err)
  lines = [line for line in err.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("funmatch: error:")]
  assert len(errors) == 1, err
  assert "Traceback" not in err and "Traceback" not in out
  assert match in errors[0], errors[0]
  assert snapshot(workdir) == before


def write_bit_npz(path, num_classes, depth, width=0.5):
  model = bit.Model(num_classes=num_classes, depth=depth, width=width)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  bit.save_npz(str(path), params)
  return str(path)


def distill(teacher, workdir, *extra):
  return ["--config", f"{DIGITS}:{TINY_STUDENT_ARG},teacher={teacher}", "--workdir",
          workdir, "--config.teacher.width=0.5", *TINY_OVERRIDES, *extra]


@pytest.fixture
def good_teacher(tmp_path):
  return write_bit_npz(tmp_path / "teacher.npz", 10, [1, 1, 2, 2])


CASES = {
    "unknown config key": (["--config.student.detph=3"], "detph"),
    "wrong value type": (["--config.lr=fast"], "config.lr"),
    "unknown teaching mode": (["--config.teaching=telepathy"], "config.teaching"),
    "teacher without config": (["--config.teachers=('teacher','assistant')"],
                               "config.assistant"),
    "unknown distance": (["--config.distance=cosine"], "config.distance"),
    "unknown optimizer": (["--config.optax_name=lion"], "config.optax_name"),
    "tfds not prepared": (["--config.input.source=tfds", "--config.input.name=mnist",
                           "--config.input.data_dir={empty}"], "{empty}"),
    "empty image folder": (["--config.input.source=folder",
                            "--config.input.root={empty}"], "{empty}"),
    "missing image folder": (["--config.input.source=folder",
                              "--config.input.root={empty}/nope"], "nope"),
    "unreadable image": (["--config.input.source=folder",
                          "--config.input.root={badimages}"], "broken.jpg"),
    "zero steps": (["--config.total_steps=0", "--config.total_epochs=0"], "total_"),
}

# Shampoo's settings, reachable once the recipe's optimizer=shampoo fills config.optax.
SHAMPOO_CASES = {
    "shampoo block size 0": (["--config.optax.block_size=0"], "block_size=0"),
    "shampoo negative epsilon": (["--config.optax.matrix_epsilon=-1e-6"], "matrix_epsilon"),
    "shampoo unknown graft": (["--config.optax.graft_type=lion"], "graft_type='lion'"),
}


@pytest.mark.parametrize("name", sorted(SHAMPOO_CASES))
def test_bad_shampoo_settings(name, good_teacher, tmp_path, capsys):
  overrides, match = SHAMPOO_CASES[name]
  workdir = str(tmp_path / "run")
  args = distill(good_teacher, workdir, *overrides)
  args[1] += ",optimizer=shampoo"
  assert_clean_failure(cli.distill_main, args, workdir, capsys, match)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_config_values(name, good_teacher, tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  badimages = tmp_path / "images"
  (badimages / "cat").mkdir(parents=True)
  (badimages / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
  overrides, match = CASES[name]
  overrides = [o.format(empty=empty, badimages=badimages) for o in overrides]
  match = match.format(empty=empty)
  workdir = str(tmp_path / "run")
  assert_clean_failure(cli.distill_main, distill(good_teacher, workdir, *overrides),
                       workdir, capsys, match)


def test_missing_teacher_file(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  assert_clean_failure(cli.distill_main, distill(str(tmp_path / "nope.npz"), workdir),
                       workdir, capsys, "nope.npz")


def test_corrupt_teacher_file(tmp_path, capsys):
  path = tmp_path / "corrupt.npz"
  path.write_bytes(b"PK\x03\x04 this zip ends too early")
  workdir = str(tmp_path / "run")
  assert_clean_failure(cli.distill_main, distill(str(path), workdir), workdir, capsys,
                       "corrupt.npz")


def test_teacher_file_that_does_not_fit_the_model(tmp_path, capsys):
  path = write_bit_npz(tmp_path / "r26.npz", 10, 26)
  workdir = str(tmp_path / "run")
  assert_clean_failure(cli.distill_main, distill(path, workdir), workdir, capsys,
                       "does not fit")


def test_teacher_head_with_other_class_count(tmp_path, capsys):
  path = write_bit_npz(tmp_path / "five.npz", 5, [1, 1, 2, 2])
  workdir = str(tmp_path / "run")
  assert_clean_failure(cli.distill_main, distill(path, workdir), workdir, capsys,
                       "5 classes")


def test_workdir_holding_another_run(teacher_workdir, capsys):
  # The teacher's workdir holds a width-0.5 run; a width-1 config must not touch it.
  args = ["--config", f"{DIGITS_TEACHER}:{TINY_TEACHER_ARG}", "--workdir", teacher_workdir,
          *TINY_OVERRIDES]
  assert_clean_failure(cli.train_main, args, teacher_workdir, capsys, "holds another run")


def test_distill_config_given_to_train_and_back(good_teacher, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  assert_clean_failure(cli.train_main, distill(good_teacher, workdir), workdir, capsys,
                       "funmatch-distill")
  args = ["--config", f"{DIGITS_TEACHER}:{TINY_TEACHER_ARG}", "--workdir", workdir]
  assert_clean_failure(cli.distill_main, args, workdir, capsys, "funmatch-train")


def test_unknown_recipe_argument_and_missing_config_file(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  assert_clean_failure(cli.distill_main, ["--config", f"{DIGITS}:tacher=x", "--workdir",
                                          workdir], workdir, capsys, "tacher")
  assert_clean_failure(cli.distill_main, ["--config", str(tmp_path / "nope.py"),
                                          "--workdir", workdir], workdir, capsys, "nope.py")


def test_eval_of_an_empty_workdir(good_teacher, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  assert_clean_failure(cli.eval_main, distill(good_teacher, workdir), workdir, capsys,
                       "no funmatch run")


def test_batch_not_divisible_by_device_count(good_teacher, tmp_path):
  """Two (simulated) devices and an odd batch: refused before anything is written."""
  workdir = str(tmp_path / "run")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  args = distill(good_teacher, workdir, "--config.input.batch_size=63")
  result = subprocess.run(
      [sys.executable, "-c", "import sys; from funmatch.train import cli; "
       "sys.exit(cli.distill_main(sys.argv))", *args],
      env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("funmatch: error:")]
  assert len(errors) == 1 and "63" in errors[0] and "2 devices" in errors[0]
  assert "Traceback" not in result.stderr
  assert not os.path.exists(workdir)
