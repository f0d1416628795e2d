"""SEED and OFA-KD: losses against numpy loops, queue mechanics, branch heads, and
end to end through the CLI on tiny digits runs (BiT and ViT teachers)."""
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import repo_path, run_cli
from funmatch import config_util
from funmatch.distill.objectives import make_objective
from funmatch.distill.objectives import ofakd as ofakd_lib
from funmatch.distill.objectives import seed as seed_lib
from funmatch.errors import UserError


def _log_softmax(row):
  row = np.asarray(row, np.float64)
  m = max(row)
  return [v - m - math.log(sum(math.exp(u - m) for u in row)) for v in row]


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _config(objective, batch_size=8, **args):
  c = config_util.base_config()
  c.input.batch_size = batch_size
  config_util.set_objective(c, objective, **args)
  return c


# ---------------------------------------------------------------------------
# SEED


def _seed_reference(s, t, queue, tau_s, tau_t):
  """METHODS.md section 4, one example and one queue entry at a time."""
  total = 0.0
  for b in range(len(s)):
    student = [float(np.dot(s[b], t[b])) / tau_s]
    teacher = [float(np.dot(t[b], t[b])) / tau_t]
    for k in range(queue.shape[1]):
      student.append(float(np.dot(s[b], queue[:, k])) / tau_s)
      teacher.append(float(np.dot(t[b], queue[:, k])) / tau_t)
    log_q = _log_softmax(student)
    log_p = _log_softmax(teacher)
    total -= sum(math.exp(lp) * lq for lp, lq in zip(log_p, log_q))
  return total / len(s)


def test_seed_loss_matches_numpy_loop():
  rng = np.random.default_rng(0)
  s = _unit(rng.normal(size=(4, 6)))
  t = _unit(rng.normal(size=(4, 6)))
  queue = _unit(rng.normal(size=(12, 6))).T  # [dim, K], unit columns
  for tau_s, tau_t in ((0.2, 1e-4), (0.2, 0.05), (1.0, 0.5)):
    loss, _, _ = seed_lib.seed_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                                    jnp.asarray(queue, jnp.float32), tau_s, tau_t)
    assert float(loss) == pytest.approx(_seed_reference(s, t, queue, tau_s, tau_t), rel=1e-4)


def test_seed_with_tau_t_to_zero_is_infonce():
  """p_T becomes one-hot on the positive (t.t = 1 beats every t.q < 1): InfoNCE."""
  rng = np.random.default_rng(1)
  s = _unit(rng.normal(size=(5, 8)))
  t = _unit(rng.normal(size=(5, 8)))
  queue = _unit(rng.normal(size=(20, 8))).T
  tau_s = 0.2
  infonce = 0.0
  for b in range(5):
    logits = [float(s[b] @ t[b]) / tau_s] + [float(s[b] @ queue[:, k]) / tau_s
                                             for k in range(20)]
    infonce -= _log_softmax(logits)[0]
  infonce /= 5
  gaps = []
  for tau_t in (1e-1, 1e-2, 1e-4):
    loss, _, _ = seed_lib.seed_loss(*(jnp.asarray(x, jnp.float32) for x in (s, t, queue)),
                                    tau_s, tau_t)
    gaps.append(abs(float(loss) - infonce))
  assert gaps[-1] < 1e-4 * infonce and gaps[0] > gaps[-1]


