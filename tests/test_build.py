"""Building a run from its config: the student's initial weights follow config.seed."""
import jax
import numpy as np

from conftest import repo_path
from funmatch import config_util
from funmatch.train import build


def _student_params(seed):
  recipe = config_util.load_recipe(repo_path("configs", "digits_teacher.py"), "digits_teacher")
  config = recipe.get_config("steps=10,batch_size=16,res=16")
  config.student.depth = [1, 1, 1, 1]
  config.student.width = 0.5
  config.seed = seed
  return build.build(config, "train").models.student_params


def test_initial_student_params_follow_the_seed():
  first, again, other = _student_params(0), _student_params(0), _student_params(1)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  kernels = [(a, b) for (path, a), b in zip(
      jax.tree_util.tree_flatten_with_path(first)[0], jax.tree.leaves(other))
             if "kernel" in jax.tree_util.keystr(path) and "head" not in
             jax.tree_util.keystr(path)]  # the head starts at zero whatever the seed
  assert kernels and all(not np.array_equal(a, b) for a, b in kernels)
