"""Distances, mixup and objectives against hand-computed references."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from funmatch.distill import losses as distances, mixup
from funmatch.distill.objectives import make_objective
from funmatch.distill.objectives.function_matching import FunctionMatching
from funmatch.errors import UserError


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_kl_hand_computed_two_classes():
  # teacher logits (0, ln 3) -> p = (1/4, 3/4); student (0, 0) -> q = (1/2, 1/2).
  teacher = jnp.array([[0.0, math.log(3.0)]])
  student = jnp.array([[0.0, 0.0]])
  expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
  assert float(distances.kl(student, teacher)) == pytest.approx(expected, rel=1e-6)


def test_kl_temperature_scaling_matches_numpy_loop():
  rng = np.random.default_rng(0)
  student = rng.normal(size=(5, 7)).astype(np.float32) * 3
  teacher = rng.normal(size=(5, 7)).astype(np.float32) * 3
  for t in (1.0, 2.0, 10.0):
    total = 0.0
    for s_row, t_row in zip(student, teacher):
      p, q = _softmax(t_row / t), _softmax(s_row / t)
      total += sum(p[i] * (math.log(p[i]) - math.log(q[i])) for i in range(7))
    expected = t * t * total / 5
    assert float(distances.kl(student, teacher, t)) == pytest.approx(expected, rel=1e-5)


def test_kl_is_zero_for_equal_logits_and_gradient_flows_only_to_student():
  logits = jnp.array([[1.0, 2.0, -1.0]])
  assert float(distances.kl(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-7)
  teacher_grad = jax.grad(lambda t: distances.kl(logits + 1.0, t))(logits)
  np.testing.assert_allclose(teacher_grad, 0.0)


def test_hard_l2_euclidean_hand_computed():
  student = jnp.array([[1.0, 0.0], [0.0, 0.0]])
  teacher = jnp.array([[0.0, 4.0], [3.0, 0.0]])
  # hard: CE to teacher argmax (1, 0): -log softmax(s)[1] and -log softmax(s)[0].
  ce1 = -math.log(math.exp(0) / (math.exp(1) + 1))
  ce2 = math.log(2)
  assert float(distances.hard(student, teacher)) == pytest.approx((ce1 + ce2) / 2, rel=1e-6)
  # l2: ((1)^2 + 4^2 + 3^2 + 0) / 2 = 13.
  assert float(distances.l2(student, teacher)) == pytest.approx(13.0, rel=1e-6)
  assert float(distances.euclidean(student, teacher)) == pytest.approx(
      (math.sqrt(17) + 3) / 2, rel=1e-5)
  # log-softmax euclidean is invariant to shifting either side's logits.
  a = float(distances.logsoftmax_euclidean(student, teacher))
  b = float(distances.logsoftmax_euclidean(student + 5.0, teacher - 2.0))
  assert a == pytest.approx(b, rel=1e-5)


def test_mixup_same_coefficient_and_partner_for_every_view():
  rng = jax.random.PRNGKey(3)
  x = jnp.arange(4 * 2 * 2 * 3, dtype=jnp.float32).reshape(4, 2, 2, 3)
  big = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # a 2x upsampled view
  mixed, a = mixup.mixup_views(rng, {"student": x, "teacher": big}, 1.0, False)
  # One coefficient for the whole batch, at least 0.5 after max(a, 1 - a).
  assert np.all(np.asarray(a) == float(a[0])) and float(a[0]) >= 0.5
  expected = float(a[0]) * x + (1 - float(a[0])) * jnp.roll(x, 1, axis=0)
  np.testing.assert_allclose(mixed["student"], expected, rtol=1e-6)
  # The teacher's view is the same mixture: downsampling it gives the student's.
  np.testing.assert_allclose(mixed["teacher"][:, ::2, ::2], mixed["student"], rtol=1e-6)


def test_mixup_per_example_uniform():
  a = mixup.mixup_coefficients(jax.random.PRNGKey(0), 1000, 1.0, per_example=True)
  a = np.asarray(a)
  assert len(set(a.tolist())) > 900 and a.min() >= 0 and a.max() <= 1
  assert abs(a.mean() - 0.5) < 0.05 and a.min() < 0.2  # not folded to >= 0.5


def test_mixup_batch_coefficient_distribution_is_folded_beta():
  draws = np.array([float(mixup.mixup_coefficients(jax.random.PRNGKey(i), 2, 1.0, False)[0])
                    for i in range(300)])
  # Beta(1,1) folded by max(a, 1-a) is Uniform[0.5, 1]: mean 0.75.
  assert draws.min() >= 0.5 and abs(draws.mean() - 0.75) < 0.03


def _config(objective="function_matching", **settings):
  from funmatch import config_util
  c = config_util.base_config()
  config_util.set_objective(c, objective, **settings)
  return c


def test_function_matching_ensembles():
  rng = np.random.default_rng(1)
  s = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
  t1 = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
  t2 = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
  outs = {"a": (t1, {}), "b": (t2, {})}
  summed, metrics = make_objective(_config(temperature=2.0))({}, (s, {}), outs, {}, None)
  expected = distances.kl(s, t1, 2.0) + distances.kl(s, t2, 2.0)
  assert float(summed) == pytest.approx(float(expected), rel=1e-6)
  assert float(metrics["loss_a"]) == pytest.approx(float(distances.kl(s, t1, 2.0)), rel=1e-6)
  mean, _ = make_objective(_config(ensemble="mean_logits"))({}, (s, {}), outs, {}, None)
  hand_mean = (np.asarray(t1) + np.asarray(t2)) / 2
  assert float(mean) == pytest.approx(float(distances.kl(s, hand_mean)), rel=1e-6)


def test_function_matching_bad_settings_are_user_errors():
  with pytest.raises(UserError, match="distance"):
    make_objective(_config(distance="cosine"))
  with pytest.raises(UserError, match="ensemble"):
    make_objective(_config(ensemble="vote"))
  with pytest.raises(UserError, match="temperature"):
    make_objective(_config(temperature=0.0))
  with pytest.raises(UserError, match="objective"):
    make_objective(_config(objective="magic"))
  # A setting no objective reads is an error, not silence.
  config = _config()
  config.objective_args = ml_collections.ConfigDict(dict(temperature=2.0, alpha=1.0))
  with pytest.raises(UserError, match="unknown key.*alpha"):
    make_objective(config)


def test_supervised_objective_is_cross_entropy_on_mixed_labels():
  logits = jnp.array([[2.0, 0.0, 0.0]])
  probs = jnp.array([[0.7, 0.3, 0.0]])
  loss, _ = make_objective(_config("supervised"))(
      {}, (logits, {}), {}, {"label_probs": probs}, None)
  log_q = np.log(_softmax(np.array([2.0, 0.0, 0.0])))
  assert float(loss) == pytest.approx(-(0.7 * log_q[0] + 0.3 * log_q[1]), rel=1e-6)


def test_function_matching_default_is_kl_without_labels():
  objective = FunctionMatching()
  s, t = jnp.ones((2, 3)), jnp.zeros((2, 3))
  loss, _ = objective({}, (s, {}), {"teacher": (t, {})}, {}, None)
  assert float(loss) == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------------------
# Evaluation against several teachers: the reference is the training ensemble.


def _eval_sums(ensemble, student_logits, teacher_logits, labels):
  import flax.linen as nn
  from funmatch.train import step as step_lib

  class FirstPixel(nn.Module):  # logits = the channels of the first pixel
    @nn.compact
    def __call__(self, images, train=False):
      return images[:, 0, 0, :], {}

  views = {"student": student_logits, **teacher_logits}
  batch = {"images": {name: jnp.asarray(v, jnp.float32)[:, None, None, :]
                      for name, v in views.items()},
           "label": jnp.asarray(labels), "mask": jnp.ones(len(labels), bool)}
  teachers = {name: FirstPixel() for name in teacher_logits}
  objective = make_objective(_config(ensemble=ensemble))
  eval_step = step_lib.make_eval_step(FirstPixel(), teachers, objective.teacher_log_probs)
  sums = eval_step({}, {name: {} for name in teachers}, batch)
  return {k: float(v) for k, v in sums.items()}


def test_eval_against_a_sum_kl_ensemble_uses_the_mean_of_probabilities():
  # Mean logits (2, 0, 0) say class 0; mean probabilities (0.44, 0.06, 0.50) class 2.
  teachers = {"a": np.array([[2.0, 0.0, -20.0]]), "b": np.array([[2.0, 0.0, 20.0]])}
  student = np.array([[0.0, 0.0, 1.0]])
  mean_probs = (_softmax(teachers["a"]) + _softmax(teachers["b"])) / 2
  sums = _eval_sums("sum_kl", student, teachers, [2])
  assert sums["teacher_top1"] == 1.0 and sums["agreement_top1"] == 1.0
  expected_kl = float(np.sum(mean_probs * (np.log(mean_probs) - np.log(_softmax(student)))))
  assert sums["kl"] == pytest.approx(expected_kl, rel=1e-5)

  sums = _eval_sums("mean_logits", student, teachers, [2])
  assert sums["teacher_top1"] == 0.0 and sums["agreement_top1"] == 0.0
  mean_logit_probs = _softmax((teachers["a"] + teachers["b"]) / 2)
  expected_kl = float(np.sum(mean_logit_probs * (np.log(mean_logit_probs)
                                                 - np.log(_softmax(student)))))
  assert sums["kl"] == pytest.approx(expected_kl, rel=1e-5)


def test_hard_label_smoothing_puts_ls_over_c_minus_1_on_the_other_classes():
  student = jnp.array([[0.5, -1.0, 2.0, 0.0]])
  teacher = jnp.array([[0.0, 3.0, 1.0, -1.0]])  # argmax 1
  ls = 0.3
  log_q = np.log(_softmax(np.asarray(student))[0])
  # Hand-built target: 0.7 on class 1, 0.1 on each of the three others.
  target = np.array([0.1, 0.7, 0.1, 0.1])
  expected = -float(np.sum(target * log_q))
  assert float(distances.hard(student, teacher, ls)) == pytest.approx(expected, rel=1e-6)
