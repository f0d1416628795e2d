"""The paper's recipes end to end: out-of-domain distillation data, teaching-mode
configs, the label baseline, and tools/plot_metrics.py."""
import json
import os
import sys

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from conftest import TINY_OVERRIDES, run_cli, repo_path
from funmatch.data import pipeline, sources
from funmatch.train import cli, metrics_io

sys.path.insert(0, repo_path("tools"))
import plot_metrics  # pylint: disable=wrong-import-position

# Constant-colour images: any crop, resize or flip of one is the same colour,
# so a view's pixels say which source image it came from.
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255),
          (255, 0, 255), (128, 128, 128), (255, 255, 255)]


def colour_folder(root):
  for i, colour in enumerate(COLORS):
    folder = root / f"class{i % 2}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 20), colour).save(folder / f"img{i}.png")
  return str(root)


def test_out_of_domain_images_reach_every_model(tmp_path):
  cfg = ConfigDict(dict(source="folder", root=colour_folder(tmp_path / "ood"), batch_size=8,
                        image_size=16, crop="inception", crop_area_min=0.3, flip=True))
  known = np.array(COLORS, np.float32) / 127.5 - 1.0
  batch = next(pipeline.train_dataset(sources.open_source(cfg),
                                      {"student": 16, "teacher": 24}, seed=0,
                                      crops="independent").as_numpy_iterator())
  for name, res in (("student", 16), ("teacher", 24)):
    images = batch["images"][name]
    assert images.shape == (8, res, res, 3)
    for image in images:  # every view is one of the folder's colours, uniformly
      pixel = image.reshape(-1, 3)
      np.testing.assert_allclose(pixel, np.broadcast_to(pixel[0], pixel.shape), atol=1e-5)
      assert np.abs(known - pixel[0]).max(axis=1).min() < 1e-2


def test_distill_on_out_of_domain_data_evaluates_on_digits(teacher_workdir, tmp_path, capsys):
  workdir = str(tmp_path / "ood_run")
  config = repo_path("configs", "digits.py") + \
      f":steps=6,batch_size=8,res=16,teacher_res=16,teacher={teacher_workdir}"
  code, _, err = run_cli(cli.distill_main, [
      "--config", config, "--workdir", workdir, "--config.teacher.width=0.5",
      "--config.input.source=folder", f"--config.input.root={colour_folder(tmp_path / 'ood')}",
      "--config.num_classes=10", *TINY_OVERRIDES], capsys)
  assert code == 0, err
  rows = metrics_io.read_metrics(workdir)
  assert [r["step"] for r in rows if "train/loss" in r] == [5, 6]
  # 8 folder images at batch 8: one step per epoch; evaluation is on all of digits' test split.
  assert rows[-2]["epoch"] == pytest.approx(6.0)
  assert rows[-1]["test/examples"] == 445
  assert rows[-1]["test/teacher_top1"] > 0.7


def test_out_of_domain_data_needs_the_class_count(teacher_workdir, tmp_path, capsys):
  workdir = str(tmp_path / "ood_run")
  config = repo_path("configs", "digits.py") + f":steps=6,batch_size=8,teacher={teacher_workdir}"
  code, _, err = run_cli(cli.distill_main, [
      "--config", config, "--workdir", workdir, "--config.teacher.width=0.5",
      "--config.input.source=folder", f"--config.input.root={colour_folder(tmp_path / 'ood')}"],
                         capsys)
  assert code == 2 and "config.evals.test has 10 classes" in err
  assert not os.path.exists(workdir)


@pytest.mark.parametrize("mode", ["fixed", "independent", "consistent"])
def test_mode_configs_set_only_the_teaching_mode(mode):
  import importlib
  base = importlib.import_module("funmatch.configs.digits").get_config("teacher=/t")
  variant = importlib.import_module(f"funmatch.configs.digits_{mode}").get_config("teacher=/t")
  assert variant.teaching == mode
  variant.teaching = base.teaching
  assert variant.to_dict() == base.to_dict()


def test_label_baseline_is_the_same_student_and_optimizer():
  from funmatch.configs import digits, digits_labels
  base, labels = digits.get_config("teacher=/t"), digits_labels.get_config()
  assert labels.objective == "supervised" and labels.teachers == ()
  assert labels.student.to_dict() == base.student.to_dict()
  for key in ("lr", "wd", "total_steps", "optax_name", "grad_clip_norm"):
    assert labels[key] == base[key]
  assert labels.input.to_dict() == base.input.to_dict()


def write_run(workdir, teacher_top1=0.9):
  os.makedirs(workdir)
  rows = [{"step": 10, "train/loss": 2.0, "epoch": 0.5},
          {"step": 20, "train/loss": 1.0, "epoch": 1.0},
          {"step": 20, "test/student_top1": 0.5, "test/agreement_top1": 0.6,
           "test/teacher_top1": teacher_top1},
          {"step": 40, "train/loss": 0.5, "epoch": 2.0},
          {"step": 40, "test/student_top1": 0.8, "test/agreement_top1": 0.85,
           "test/teacher_top1": teacher_top1}]
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return workdir


def test_plot_metrics_curves_and_png(tmp_path):
  a = write_run(str(tmp_path / "a"))
  curves = plot_metrics.load_curves(a, "test")
  assert curves["top1"] == [(1.0, 0.5), (2.0, 0.8)]  # eval steps converted to epochs
  assert curves["agreement"] == [(1.0, 0.6), (2.0, 0.85)]
  assert curves["loss"] == [(0.5, 2.0), (1.0, 1.0), (2.0, 0.5)]
  assert curves["teacher_top1"] == 0.9
  b = write_run(str(tmp_path / "b"), teacher_top1=0.95)
  output = str(tmp_path / "fig.png")
  assert plot_metrics.main([a, b, "--labels", "A,B", "--output", output]) == 0
  with open(output, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _exit_code(main, args):
  try:
    return main(args)
  except SystemExit as e:
    return e.code


def test_plot_metrics_bad_inputs(tmp_path, capsys, monkeypatch):
  output = str(tmp_path / "fig.png")
  assert _exit_code(plot_metrics.main, [str(tmp_path / "missing"), "--output", output]) == 2
  a = write_run(str(tmp_path / "a"))
  assert _exit_code(plot_metrics.main, [a, "--eval", "val", "--output", output]) == 2
  assert _exit_code(plot_metrics.main, [a, "--labels", "x,y", "--output", output]) == 2
  err = capsys.readouterr().err
  assert "no metrics.jsonl" in err and "'val/student_top1'" in err and "--labels" in err
  assert not os.path.exists(output)
  # Without matplotlib: one line naming the extra to install, no traceback.
  import importlib.util
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
  assert _exit_code(plot_metrics.main, [a, "--output", output]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and "funmatch[plot]" in lines[0] and "matplotlib" in lines[0]
