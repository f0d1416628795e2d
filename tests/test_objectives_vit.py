"""NKD, TinyMIM and ViTKD: each loss against numpy loops, then end to end on digits."""
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import TINY_OVERRIDES, repo_path, run_cli
from funmatch import checkpoint, config_util
from funmatch.distill.objectives import make_objective
from funmatch.distill.objectives import nkd as nkd_lib
from funmatch.distill.objectives import tinymim as tinymim_lib
from funmatch.distill.objectives import vitkd as vitkd_lib
from funmatch.errors import UserError
from funmatch.models import vit
from funmatch.train import cli, metrics_io


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def _log_softmax(x):
  return np.log(_softmax(x))


# ---------------------------------------------------------------------------
# NKD.
# ---------------------------------------------------------------------------


def np_nkd(student, teacher, labels, temperature, gamma):
  """(target term, non-target term) with explicit loops over examples and classes."""
  batch, classes = student.shape
  target = non_target = 0.0
  for b in range(batch):
    t = labels[b]
    target -= _softmax(teacher[b])[t] * _log_softmax(student[b])[t]
    others = [i for i in range(classes) if i != t]
    q_teacher = _softmax(np.array([teacher[b, i] for i in others]) / temperature)
    log_q_student = _log_softmax(np.array([student[b, i] for i in others]) / temperature)
    non_target -= sum(q_teacher[j] * log_q_student[j] for j in range(len(others)))
  return target / batch, gamma * temperature**2 * non_target / batch


@pytest.mark.parametrize("temperature,gamma", [(1.0, 1.0), (2.0, 1.5), (0.5, 0.3)])
def test_nkd_matches_numpy_loops(temperature, gamma):
  rng = np.random.default_rng(0)
  student = rng.normal(size=(5, 7)) * 2
  teacher = rng.normal(size=(5, 7)) * 2
  labels = rng.integers(0, 7, size=5)
  got = nkd_lib.nkd_loss(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
                         jnp.asarray(labels), temperature, gamma)
  want = np_nkd(student, teacher, labels, temperature, gamma)
  np.testing.assert_allclose(np.array(got), want, rtol=1e-5)


def test_nkd_non_target_term_excludes_the_target_class():
  rng = np.random.default_rng(1)
  student = rng.normal(size=(4, 6)).astype(np.float32)
  teacher = rng.normal(size=(4, 6)).astype(np.float32)
  labels = np.array([0, 3, 5, 3])
  target, non_target = nkd_lib.nkd_loss(student, teacher, labels, 2.0, 1.0)
  rows = np.arange(4)
  for who in ("student", "teacher"):
    changed = {"student": student.copy(), "teacher": teacher.copy()}
    changed[who][rows, labels] += np.array([5.0, -7.0, 11.0, 3.0], np.float32)
    new_target, new_non_target = nkd_lib.nkd_loss(changed["student"], changed["teacher"],
                                                  labels, 2.0, 1.0)
    assert float(new_non_target) == pytest.approx(float(non_target), rel=1e-6)
    assert abs(float(new_target) - float(target)) > 1e-3
  # A non-target logit does move the non-target term.
  moved = teacher.copy()
  moved[0, 1] += 3.0
  assert abs(float(nkd_lib.nkd_loss(student, moved, labels, 2.0, 1.0)[1])
             - float(non_target)) > 1e-3


def test_nkd_objective_is_ce_plus_nkd_on_the_argmax_of_the_mixed_label():
  rng = np.random.default_rng(2)
  student = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  label_probs = np.zeros((3, 5), np.float32)
  label_probs[[0, 1, 2], [1, 4, 2]] = 0.7
  label_probs[[0, 1, 2], [3, 0, 1]] = 0.3
  objective = nkd_lib.NKD(temperature=1.0, gamma=1.0, ce_weight=0.5)
  loss, metrics = objective({}, (student, {}), {"teacher": (teacher, {})},
                            {"label_probs": jnp.asarray(label_probs)}, None)
  target, non_target = np_nkd(np.array(student), np.array(teacher), [1, 4, 2], 1.0, 1.0)
  ce = -np.mean([np.dot(label_probs[b], _log_softmax(np.array(student[b]))) for b in range(3)])
  assert float(metrics["ce"]) == pytest.approx(ce, rel=1e-5)
  assert float(loss) == pytest.approx(0.5 * ce + target + non_target, rel=1e-5)
  # Gradients reach the student only.
  teacher_grad = jax.grad(lambda t: objective({}, (student, {}), {"teacher": (t, {})},
                                              {"label_probs": label_probs}, None)[0])(teacher)
  np.testing.assert_array_equal(teacher_grad, 0.0)


