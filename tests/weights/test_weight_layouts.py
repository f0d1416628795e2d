"""Weight layouts in and out: official, big_vision, timm, funmatch.

timm's own modules write the timm files (safetensors and .pth) from random
weights; every load is checked by running the loaded model on the images
the writing model ran on. The contracts every architecture keeps (round trips
in each format, detection, head handling, describe, num_classes, the timm
twin's strict load) are one test parametrized over the registered models.
"""
import functools

import jax
import numpy as np
import pytest

from funmatch import models
from funmatch.errors import UserError
from funmatch.models import bit
from funmatch.weights import files as formats
from funmatch.weights import init as weights_init
from funmatch.weights import layouts
from funmatch.models import mobilenet_v3
from funmatch.models import vit

import torch  # pylint: disable=wrong-import-order
import timm_import  # pylint: disable=wrong-import-position

timm = timm_import.import_timm()
from safetensors import torch as safetensors_torch  # pylint: disable=wrong-import-position

RES = 32
BIT = dict(depth=[1, 1, 1, 1], width=0.5)
VIT = dict(width=64, depth=2, num_heads=2, mlp_dim=128, patch_size=8)
CONVNEXT = dict(variant="atto", version=2, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))
SWIN = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), patch_size=2,
            window_size=2, img_size=RES)
CLASSES = 7


def images(seed=0):
  return np.random.default_rng(seed).uniform(
      -1, 1, (2, RES, RES, 3)).astype(np.float32)


def timm_logits(network, x):
  with torch.no_grad():
    return network.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, x):
  return model.apply({"params": params}, x)[0]


def funmatch_logits(model, params, x):
  """One compiled forward per model (op-by-op, MobileNetV3 compiles hundreds)."""
  return np.asarray(_logits(model, params, x))


def assert_close(got, want):
  """<= 1e-4 relative to the logits' scale."""
  np.testing.assert_allclose(got, want, rtol=1e-4,
                             atol=1e-4 * np.abs(want).max())


def randomize_torch(network, seed=0):
  """Random values everywhere (norm scales near 1), heads included."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, value in network.state_dict().items():
      noise = torch.randn(value.shape, generator=generator)
      is_scale = value.ndim == 1 and name.endswith("weight") and (
          "norm" in name or ".bn" in name or name.startswith("bn"))
      value.copy_(1 + 0.1 * noise if is_scale else 0.3 * noise)
  return network.eval()


def param_shapes(model):
  """{name: shape} of the model's params, without running initialisers."""
  variables = jax.eval_shape(model.init, jax.random.key(0), images())
  return {name: value.shape
          for name, value in layouts.flat_params(variables).items()}


def random_params(model, seed=0):
  """Params of the model with random values (norm scales near 1)."""
  rng = np.random.default_rng(seed)
  flat = {name: (1 + 0.1 * rng.normal(size=shape) if name.endswith("scale")
                 else 0.3 * rng.normal(size=shape)).astype(np.float32)
          for name, shape in param_shapes(model).items()}
  return layouts.unflat_params(flat, wrapped=False)


def init_params(model):
  """Stand-in initial params (zeros): loading only needs their structure."""
  flat = {name: np.zeros(shape, np.float32)
          for name, shape in param_shapes(model).items()}
  return layouts.unflat_params(flat, wrapped=False)


save_torch = timm_import.save_state_dict


def timm_vit(act_layer="gelu", classes=CLASSES, **overrides):
  kwargs = dict(img_size=RES, patch_size=VIT["patch_size"],
                embed_dim=VIT["width"], depth=VIT["depth"],
                num_heads=VIT["num_heads"],
                mlp_ratio=VIT["mlp_dim"] / VIT["width"],
                num_classes=classes, act_layer=act_layer)
  kwargs.update(overrides)
  return timm.models.vision_transformer.VisionTransformer(**kwargs)


def timm_bit(stem_type="fixed", classes=CLASSES, **kwargs):
  args = dict(layers=BIT["depth"], width_factor=BIT["width"])
  args.update(kwargs)
  return timm.models.resnetv2.ResNetV2(
      **args, stem_type=stem_type, num_classes=classes,
      conv_layer=functools.partial(timm.layers.StdConv2d, eps=1e-8))


def load_funmatch(name, path, options, classes=CLASSES, **kwargs):
  """resolve options -> build -> load, as the trainer does."""
  options = weights_init.decide_options(name, options, path)
  model = models.get_model(name, classes, **options)
  params = layouts.load(name, path, init_params(model), **kwargs)
  return model, params, options


