"""The optimizer factory: schedule, decoupled weight decay, clipping, options."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from funmatch.errors import UserError
from funmatch.optim import make_optimizer, make_schedule


def _config(**kw):
  c = ml_collections.ConfigDict(dict(
      optax_name="sgd", optax=ml_collections.ConfigDict(dict(momentum=0.0)), lr=0.1, wd=0.0,
      grad_clip_norm=0.0,
      schedule=ml_collections.ConfigDict(dict(warmup_steps=0, decay_type="constant"))))
  for key, value in kw.items():  # replace, not merge, nested dicts
    c[key] = value
  return c


def test_warmup_then_cosine_values():
  schedule = make_schedule(_config(lr=2.0, schedule=ml_collections.ConfigDict(
      dict(warmup_steps=10, decay_type="cosine"))), total_steps=110)
  assert float(schedule(0)) == pytest.approx(0.0)
  assert float(schedule(5)) == pytest.approx(1.0)
  assert float(schedule(10)) == pytest.approx(2.0)
  # Halfway through the 100 decay steps, cosine is at half the peak.
  assert float(schedule(60)) == pytest.approx(1.0, rel=1e-5)
  assert float(schedule(110)) == pytest.approx(0.0, abs=1e-6)


def test_linear_decay_values():
  schedule = make_schedule(_config(lr=1.0, schedule=ml_collections.ConfigDict(
      dict(warmup_steps=0, decay_type="linear"))), total_steps=100)
  assert float(schedule(25)) == pytest.approx(0.75)


def test_decoupled_weight_decay_follows_schedule_shape_not_lr_scale():
  params = {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}
  grads = {"kernel": jnp.full((2, 2), 1.0), "bias": jnp.full((2,), 1.0)}
  config = _config(lr=0.1, wd=0.01, schedule=ml_collections.ConfigDict(
      dict(warmup_steps=4, decay_type="constant")))
  tx, schedule = make_optimizer(config, total_steps=10)
  state = tx.init(params)
  for step in range(3):
    updates, state = tx.update(grads, state, params)
    lr = float(schedule(step))
    # kernel: -lr * g - wd * (lr / peak_lr) * p ; bias: no decay.
    np.testing.assert_allclose(updates["kernel"], -lr * 1.0 - 0.01 * (lr / 0.1) * 2.0,
                               rtol=1e-6)
    np.testing.assert_allclose(updates["bias"], -lr * 1.0, rtol=1e-6)


def test_global_norm_clipping():
  params = {"w": jnp.zeros((4,))}
  grads = {"w": jnp.array([3.0, 4.0, 0.0, 0.0])}  # norm 5
  tx, _ = make_optimizer(_config(lr=1.0, grad_clip_norm=1.0), total_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [-0.6, -0.8, 0.0, 0.0], rtol=1e-6)


def test_adam_first_step_and_bfloat16_first_moment():
  params = {"w": jnp.ones((3, 3))}
  grads = {"w": jnp.full((3, 3), 0.5)}
  config = _config(optax_name="adam", lr=0.01,
                   optax=ml_collections.ConfigDict(dict(mu_dtype="bfloat16")))
  tx, _ = make_optimizer(config, total_steps=10)
  state = tx.init(params)
  mu_leaves = [x for x in jax.tree.leaves(state) if x.shape == (3, 3)]
  assert any(x.dtype == jnp.bfloat16 for x in mu_leaves)
  updates, _ = tx.update(grads, state, params)
  # Bias-corrected Adam's first step is -lr * sign(g) (up to eps).
  np.testing.assert_allclose(updates["w"], -0.01, rtol=1e-4)


def test_sgd_momentum_accumulates():
  params = {"w": jnp.zeros(())}
  tx, _ = make_optimizer(_config(optax=ml_collections.ConfigDict(dict(momentum=0.9))), 10)
  state = tx.init(params)
  u1, state = tx.update({"w": jnp.ones(())}, state, params)
  u2, state = tx.update({"w": jnp.ones(())}, state, params)
  assert float(u1["w"]) == pytest.approx(-0.1)
  assert float(u2["w"]) == pytest.approx(-0.1 * 1.9)


@pytest.mark.parametrize("overrides,match", [
    (dict(optax_name="lamb"), "optax_name"),
    (dict(lr=-1.0), "lr"),
    (dict(wd=-0.1), "wd"),
    (dict(optax=ml_collections.ConfigDict(dict(betas=0.9))), "optax"),
    (dict(schedule=ml_collections.ConfigDict(dict(warmup_steps=0, decay_type="step"))),
     "decay_type"),
    (dict(optax_name="adam", optax=ml_collections.ConfigDict(dict(mu_dtype="bf17"))),
     "mu_dtype"),
])
def test_bad_optimizer_settings_are_user_errors(overrides, match):
  with pytest.raises(UserError, match=match):
    make_optimizer(_config(**overrides), total_steps=10)


def test_cosine_schedule_reaches_zero_at_end():
  schedule = make_schedule(_config(lr=0.5, schedule=ml_collections.ConfigDict(
      dict(warmup_steps=0, decay_type="cosine"))), total_steps=40)
  for step in (0, 10, 20, 30):
    expected = 0.5 * 0.5 * (1 + math.cos(math.pi * step / 40))
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)


def test_factory_shampoo_equals_the_transformation_itself():
  """Through the factory (recipe keys from set_optimizer) Shampoo is unchanged."""
  from funmatch import config_util
  from funmatch.optim import shampoo
  c = _config()
  config_util.set_optimizer(c, "shampoo")
  c.optax.start_preconditioning_step = 2
  c.optax.preconditioning_compute_steps = 2
  params = {"w": jnp.arange(12.0).reshape(3, 4) / 10, "b": jnp.ones(4)}
  factory = make_optimizer(c, total_steps=10)[0]
  direct = shampoo.shampoo(0.1, start_preconditioning_step=2, preconditioning_compute_steps=2)
  s1, s2 = factory.init(params), direct.init(params)
  for i in range(5):
    grads = jax.tree.map(lambda p: jnp.sin(p * (i + 1)) + 0.1 * i, params)
    u1, s1 = factory.update(grads, s1, params)
    u2, s2 = direct.update(grads, s2, params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_set_optimizer_fills_every_key_of_the_optimizer():
  from funmatch import config_util
  c = _config()
  config_util.set_optimizer(c, "shampoo")
  assert c.optax_name == "shampoo"
  assert c.optax.block_size == 128 and c.optax.graft_type == "adam"
  assert "learning_rate" not in c.optax and "weight_decay" not in c.optax
  config_util.set_optimizer(c, "adam")
  assert set(c.optax) == {"b1", "b2", "eps", "mu_dtype"}
  with pytest.raises(UserError, match="optimizer 'lion'"):
    config_util.set_optimizer(c, "lion")