def test_queue_is_fifo_and_pointer_wraps():
  queue = jnp.zeros((3, 8))
  pointer = jnp.zeros([], jnp.int32)
  batches = [np.full((4, 3), float(i + 1)) for i in range(3)]
  queue, pointer = seed_lib.enqueue(queue, pointer, jnp.asarray(batches[0]))
  assert int(pointer) == 4
  np.testing.assert_array_equal(queue[:, :4], 1.0)
  np.testing.assert_array_equal(queue[:, 4:], 0.0)
  queue, pointer = seed_lib.enqueue(queue, pointer, jnp.asarray(batches[1]))
  assert int(pointer) == 0  # wrapped around: 8 % 8
  # The oldest batch (1s) is replaced first.
  queue, pointer = seed_lib.enqueue(queue, pointer, jnp.asarray(batches[2]))
  assert int(pointer) == 4
  np.testing.assert_array_equal(queue[:, :4], 3.0)
  np.testing.assert_array_equal(queue[:, 4:], 2.0)
  # Columns keep the order of the batch's rows.
  rows = jnp.arange(8.0).reshape(4, 2)
  q, _ = seed_lib.enqueue(jnp.zeros((2, 8)), jnp.asarray(4, jnp.int32), rows)
  np.testing.assert_array_equal(q[:, 4:], rows.T)


def _shapes(batch, features, taps=None, logits=10):
  taps = dict(taps or {})
  taps["pre_logits"] = jax.ShapeDtypeStruct((batch, features), jnp.float32)
  return (jax.ShapeDtypeStruct((batch, logits), jnp.float32), taps)


def test_seed_state_step_and_next_state():
  objective = make_objective(_config("seed", batch_size=4, queue_size=8, dim=5))
  student, teacher = _shapes(2, 6), _shapes(2, 7)
  aux = objective.init_aux(jax.random.PRNGKey(0), student, {"teacher": teacher})
  assert jax.tree.map(np.shape, aux) == {"head": {"hidden": {"kernel": (6, 6), "bias": (6,)},
                                                   "out": {"kernel": (6, 5), "bias": (5,)}}}
  state = objective.init_state(jax.random.PRNGKey(0), student, {"teacher": teacher})
  assert state["queue"].shape == (5, 8) and int(state["pointer"]) == 0
  # The teacher's 7 features reach dim 5 through a fixed projection kept in the state.
  assert state["projection"].shape == (7, 5)
  np.testing.assert_allclose(np.linalg.norm(state["queue"], axis=0), 1.0, rtol=1e-5)
  rng = np.random.default_rng(2)
  student_out = (jnp.zeros((4, 10)), {"pre_logits": jnp.asarray(rng.normal(size=(4, 6)),
                                                                jnp.float32)})
  teacher_outs = {"teacher": (jnp.zeros((4, 10)),
                              {"pre_logits": jnp.asarray(rng.normal(size=(4, 7)), jnp.float32)})}
  batch = {"objective_state": state}
  loss, metrics = jax.jit(objective)(aux, student_out, teacher_outs, batch, None)
  s = np.asarray(objective.student_embeddings(aux, student_out))
  t = np.asarray(objective.teacher_embeddings(state, teacher_outs))
  np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, rtol=1e-5)
  assert float(loss) == pytest.approx(
      _seed_reference(s, t, np.asarray(state["queue"]), 0.2, 1e-4), rel=1e-4)
  assert set(metrics) >= {"teacher_self_top1", "student_agreement_top1"}
  grads = jax.jit(jax.grad(
      lambda a: objective(a, student_out, teacher_outs, batch, None)[0]))(aux)
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))
  new = jax.jit(objective.next_state)(state, teacher_outs)
  assert int(new["pointer"]) == 4
  np.testing.assert_allclose(new["queue"][:, :4], t.T, atol=1e-5)
  np.testing.assert_array_equal(new["queue"][:, 4:], state["queue"][:, 4:])


def test_seed_dim_zero_uses_the_teacher_width_without_projection():
  objective = make_objective(_config("seed", batch_size=4, queue_size=8, dim=0))
  x = np.random.default_rng(3).normal(size=(4, 7)).astype(np.float32)
  state = objective.init_state(jax.random.PRNGKey(0), _shapes(2, 6),
                               {"teacher": _shapes(2, 7)})
  assert state["queue"].shape == (7, 8) and "projection" not in state
  t = objective.teacher_embeddings(state, {"teacher": (None, {"pre_logits": jnp.asarray(x)})})
  np.testing.assert_allclose(t, _unit(x), rtol=1e-5)


