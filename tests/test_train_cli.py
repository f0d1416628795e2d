"""End to end through the console entry points on tiny digits runs."""
import json
import os

import numpy as np
import pytest

from conftest import TINY_STUDENT_ARG, distill_args, repo_path, run_cli
from funmatch import checkpoint
from funmatch.train import cli, metrics_io


def test_teacher_learns_digits(teacher_workdir):
  rows = metrics_io.read_metrics(teacher_workdir)
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  # Single-batch losses are noisy: compare the last two logs with the first.
  assert np.mean(losses[-2:]) < 0.5 * losses[0]
  final = [r for r in rows if "test/student_top1" in r][-1]
  assert final["test/student_top1"] > 0.7
  assert final["test/examples"] == 445


def test_distill_lowers_loss_and_writes_checkpoints(student_workdir):
  rows = metrics_io.read_metrics(student_workdir)
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30]
  assert np.mean([r["train/loss"] for r in train_rows[-2:]]) < train_rows[0]["train/loss"]
  for key in ("train/grad_norm", "train/param_norm", "train/update_norm", "train/lr",
              "train/student_entropy", "train/teacher_entropy", "epoch", "img_per_sec"):
    assert key in train_rows[-1]
  assert checkpoint.saved_steps(student_workdir) == [10, 20, 30]
  final = rows[-1]
  for key in ("test/student_top1", "test/teacher_top1", "test/agreement_top1",
              "test/agreement_top5", "test/kl"):
    assert 0.0 <= final[key] <= (1.0 if "top" in key else 50.0)
  assert os.path.exists(os.path.join(student_workdir, "config.json"))
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(student_workdir))


def test_resume_continues_from_saved_step(teacher_workdir, tmp_path, capsys):
  workdir = str(tmp_path / "resume")
  code, _, _ = run_cli(cli.distill_main, distill_args(teacher_workdir, workdir, steps=20),
                       capsys)
  assert code == 0 and checkpoint.saved_steps(workdir) == [10, 20]
  # A longer schedule is a change users make on purpose: the run continues.
  code, out, _ = run_cli(cli.distill_main, distill_args(
      teacher_workdir, workdir, "--config.total_steps=30"), capsys)
  assert code == 0
  steps = [r["step"] for r in metrics_io.read_metrics(workdir) if "train/loss" in r]
  assert steps == [5, 10, 15, 20, 25, 30]  # 25 and 30 come from the resumed run
  assert "step 25/30" in out and "step 5/30" not in out
  assert checkpoint.saved_steps(workdir) == [10, 20, 30]


def test_eval_prints_table_and_writes_json(teacher_workdir, student_workdir, tmp_path, capsys):
  config = repo_path("configs", "digits.py") + ":" + TINY_STUDENT_ARG + \
      f",teacher={teacher_workdir}"
  width = "--config.teacher.width=0.5"
  code, out, _ = run_cli(cli.eval_main, ["--config", config, "--workdir", student_workdir, width],
                         capsys)
  assert code == 0
  default_path = os.path.join(student_workdir, "eval_30.json")
  with open(default_path) as f:
    results = json.load(f)
  assert results["step"] == 30 and results["test/examples"] == 445
  assert set(results) >= {"test/student_top1", "test/student_top5", "test/teacher_top1",
                          "test/agreement_top1", "test/agreement_top5", "test/kl"}
  assert "test/student_top1" in out
  # The final eval of the training run saw the same checkpoint: same numbers.
  final = metrics_io.read_metrics(student_workdir)[-1]
  assert results["test/student_top1"] == pytest.approx(final["test/student_top1"])
  output = str(tmp_path / "e.json")
  code, _, _ = run_cli(cli.eval_main, ["--config", config, "--workdir", student_workdir, width,
                                       "--step=20", f"--output={output}"], capsys)
  assert code == 0
  with open(output) as f:
    assert json.load(f)["step"] == 20


