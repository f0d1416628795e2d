"""Using a trained student: funmatch.load_student, funmatch-predict, exports, eval.

Runs on conftest's tiny digits runs (teacher_workdir, student_workdir). The
references are independent of the code under test: TensorFlow's eval pipeline
for preprocessing, timm's own ResNetV2 for timm exports, funmatch-eval's accuracy
for funmatch-predict.
"""
import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import funmatch
from conftest import TINY_STUDENT_ARG, repo_path, run_cli
from funmatch import checkpoint, models
from funmatch.data import preprocess, sources
from funmatch.errors import UserError
from funmatch.weights import files as formats
from funmatch.weights import layouts
from funmatch.train import cli

DIGITS = repo_path("configs", "digits.py")
PNG_SIZE = 24  # the PNGs are bigger than the 16px student: the resize matters


def eval_args(teacher: str, workdir: str, *extra) -> list[str]:
  return ["--config", f"{DIGITS}:{TINY_STUDENT_ARG},teacher={teacher}",
          "--workdir", workdir, "--config.teacher.width=0.5", *extra]


def tf_eval_views(images_uint8, res: int, crop: str = "resize") -> np.ndarray:
  """The pipeline's eval view (TensorFlow), the reference for funmatch/images.py."""
  spec = preprocess.Spec(eval_crop=crop)
  return np.stack([preprocess.eval_view(tf.constant(image), res, spec).numpy()
                   for image in images_uint8])


@functools.partial(jax.jit, static_argnums=0)
def _logits(module, params, x):
  return module.apply({"params": params}, x, train=False)[0]


def logits_of(student, x):
  """The module's own logits, in one compiled program (op by op compiles hundreds)."""
  return np.asarray(_logits(student.module, student.params, x))


@pytest.fixture(scope="module")
def digit_images():
  images, labels = sources.digits("test", PNG_SIZE)
  return images[:40], labels[:40]


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
  """The digits test split as PNG files root/<label>/<index>.png."""
  images, labels = sources.digits("test", PNG_SIZE)
  root = tmp_path_factory.mktemp("digits_png")
  for index, (image, label) in enumerate(zip(images, labels)):
    os.makedirs(root / str(label), exist_ok=True)
    Image.fromarray(image).save(root / str(label) / f"{index:03d}.png")
  return root


# ---------------------------------------------------------------------------
# funmatch.load_student.


def test_load_student_from_a_workdir(student_workdir, digit_images):
  student = funmatch.load_student(student_workdir)
  step, stored = checkpoint.restore_params(student_workdir)
  assert student.step == step == 30 and student.num_classes == 10
  assert student.class_names == tuple(str(i) for i in range(10))
  assert student.model == "bit" and student.options["stem_pool_padding"] == "zeros"
  assert (student.res, student.preprocessing.eval_crop) == (16, "resize")
  for a, b in zip(jax.tree.leaves(student.params), jax.tree.leaves(stored)):
    np.testing.assert_array_equal(a, b)
  images, _ = digit_images
  want = logits_of(student, tf_eval_views(images, 16))
  np.testing.assert_allclose(student.predict(images), want, rtol=1e-5, atol=1e-5)
  # A list of images of different sizes works too.
  mixed = [images[0], np.asarray(Image.fromarray(images[1]).resize((30, 20)))]
  np.testing.assert_allclose(
      student.predict(mixed), logits_of(student, tf_eval_views(mixed, 16)),
      rtol=1e-5, atol=1e-5)
  earlier = funmatch.load_student(student_workdir, step=20)
  assert earlier.step == 20
  assert not np.allclose(earlier.predict(images[:4]), student.predict(images[:4]))