@pytest.mark.parametrize("batch_size,queue_size", [(64, 100), (64, 0), (48, 64)])
def test_seed_queue_must_be_a_multiple_of_the_global_batch(batch_size, queue_size):
  with pytest.raises(UserError, match="queue_size=.*multiple of the global batch"):
    make_objective(_config("seed", batch_size=batch_size, queue_size=queue_size))


def test_seed_rejects_missing_taps_and_several_teachers():
  objective = make_objective(_config("seed", batch_size=4, queue_size=8,
                                     teacher_tap="stage9"))
  with pytest.raises(UserError, match="teacher_tap='stage9'.*taps: pre_logits"):
    objective.check_models(_shapes(2, 6), {"teacher": _shapes(2, 7)})
  objective = make_objective(_config("seed", batch_size=4, queue_size=8))
  with pytest.raises(UserError, match="one teacher"):
    objective.check_models(_shapes(2, 6), {"a": _shapes(2, 7), "b": _shapes(2, 7)})


# ---------------------------------------------------------------------------
# OFA-KD


def _ofa_reference(student, teacher, labels, gamma, temperature=1.0):
  total = 0.0
  for s_row, t_row, label in zip(student, teacher, labels):
    log_q = _log_softmax(np.asarray(s_row) / temperature)
    p = [math.exp(v) for v in _log_softmax(np.asarray(t_row) / temperature)]
    for c in range(len(s_row)):
      y = 1.0 if c == label else 0.0
      total += -((p[c] + y) ** gamma - y) * log_q[c]
  return total / len(student)


@pytest.mark.parametrize("gamma,temperature", [(1.0, 1.0), (1.5, 1.0), (1.5, 2.0), (2.0, 1.0)])
def test_ofa_loss_matches_numpy_loop(gamma, temperature):
  rng = np.random.default_rng(4)
  student = rng.normal(size=(6, 5)) * 2
  teacher = rng.normal(size=(6, 5)) * 2
  labels = rng.integers(0, 5, size=6)
  loss = ofakd_lib.ofa_loss(jnp.asarray(student), jnp.asarray(teacher),
                            jax.nn.one_hot(labels, 5), gamma, temperature)
  assert float(loss) == pytest.approx(
      _ofa_reference(student, teacher, labels, gamma, temperature), rel=1e-5)


def test_ofa_with_gamma_one_is_soft_cross_entropy_with_the_teacher():
  rng = np.random.default_rng(5)
  student = rng.normal(size=(7, 4))
  teacher = rng.normal(size=(7, 4))
  labels = jax.nn.one_hot(rng.integers(0, 4, size=7), 4)
  p_teacher = np.exp(teacher) / np.exp(teacher).sum(-1, keepdims=True)
  log_q = student - np.log(np.exp(student).sum(-1, keepdims=True))
  soft_ce = -np.mean(np.sum(p_teacher * log_q, -1))
  loss = ofakd_lib.ofa_loss(jnp.asarray(student), jnp.asarray(teacher), labels, 1.0)
  assert float(loss) == pytest.approx(soft_ce, rel=1e-5)
  # The label does not matter at gamma = 1 ...
  other = ofakd_lib.ofa_loss(jnp.asarray(student), jnp.asarray(teacher),
                             jnp.roll(labels, 1, axis=1), 1.0)
  assert float(other) == pytest.approx(float(loss), rel=1e-6)
  # ... and for gamma > 1 the target class weighs (1 + p_T)^gamma - 1 > p_T.
  enhanced = ofakd_lib.ofa_loss(jnp.asarray(student), jnp.asarray(teacher), labels, 1.5)
  assert float(enhanced) != pytest.approx(float(loss), rel=1e-3)


def _tiny(name):
  from funmatch import models
  kwargs = {"bit": dict(depth=[1, 1, 1, 1], width=0.5),
            "mobilenet_v3": dict(width=0.25),
            "vit": dict(variant="Ti", width=48, depth=4, num_heads=3, mlp_dim=96,
                        patch_size=4)}[name]
  return models.get_model(name, 10, **kwargs)


