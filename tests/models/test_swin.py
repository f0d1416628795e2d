"""Swin V1: shapes of every timm variant, logits equal to timm's on files timm
writes (shifted windows and masks included), the strict timm export, and the
one-line errors for sizes the windows do not fit."""
import jax
import numpy as np
import pytest

from funmatch import models
from funmatch.errors import UserError
from funmatch.weights import layouts as weights_layouts
from funmatch.models import swin

import family_helpers as fh

CLASSES = 7
# Every stage shifts but the last (its map is one window): 32px, maps 16 .. 2.
SMALL = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
             patch_size=2, window_size=2, img_size=32)


def timm_swin(variant="tiny", **kwargs):
  return fh.timm.create_model(f"swin_{variant}_patch4_window7_224",
                              num_classes=CLASSES, **kwargs)


@pytest.mark.parametrize("variant", list(swin.VARIANTS))
def test_every_variant_has_timms_names_and_shapes(variant):
  model = models.get_model("swin", CLASSES, variant=variant)
  want = fh.meta_timm_shapes(f"swin_{variant}_patch4_window7_224",
                             num_classes=CLASSES)
  assert fh.timm_shapes_of(model, 224, swin.TIMM) == want


@pytest.mark.parametrize("variant,options,res,batch,scale", [
    ("tiny", {}, 224, 1, 0.05),          # the real Swin-T: window 7 at 224px
    ("base", SMALL, 32, 2, 0.3),         # small maps, shifts in three stages
])
def test_logits_equal_timms(variant, options, res, batch, scale):
  network = fh.randomize(timm_swin(variant, **options), scale=scale)
  model = models.get_model("swin", CLASSES, variant=variant, **options)
  params = fh.load_with_spec(swin.WEIGHTS, fh.state_arrays(network),
                             fh.init_params(model, res))
  x = fh.images(res, batch)
  logits, taps = jax.jit(model.apply)({"params": params}, x)
  fh.assert_close(np.asarray(logits), fh.timm_logits(network, x))
  embed, _, _ = model.dims
  side = res // model.patch_size
  assert {k: v.shape for k, v in taps.items()} == {
      **{f"stage{i + 1}": (batch, (side >> i) ** 2, embed << i) for i in range(4)},
      "pre_logits": (batch, embed << 3)}


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
  network = fh.randomize(timm_swin(**SMALL), seed=1)
  path = str(tmp_path_factory.mktemp("swin") / "timm.safetensors")
  return network, fh.save_state(network, path)


def test_timm_file_loads_and_exports_back_into_timm_strictly(small_file, tmp_path):
  network, path = small_file
  model = models.get_model("swin", CLASSES, **SMALL)
  params = weights_layouts.load("swin", path, fh.init_params(model, 32),
                              strict_head=True)
  x = fh.images(32)
  want = fh.timm_logits(network, x)
  fh.assert_close(np.asarray(model.apply({"params": params}, x)[0]), want)
  out = str(tmp_path / "export.safetensors")
  record = weights_layouts.save_params("swin", out, params, format="timm",
                              options=SMALL, resolution=32)
  assert record["timm"]["kwargs"]["img_size"] == 32
  fh.assert_close(fh.timm_logits(weights_layouts.timm_model(out), x), want)  # strict
  for suffix in ("npz", "safetensors"):
    own = str(tmp_path / f"own.{suffix}")
    weights_layouts.save_params("swin", own, params, format=suffix, resolution=32,
                       options=SMALL)
    back = weights_layouts.load("swin", own, fh.init_params(model, 32))
    fh.assert_close(np.asarray(model.apply({"params": back}, x)[0]), want)


def test_older_timm_naming_and_stored_buffers_load(small_file):
  """Files from before timm moved downsample to the next stage's start, with
  the relative_position_index / attn_mask buffers stored."""
  network, _ = small_file
  arrays = fh.state_arrays(network)
  old = {}
  for name, value in arrays.items():
    if ".downsample." in name:
      stage = int(name.split(".")[1])
      name = name.replace(f"layers.{stage}.", f"layers.{stage - 1}.", 1)
    old[name.replace("head.fc.", "head.")] = value
  old["layers.0.blocks.0.attn.relative_position_index"] = np.zeros((4, 4))
  old["layers.0.blocks.1.attn_mask"] = np.zeros((64, 4, 4))
  model = models.get_model("swin", CLASSES, **SMALL)
  params = fh.load_with_spec(swin.WEIGHTS, old, fh.init_params(model, 32))
  x = fh.images(32)
  fh.assert_close(np.asarray(model.apply({"params": params}, x)[0]),
                  fh.timm_logits(network, x))


def test_teacher_from_another_variant_or_class_count_is_one_line(small_file):
  _, path = small_file
  for options, classes, says in [
      ({**SMALL, "embed_dim": 32}, CLASSES,
       ["holding Swin embed_dim=16, depths=[2, 2, 2, 2]",
        "model (Swin embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], "
        "window_size=2, num_classes=7)", "head.fc.weight file [7, 128] vs model [7, 256]",
        "set the model's variant"]),
      (SMALL, 10, ["head with 7 classes", "has 10"])]:
    model = models.get_model("swin", classes, **options)
    with pytest.raises(UserError) as info:
      weights_layouts.load("swin", path, fh.init_params(model, 32),
                         strict_head=True)
    message = str(info.value)
    assert "\n" not in message and path in message
    for part in says:
      assert part in message


def test_shift_mask_separates_the_wrapped_regions():
  mask = swin.shift_mask(4, 2, 1)  # 4 windows of 2x2 tokens
  assert mask.shape == (4, 4, 4)
  assert not mask[0].any()  # the top-left window holds one region
  # The bottom-right window holds four regions: each token sees only itself.
  assert np.array_equal(mask[3] == 0, np.eye(4, dtype=bool))
  index = swin.relative_position_index(2)
  assert index[0, 0] == 4 and index.max() == 8 and index.shape == (4, 4)


@pytest.mark.parametrize("options,culprit", [
    ({"variant": "huge"}, "variant='huge' is unknown; use one of tiny, small, "
     "base, large"),
    ({"img_size": 200}, "Swin img_size=200 does not fit window_size=7 with "
     "patch_size=4: every stage's map must be a whole number of windows; use "
     "an image size (res and img_size) that is a multiple of 224 (224, 448,"),
    ({"embed_dim": 10}, "stage 1 width 10 is not divisible by its num_heads=3"),
    ({"depths": (2, 2)}, "depths=[2, 2] must be four"),
])
def test_bad_options_are_one_line(options, culprit):
  with pytest.raises(UserError) as info:
    models.get_model("swin", CLASSES, **options)
  assert culprit in str(info.value) and "\n" not in str(info.value)


def test_images_of_another_size_are_one_line():
  model = models.get_model("swin", CLASSES, **SMALL)
  with pytest.raises(UserError, match="built for 32px images .* got 64x64; "
                     "set the model's img_size"):
    jax.eval_shape(model.init, jax.random.key(0), fh.images(64, 1))


def test_published_names_are_timm_hub_checkpoints():
  pretrained = set(fh.timm.list_pretrained("swin_*"))
  for entry in swin.WEIGHTS.published:
    assert entry.hub in pretrained and not entry.path
    assert entry.hub.startswith(f"swin_{entry.options['variant']}_patch4_window7_224.")
