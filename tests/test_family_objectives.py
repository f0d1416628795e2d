"""ConvNeXt and Swin in the objectives: OFA-KD branch heads on their stages (CNN
maps for ConvNeXt, transformer tokens for Swin), objectives that cannot use them
refusing in one line, and tiny cross-family digits runs through the CLI."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import repo_path, run_cli
from funmatch import checkpoint, config_util, models
from funmatch.distill.objectives import make_objective
from funmatch.errors import UserError
from funmatch.train import cli, metrics_io
from funmatch.weights import files, layouts

family_teacher = config_util.load_recipe(repo_path("configs", "x.py"),
                                         "digits_family_teacher")


def _config(objective, **args):
  c = config_util.base_config()
  c.input.batch_size = 8
  config_util.set_objective(c, objective, **args)
  return c


def _model(name, res, classes=10):
  """The digits-sized model of configs/digits_family_teacher.py."""
  config = family_teacher.model(name, res)
  options = {k: v for k, v in config.items() if k not in models.MODEL_META_KEYS}
  return models.get_model(name, classes, **options)


def _output_shapes(model, res, batch=4):
  images = jax.ShapeDtypeStruct((batch, res, res, 3), jnp.float32)
  return jax.eval_shape(
      lambda x: model.apply(model.init(jax.random.PRNGKey(0), x), x), images)


def _random_like(shapes, seed):
  """Normal samples in the shapes' tree (numpy: one jax.random program per shape
  would compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), shapes)


@pytest.mark.parametrize("student,teacher,branch", [
    ("convnext", "swin", "CNNBranch"),    # stage maps [B, H, W, C]
    ("swin", "convnext", "ViTBranch"),    # stage tokens [B, N, C], no CLS
])
def test_ofa_branches_on_the_new_families(student, teacher, branch):
  student_shapes = _output_shapes(_model(student, 32), 32)
  teacher_shapes = _output_shapes(_model(teacher, 32), 32)
  objective = make_objective(_config("ofakd", gamma=1.5))
  objective.check_models(student_shapes, {"teacher": teacher_shapes})
  stages = ("stage1", "stage2", "stage3")
  assert objective.stage_names(student_shapes[1]) == stages  # 'auto'
  assert {type(objective.branch(s, student_shapes)).__name__ for s in stages} == {branch}
  # Jitted init and shapes from eval_shape: op-by-op, each branch layer compiles alone.
  aux = jax.jit(objective.init_aux)(jax.random.PRNGKey(3), student_shapes,
                                    {"teacher": teacher_shapes})
  student_out = _random_like(student_shapes, 1)
  teacher_out = _random_like(teacher_shapes, 2)
  assert {k: v.shape for k, v in
          jax.eval_shape(objective.branch_logits, aux, student_out).items()} == {
      s: (4, 10) for s in stages}
  batch = {"label_probs": jax.nn.one_hot(jnp.arange(4) % 10, 10), "label": jnp.arange(4)}

  def loss_fn(aux_params, out):
    return objective(aux_params, out, {"teacher": teacher_out}, batch, None)[0]

  aux_grads, out_grads = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(aux, student_out)
  for stage in stages:
    assert all(float(jnp.abs(g).sum()) > 0
               for g in jax.tree.leaves(aux_grads[f"branch_{stage}"])), stage
    assert float(jnp.abs(out_grads[1][stage]).sum()) > 0, stage


@pytest.mark.parametrize("objective,says", [
    ("vitkd", "config.objective='vitkd' distils ViT tokens, but config.teacher is a "
     "model without the tap(s)"),
    ("tinymim", "config.objective='tinymim' distils attention relations between ViTs, "
     "but config.teacher is a model with taps pre_logits, stage1"),
])
def test_vit_token_objectives_refuse_a_swin_teacher_in_one_line(objective, says):
  vit = models.get_model("vit", 10, width=48, depth=4, num_heads=3, mlp_dim=96,
                         patch_size=4)
  student_shapes = _output_shapes(vit, 32)
  teacher_shapes = _output_shapes(_model("swin", 32), 32)
  with pytest.raises(UserError) as info:
    make_objective(_config(objective)).check_models(student_shapes,
                                                    {"teacher": teacher_shapes})
  assert says in str(info.value) and "\n" not in str(info.value)
  assert "model='vit'" in str(info.value)


# ---------------------------------------------------------------------------
# Tiny cross-family digits runs: each teacher at its own resolution (32px).

# 4 steps of 16 images: what is checked (the objective's metrics, a checkpoint, the
# export) does not need more, and each step of these 32px models costs.
OVERRIDES = ["--config.log_every_steps=2", "--config.eval_every_steps=0",
             "--config.checkpoint_every_steps=4"]
RECIPE = repo_path("configs", "digits_family.py")


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
  """Randomly initialised digits teachers (a run needs logits, not good ones)."""
  root = tmp_path_factory.mktemp("family_teachers")
  paths = {}
  for name in family_teacher.MODELS:
    shapes = jax.eval_shape(_model(name, 32).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 32, 32, 3)))["params"]
    rng = np.random.default_rng(0)  # no init to compile; a non-zero head
    params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32),
                          shapes)
    paths[name] = str(root / f"{name}.safetensors")
    config = family_teacher.model(name, 32)
    layouts.save_params(name, paths[name], params, resolution=32, format="safetensors",
                        options={k: v for k, v in config.items()
                                 if k not in models.MODEL_META_KEYS})
  return paths


def _run(teacher_files, tmp_path, capsys, arg):
  family = arg.split("family=")[1].split(",")[0]
  workdir = str(tmp_path / "run")
  args = ["--config", f"{RECIPE}:{arg},teacher={teacher_files[family]},steps=4,"
          "batch_size=16", "--workdir", workdir, *OVERRIDES]
  code, _, err = run_cli(cli.distill_main, args, capsys)
  assert code == 0, err
  rows = [r for r in metrics_io.read_metrics(workdir) if "train/loss" in r]
  assert len(rows) == 2 and all(np.isfinite(r["train/loss"]) for r in rows)
  assert checkpoint.saved_steps(workdir) == [4]
  return args, workdir, rows


def _exported_names(args, workdir, tmp_path, capsys):
  output = str(tmp_path / "student.npz")
  code, _, err = run_cli(cli.export_main, [*args[:2], "--workdir", workdir,
                                           f"--output={output}"], capsys)
  assert code == 0, err
  return set(files.read(output).arrays)


def test_function_matching_swin_teacher_to_vit_student(teacher_files, tmp_path, capsys):
  args, workdir, rows = _run(teacher_files, tmp_path, capsys,
                             "family=swin,student=vit")
  _, params = checkpoint.restore_params(workdir)
  assert _exported_names(args, workdir, tmp_path, capsys) == set(
      layouts.file_arrays("vit", params))


def test_ofakd_convnext_teacher_to_swin_student_with_token_branches(
    teacher_files, tmp_path, capsys):
  args, workdir, rows = _run(teacher_files, tmp_path, capsys,
                             "family=convnext,student=swin,objective=ofakd")
  for key in ("train/ce", "train/ofa_logits", "train/ofa_stage1", "train/ofa_stage2",
              "train/ofa_stage3"):
    assert key in rows[-1]
  _, params = checkpoint.restore_params(workdir)
  names = _exported_names(args, workdir, tmp_path, capsys)
  # Only the student: its own params, no branch heads.
  assert names == set(layouts.file_arrays("swin", params))
  assert not any("branch" in name for name in names)
  assert os.path.exists(workdir)