def _output_shapes(model, batch=4):
  """The model's (logits, taps) shapes at 16px, without compiling the model."""
  images = jax.ShapeDtypeStruct((batch, 16, 16, 3), jnp.float32)
  return jax.eval_shape(
      lambda x: model.apply(model.init(jax.random.PRNGKey(0), x, train=False), x,
                            train=False), images)


def _random_like(shapes, seed):
  """Normal samples in the shapes' tree (numpy: one jax.random program per shape
  would compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), shapes)


@pytest.mark.parametrize("student_name,stages,teacher_name", [
    ("bit", ("stage1", "stage2", "stage3"), "vit"),
    ("mobilenet_v3", ("stage2", "stage3", "stage4"), "vit"),
    ("vit", ("block0", "block1", "block2"), "bit")])
def test_ofa_branches_have_logit_shapes_and_get_gradients(student_name, stages, teacher_name):
  """Branches on the real models' tap shapes (random features: no model compile)."""
  student_shapes = _output_shapes(_tiny(student_name))
  teacher_shapes = _output_shapes(_tiny(teacher_name))
  objective = make_objective(_config("ofakd", gamma=1.5))
  objective.check_models(student_shapes, {"teacher": teacher_shapes})
  assert objective.stage_names(student_shapes[1]) == stages  # 'auto'
  aux = jax.jit(objective.init_aux)(jax.random.PRNGKey(3), student_shapes,
                                    {"teacher": teacher_shapes})
  assert set(aux) == {f"branch_{s}" for s in stages}
  student_out = _random_like(student_shapes, 1)
  teacher_out = _random_like(teacher_shapes, 2)
  branch_logits = jax.jit(objective.branch_logits)(aux, student_out)
  assert {k: v.shape for k, v in branch_logits.items()} == {s: (4, 10) for s in stages}
  batch = {"label_probs": jax.nn.one_hot(jnp.arange(4) % 10, 10), "label": jnp.arange(4)}

  def loss_fn(aux_params, out):
    return objective(aux_params, out, {"teacher": teacher_out}, batch, None)

  (loss, metrics), (aux_grads, out_grads) = jax.jit(
      jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(aux, student_out)
  assert np.isfinite(float(loss))
  assert set(metrics) >= {"ce", "ofa_logits", *(f"ofa_{s}" for s in stages)}
  expected = metrics["ce"] + metrics["ofa_logits"] + sum(metrics[f"ofa_{s}"] for s in stages)
  assert float(loss) == pytest.approx(float(expected), rel=1e-6)
  for stage in stages:
    norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(aux_grads[f"branch_{stage}"])]
    assert all(n > 0 for n in norms), stage
    # The branch loss also reaches the student's features at that stage.
    assert float(jnp.abs(out_grads[1][stage]).sum()) > 0, stage