def test_load_student_needs_no_tensorflow(student_workdir):
  code = ("import sys, numpy as np, funmatch\n"
          f"student = funmatch.load_student({student_workdir!r})\n"
          "logits = student.predict(np.zeros((3, 20, 25, 3), np.uint8))\n"
          "assert logits.shape == (3, 10), logits.shape\n"
          "assert 'tensorflow' not in sys.modules\n"
          "print('ok')\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_load_student_errors_are_one_line(tmp_path, student_workdir):
  for source, match in ((str(tmp_path / "nope" / "x.npz"), "x.npz"),
                        (str(tmp_path), "no funmatch run")):
    with pytest.raises(UserError, match=match):
      funmatch.load_student(source)
  bare = str(tmp_path / "bare.npz")
  formats.write_npz(bare, {"a": np.zeros(3)}, {})
  with pytest.raises(UserError, match="no funmatch metadata"):
    funmatch.load_student(bare)
  with pytest.raises(UserError, match="step 7"):
    funmatch.load_student(student_workdir, step=7)


# ---------------------------------------------------------------------------
# Exports: every format rebuilds the same function from the file alone.


@pytest.fixture(scope="module")
def exports(student_workdir, teacher_workdir, tmp_path_factory):
  out = tmp_path_factory.mktemp("exports")
  paths = {}
  for format_name, name in (("npz", "s.npz"), ("safetensors", "s.safetensors"),
                            ("timm", "s-timm.safetensors")):
    paths[format_name] = str(out / name)
    code = cli.export_main(["funmatch-export", *eval_args(
        teacher_workdir, student_workdir, f"--output={paths[format_name]}",
        f"--format={format_name}")])
    assert code == 0
  return paths


def test_exports_carry_metadata_and_load_as_the_workdir(student_workdir, exports,
                                                        digit_images):
  reference = funmatch.load_student(student_workdir)
  images, _ = digit_images
  want = reference.predict(images)
  for format_name, path in exports.items():
    meta = formats.read_metadata(path)
    assert meta["model"] == "bit" and meta["num_classes"] == 10
    assert meta["options"]["depth"] == [1, 1, 1, 1] and meta["options"]["width"] == 0.5
    assert meta["options"]["stem_pool_padding"] == "zeros"
    assert meta["resolution"] == 16 and meta["step"] == 30
    assert meta["preprocessing"]["eval_crop"] == "resize"
    assert meta["preprocessing"]["value_range"] == [-1, 1]
    assert meta["class_names"] == [str(i) for i in range(10)]
    student = funmatch.load_student(path)
    assert student.class_names == reference.class_names and student.res == 16
    np.testing.assert_allclose(student.predict(images), want, rtol=1e-6, atol=1e-6,
                               err_msg=format_name)


def test_timm_export_loads_into_timm(exports, student_workdir, digit_images):
  import torch  # pylint: disable=import-outside-toplevel
  import timm_import  # pylint: disable=import-outside-toplevel
  timm = timm_import.import_timm()
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  path = exports["timm"]
  spec = formats.read_metadata(path)["timm"]
  # docs/weights.md's recipe: ResNetV2 with the recorded kwargs, StdConv2d eps 1e-8.
  network = timm.models.resnetv2.ResNetV2(
      **spec["kwargs"], conv_layer=functools.partial(timm.layers.StdConv2d, eps=1e-8))
  network.load_state_dict(load_file(path))  # strict: every name and shape fits
  student = funmatch.load_student(student_workdir)
  images, _ = digit_images
  x = student.preprocess(images)
  with torch.no_grad():
    got = network.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  want = logits_of(student, x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  np.testing.assert_allclose(
      layouts.timm_model(path)(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy(),
      want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ---------------------------------------------------------------------------
# funmatch-predict and funmatch-eval on the same PNGs.


def test_predict_agrees_with_eval_on_a_folder_of_pngs(student_workdir, digits_folder,
                                                      tmp_path, capsys):
  # Eval without the teacher and without the training data: neither exists here.
  results_path = str(tmp_path / "eval.json")
  code, _, err = run_cli(cli.eval_main, eval_args(
      str(tmp_path / "no_teacher"), student_workdir, "--student_only",
      "--config.input.source=folder", f"--config.input.root={tmp_path}/no_train_data",
      "--config.evals.test.source=folder", f"--config.evals.test.root={digits_folder}",
      f"--output={results_path}"), capsys)
  assert code == 0, err
  with open(results_path) as f:
    results = json.load(f)
  assert results["test/examples"] == 445 and "test/teacher_top1" not in results

  output = str(tmp_path / "predictions.json")
  code, out, err = run_cli(cli.predict_main, [
      "--model", student_workdir, "--images", str(digits_folder), "--topk", "3",
      "--output", output], capsys)
  assert code == 0, err
  with open(output) as f:
    predictions = json.load(f)["predictions"]
  assert len(predictions) == 445 and all(len(p["top"]) == 3 for p in predictions)
  correct = sum(p["top"][0]["name"] == os.path.basename(os.path.dirname(p["image"]))
                for p in predictions)
  assert correct / 445 == pytest.approx(results["test/student_top1"], abs=1e-9)
  first = predictions[0]
  assert first["image"] in out and f"{first['top'][0]['probability']:.3f}" in out


def test_predict_reports_an_undecodable_image_and_classifies_the_rest(
    student_workdir, digits_folder, tmp_path, capsys):
  folder = tmp_path / "mixed"
  shutil.copytree(digits_folder / "3", folder)
  (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
  good = sorted(p for p in os.listdir(folder) if p != "broken.png")
  output = str(tmp_path / "p.json")
  code, out, err = run_cli(cli.predict_main, [
      "--model", student_workdir, "--images", str(folder), "--output", output], capsys)
  errors = [line for line in err.splitlines() if line.startswith("funmatch: error:")]
  assert code == 2 and len(errors) == 1 and "broken.png" in errors[0]
  assert f"the other {len(good)} were classified" in errors[0]
  with open(output) as f:
    report = json.load(f)
  assert [os.path.basename(p["image"]) for p in report["predictions"]] == good
  assert [os.path.basename(e["image"]) for e in report["errors"]] == ["broken.png"]
  assert all(name in out for name in good)


# ---------------------------------------------------------------------------
# The weight-dependent options a run records and keeps.


def test_config_json_records_resolved_options_and_data(student_workdir):
  with open(os.path.join(student_workdir, "config.json")) as f:
    stored = json.load(f)
  assert stored["config"]["student"]["stem_pool_padding"] == "zeros"
  assert stored["config"]["teacher"]["stem_pool_padding"] == "zeros"
  assert stored["data"] == {"num_classes": 10,
                            "class_names": [str(i) for i in range(10)]}


def test_options_follow_the_init_and_survive_resume(teacher_workdir, tmp_path):
  import copy  # pylint: disable=import-outside-toplevel
  from funmatch import config_util  # pylint: disable=import-outside-toplevel
  from funmatch.train import build  # pylint: disable=import-outside-toplevel
  from funmatch.train import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  # A teacher workdir whose student pads with -inf ...
  teacher = str(tmp_path / "teacher")
  shutil.copytree(teacher_workdir, teacher)
  config_path = os.path.join(teacher, "config.json")
  with open(config_path) as f:
    stored = json.load(f)
  stored["config"]["student"]["stem_pool_padding"] = "neg_inf"
  with open(config_path, "w") as f:
    json.dump(stored, f)
  # ... and a student initialised from an export that pads with -inf.
  student_init = str(tmp_path / "init.safetensors")
  student_model = models.get_model("bit", 10, depth=[1, 1, 1, 1], width=0.5)
  shapes = jax.eval_shape(student_model.init, jax.random.key(0),
                          np.zeros((1, 16, 16, 3), np.float32))["params"]
  layouts.save_params("bit", student_init,
                     jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes),
                     format="safetensors", resolution=16,
                     options={"depth": [1, 1, 1, 1], "width": 0.5,
                              "stem_pool_padding": "neg_inf"})
  recipe = config_util.load_recipe(DIGITS, "digits")
  config = recipe.get_config(f"{TINY_STUDENT_ARG},teacher={teacher}")
  config.teacher.width = 0.5
  config.student.init = student_init
  run = build.build(config, "distill")
  assert run.config.teacher.stem_pool_padding == "neg_inf"
  assert run.teachers["teacher"].stem_pool_padding == "neg_inf"
  assert run.config.student.stem_pool_padding == "neg_inf"
  assert run.student.stem_pool_padding == "neg_inf"
  assert config.student.stem_pool_padding == "auto"  # the user's config is untouched
  # config.json records them; the same command resumes, another padding does not.
  workdir = str(tmp_path / "run")
  workdir_lib.write_config(workdir, run.config, "distill", run.data.record())
  workdir_lib.check_resumable(workdir, build.resolve_options(
      config, build.validate(config, "distill")), "distill")
  changed = copy.deepcopy(run.config)
  changed.student.stem_pool_padding = "zeros"
  with pytest.raises(UserError, match="holds another run"):
    workdir_lib.check_resumable(workdir, changed, "distill")
  # A teacher configured against its workdir's options is refused.
  config.teacher.stem_pool_padding = "zeros"
  with pytest.raises(UserError, match="holds a"):
    build.build(config, "distill")
