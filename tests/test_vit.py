"""Tests for funmatch.models.vit against numpy references and published sizes."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funmatch.errors import UserError
from clu.parameter_overview import count_parameters as count_params
from funmatch.models import get_model
from funmatch.models import vit
from funmatch import config_util, models
from funmatch.weights import init as weights
from funmatch.weights import layouts

TINY = dict(variant="Ti", width=32, depth=3, num_heads=4, mlp_dim=48,
            patch_size=4)
SIZE = 16  # 4x4 = 16 patches + CLS = 17 tokens.

# ---------------------------------------------------------------------------
# Numpy references (float64, written independently of the module).
# ---------------------------------------------------------------------------


def np_layer_norm(x, p, eps=1e-6):
  mean = x.mean(axis=-1, keepdims=True)
  var = ((x - mean)**2).mean(axis=-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu(x):  # tanh approximation, as in the official JAX ViT.
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def np_projection(x, p):
  """x [B, T, D] through a [D, H, d] kernel + [H, d] bias -> [B, T, H*d]."""
  d_in = p["kernel"].shape[0]
  return x @ p["kernel"].reshape(d_in, -1) + p["bias"].reshape(-1)


def np_split_heads(t, heads):
  """[B, T, D] -> [B, heads, T, D / heads]."""
  b, n, d = t.shape
  return t.reshape(b, n, heads, d // heads).transpose(0, 2, 1, 3)


def np_qkv(x, block):
  """Q, K, V [B, T, D] of a block from its input tokens x."""
  h = np_layer_norm(x, block["LayerNorm_0"])
  attn = block["MultiHeadDotProductAttention_1"]
  return tuple(np_projection(h, attn[n]) for n in ("query", "key", "value"))


def np_block_from_qkv(x, q, k, v, block):
  """Finishes a block from its input x and per-head Q, K, V [B, H, T, d]."""
  heads, head_dim = q.shape[1], q.shape[-1]
  weights = np_softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim))
  mixed = (weights @ v).transpose(0, 2, 1, 3).reshape(x.shape)  # [B, T, D]
  out = block["MultiHeadDotProductAttention_1"]["out"]
  x = x + mixed @ out["kernel"].reshape(heads * head_dim, -1) + out["bias"]
  h = np_layer_norm(x, block["LayerNorm_2"])
  mlp = block["MlpBlock_3"]
  h = np_gelu(h @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
  return x + h @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]


def np_block(x, block, heads):
  q, k, v = (np_split_heads(t, heads) for t in np_qkv(x, block))
  return np_block_from_qkv(x, q, k, v, block)


def np_vit(p, images, patch, heads):
  """Whole forward: patchify, CLS, position embedding, blocks, norm, head."""
  b, h, w, c = images.shape
  patches = images.reshape(b, h // patch, patch, w // patch, patch, c)
  patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, patch * patch * c)
  kernel = p["embedding"]["kernel"].reshape(patch * patch * c, -1)
  x = patches @ kernel + p["embedding"]["bias"]
  x = np.concatenate([np.broadcast_to(p["cls"], (b, 1, x.shape[-1])), x], 1)
  enc = p["Transformer"]
  x = x + enc["posembed_input"]["pos_embedding"]
  blocks = []
  i = 0
  while f"encoderblock_{i}" in enc:
    x = np_block(x, enc[f"encoderblock_{i}"], heads)
    blocks.append(x)
    i += 1
  encoded = np_layer_norm(x, enc["encoder_norm"])
  logits = encoded[:, 0] @ p["head"]["kernel"] + p["head"]["bias"]
  return logits, blocks, encoded


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def images(batch=2, size=SIZE, seed=3):
  return np.random.default_rng(seed).uniform(
      -1, 1, (batch, size, size, 3)).astype(np.float32)


def randomize(tree, seed=0):
  """Random values for every leaf (LayerNorm scales around 1, head non-zero)."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(tree)
  return flax.traverse_util.unflatten_dict({
      path: (rng.uniform(0.5, 1.5, leaf.shape) if path[-1] == "scale" else
             0.3 * rng.standard_normal(leaf.shape)).astype(np.float32)
      for path, leaf in flat.items()})