def test_ofa_uses_the_label_class_under_mixup_and_a_gamma_per_stage():
  """As the authors' code: y = one_hot(argmax(mixed label)) in (p_T + y)^gamma - y,
  gamma per branch stage and the last one for the final logits; CE on the mixed label."""
  student_shapes = _output_shapes(_tiny("bit"))
  teacher_shapes = _output_shapes(_tiny("vit"))
  gammas = (1.2, 1.4, 1.6, 2.0)
  objective = make_objective(_config("ofakd", gamma=gammas))
  aux = jax.jit(objective.init_aux)(jax.random.PRNGKey(3), student_shapes,
                                    {"teacher": teacher_shapes})
  student_out = _random_like(student_shapes, 1)
  teacher_out = _random_like(teacher_shapes, 2)
  labels = np.array([1, 4, 7, 2])
  partners = np.roll(labels, 1)
  mixed = 0.7 * np.eye(10)[labels] + 0.3 * np.eye(10)[partners]
  batch = {"label_probs": jnp.asarray(mixed, jnp.float32), "label": jnp.asarray(labels)}
  # One program for the loss and the branch logits (op by op, each op compiles alone).
  (loss, metrics), branches = jax.jit(lambda a, out: (
      objective(a, out, {"teacher": teacher_out}, batch, None),
      objective.branch_logits(a, out)))(aux, student_out)

  student_logits = np.asarray(student_out[0], np.float64)
  teacher_logits = np.asarray(teacher_out[0], np.float64)
  ce = -np.mean(np.sum(mixed * np.array([_log_softmax(r) for r in student_logits]), -1))
  expected = ce + _ofa_reference(student_logits, teacher_logits, labels, gammas[-1])
  for (stage, logits), gamma in zip(branches.items(), gammas[:-1]):
    stage_loss = _ofa_reference(np.asarray(logits, np.float64), teacher_logits, labels, gamma)
    assert float(metrics[f"ofa_{stage}"]) == pytest.approx(stage_loss, rel=1e-4)
    expected += stage_loss
  assert float(loss) == pytest.approx(expected, rel=1e-4)
  # A tuple that does not give every stage plus the final logits a gamma is refused.
  with pytest.raises(UserError, match="gamma has 2 values but the student has 3 branch"):
    make_objective(_config("ofakd", gamma=(1.0, 2.0))).check_models(
        student_shapes, {"teacher": teacher_shapes})


def test_ofa_stage_tap_missing_is_one_clear_error():
  out = _output_shapes(_tiny("bit"))
  objective = make_objective(_config("ofakd", stages="stage1,stage7"))
  with pytest.raises(UserError) as error:
    objective.check_models(out, {"teacher": out})
  message = str(error.value)
  assert "'stage7'" in message and "stage1, stage2, stage3, stage4" in message
  assert "\n" not in message
  with pytest.raises(UserError, match="gamma must be > 0"):
    make_objective(_config("ofakd", gamma=0.0))


# ---------------------------------------------------------------------------
# The linear probe


def test_linear_probe_is_deterministic_and_separates_separable_classes():
  from funmatch.train import probe
  rng = np.random.default_rng(6)
  centers = rng.normal(size=(3, 5)) * 4
  labels = np.arange(90) % 3
  features = centers[labels] + rng.normal(size=(90, 5))
  test_labels = np.arange(30) % 3
  test = centers[test_labels] + rng.normal(size=(30, 5))
  first = probe.probe((features, labels), {"test": (test, test_labels)}, 3)
  second = probe.probe((features, labels), {"test": (test, test_labels)}, 3)
  assert first == second
  assert first["test/linear_probe_top1"] > 0.9
  # Shuffled labels carry no signal: chance level on fresh data.
  shuffled = probe.probe((features, rng.permutation(labels)), {"test": (test, test_labels)}, 3)
  assert shuffled["test/linear_probe_top1"] < first["test/linear_probe_top1"]


def test_logistic_fit_reaches_the_optimum_of_its_objective():
  """At the optimum the gradient of mean CE + l2/2 |W|^2 vanishes (numpy check)."""
  from funmatch.train import probe
  rng = np.random.default_rng(7)
  x = rng.normal(size=(40, 4))
  y = rng.integers(0, 3, size=40)
  params = probe.fit_logistic(x, y, 3, l2=0.1)
  w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
  logits = x @ w + b
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  residual = p - np.eye(3)[y]
  np.testing.assert_allclose(x.T @ residual / 40 + 0.1 * w, 0.0, atol=1e-4)
  np.testing.assert_allclose(residual.mean(0), 0.0, atol=1e-4)


# ---------------------------------------------------------------------------
# End to end: funmatch-distill / -eval / -export and tools/linear_probe.py

from funmatch import checkpoint  # noqa: E402
from funmatch.train import cli, metrics_io  # noqa: E402

