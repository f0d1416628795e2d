"""Every recipe in configs/ loads, uses only known keys, and holds the paper's values."""
import glob
import os

import pytest

from conftest import repo_path
from funmatch import config_util
from funmatch.errors import UserError
from funmatch.train import build

RECIPES = sorted(os.path.basename(p)[:-3] for p in glob.glob(repo_path("configs", "*.py"))
                 if not p.endswith("__init__.py"))


def load(name, arg=None):
  """The recipe by its shipped name, as `--config NAME[:arg]` finds it."""
  return config_util.load_config(name + (f":{arg}" if arg else ""))


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_is_valid(name):
  config = load(name)
  base = config_util.base_config()
  unknown = set(config) - set(base) - set(config.teachers)
  assert not unknown, f"{name} sets keys the trainer does not read: {unknown}"
  assert set(config.input) == set(base.input)  # built by config_util.data_config
  mode = "train" if config.objective == "supervised" else "distill"
  # Everything that needs no files: objective settings, teachers, teaching plan,
  # dtypes, mesh and batch sizes, sharding.
  build.validate(config, mode)
  assert config.total_steps > 0 or config.total_epochs > 0


def test_imagenet_recipes_hold_the_papers_values():
  c = load("bit_i1k")
  assert (c.input.batch_size, c.lr, c.wd, c.schedule.warmup_steps, c.total_epochs,
          c.grad_clip_norm, c.objective_args.temperature) == (4096, 0.03, 3e-4, 5000, 1200.0,
                                                              1.0, 1.0)
  assert (c.teacher.depth, c.teacher.width, c.student.depth, c.student.width) == (152, 2, 50, 1)
  assert load("bit_i1k_160").student.res == 160 and load("bit_i1k_160").teacher.res == 224
  ens = load("bit_i1k_ensemble", "teacher=a.npz,teacher384=b.npz")
  assert ens.teachers == ("teacher", "teacher384") and ens.objective_args.ensemble == "mean_logits"
  assert (ens.teacher.res, ens.teacher384.res, ens.total_epochs) == (224, 384, 9600.0)
  assert (ens.teacher.init, ens.teacher384.init) == ("a.npz", "b.npz")
  assert load("mobilenet_i1k").student.model == "mobilenet_v3"
  shampoo = load("bit_i1k", "optimizer=shampoo")
  assert shampoo.optax_name == "shampoo" and shampoo.optax.block_size == 128


def test_out_of_domain_recipe_distills_on_food_and_evaluates_on_pets():
  c = load("food_sun", "target=pet,source=food")
  assert (c.input.name, c.evals.test.name, c.num_classes) == ("food101", "oxford_iiit_pet", 37)
  # Pets 'fast': 1000 epochs of the 3312 images of train[:90%] at batch 512.
  assert c.total_steps == 6469
  sun = load("food_sun", "target=flowers,source=sun")
  assert (sun.input.name, sun.evals.test.name, sun.num_classes) == (
      "sun397", "oxford_flowers102", 102)


def test_flowers_pet_recipe_follows_the_papers_code():
  pet = load("flowers_pet", "data=pet")
  assert (pet.input.split, pet.evals.minival.split, pet.evals.test.split) == (
      "train[:90%]", "train[90%:]", "test")
  flowers = load("flowers_pet", "data=flowers")
  assert (flowers.input.split, flowers.evals.minival.split) == ("train", "validation")
  for c in (pet, flowers):
    for eval_config in c.evals.values():  # resize_small(160) | central_crop(128)
      assert round(eval_config.eval_resize_ratio * c.student.res) == 160
    assert c.optax.mu_dtype == "bfloat16"


def test_sgd_recipes_use_pytorchs_coupled_decay():
  for name in ("seed_i1k", "ofakd_i1k"):
    c = load(name)
    assert (c.optax_name, c.optax.momentum, c.wd, c.wd_mode) == ("sgd", 0.9, 1e-4, "coupled")


def test_cross_family_recipes_pair_timm_teachers_with_their_students():
  pairs = {"swin_r50": ("swin", "bit", "swin_tiny_patch4_window7_224.ms_in1k"),
           "convnext_deit": ("convnext", "vit", "convnext_tiny.fb_in22k_ft_in1k"),
           "convnext_vit": ("convnext", "vit", "convnext_tiny.fb_in22k_ft_in1k"),
           "vit_r50": ("vit", "bit", "")}
  for pair, (teacher, student, init) in pairs.items():
    c = load("ofakd_i1k", f"pair={pair}")
    assert (c.teacher.model, c.student.model, c.teacher.init) == (teacher, student, init)
    build.validate(c, "distill")
    assert c.objective == "ofakd" and c.objective_args.gamma == 1.5
  deit = load("ofakd_i1k", "pair=convnext_deit")
  assert (deit.student.variant, deit.optax_name, deit.total_epochs, deit.wd) == (
      "Ti", "adam", 300.0, 0.05)
  assert deit.objective_args.stages == ("block2", "block5", "block8")
  assert load("ofakd_i1k").total_epochs == 100.0  # the CNN student's schedule
  for family, init in (("convnext", "convnext_tiny.fb_in22k_ft_in1k"),
                       ("swin", "swin_tiny_patch4_window7_224.ms_in1k")):
    c = load("timm_teacher_i1k", f"family={family}")
    assert (c.teacher.model, c.teacher.init, c.teacher.res) == (family, init, 224)
    assert c.student == load("bit_i1k").student and c.lr == 0.03
    assert c.objective == "function_matching"
  for recipe, arg in (("ofakd_i1k", "pair=swin_deit"), ("timm_teacher_i1k", "family=vit")):
    with pytest.raises(UserError, match="is unknown; use one of"):
      load(recipe, arg)
  # The digits versions build for every teacher family and student.
  for student in ("bit", "mobilenet_v3", "vit", "convnext", "swin"):
    for objective in ("function_matching", "ofakd"):
      c = load("digits_family", f"family=swin,student={student},objective={objective}")
      build.validate(c, "distill")
      assert c.student.res == (32 if student in ("convnext", "swin") else 16)
      assert c.teacher.res == 32
  assert load("digits_family", "baseline=True").objective == "supervised"