def test_export_writes_official_bit_names_without_teacher(teacher_workdir, student_workdir,
                                                          tmp_path, capsys):
  import jax
  import jax.numpy as jnp
  from funmatch.models import bit
  from funmatch.weights import layouts
  config = repo_path("configs", "digits.py") + ":" + TINY_STUDENT_ARG + \
      f",teacher={teacher_workdir}"
  width = "--config.teacher.width=0.5"
  output = str(tmp_path / "student.npz")
  code, _, _ = run_cli(cli.export_main, ["--config", config, "--workdir", student_workdir, width,
                                         f"--output={output}"], capsys)
  assert code == 0
  with np.load(output) as data:
    names = set(data.files)
  assert "resnet/root_block/standardized_conv2d/kernel" in names
  assert "resnet/head/conv2d/bias" in names
  model = bit.Model(num_classes=10, depth=[1, 1, 1, 1], width=0.5)  # the tiny student
  init = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)))["params"]
  loaded = layouts.load("bit", output, init)
  _, stored = checkpoint.restore_params(student_workdir)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(stored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Never overwrites: a second export to the same path is refused.
  code, _, err = run_cli(cli.export_main, ["--config", config, "--workdir", student_workdir, width,
                                           f"--output={output}"], capsys)
  assert code == 2 and "already exists" in err


def test_student_init_from_teacher_export(teacher_workdir, tmp_path, capsys):
  """A funmatch-export file works as a teacher init too."""
  from conftest import TINY_TEACHER_ARG
  export = str(tmp_path / "teacher.npz")
  teacher_config = repo_path("configs", "digits_teacher.py") + ":" + TINY_TEACHER_ARG
  code, _, _ = run_cli(cli.export_main, ["--config", teacher_config, "--workdir",
                                         teacher_workdir, "--config.student.width=0.5",
                                         f"--output={export}"], capsys)
  assert code == 0
  workdir = str(tmp_path / "from_export")
  code, _, _ = run_cli(cli.distill_main, distill_args(export, workdir, steps=10), capsys)
  assert code == 0
  final = metrics_io.read_metrics(workdir)[-1]
  # Same teacher weights as the workdir teacher: same teacher accuracy.
  teacher_rows = [r for r in metrics_io.read_metrics(teacher_workdir) if "test/student_top1" in r]
  assert final["test/teacher_top1"] == pytest.approx(teacher_rows[-1]["test/student_top1"])


def test_nonfinite_loss_stops_with_step_and_keeps_good_checkpoint(teacher_workdir, tmp_path,
                                                                  capsys):
  workdir = str(tmp_path / "nan")
  code, _, err = run_cli(cli.distill_main, distill_args(
      teacher_workdir, workdir, "--config.lr=1e38", "--config.grad_clip_norm=0.0",
      "--config.schedule.warmup_steps=0"), capsys)
  assert code == 3
  lines = [l for l in err.splitlines() if l.startswith("funmatch: error:")]
  assert len(lines) == 1 and "non-finite at step" in lines[0]
  # Whatever was saved before the blow-up holds finite params only.
  for step in checkpoint.saved_steps(workdir):
    _, params = checkpoint.restore_params(workdir, step)
    import jax
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_shampoo_distills_and_resumes_bit_identically(teacher_workdir, tmp_path, capsys):
  """Shampoo through the CLI; its state survives a checkpoint exactly."""
  import shutil
  import jax
  shampoo_args = ("--config.optax.start_preconditioning_step=4",
                  "--config.optax.preconditioning_compute_steps=4")

  def args(workdir):
    result = distill_args(teacher_workdir, workdir, *shampoo_args, steps=20)
    result[1] += ",optimizer=shampoo"
    return result

  full = str(tmp_path / "full")
  code, _, err = run_cli(cli.distill_main, args(full), capsys)
  assert code == 0, err
  losses = [r["train/loss"] for r in metrics_io.read_metrics(full) if "train/loss" in r]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  # "Preempted" after step 10: only the step-10 checkpoint survives.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(full, resumed)
  shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(resumed), "20"))
  assert checkpoint.saved_steps(resumed) == [10]
  code, _, err = run_cli(cli.distill_main, args(resumed), capsys)
  assert code == 0, err
  _, want = checkpoint.restore_params(full, 20)
  _, got = checkpoint.restore_params(resumed, 20)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_each_eval_set_has_its_own_cadence_size_and_cost(tmp_path):
  """A quick minival (the test split's first 100) every 2 steps, the full test set
  at config.eval_every_steps (3), both at the last step; each call's seconds in the
  metrics."""
  from funmatch import config_util
  from funmatch.train import loop
  config, _, _ = cli.parse([
      "prog", "--config", repo_path("configs", "digits_labels.py") +
      ":steps=6,batch_size=32,res=16", "--config.log_every_steps=2",
      "--config.eval_every_steps=3", "--config.checkpoint_every_steps=6"],
      "test", {}, needs_workdir=False)
  with config.unlocked():
    config.evals.minival = config_util.eval_config(
        "digits", "test", 32, image_size=16, eval_crop="resize", every_steps=2,
        max_examples=100)
  workdir = str(tmp_path / "run")
  results = loop.train_and_evaluate(config, workdir, "train")
  rows = metrics_io.read_metrics(workdir)
  minival = [r for r in rows if "minival/examples" in r]
  test = [r for r in rows if "test/examples" in r]
  assert [r["step"] for r in minival] == [2, 4, 6]
  assert [r["step"] for r in test] == [3, 6]
  assert {r["minival/examples"] for r in minival} == {100}
  assert {r["test/examples"] for r in test} == {445}
  assert all(r["minival/seconds"] > 0 for r in minival)
  assert all(r["test/seconds"] > 0 for r in test)
  assert results["minival/examples"] == 100 and results["test/examples"] == 445


def test_startup_clock_counts_imports_once_per_process(monkeypatch):
  """The first clock starts at funmatch's import; a later run in the same process
  (the demo's student) starts its own clock when it begins."""
  import time  # pylint: disable=import-outside-toplevel
  import funmatch  # pylint: disable=import-outside-toplevel
  from funmatch.train import startup  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(startup.Clock, "_made_one", False)
  monkeypatch.setattr(funmatch, "IMPORTED_AT", time.perf_counter() - 100.0)
  first = startup.Clock()
  first.mark("imports")
  first.mark("config")
  assert first.phases["imports"] >= 100.0 and first.phases["config"] < 100.0
  later = startup.Clock()
  later.mark("imports")
  assert later.phases["imports"] < 100.0
  line = first.report()
  assert line.startswith("start-up ") and "imports 1" in line and ", config " in line