TINY = "steps=20,batch_size=64,res=16"
OVERRIDES = ["--config.log_every_steps=5", "--config.checkpoint_every_steps=10"]


def seed_args(teacher_workdir, workdir, *extra, queue_size=256):
  return ["--config", repo_path("configs", "digits_seed.py") +
          f":{TINY},queue_size={queue_size},teacher={teacher_workdir}",
          "--workdir", workdir, "--config.teacher.width=0.5", *OVERRIDES, *extra]


def ofa_args(teacher_workdir, workdir, *extra):
  return ["--config", repo_path("configs", "digits_ofakd.py") + f":{TINY},teacher={teacher_workdir}",
          "--workdir", workdir, *OVERRIDES, *extra]


def _objective_state(workdir, step):
  """The SEED queue and pointer stored in a checkpoint, as numpy."""
  import orbax.checkpoint as ocp
  item = os.path.join(checkpoint.checkpoint_dir(workdir), str(step), "default")
  with ocp.PyTreeCheckpointer() as checkpointer:
    meta = checkpointer.metadata(item).item_metadata.tree["objective_state"]
    abstract = {"objective_state": jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta)}
    restored = checkpointer.restore(item, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract),
        partial_restore=True))
  return restored["objective_state"]


def _losses(workdir):
  return [r["train/loss"] for r in metrics_io.read_metrics(workdir) if "train/loss" in r]


def _export_keys_equal_student_params(config_args, workdir, tmp_path, capsys):
  output = str(tmp_path / "student.npz")
  code, _, err = run_cli(cli.export_main, [*config_args[:2], "--workdir", workdir,
                                           f"--output={output}"], capsys)
  assert code == 0, err
  _, params = checkpoint.restore_params(workdir)
  from funmatch.weights import files, layouts
  with np.load(output) as data:
    names = set(data.files) - {files.METADATA_KEY}  # the export's metadata
  # Only the student: no branch/projection head, no queue.
  assert names == set(layouts.file_arrays("bit", params))
  assert not any("branch" in n or "head/hidden" in n or "queue" in n for n in names)


def test_seed_distills_checkpoints_probes_exports_and_resumes_its_queue(
    teacher_workdir, tmp_path, capsys):
  full = str(tmp_path / "seed")
  args = seed_args(teacher_workdir, full)
  code, out, err = run_cli(cli.distill_main, args, capsys)
  assert code == 0, err
  losses = _losses(full)
  assert len(losses) == 4 and np.mean(losses[-2:]) < losses[0]
  assert checkpoint.saved_steps(full) == [10, 20]
  final = metrics_io.read_metrics(full)[-1]
  assert 0.5 < final["test/linear_probe_top1"] <= 1.0  # digits: well above chance
  assert "test/linear_probe_top1" in out
  state = _objective_state(full, 20)
  assert state["queue"].shape == (128, 256) and int(state["pointer"]) == (20 * 64) % 256
  # The last batch's teacher embeddings sit just before the pointer: unit columns.
  np.testing.assert_allclose(np.linalg.norm(state["queue"], axis=0), 1.0, rtol=1e-5)

  # funmatch-eval on the checkpoint reports the same probe (deterministic).
  code, out, err = run_cli(cli.eval_main, [*args[:4], "--config.teacher.width=0.5"], capsys)
  assert code == 0, err
  assert "test/linear_probe_top1" in out
  import json
  with open(os.path.join(full, "eval_20.json")) as f:
    assert json.load(f)["test/linear_probe_top1"] == pytest.approx(
        final["test/linear_probe_top1"], abs=1e-6)

  _export_keys_equal_student_params(args, full, tmp_path, capsys)

  # "Preempted" after step 10: the resumed run's queue and pointer at step 20 are
  # bit-identical to the uninterrupted run's.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(full, resumed)
  shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(resumed), "20"))
  code, _, err = run_cli(cli.distill_main, seed_args(teacher_workdir, resumed), capsys)
  assert code == 0, err
  want, got = _objective_state(full, 20), _objective_state(resumed, 20)
  np.testing.assert_array_equal(want["queue"], got["queue"])
  assert int(want["pointer"]) == int(got["pointer"])
  mid = _objective_state(full, 10)
  assert not np.array_equal(mid["queue"], want["queue"])  # the queue did move