# ---------------------------------------------------------------------------
# TinyMIM.
# ---------------------------------------------------------------------------


def np_relation_kl(student_merged, teacher_merged, heads):
  """TinyMIM's loss from merged [B, N, D] q/k/v, slicing heads out of the channels."""
  total = 0.0
  for a, b in (("q", "k"), ("v", "v")):
    batch, tokens, _ = student_merged[a].shape
    terms = []
    for n in range(batch):
      for h in range(heads):
        def relation(merged, i):
          dh = merged[a].shape[-1] // heads
          rows_a = merged[a][n, :, h * dh:(h + 1) * dh]
          rows_b = merged[b][n, :, h * dh:(h + 1) * dh]
          return _log_softmax(np.array([rows_a[i] @ rows_b[j] / math.sqrt(dh)
                                        for j in range(tokens)]))
        for i in range(tokens):
          log_t, log_s = relation(teacher_merged, i), relation(student_merged, i)
          terms.append(sum(math.exp(log_t[j]) * (log_t[j] - log_s[j])
                           for j in range(tokens)))
    total += np.mean(terms)
  return total


def split_heads(merged, heads):
  """[B, N, D] -> [B, H, N, D / H], as the ViT's q/k/v taps."""
  b, n, d = merged.shape
  return jnp.asarray(merged.reshape(b, n, heads, d // heads).transpose(0, 2, 1, 3), jnp.float32)


def test_tinymim_relation_kl_matches_numpy_loops_with_a_head_split():
  rng = np.random.default_rng(3)
  heads, tokens = 3, 5
  # Student width 6 split into the teacher's 3 heads (d_h = 2); teacher width 12 (d_h = 4).
  student = {n: rng.normal(size=(2, tokens, 6)) for n in "qkv"}
  teacher = {n: rng.normal(size=(2, tokens, 12)) for n in "qkv"}
  want = np_relation_kl(student, teacher, heads)
  student_taps = {n: split_heads(x, heads) for n, x in student.items()}
  teacher_taps = {n: split_heads(x, heads) for n, x in teacher.items()}
  objective = tinymim_lib.TinyMIM()
  loss, metrics = objective({}, (jnp.zeros((2, 4)), student_taps),
                            {"teacher": (jnp.zeros((2, 4)), teacher_taps)}, {}, None)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(metrics["relation_qk"] + metrics["relation_vv"]) == pytest.approx(want, rel=1e-5)
  assert "ce" not in metrics  # no label loss by default


def test_tinymim_is_zero_for_equal_relations_and_trains_the_student_only():
  rng = np.random.default_rng(4)
  taps = {n: jnp.asarray(rng.normal(size=(2, 2, 5, 3)), jnp.float32) for n in "qkv"}
  objective = tinymim_lib.TinyMIM()
  loss, _ = objective({}, (jnp.zeros((2, 4)), taps), {"t": (None, taps)}, {}, None)
  assert float(loss) == pytest.approx(0.0, abs=1e-6)

  def loss_of(student_taps, teacher_taps):
    return objective({}, (jnp.zeros((2, 4)), student_taps), {"t": (None, teacher_taps)},
                     {}, None)[0]
  other = {n: t + 0.5 for n, t in taps.items()}
  student_grad, teacher_grad = jax.jit(jax.grad(loss_of, argnums=(0, 1)))(other, taps)
  assert all(float(jnp.abs(g).sum()) > 0 for g in student_grad.values())
  assert all(float(jnp.abs(g).sum()) == 0 for g in teacher_grad.values())


def test_tinymim_ce_weight_adds_label_cross_entropy():
  taps = {n: jnp.ones((2, 1, 3, 2)) for n in "qkv"}
  logits = jnp.array([[2.0, 0.0], [0.0, 1.0]])
  probs = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  loss, metrics = tinymim_lib.TinyMIM(ce_weight=2.0)(
      {}, (logits, taps), {"t": (logits, taps)}, {"label_probs": probs}, None)
  ce = -(math.log(_softmax(np.array([2.0, 0.0]))[0]) + math.log(_softmax(np.array([0., 1.]))[1])) / 2
  assert float(metrics["ce"]) == pytest.approx(ce, rel=1e-5)
  assert float(loss) == pytest.approx(2 * ce, rel=1e-5)


def tiny_vit_out(width=12, heads=3, relation_heads=0, size=8, patch=4, depth=2):
  model = vit.Model(10, variant="Ti", width=width, depth=depth, num_heads=heads,
                    mlp_dim=2 * width, patch_size=patch, relation_heads=relation_heads)
  x = jnp.zeros((2, size, size, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  return jax.eval_shape(model.apply, variables, x)


def bit_out():
  from funmatch.models import bit
  model = bit.Model(num_classes=10, depth=[1, 1, 1, 1], width=0.5)
  x = jnp.zeros((2, 16, 16, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  return jax.eval_shape(model.apply, variables, x)


def test_tinymim_check_models_refuses_what_it_cannot_use():
  objective = tinymim_lib.TinyMIM()
  objective.check_models(tiny_vit_out(width=12, relation_heads=6),
                         {"teacher": tiny_vit_out(width=24, heads=6)})
  with pytest.raises(UserError, match=r"config.student is a CNN .*model='vit'"):
    objective.check_models(bit_out(), {"teacher": tiny_vit_out()})
  with pytest.raises(UserError, match=r"config.teacher is a CNN .*model='vit'"):
    objective.check_models(tiny_vit_out(), {"teacher": bit_out()})
  with pytest.raises(UserError, match=r"config.student.relation_heads=6"):
    objective.check_models(tiny_vit_out(width=12), {"teacher": tiny_vit_out(width=24, heads=6)})
  with pytest.raises(UserError, match=r"5 tokens .* 17.*res / patch_size"):
    objective.check_models(tiny_vit_out(), {"teacher": tiny_vit_out(size=16)})
  with pytest.raises(UserError, match="exactly one teacher"):
    objective.check_models(tiny_vit_out(), {"a": tiny_vit_out(), "b": tiny_vit_out()})


# ---------------------------------------------------------------------------
# ViTKD.
# ---------------------------------------------------------------------------


def np_dense(x, p):
  return np.asarray(x, np.float64) @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"])


def np_conv3x3(x, p):
  """SAME 3x3 convolution with explicit loops: x [B, H, W, C] -> [B, H, W, O]."""
  kernel, bias = np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)
  batch, height, width, _ = x.shape
  out = np.zeros((batch, height, width, kernel.shape[-1]))
  for b in range(batch):
    for i in range(height):
      for j in range(width):
        out[b, i, j] = bias
        for u in range(3):
          for v in range(3):
            y, z = i + u - 1, j + v - 1
            if 0 <= y < height and 0 <= z < width:
              out[b, i, j] += x[b, y, z] @ kernel[u, v]
  return out


def np_vitkd(params, student_taps, teacher_taps, masked, alpha=3e-5, beta=3e-6, lam=0.5):
  """(L_lr, L_gen) from the taps, the aux params and the mask, with loops."""
  patches = lambda t: np.asarray(t, np.float64)[:, 1:]
  batch = masked.shape[0]
  mimic = 0.0
  for i, name in enumerate(("block0", "block1")):
    adapted = np_dense(patches(student_taps[name]), params[f"mimic_{i}"])
    target = patches(teacher_taps[name])
    for b in range(batch):
      for n in range(adapted.shape[1]):
        mimic += sum((adapted[b, n, d] - target[b, n, d]) ** 2 for d in range(adapted.shape[2]))
  x = np_dense(patches(student_taps["encoded"]), params["project"])
  token = np.asarray(params["mask_token"], np.float64)
  for b in range(batch):
    for n in range(x.shape[1]):
      if masked[b, n]:
        x[b, n] = token
  side = int(math.sqrt(x.shape[1]))
  grid = x.reshape(batch, side, side, -1)
  generated = np_conv3x3(np.maximum(np_conv3x3(grid, params["generator_0"]), 0),
                         params["generator_1"]).reshape(x.shape)
  target = patches(teacher_taps["encoded"])
  gen = 0.0
  for b in range(batch):
    for n in range(x.shape[1]):
      if masked[b, n]:
        gen += np.sum((generated[b, n] - target[b, n]) ** 2)
  return alpha * mimic / batch, beta / lam * gen / batch


@pytest.fixture(scope="module")
def vitkd_case():
  """Random taps of a width-6 student and a width-10 teacher (2x2 token grid), aux params
  with random (non-zero) values."""
  rng = np.random.default_rng(5)
  student = {n: jnp.asarray(rng.normal(size=(3, 5, 6)), jnp.float32)
             for n in ("block0", "block1", "encoded")}
  teacher = {n: jnp.asarray(rng.normal(size=(3, 5, 10)), jnp.float32)
             for n in ("block0", "block1", "encoded")}
  objective = vitkd_lib.ViTKD()
  shapes = lambda taps: (jax.ShapeDtypeStruct((3, 4), jnp.float32),
                         {n: jax.ShapeDtypeStruct(t.shape, t.dtype) for n, t in taps.items()})
  params = objective.init_aux(jax.random.key(0), shapes(student), {"teacher": shapes(teacher)})
  leaves, tree = jax.tree.flatten(params)
  params = jax.tree.unflatten(tree, [jnp.asarray(rng.normal(size=l.shape) * 0.3, jnp.float32)
                                     for l in leaves])
  return objective, params, student, teacher


def test_random_mask_masks_half_of_each_examples_tokens():
  masked = np.array(vitkd_lib.random_mask(jax.random.key(0), 64, 16, 0.5))
  assert masked.shape == (64, 16) and masked.dtype == bool
  np.testing.assert_array_equal(masked.sum(1), 8)
  assert len({row.tobytes() for row in masked}) > 32  # per example, not one mask
  np.testing.assert_array_equal(masked, vitkd_lib.random_mask(jax.random.key(0), 64, 16, 0.5))
  # The reference keeps int(N * (1 - ratio)) tokens.
  np.testing.assert_array_equal(vitkd_lib.random_mask(jax.random.key(1), 2, 5, 0.5).sum(1), 3)


def test_vitkd_aux_params_have_the_right_shapes_and_are_made_inside_jit():
  objective = vitkd_lib.ViTKD()
  student, teacher = tiny_vit_out(width=12), tiny_vit_out(width=24, heads=6)
  params = jax.jit(lambda r: objective.init_aux(r, student, {"teacher": teacher}))(
      jax.random.key(0))
  shapes = jax.tree.map(lambda x: x.shape, params)
  assert shapes == {
      "mimic_0": {"kernel": (12, 24), "bias": (24,)},
      "mimic_1": {"kernel": (12, 24), "bias": (24,)},
      "project": {"kernel": (12, 24), "bias": (24,)},
      "mask_token": (24,),
      "generator_0": {"kernel": (3, 3, 24, 24), "bias": (24,)},
      "generator_1": {"kernel": (3, 3, 24, 24), "bias": (24,)}}
  np.testing.assert_array_equal(params["mask_token"], 0.0)  # zero init
  # Equal widths: no adapters, the features are compared directly.
  same = objective.init_aux(jax.random.key(0), student, {"teacher": tiny_vit_out(width=12)})
  assert set(same) == {"mask_token", "generator_0", "generator_1"}


def test_vitkd_losses_match_numpy_given_the_same_mask(vitkd_case):
  objective, params, student, teacher = vitkd_case
  rng = jax.random.key(7)
  masked = np.array(vitkd_lib.random_mask(rng, 3, 4, 0.5))
  logits = jnp.zeros((3, 4))
  label_probs = jax.nn.one_hot(jnp.array([0, 1, 2]), 4)
  loss, metrics = objective(params, (logits, student), {"teacher": (logits, teacher)},
                            {"label_probs": label_probs}, rng)
  want_mimic, want_gen = np_vitkd(params, student, teacher, masked)
  assert float(metrics["mimic"]) == pytest.approx(want_mimic, rel=1e-4)
  assert float(metrics["generation"]) == pytest.approx(want_gen, rel=1e-4)
  assert float(loss) == pytest.approx(math.log(4) + want_mimic + want_gen, rel=1e-4)
  assert "nkd" not in metrics  # nkd_weight defaults to 0


def test_vitkd_generation_counts_only_masked_tokens(vitkd_case):
  objective, params, student, teacher = vitkd_case
  rng = jax.random.key(8)
  masked = np.array(vitkd_lib.random_mask(rng, 3, 4, 0.5))

  def generation(teacher_taps):
    logits = jnp.zeros((3, 4))
    return float(objective(params, (logits, student), {"teacher": (logits, teacher_taps)},
                           {"label_probs": jax.nn.one_hot(jnp.zeros(3, int), 4)},
                           rng)[1]["generation"])
  base = generation(teacher)
  # Teacher tokens at unmasked positions (and its CLS token) do not count...
  encoded = np.array(teacher["encoded"])
  encoded[:, 1:][~masked] += 100.0
  encoded[:, 0] -= 50.0
  assert generation({**teacher, "encoded": jnp.asarray(encoded)}) == pytest.approx(base, rel=1e-6)
  # ... a masked one does.
  encoded = np.array(teacher["encoded"])
  b, n = np.argwhere(masked)[0]
  encoded[b, 1 + n] += 1.0
  assert generation({**teacher, "encoded": jnp.asarray(encoded)}) != pytest.approx(base, rel=1e-6)
  # The pure function: generated tokens at unmasked positions are ignored.
  generated = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 10)), jnp.float32)
  target = vitkd_lib.patch_tokens(teacher["encoded"])
  moved = jnp.where(jnp.asarray(masked)[..., None], generated, generated + 9.0)
  assert float(vitkd_lib.generation_loss(moved, target, masked, 3e-6, 0.5)) == pytest.approx(
      float(vitkd_lib.generation_loss(generated, target, masked, 3e-6, 0.5)), rel=1e-6)


def test_vitkd_mimic_loss_matches_numpy_loops():
  rng = np.random.default_rng(9)
  student = [rng.normal(size=(2, 3, 4)) for _ in range(2)]
  teacher = [rng.normal(size=(2, 3, 4)) for _ in range(2)]
  total = 0.0
  for s, t in zip(student, teacher):
    for b in range(2):
      for n in range(3):
        for d in range(4):
          total += (s[b, n, d] - t[b, n, d]) ** 2
  got = vitkd_lib.mimic_loss([jnp.asarray(s, jnp.float32) for s in student],
                             [jnp.asarray(t, jnp.float32) for t in teacher], 3e-5)
  assert float(got) == pytest.approx(3e-5 * total / 2, rel=1e-5)


def test_vitkd_aux_params_get_gradients_and_nkd_adds_on(vitkd_case):
  _, params, student, teacher = vitkd_case
  params = {**params, "mask_token": jnp.zeros_like(params["mask_token"])}  # as initialised
  objective = vitkd_lib.ViTKD(nkd_weight=1.0)
  rng = jax.random.key(3)
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)), jnp.float32)
  batch = {"label_probs": jax.nn.one_hot(jnp.array([0, 3, 1]), 4)}

  def loss_fn(aux, taps):
    return objective(aux, (logits, taps), {"teacher": (logits + 1.0, teacher)}, batch, rng)

  (loss, metrics), (aux_grad, taps_grad) = jax.jit(jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True))(params, student)
  for path, grad in jax.tree_util.tree_leaves_with_path(aux_grad):
    assert float(jnp.abs(grad).sum()) > 0, path
  assert all(float(jnp.abs(g).sum()) > 0 for g in taps_grad.values())
  target, non_target = np_nkd(np.array(logits), np.array(logits) + 1.0, [0, 3, 1], 1.0, 1.0)
  assert float(metrics["nkd"]) == pytest.approx(target + non_target, rel=1e-5)
  assert float(loss) == pytest.approx(float(metrics["ce"] + metrics["mimic"]
                                            + metrics["generation"] + metrics["nkd"]), rel=1e-6)