def one_line_error(call, *args, **kwargs) -> str:
  with pytest.raises(UserError) as info:
    call(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message
  return message


# ---------------------------------------------------------------------------
# What every architecture keeps.
# ---------------------------------------------------------------------------

# Each registered model, small, with its 'auto' options as they were trained
# (a new architecture adds its row here), and the seed of its random params.
EXPORTED = {
    "bit": (dict(BIT, stem_pool_padding="zeros"), 0),
    "mobilenet_v3": (dict(width=0.35), 5),
    "vit": (dict(VIT, gelu="tanh"), 2),
    "convnext": (CONVNEXT, 3),
    "swin": (SWIN, 4),
}


def test_every_registered_model_is_covered():
  assert set(EXPORTED) == set(models.model_names()), (
      "add the new model's small options to EXPORTED")


def bit_by_hand(record, path):
  assert record["timm"]["model_name"] is None  # no registered R?x0.5
  # The documented recipe, by hand: ResNetV2 with the recorded kwargs.
  network = timm.models.resnetv2.ResNetV2(
      **record["timm"]["kwargs"],
      conv_layer=functools.partial(timm.layers.StdConv2d, eps=1e-8))
  network.load_state_dict(safetensors_torch.load_file(path))  # strict: every name fits
  return network


def vit_by_hand(record, path):
  kwargs = record["timm"]["kwargs"]
  assert kwargs["act_layer"] == "gelu_tanh" and kwargs["img_size"] == RES
  network = timm.models.vision_transformer.VisionTransformer(**kwargs)
  network.load_state_dict(safetensors_torch.load_file(path))
  return network


def mobilenet_by_hand(record, path):
  assert record["timm"]["code"].startswith(
      "timm.models.mobilenetv3.MobileNetV3(")
  network = layouts.timm_model(path)
  assert any(isinstance(m, timm.layers.GroupNormAct)
             for m in network.modules())
  return network


def registered_by_hand(record, path):
  """ConvNeXt, Swin: timm's registered name with the recorded kwargs."""
  network = timm.create_model(record["timm"]["model_name"], **record["timm"]["kwargs"])
  network.load_state_dict(safetensors_torch.load_file(path))  # strict
  return network


# How timm builds each exported network by hand, from the file's record.
BY_HAND = {"bit": bit_by_hand, "mobilenet_v3": mobilenet_by_hand, "vit": vit_by_hand,
           "convnext": registered_by_hand, "swin": registered_by_hand}


@pytest.mark.parametrize("name", sorted(EXPORTED))
def test_round_trips_through_timm_safetensors_and_npz(tmp_path, name):
  options, seed = EXPORTED[name]
  auto = models.weights_spec(name).auto_options
  model = models.get_model(name, CLASSES, **options)
  params = random_params(model, seed=seed)
  x = images()
  want = funmatch_logits(model, params, x)

  path = str(tmp_path / f"{name}-timm.safetensors")
  record = layouts.save_params(name, path, params, options=options,
                               format="timm", resolution=RES)
  assert_close(timm_logits(BY_HAND[name](record, path), x), want)
  assert_close(timm_logits(layouts.timm_model(path), x), want)
  # ... and back into funmatch, the 'auto' options as recorded in the file.
  unset = {k: v for k, v in options.items() if k not in auto}
  loaded_model, loaded, resolved = load_funmatch(name, path, unset)
  assert {k: resolved[k] for k in auto} == {k: options[k] for k in auto}
  assert_close(funmatch_logits(loaded_model, loaded, x), want)

  for fmt in ("safetensors", "npz"):
    path = str(tmp_path / f"{name}.{fmt}")
    layouts.save_params(name, path, params, options=options, format=fmt,
                        resolution=RES)
    loaded_model, loaded, _ = load_funmatch(name, path, unset)
    assert_close(funmatch_logits(loaded_model, loaded, x), want)


@pytest.mark.parametrize("name", sorted(EXPORTED))
def test_detection_head_rules_describe_and_num_classes(tmp_path, name):
  options, seed = EXPORTED[name]
  spec = models.weights_spec(name)
  params = random_params(models.get_model(name, CLASSES, **options), seed=seed)
  assert layouts.num_classes(name, params) == CLASSES
  assert f"num_classes={CLASSES}" in layouts.describe(name, params)
  headless = init_params(models.get_model(name, 0, **options))
  assert layouts.num_classes(name, headless) == 0
  other = init_params(models.get_model(name, CLASSES + 2, **options))
  head_kernel = spec.head[0]
  for fmt, layout in spec.formats.items():
    path = str(tmp_path / f"{fmt}{layouts.SUFFIXES[fmt]}")
    layouts.save_params(name, path, params, options=options, format=fmt,
                        resolution=RES)
    assert layouts.detect(name, formats.peek(path)).name == layout  # recorded
    # Without metadata the names alone tell a layout that reads it the same.
    bare = str(tmp_path / f"bare-{fmt}{layouts.SUFFIXES[fmt]}")
    write = formats.write_npz if bare.endswith(".npz") else formats.write_safetensors
    write(bare, formats.read(path).arrays, {})
    for source in (path, bare):
      loaded = layouts.flat_params(layouts.load(name, source, init_params(
          models.get_model(name, CLASSES, **options))))
      for param, value in layouts.flat_params(params).items():
        np.testing.assert_array_equal(loaded[param], value)
    # A head of another class count: a student keeps its own, a teacher refuses.
    kept = layouts.load(name, path, other)
    np.testing.assert_array_equal(layouts.flat_params(kept)[head_kernel],
                                  layouts.flat_params(other)[head_kernel])
    message = one_line_error(layouts.load, name, path, other, strict_head=True)
    assert f"{CLASSES} classes" in message and f"has {CLASSES + 2}" in message
    assert "head" not in layouts.flat_params(layouts.load(name, path, headless))


# timm's own networks, written by timm, read as funmatch models: the module
# that writes them and the 'auto' options their layout implies.
TIMM_WRITTEN = {
    "bit": (lambda: randomize_torch(timm_bit()), BIT,
            {"stem_pool_padding": "zeros"}),  # timm's 'fixed' stem
    "vit": (lambda: randomize_torch(timm_vit(), seed=1), VIT,
            {"gelu": "exact"}),  # timm's nn.GELU
    # timm's small ConvNeXts run their MLPs as 1x1 convs (conv_mlp).
    "convnext": (lambda: randomize_torch(timm.create_model(
        "convnextv2_atto", depths=CONVNEXT["depths"], dims=CONVNEXT["dims"],
        num_classes=CLASSES), seed=3), CONVNEXT, {}),
    "swin": (lambda: randomize_torch(timm.create_model(
        "swin_tiny_patch4_window7_224", num_classes=CLASSES,
        **{k: v for k, v in SWIN.items()}), seed=4), SWIN, {}),
}


@pytest.mark.parametrize("name", sorted(TIMM_WRITTEN))
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_from_timm_state_dict(tmp_path, name, suffix):
  make, options, implied = TIMM_WRITTEN[name]
  network = make()
  path = save_torch(network, str(tmp_path / f"timm{suffix}"))
  model, params, resolved = load_funmatch(name, path, options)
  assert {k: resolved[k] for k in implied} == implied
  x = images()
  assert_close(funmatch_logits(model, params, x), timm_logits(network, x))


@pytest.mark.parametrize("name,network,file,expected", [
    ("bit", lambda: timm_bit(width_factor=1), "wide.safetensors",
     ("timm layout", "44 shape clashes (head.fc.weight file [7, 2048, 1, 1] vs model "
      "[7, 1024, 1, 1]")),
    ("bit", lambda: timm_bit(layers=[1, 2, 1, 1]), "deep.pth",
     ("unexpected (stages.1.blocks.1.conv1.weight",)),
    ("vit", lambda: timm_vit(embed_dim=32, mlp_ratio=4), "narrow.safetensors",
     ("37 shape clashes (blocks.0.attn.proj.bias file [32] vs model [64]",)),
])
def test_timm_file_of_another_size_is_one_line(tmp_path, name, network, file, expected):
  path = save_torch(network(), str(tmp_path / file))
  options = {"bit": BIT, "vit": VIT}[name]
  model = models.get_model(name, CLASSES, **options)
  message = one_line_error(layouts.load, name, path, init_params(model))
  assert path in message
  for part in expected:
    assert part in message


# ---------------------------------------------------------------------------
# BiT.
# ---------------------------------------------------------------------------


def test_bit_neg_inf_stem_matches_pytorch_max_pool_padding(tmp_path):
  # timm's stem_type '' pools with PyTorch's padding=1, which never picks
  # the border: big_vision's bit_paper stem.
  network = randomize_torch(timm_bit(stem_type=""), seed=3)
  path = save_torch(network, str(tmp_path / "timm.safetensors"))
  options = dict(BIT, stem_pool_padding="neg_inf")  # explicit beats 'auto'
  model, params, resolved = load_funmatch("bit", path, options)
  assert resolved["stem_pool_padding"] == "neg_inf"
  x = images()
  want = timm_logits(network, x)
  assert_close(funmatch_logits(model, params, x), want)
  zeros = models.get_model("bit", CLASSES, **dict(BIT,
                                                  stem_pool_padding="zeros"))
  assert not np.allclose(funmatch_logits(zeros, params, x), want, rtol=1e-3)


def test_stem_pool_padding_zeros_vs_neg_inf():
  # All-negative conv outputs: the windows that reach the border (the first
  # row and column) pick a zero border; an -inf border is never picked.
  kernel = -np.ones((7, 7, 3, 32), np.float32)
  x = np.ones((1, 8, 8, 3), np.float32)
  out = {}
  for padding in ("zeros", "neg_inf"):
    block = bit.RootBlock(32, standardize_weights=False, pool_padding=padding)
    out[padding] = np.asarray(block.apply(
        {"params": {"standardized_conv2d": {"kernel": kernel}}}, x))
  assert (out["zeros"][:, 0] == 0).all() and (out["zeros"][:, :, 0] == 0).all()
  assert (out["zeros"][:, 1:, 1:] < 0).all()
  assert (out["neg_inf"] < 0).all()


def big_vision_arrays(params):
  """funmatch BiT params under big_vision's bit_paper names (its docs)."""
  flat = layouts.flat_params(params)
  out = {"root_block/conv_root/kernel":
             flat["root_block/standardized_conv2d/kernel"],
         "norm-pre-head/scale": flat["group_norm/scale"].reshape(1, 1, 1, -1),
         "norm-pre-head/bias": flat["group_norm/bias"].reshape(1, 1, 1, -1),
         "head/kernel": flat["head/conv2d/kernel"][0, 0],
         "head/bias": flat["head/conv2d/bias"]}
  for name, value in flat.items():
    parts = name.split("/")
    if not parts[0].startswith("block"):
      continue
    unit = "/".join(parts[:2])
    i = "abc".index(parts[2]) + 1
    rest = "/".join(parts[3:])
    if rest == "proj/standardized_conv2d/kernel":
      out[f"{unit}/conv_proj/kernel"] = value
    elif rest == "standardized_conv2d/kernel":
      out[f"{unit}/conv{i}/kernel"] = value
    else:  # group_norm/scale|bias, stored [1, 1, 1, C]
      out[f"{unit}/gn{i}/{parts[-1]}"] = value.reshape(1, 1, 1, -1)
  return out


def test_bit_from_big_vision_npz(tmp_path):
  source = models.get_model("bit", CLASSES, **BIT,
                            stem_pool_padding="neg_inf")
  params = random_params(source)
  path = str(tmp_path / "bv.npz")
  arrays = big_vision_arrays(params)
  np.savez(path, **{f"params/{k}": v for k, v in arrays.items()})
  model, loaded, options = load_funmatch("bit", path, BIT)
  assert options["stem_pool_padding"] == "neg_inf"  # big_vision's stem
  for name, value in layouts.flat_params(params).items():
    np.testing.assert_array_equal(layouts.flat_params(loaded)[name], value)
  x = images()
  assert_close(funmatch_logits(model, loaded, x),
               funmatch_logits(source, params, x))


def test_bit_npz_export_is_official_with_metadata(tmp_path):
  options = dict(BIT, stem_pool_padding="neg_inf")
  model = models.get_model("bit", CLASSES, **options)
  params = random_params(model)
  path = str(tmp_path / "student.npz")
  layouts.save_params("bit", path, params, options=options, resolution=RES,
                     preprocessing=layouts.preprocessing_metadata(
                         eval_resize_ratio=1.25),
                     metadata={"step": 12})
  weights = formats.read(path)
  assert set(weights.arrays) == set(layouts.file_arrays("bit", params))
  meta = weights.metadata
  assert meta["model"] == "bit" and meta["num_classes"] == CLASSES
  assert meta["options"]["depth"] == [1, 1, 1, 1]
  assert meta["options"]["stem_pool_padding"] == "neg_inf"
  assert meta["resolution"] == RES and meta["step"] == 12
  assert meta["preprocessing"]["value_range"] == [-1, 1]
  assert meta["preprocessing"]["resize_small_ratio"] == 1.25
  # The recorded option wins over the official layout's zeros.
  assert weights_init.decide_options("bit", BIT, path)["stem_pool_padding"] == (
      "neg_inf")
  # A file read as npz whatever its name still loads.
  loaded = layouts.load("bit", formats.read(path, kind="npz"), init_params(model))
  np.testing.assert_array_equal(loaded["head"]["conv2d"]["bias"],
                                params["head"]["conv2d"]["bias"])


def test_bit_timm_spec_uses_registered_names():
  model = bit.Model(10, depth=50, width=1, stem_pool_padding="zeros")
  spec = bit.timm_spec(model, None)
  assert spec["model_name"] == "resnetv2_50x1_bit"
  assert spec["code"] == (
      "timm.create_model('resnetv2_50x1_bit', num_classes=10)")
  arrays = layouts.file_arrays("bit", init_params(model), "timm")
  network = bit.build_timm(spec)
  assert {k: list(v.shape) for k, v in network.state_dict().items()} == {
      k: list(v.shape) for k, v in arrays.items()}


def test_head_of_other_classes_kept_or_refused_for_teachers(tmp_path):
  network = randomize_torch(timm_bit(classes=5))
  path = save_torch(network, str(tmp_path / "timm.safetensors"))
  model = models.get_model("bit", CLASSES, **BIT)
  init = init_params(model)
  params = layouts.load("bit", path, init)
  np.testing.assert_array_equal(params["head"]["conv2d"]["kernel"],
                                init["head"]["conv2d"]["kernel"])
  message = one_line_error(layouts.load, "bit", path, init,
                           strict_head=True)
  assert "5 classes" in message and f"has {CLASSES}" in message


def test_unknown_layout_is_one_line(tmp_path):
  path = str(tmp_path / "other.safetensors")
  formats.write_safetensors(path, {"encoder.weight": np.zeros(3)}, {})
  message = one_line_error(layouts.load, "bit", path, {})
  assert "not in any BiT layout" in message and "encoder.weight" in message


# ---------------------------------------------------------------------------
# ViT.
# ---------------------------------------------------------------------------


def test_vit_official_npz_names_imply_tanh(tmp_path):
  model = models.get_model("vit", CLASSES, **VIT, gelu="tanh")
  params = random_params(model, seed=4)
  path = str(tmp_path / "official.npz")
  np.savez(path, **layouts.flat_params(params))  # the official names
  loaded_model, loaded, options = load_funmatch("vit", path, VIT)
  assert options["gelu"] == "tanh"
  x = images()
  assert_close(funmatch_logits(loaded_model, loaded, x),
               funmatch_logits(model, params, x))


def test_vit_timm_spec_names_standard_sizes():
  model = vit.Model(1000, variant="S", patch_size=16, gelu="tanh")
  pos = np.zeros((1, 1 + 14 * 14, 384))
  spec = vit.timm_spec(model, {"Transformer": {"posembed_input": {
      "pos_embedding": pos}}})
  assert spec["model_name"] == "vit_small_patch16_224"
  assert spec["code"].startswith("timm.create_model('vit_small_patch16_224', ")


# ---------------------------------------------------------------------------
# MobileNetV3.
# ---------------------------------------------------------------------------


def test_mobilenet_timm_refusals(tmp_path):
  # A width whose blocks timm's MobileNetV3 cannot express.
  model = models.get_model("mobilenet_v3", CLASSES, width=0.1)
  message = one_line_error(
      layouts.save_params, "mobilenet_v3", str(tmp_path / "m.safetensors"),
      init_params(model), options={"width": 0.1}, format="timm",
      resolution=RES)
  assert "width=0.1" in message and "'safetensors'" in message
  assert not (tmp_path / "m.safetensors").exists()
  # timm's own (BatchNorm) MobileNetV3 cannot run as GroupNorm.
  path = save_torch(timm.create_model("mobilenetv3_large_100"),
                    str(tmp_path / "bn.safetensors"))
  model = models.get_model("mobilenet_v3", CLASSES)
  message = one_line_error(layouts.load, "mobilenet_v3", path,
                           init_params(model))
  assert path in message and "BatchNorm" in message