def random_params(model, size=SIZE, seed=0):
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, size, size, 3)))["params"]
  return randomize(shapes, seed)


def f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def run(model, params, x, train=False, rngs=None):
  return model.apply({"params": params}, x, train=train, rngs=rngs)


@pytest.fixture(scope="module")
def tiny():
  """A 3-block model with random params and its float32 outputs."""
  model = vit.Model(5, **TINY)
  params = random_params(model)
  x = images()
  logits, taps = run(model, params, x)
  return model, params, x, logits, taps


# ---------------------------------------------------------------------------
# Architecture.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("size,patch,classes", [(16, 4, 5), (32, 8, 0),
                                                (24, 4, 3)])
def test_output_and_tap_shapes(size, patch, classes):
  model = vit.Model(classes, **{**TINY, "patch_size": patch})
  x = jnp.zeros((2, size, size, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  logits, taps = jax.eval_shape(model.apply, variables, x)
  tokens = 1 + (size // patch)**2
  assert logits.shape == (2, classes or 32) and logits.dtype == jnp.float32
  assert set(taps) == {"block0", "block1", "block2", "encoded", "pre_logits",
                       "q", "k", "v"}
  for name in ("block0", "block1", "block2", "encoded"):
    assert taps[name].shape == (2, tokens, 32)
  for name in "qkv":
    assert taps[name].shape == (2, 4, tokens, 8)
  assert taps["pre_logits"].shape == (2, 32)
  assert taps["pre_logits"].dtype == jnp.float32
  params = variables["params"]
  assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (
      1, tokens, 32)
  assert ("head" in params) == bool(classes)


def official_count(width, depth, mlp, patch=16, size=224, classes=1000):
  """Parameters of a standard ViT, counted from the published layout."""
  tokens = 1 + (size // patch)**2
  embed = patch * patch * 3 * width + width + width + tokens * width  # + cls, pos
  block = (2 * 2 * width  # two LayerNorms
           + 4 * (width * width + width)  # q, k, v, out
           + width * mlp + mlp + mlp * width + width)  # MLP
  return embed + depth * block + 2 * width + width * classes + classes


@pytest.mark.parametrize("variant,published", [
    ("Ti", 5_717_416), ("S", 22_050_664), ("B", 86_567_656),
    ("L", 304_326_632)])
def test_param_counts_match_published_vits(variant, published):
  width, depth, _, mlp = {"Ti": (192, 12, 3, 768), "S": (384, 12, 6, 1536),
                          "B": (768, 12, 12, 3072),
                          "L": (1024, 24, 16, 4096)}[variant]
  assert official_count(width, depth, mlp) == published
  model = get_model("vit", 1000, variant=variant)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 224, 224, 3)))["params"]
  assert count_params(shapes) == published
  assert model.dims == vit.VARIANTS[variant]


def test_overrides_replace_the_preset():
  model = vit.Model(10, variant="B", depth=2, mlp_dim=100)
  assert model.dims == (768, 2, 12, 100)


def test_forward_matches_numpy_reference(tiny):
  model, params, x, logits, taps = tiny
  ref_logits, ref_blocks, ref_encoded = np_vit(
      f64(params), x.astype(np.float64), patch=4, heads=4)
  for i, ref in enumerate(ref_blocks):
    np.testing.assert_allclose(taps[f"block{i}"], ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(taps["encoded"], ref_encoded, rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(taps["pre_logits"], ref_encoded[:, 0],
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_head_is_zero_initialised():
  model = vit.Model(5, **TINY)
  params = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
  assert not np.any(params["params"]["head"]["kernel"])
  logits, _ = model.apply(params, images())
  np.testing.assert_array_equal(logits, 0.0)


# ---------------------------------------------------------------------------
# Q, K, V taps.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("qkv_block,index", [(-1, 2), (1, 1), (-2, 1),
                                             (2, 2)])
def test_qkv_taps_are_the_blocks_projections(tiny, qkv_block, index):
  model, params, x, _, taps = tiny
  if qkv_block != -1:
    taps = run(model.clone(qkv_block=qkv_block), params, x)[1]
  block = f64(params["Transformer"][f"encoderblock_{index}"])
  inputs = np.asarray(taps[f"block{index - 1}"], np.float64)
  for name, ref in zip("qkv", np_qkv(inputs, block)):
    np.testing.assert_allclose(taps[name], np_split_heads(ref, 4), rtol=1e-4,
                               atol=1e-4)


def test_attention_from_taps_reproduces_the_block_output(tiny):
  _, params, _, _, taps = tiny
  block = f64(params["Transformer"]["encoderblock_2"])
  inputs = np.asarray(taps["block1"], np.float64)
  q, k, v = (np.asarray(taps[n], np.float64) for n in "qkv")
  np.testing.assert_allclose(np_block_from_qkv(inputs, q, k, v, block),
                             taps["block2"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("relation_heads", [1, 2, 8, 16])
def test_relation_heads_resplit_the_same_qkv(tiny, relation_heads):
  model, params, x, logits, taps = tiny
  other = model.clone(relation_heads=relation_heads)
  # No extra parameters: the same params apply, with the same outputs.
  shapes = jax.eval_shape(other.init, jax.random.key(0),
                          jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  assert count_params(shapes) == count_params(params)
  other_logits, other_taps = run(other, params, x)
  np.testing.assert_array_equal(other_logits, logits)
  np.testing.assert_array_equal(other_taps["block2"], taps["block2"])
  for name in "qkv":
    t = other_taps[name]
    assert t.shape == (2, relation_heads, 17, 32 // relation_heads)
    merged = np.asarray(taps[name]).transpose(0, 2, 1, 3).reshape(2, 17, 32)
    np.testing.assert_array_equal(t, np_split_heads(merged, relation_heads))


# ---------------------------------------------------------------------------
# Stochastic depth, dtype.
# ---------------------------------------------------------------------------


def test_drop_path_rates_rise_linearly():
  np.testing.assert_allclose(vit.drop_path_rates(5, 0.2),
                             [0, 0.05, 0.1, 0.15, 0.2])
  assert vit.drop_path_rates(1, 0.3) == (0.0,)


def test_drop_path_is_only_active_in_training(tiny):
  model, params, x, logits, taps = tiny
  # drop_path=0 in train mode needs no rng and equals eval mode.
  train_logits, _ = run(model, params, x, train=True)
  np.testing.assert_array_equal(train_logits, logits)
  dropping = model.clone(drop_path=0.5)
  eval_logits, eval_taps = run(dropping, params, x)
  np.testing.assert_array_equal(eval_logits, logits)
  np.testing.assert_array_equal(eval_taps["q"], taps["q"])

  xs = images(batch=16, seed=5)
  out = [run(dropping, params, xs, True, {"dropout": jax.random.key(s)})[1]
         for s in (0, 1, 0)]
  # The first block's rate is 0; the last block's (0.5) drops branches.
  np.testing.assert_array_equal(out[0]["block0"], out[1]["block0"])
  assert not np.allclose(out[0]["block2"], out[1]["block2"])
  np.testing.assert_array_equal(out[0]["block2"], out[2]["block2"])
  # Per example, a dropped branch leaves the residual stream alone, so some
  # examples of the last block keep all of the previous block's tokens
  # (both branches dropped: probability 1/4 per example).
  same = [np.array_equal(out[0]["block2"][i], out[0]["block1"][i])
          for i in range(16)]
  assert 0 < sum(same) < 16


def test_bfloat16_activations_float32_params():
  model = vit.Model(5, **TINY, dtype=jnp.bfloat16)
  variables = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
  assert all(leaf.dtype == jnp.float32
             for leaf in jax.tree.leaves(variables))
  params = randomize(variables["params"])
  logits, taps = run(model, params, images())
  assert logits.dtype == jnp.float32
  assert taps["pre_logits"].dtype == jnp.float32
  for name in ("block0", "block2", "encoded", "q", "k", "v"):
    assert taps[name].dtype == jnp.bfloat16, name
  ref, _ = run(vit.Model(5, **TINY), params, images())
  np.testing.assert_allclose(logits, ref, rtol=0.1, atol=0.3)


# ---------------------------------------------------------------------------
# Options, registry, params export.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,culprit", [
    (dict(variant="XL"), "variant"),
    (dict(width=30), "num_heads"),
    (dict(relation_heads=3), "relation_heads"),
    (dict(qkv_block=3), "qkv_block"),
    (dict(qkv_block=-4), "qkv_block"),
    (dict(drop_path=1.0), "drop_path"),
    (dict(drop_path=-0.1), "drop_path"),
    (dict(depth=-1), "depth"),
    (dict(patch_size=0), "patch_size"),
])
def test_bad_options_raise_user_error(kwargs, culprit):
  with pytest.raises(UserError, match=culprit) as info:
    vit.Model(5, **{**TINY, **kwargs})
  assert "\n" not in str(info.value)
  with pytest.raises(UserError, match=culprit):
    get_model("vit", 5, **{**TINY, **kwargs})


def test_image_size_not_divisible_by_patch_raises_at_call():
  model = vit.Model(5, **TINY)
  with pytest.raises(UserError, match="patch_size=4"):
    model.init(jax.random.key(0), jnp.zeros((1, 18, 18, 3)))


def test_other_image_size_than_init_raises_user_error(tiny):
  model, params, _, _, _ = tiny
  with pytest.raises(UserError, match="position embedding"):
    run(model, params, images(size=24))


def test_registry_builds_a_vit():
  model = get_model("vit", 10, variant="Ti", width=32, depth=2, num_heads=2,
                    mlp_dim=64, patch_size=4)
  assert isinstance(model, vit.Model)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  logits, taps = model.apply(variables, images(), train=False)
  assert logits.shape == (2, 10)
  assert taps["q"].shape == (2, 2, 17, 16)
  with pytest.raises(UserError, match="no option"):
    get_model("vit", 10, heads=2)


def test_params_export_round_trips(tiny, tmp_path):
  model, params, x, logits, _ = tiny
  path = str(tmp_path / "vit.npz")
  layouts.save_params("vit", path, params, resolution=SIZE)
  with np.load(path) as stored:
    names = set(stored.files)
  # Official JAX ViT names, '/'-joined.
  assert {"cls", "embedding/kernel", "head/kernel",
          "Transformer/posembed_input/pos_embedding",
          "Transformer/encoder_norm/scale",
          "Transformer/encoderblock_2/MultiHeadDotProductAttention_1/query/kernel",
          "Transformer/encoderblock_0/MlpBlock_3/Dense_1/bias"} <= names
  init = model.init(jax.random.key(1), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  loaded = layouts.load("vit", path, init)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  np.testing.assert_array_equal(run(model, loaded, x)[0], logits)
  teacher_config = config_util.model_config("vit", SIZE, init=path, **TINY)
  loaded = weights.initial_params(teacher_config, init, what="config.teacher", teacher=True)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  # A file for another model size is refused in one line.
  other = vit.Model(5, **{**TINY, "depth": 2})
  other_init = other.init(jax.random.key(0),
                          jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  with pytest.raises(UserError, match="unexpected"):
    layouts.load("vit", path, other_init)