def test_vitkd_check_models_refuses_what_it_cannot_use():
  objective = vitkd_lib.ViTKD()
  objective.check_models(tiny_vit_out(width=12), {"teacher": tiny_vit_out(width=24, heads=6)})
  with pytest.raises(UserError, match=r"config.teacher is a CNN .*model='vit'"):
    objective.check_models(tiny_vit_out(), {"teacher": bit_out()})
  with pytest.raises(UserError, match=r"config.student is a CNN"):
    objective.check_models(bit_out(), {"teacher": tiny_vit_out()})
  with pytest.raises(UserError, match=r"5 tokens .* 17"):
    objective.check_models(tiny_vit_out(), {"teacher": tiny_vit_out(size=16)})
  with pytest.raises(UserError, match=r"block1 \(too few blocks\)"):
    objective.check_models(tiny_vit_out(depth=1), {"teacher": tiny_vit_out()})


@pytest.mark.parametrize("name,args", [("nkd", {"gamma": -1.0}), ("nkd", {"temperature": 0.0}),
                                       ("vitkd", {"mask_ratio": 1.0}),
                                       ("vitkd", {"shallow_blocks": ()}),
                                       ("tinymim", {"ce_weight": -1.0}),
                                       ("tinymim", {"alpha": 1.0})])