def test_seed_queue_not_a_multiple_of_the_batch_is_one_line_exit_2(tmp_path, capsys):
  workdir = str(tmp_path / "bad_queue")
  # Found before any teacher is loaded (so the teacher path is not even read).
  code, _, err = run_cli(cli.distill_main, seed_args(str(tmp_path / "teacher"), workdir,
                                                     queue_size=100), capsys)
  lines = [l for l in err.splitlines() if l.startswith("funmatch: error:")]
  assert code == 2 and len(lines) == 1
  assert "queue_size=100" in lines[0] and "batch_size=64" in lines[0]
  assert not os.path.exists(workdir)


def test_linear_probe_tool_random_init_and_bad_input(capsys):
  tool = config_util.load_recipe(repo_path("tools", "x.py"), "linear_probe")
  config = repo_path("configs", "digits_seed.py") + ":batch_size=64,queue_size=256"
  code, out, err = run_cli(tool.main, ["--config", config], capsys)
  assert code == 2 and err.count("\n") == 1 and "--random_init" in err
  code, out, err = run_cli(tool.main, ["--config", config, "--workdir", "/nonexistent/x"],
                           capsys)
  assert code == 2 and "does not exist" in err
  code, out, err = run_cli(tool.main, ["--config", config, "--random_init"], capsys)
  assert code == 0, err
  top1 = float(out.split("test/linear_probe_top1: ")[1].split()[0])
  assert 0.3 < top1 <= 1.0


def test_ofakd_vit_teacher_to_bit_student_distills_and_exports(vit_teacher_workdir, tmp_path,
                                                               capsys):
  workdir = str(tmp_path / "ofa")
  args = ofa_args(vit_teacher_workdir, workdir)
  code, _, err = run_cli(cli.distill_main, args, capsys)
  assert code == 0, err
  rows = [r for r in metrics_io.read_metrics(workdir) if "train/loss" in r]
  losses = [r["train/loss"] for r in rows]
  assert np.mean(losses[-2:]) < losses[0]
  for key in ("train/ce", "train/ofa_logits", "train/ofa_stage1", "train/ofa_stage2",
              "train/ofa_stage3"):
    assert key in rows[-1]
  assert checkpoint.saved_steps(workdir) == [10, 20]
  assert 0.0 <= metrics_io.read_metrics(workdir)[-1]["test/student_top1"] <= 1.0
  _export_keys_equal_student_params(args, workdir, tmp_path, capsys)


def test_ofakd_missing_stage_tap_is_one_line_exit_2(vit_teacher_workdir, tmp_path, capsys):
  workdir = str(tmp_path / "bad_stage")
  code, _, err = run_cli(cli.distill_main, ofa_args(
      vit_teacher_workdir, workdir, "--config.objective_args.stages=stage1,block3"), capsys)
  lines = [l for l in err.splitlines() if l.startswith("funmatch: error:")]
  assert code == 2 and len(lines) == 1
  assert "'block3'" in lines[0] and "stage1, stage2, stage3, stage4" in lines[0]
  assert not os.path.exists(workdir)


def test_baseline_configs_train_on_labels_with_the_same_student():
  from funmatch.train import build
  for name in ("digits_seed", "digits_ofakd"):
    module = config_util.load_recipe(repo_path("configs", "x.py"), name)
    method, baseline = module.get_config("teacher=x"), module.get_config("baseline=True")
    assert baseline.objective == "supervised" and baseline.teachers == ()
    build.validate(baseline, "train")
    for key in ("student", "input", "total_steps", "lr", "wd", "optax_name", "schedule"):
      assert baseline[key] == method[key], (name, key)
