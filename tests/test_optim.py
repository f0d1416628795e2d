"""The optimizer factory: schedule, decoupled weight decay, clipping, options."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from funmatch.errors import UserError
from funmatch.optim import make_optimizer, make_schedule


def _config(**kw):
  c = ml_collections.ConfigDict(dict(
      optax_name="sgd", optax=ml_collections.ConfigDict(dict(momentum=0.0)), lr=0.1, wd=0.0,
      wd_mode="decoupled", wd_mask="(.*/)?kernel", grad_clip_norm=0.0,
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
    (dict(wd_mode="l2"), "wd_mode"),
    (dict(wd_mask="(kernel"), "wd_mask"),
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
  with pytest.raises(UserError, match="optax_name 'lion'"):
    config_util.set_optimizer(c, "lion")


# ---------------------------------------------------------------------------
# Which parameters decay: by name, kernels only by default.


def _decayed_names(model_name, res, **kwargs):
  """Names (as the trainer sees them) of the student leaves the default mask decays."""
  from funmatch import config_util, models
  from funmatch.optim import name_mask, param_name
  module = models.get_model(model_name, 10, **kwargs)
  params = jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)), train=False)["params"])
  mask = name_mask(config_util.base_config().wd_mask)({"student": params, "aux": {}})
  return {param_name(path) for path, keep in
          jax.tree_util.tree_flatten_with_path(mask)[0] if keep}


def test_default_mask_decays_exactly_the_vit_kernels():
  names = _decayed_names("vit", 16, variant="Ti", width=32, depth=1, num_heads=2,
                         mlp_dim=64, patch_size=8)
  block = "student/Transformer/encoderblock_0"
  # Written out by hand: every Dense/Conv kernel; no q/k/v/out biases ([H, d_h] or
  # [D]), no position embedding, no CLS token, no LayerNorm scales.
  assert names == {
      "student/embedding/kernel",
      f"{block}/MultiHeadDotProductAttention_1/query/kernel",
      f"{block}/MultiHeadDotProductAttention_1/key/kernel",
      f"{block}/MultiHeadDotProductAttention_1/value/kernel",
      f"{block}/MultiHeadDotProductAttention_1/out/kernel",
      f"{block}/MlpBlock_3/Dense_0/kernel",
      f"{block}/MlpBlock_3/Dense_1/kernel",
      "student/head/kernel",
  }


def test_default_mask_decays_exactly_the_bit_kernels():
  names = _decayed_names("bit", 32, depth=[1, 1, 1, 1], width=0.5)
  expected = {"student/root_block/standardized_conv2d/kernel", "student/head/conv2d/kernel"}
  for stage in range(1, 5):
    unit = f"student/block{stage}/unit01"
    expected |= {f"{unit}/{conv}/standardized_conv2d/kernel" for conv in "abc"}
    expected.add(f"{unit}/a/proj/standardized_conv2d/kernel")
  assert names == expected


def test_default_mask_decays_exactly_the_mobilenet_kernels():
  names = _decayed_names("mobilenet_v3", 32, width=0.35)
  # From the MobileNetV3-Large table: an expand conv where the expansion differs
  # from the input width (all but block 1), the depthwise conv, the SE pair
  # (blocks 4-6 and 11-15) and the project conv; then stem, final, pre_logits, head.
  expected = {"student/stem/conv/kernel", "student/final/conv/kernel",
              "student/pre_logits/kernel", "student/head/kernel"}
  with_se = {4, 5, 6, 11, 12, 13, 14, 15}
  for index in range(1, 16):
    block = f"student/block{index:02d}"
    expected |= {f"{block}/depthwise/conv/kernel", f"{block}/project/conv/kernel"}
    if index != 1:
      expected.add(f"{block}/expand/conv/kernel")
    if index in with_se:
      expected |= {f"{block}/se/reduce/kernel", f"{block}/se/expand/kernel"}
  assert names == expected


def test_wd_mask_is_a_configurable_regex():
  params = {"student": {"head": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
                        "body": {"kernel": jnp.ones((2, 2))}}, "aux": {}}
  grads = jax.tree.map(jnp.zeros_like, params)
  config = _config(wd=0.1, wd_mask="student/head/.*")
  tx, _ = make_optimizer(config, total_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Only the head (kernel and bias) decays: -lr * wd / lr * p = -0.1.
  np.testing.assert_allclose(updates["student"]["head"]["kernel"], -0.1, rtol=1e-6)
  np.testing.assert_allclose(updates["student"]["head"]["bias"], -0.1, rtol=1e-6)
  np.testing.assert_array_equal(updates["student"]["body"]["kernel"], 0.0)


# ---------------------------------------------------------------------------
# Coupled decay: PyTorch's SGD(momentum, weight_decay).


def _torch_sgd_reference(w0, target, curvature, lr_at, momentum, weight_decay, steps):
  """A plain NumPy transcription of torch.optim.SGD's update rule (dampening 0,
  nesterov False): d_p = grad + weight_decay * p; buf = momentum * buf + d_p
  (buf = d_p at the first step); p = p - lr * buf."""
  p = np.array(w0, np.float64)
  buf = None
  for t in range(steps):
    grad = curvature * (p - target)
    d_p = grad + weight_decay * p
    buf = d_p.copy() if buf is None else momentum * buf + d_p
    p = p - lr_at(t) * buf
  return p


def test_coupled_sgd_decay_matches_pytorch_on_a_quadratic():
  rng = np.random.RandomState(0)
  w0 = rng.randn(4, 3)
  target = rng.randn(4, 3)
  curvature = rng.uniform(0.5, 2.0, (4, 3))
  config = _config(optax_name="sgd", optax=ml_collections.ConfigDict(
      dict(momentum=0.9, nesterov=False)), lr=0.05, wd=1e-4, wd_mode="coupled",
                   schedule=ml_collections.ConfigDict(dict(warmup_steps=10,
                                                           decay_type="cosine")))
  tx, schedule = make_optimizer(config, total_steps=100)
  params = {"kernel": jnp.asarray(w0, jnp.float32)}
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = {"kernel": jnp.asarray(curvature, jnp.float32) * (
        params["kernel"] - jnp.asarray(target, jnp.float32))}
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(100):
    params, state = step(params, state)
  expected = _torch_sgd_reference(w0, target, curvature, lambda t: float(schedule(t)),
                                  0.9, 1e-4, 100)
  np.testing.assert_allclose(params["kernel"], expected, atol=1e-6)
  # The decoupled form of the same wd is a different (10x weaker) decay: the test
  # can tell them apart.
  weak = _torch_sgd_reference(w0, target, curvature, lambda t: float(schedule(t)),
                              0.9, 1e-5, 100)
  assert np.abs(expected - weak).max() > 1e-5


def test_every_optimizer_decays_only_masked_leaves():
  from funmatch import config_util
  params = {"student": {"w": {"kernel": jnp.ones((3, 4))}, "b": {"bias": jnp.ones((4,))}}}
  for name in ("adam", "sgd", "shampoo"):
    decayed = _config(lr=0.1, wd=0.01)
    config_util.set_optimizer(decayed, name)
    plain = _config(lr=0.1, wd=0.0)
    config_util.set_optimizer(plain, name)
    tx_a, _ = make_optimizer(decayed, total_steps=10)
    tx_b, _ = make_optimizer(plain, total_steps=10)
    grads = jax.tree.map(lambda p: 0.3 * p, params)
    a, _ = tx_a.update(grads, tx_a.init(params), params)
    b, _ = tx_b.update(grads, tx_b.init(params), params)
    np.testing.assert_allclose(a["student"]["w"]["kernel"] - b["student"]["w"]["kernel"],
                               -0.01, rtol=1e-5, err_msg=name)
    np.testing.assert_array_equal(a["student"]["b"]["bias"], b["student"]["b"]["bias"])