def test_bad_objective_args_are_user_errors(name, args):
  config = config_util.base_config()
  config_util.set_objective(config, name)
  config.objective_args = ml_collections.ConfigDict(
      {**config.objective_args.to_dict(), **args})
  with pytest.raises(UserError, match="config.objective_args"):
    make_objective(config)


# ---------------------------------------------------------------------------
# End to end: each digits recipe distils, lowers its loss, checkpoints, exports.
# ---------------------------------------------------------------------------

TINY_ARG = "steps=20,batch_size=64,res=16"


def recipe_args(recipe, arg, workdir, *extra):
  return ["--config", repo_path("configs", f"{recipe}.py") + ":" + arg, "--workdir", workdir,
          "--config.schedule.warmup_steps=5", *TINY_OVERRIDES, *extra]


def distill_recipe(recipe, teacher, workdir, *extra, arg=TINY_ARG):
  return recipe_args(recipe, f"{arg},teacher={teacher}", workdir, *extra)


@pytest.fixture(scope="module")
def tinymim_workdir(vit_teacher_workdir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tinymim") / "run")
  args = distill_recipe("digits_tinymim", vit_teacher_workdir, workdir, "--config.lr=0.003")
  assert cli.distill_main(["funmatch-distill", *args]) == 0
  return workdir


def assert_trained(workdir, *metric_keys):
  rows = [r for r in metrics_io.read_metrics(workdir) if "train/loss" in r]
  assert [r["step"] for r in rows] == [5, 10, 15, 20]
  assert np.mean([r["train/loss"] for r in rows[-2:]]) < rows[0]["train/loss"]
  for key in metric_keys:
    assert key in rows[-1], key
  assert checkpoint.saved_steps(workdir) == [10, 20]


def assert_exports_the_student_only(config_args, workdir, student_names, tmp_path, capsys):
  output = str(tmp_path / "student.npz")
  code, _, err = run_cli(cli.export_main, [*config_args, f"--output={output}"], capsys)
  assert code == 0, err
  from funmatch.weights import files
  with np.load(output) as data:
    assert set(data.files) - {files.METADATA_KEY} == student_names  # + metadata


def vit_param_names(width, heads, depth=4):
  model = vit.Model(10, variant="Ti", width=width, depth=depth, num_heads=heads,
                    mlp_dim=4 * width, patch_size=4)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  from funmatch.weights import layouts
  return set(layouts.flat_params(shapes))


def test_tinymim_distils_checkpoints_and_exports(vit_teacher_workdir, tinymim_workdir,
                                                 tmp_path, capsys):
  assert_trained(tinymim_workdir, "train/relation_qk", "train/relation_vv")
  args = distill_recipe("digits_tinymim", vit_teacher_workdir, tinymim_workdir)
  assert_exports_the_student_only(args, tinymim_workdir, vit_param_names(48, 3), tmp_path, capsys)


def test_tinymim_student_is_the_next_teacher_and_fine_tunes(tinymim_workdir, tmp_path, capsys):
  from funmatch.train import build
  # Sequential distillation: the finished student (drop-path, relation heads) teaches.
  config = config_util.load_recipe(repo_path("configs", "x.py"), "digits_tinymim").get_config(
      f"{TINY_ARG},teacher={tinymim_workdir},teacher_width=48,width=24")
  run = build.build(config, "distill")
  _, stored = checkpoint.restore_params(tinymim_workdir)
  for a, b in zip(jax.tree.leaves(run.teacher_params["teacher"]), jax.tree.leaves(stored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  workdir = str(tmp_path / "second")
  code, _, err = run_cli(cli.distill_main, distill_recipe(
      "digits_tinymim", tinymim_workdir, workdir, "--config.total_steps=10",
      arg=f"{TINY_ARG},teacher_width=48,width=24"), capsys)
  assert code == 0, err
  # The second stage: fine-tuning the distilled student on labels.
  workdir = str(tmp_path / "finetune")
  code, out, err = run_cli(cli.train_main, recipe_args(
      "digits_tinymim", f"{TINY_ARG},finetune={tinymim_workdir}", workdir,
      "--config.total_steps=10"), capsys)
  assert code == 0, err
  assert checkpoint.saved_steps(workdir) == [10]


def test_vitkd_distils_checkpoints_and_exports(vit_teacher_workdir, tmp_path, capsys):
  workdir = str(tmp_path / "vitkd")
  args = distill_recipe("digits_vitkd", vit_teacher_workdir, workdir)
  code, _, err = run_cli(cli.distill_main, args, capsys)
  assert code == 0, err
  assert_trained(workdir, "train/ce", "train/mimic", "train/generation", "train/nkd")
  # The adapters, mask token and generator live in the checkpoint, not in the export.
  assert_exports_the_student_only(args, workdir, vit_param_names(48, 3), tmp_path, capsys)


def test_nkd_distils_checkpoints_and_exports(teacher_workdir, tmp_path, capsys):
  from funmatch.models import bit
  from funmatch.weights import layouts
  workdir = str(tmp_path / "nkd")
  args = distill_recipe("digits_nkd", teacher_workdir, workdir, "--config.teacher.width=0.5")
  code, _, err = run_cli(cli.distill_main, args, capsys)
  assert code == 0, err
  assert_trained(workdir, "train/ce", "train/nkd")
  model = bit.Model(num_classes=10, depth=[1, 1, 1, 1], width=0.5)
  init = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  assert_exports_the_student_only(args, workdir, set(layouts.file_arrays("bit", init)), tmp_path, capsys)


@pytest.mark.parametrize("recipe", ["digits_nkd", "digits_vitkd", "digits_tinymim"])
def test_baseline_is_the_same_student_on_labels(recipe):
  load = lambda arg: config_util.load_recipe(repo_path("configs", "x.py"), recipe).get_config(arg)
  method, baseline = load("teacher=/t"), load("baseline=True")
  assert baseline.objective == "supervised" and not baseline.teachers
  assert method.objective == recipe[len("digits_"):] and method.teachers == ("teacher",)
  plain = lambda value: value.to_dict() if hasattr(value, "to_dict") else value
  for key in ("student", "input", "evals", "total_steps", "lr", "wd", "optax_name", "optax",
              "schedule", "mixup", "grad_clip_norm", "seed"):
    assert plain(baseline[key]) == plain(method[key]), key


def test_imagenet_recipes_hold_the_papers_values_and_fit_their_objectives():
  load = lambda name, arg=None: config_util.load_recipe(
      repo_path("configs", "x.py"), name).get_config(arg)
  tm = load("tinymim_i1k")
  assert (tm.student.variant, tm.teacher.variant, tm.teacher.qkv_block) == ("B", "L", 17)
  assert (tm.student.relation_heads, tm.student.drop_path, tm.teacher.get("drop_path", 0)) == (
      16, 0.1, 0)
  assert (tm.total_epochs, tm.input.batch_size, tm.optax.b2, tm.teaching) == (
      300.0, 2048, 0.95, "consistent")
  assert tm.lr == pytest.approx(1.2e-3) and tm.wd == pytest.approx(1.2e-3 * 0.05)
  assert tm.objective_args.to_dict() == {"qk_weight": 1.0, "vv_weight": 1.0, "ce_weight": 0.0}
  small = load("tinymim_i1k", "student=S,teacher=B")
  assert (small.student.relation_heads, small.teacher.qkv_block) == (12, -1)
  assert load("tinymim_i1k", "finetune=/w").student.init == "/w"
  kd = load("vitkd_i1k")
  assert (kd.student.variant, kd.teacher.variant, kd.total_epochs, kd.lr) == ("Ti", "S", 300.0,
                                                                               1e-3)
  assert kd.objective_args.to_dict() == {
      "alpha": 3e-5, "beta": 3e-6, "mask_ratio": 0.5, "shallow_blocks": (0, 1),
      "ce_weight": 1.0, "nkd_weight": 1.0, "nkd_temperature": 1.0, "nkd_gamma": 1.0}
  assert load("vitkd_i1k", "student=S,nkd=False").teacher.variant == "B"
  # The models these recipes build have the taps and shapes their objective needs.
  def shapes(model_config):
    kwargs = config_util.model_kwargs(model_config)
    model = vit.Model(1000, **kwargs)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], x)
  tinymim_lib.TinyMIM().check_models(shapes(tm.student), {"teacher": shapes(tm.teacher)})
  vitkd_lib.ViTKD().check_models(shapes(kd.student), {"teacher": shapes(kd.teacher)})


# ---------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written.
# ---------------------------------------------------------------------------


def assert_one_line_error(code, err, workdir, *fragments):
  assert code == 2, err
  lines = [l for l in err.splitlines() if l.startswith("funmatch: error:")]
  assert len(lines) == 1 and "Traceback" not in err, err
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  assert not os.path.exists(workdir)


def write_recipe(tmp_path, body):
  path = tmp_path / "recipe.py"
  path.write_text("from funmatch import config_util as cu\n"
                  f"digits = cu.load_recipe({repo_path('configs', 'x.py')!r}, 'digits')\n"
                  "def get_config(arg=None):\n"
                  "  c = digits.get_config(arg)\n" + body + "  return c\n")
  return str(path)


def test_tinymim_with_a_cnn_is_one_line_exit_2(teacher_workdir, tmp_path, capsys):
  recipe = write_recipe(tmp_path, "  cu.set_objective(c, 'tinymim')\n")
  workdir = str(tmp_path / "run")
  code, _, err = run_cli(cli.distill_main, [
      "--config", f"{recipe}:teacher={teacher_workdir}", "--workdir", workdir,
      "--config.teacher.width=0.5"], capsys)
  assert_one_line_error(code, err, workdir, "tinymim", "config.student is a CNN",
                        "model='vit'")


def test_tinymim_head_mismatch_is_one_line_exit_2(vit_teacher_workdir, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  code, _, err = run_cli(cli.distill_main, distill_recipe(
      "digits_tinymim", vit_teacher_workdir, workdir, "--config.student.relation_heads=2"),
      capsys)
  assert_one_line_error(code, err, workdir, "config.student.relation_heads=3")


def test_unknown_objective_args_key_is_one_line_exit_2(vit_teacher_workdir, tmp_path, capsys):
  recipe = write_recipe(tmp_path, "  cu.set_objective(c, 'nkd')\n"
                                  "  c.objective_args.alpha = 1.0\n")
  workdir = str(tmp_path / "run")
  code, _, err = run_cli(cli.distill_main, ["--config", f"{recipe}:teacher=/nonexistent",
                                            "--workdir", workdir], capsys)
  assert_one_line_error(code, err, workdir, "objective_args has unknown key(s) alpha",
                        "valid keys: ce_weight, gamma, temperature")
  # On a recipe's locked config, a mistyped setting is refused as well.
  code, _, err = run_cli(cli.distill_main, distill_recipe(
      "digits_vitkd", vit_teacher_workdir, workdir, "--config.objective_args.alpah=1"), capsys)
  assert_one_line_error(code, err, workdir, "alpah")
