"""ConvNeXt V1 / V2: shapes of every timm variant, logits equal to timm's on
files timm writes, the timm export loading back into timm strictly."""
import jax
import numpy as np
import pytest

from funmatch import models
from funmatch.errors import UserError
from funmatch.weights import layouts as weights_layouts
from funmatch.models import convnext

import family_helpers as fh

CLASSES = 7
VARIANTS = [(variant, version) for version in (1, 2)
            for variant in convnext.VARIANTS]


def timm_name(variant, version):
  return f"convnext{'v2' if version == 2 else ''}_{variant}"


@pytest.mark.parametrize("variant,version", VARIANTS)
def test_every_variant_has_timms_names_and_shapes(variant, version):
  model = models.get_model("convnext", CLASSES, variant=variant, version=version)
  want = fh.meta_timm_shapes(timm_name(variant, version), num_classes=CLASSES,
                             conv_mlp=False)
  assert fh.timm_shapes_of(model, 32, convnext.TIMM) == want


@pytest.mark.parametrize("variant,version,res,kwargs", [
    ("atto", 1, 32, {}),                      # timm's conv_mlp: 1x1-conv MLPs
    ("atto", 1, 64, {}),
    ("femto", 2, 64, {}),                     # GRN, no layer scale, conv_mlp
    ("tiny", 1, 32, {"conv_mlp": False}),     # Linear MLPs
])
def test_logits_equal_timms(variant, version, res, kwargs):
  network = fh.randomize(fh.timm.create_model(
      timm_name(variant, version), num_classes=CLASSES, **kwargs))
  model = models.get_model("convnext", CLASSES, variant=variant, version=version)
  params = fh.load_with_spec(convnext.WEIGHTS, fh.state_arrays(network),
                             fh.init_params(model, res))
  x = fh.images(res)
  logits, taps = model.apply({"params": params}, x)
  fh.assert_close(np.asarray(logits), fh.timm_logits(network, x))
  dims = convnext.VARIANTS[variant].dims
  assert {k: v.shape for k, v in taps.items()} == {
      **{f"stage{i + 1}": (2, res // 2 ** (i + 2), res // 2 ** (i + 2), dims[i])
         for i in range(4)}, "pre_logits": (2, dims[3])}


@pytest.fixture(scope="module")
def atto_v2_file(tmp_path_factory):
  network = fh.randomize(fh.timm.create_model("convnextv2_atto",
                                              num_classes=CLASSES), seed=1)
  path = str(tmp_path_factory.mktemp("convnext") / "timm.pth")
  return network, fh.save_state(network, path)


def test_timm_file_loads_and_exports_back_into_timm_strictly(atto_v2_file,
                                                             tmp_path):
  network, path = atto_v2_file
  model = models.get_model("convnext", CLASSES, variant="atto", version=2)
  params = weights_layouts.load("convnext", path, fh.init_params(model, 32),
                              strict_head=True)
  x = fh.images(32)
  want = fh.timm_logits(network, x)
  fh.assert_close(np.asarray(model.apply({"params": params}, x)[0]), want)
  out = str(tmp_path / "export.safetensors")
  record = weights_layouts.save_params("convnext", out, params, format="timm",
                              options={"variant": "atto", "version": 2},
                              resolution=32)
  assert record["timm"]["model_name"] == "convnextv2_atto"
  fh.assert_close(fh.timm_logits(weights_layouts.timm_model(out), x), want)  # strict
  again = weights_layouts.load("convnext", out, fh.init_params(model, 32))
  fh.assert_close(np.asarray(model.apply({"params": again}, x)[0]), want)
  for suffix in ("npz", "safetensors"):  # funmatch's own names
    own = str(tmp_path / f"own.{suffix}")
    weights_layouts.save_params("convnext", own, params, format=suffix, resolution=32,
                       options={"variant": "atto", "version": 2})
    back = weights_layouts.load("convnext", own, fh.init_params(model, 32))
    fh.assert_close(np.asarray(model.apply({"params": back}, x)[0]), want)


@pytest.mark.parametrize("options,classes,says", [
    ({"variant": "femto", "version": 2}, CLASSES,
     ["holding ConvNeXt V2 depths=[2, 2, 6, 2], dims=[40, 80, 160, 320]",
      "model (ConvNeXt V2 depths=[2, 2, 6, 2], dims=[48, 96, 192, 384]",
      "head.norm.weight file [320] vs model [384]", "set the model's variant"]),
    ({"variant": "atto", "version": 1}, CLASSES,
     ["holding ConvNeXt V2", "missing (stages.0.blocks.0.gamma", "unexpected (stages.0.blocks.0.mlp.grn",
      "model (ConvNeXt V1"]),
    ({"variant": "atto", "version": 2}, 10, ["head with 7 classes", "has 10"]),
])
def test_teacher_from_another_variant_or_class_count_is_one_line(
    atto_v2_file, options, classes, says):
  _, path = atto_v2_file
  model = models.get_model("convnext", classes, **options)
  with pytest.raises(UserError) as info:
    weights_layouts.load("convnext", path, fh.init_params(model, 32),
                       strict_head=True)
  message = str(info.value)
  assert "\n" not in message and path in message
  for part in says:
    assert part in message


def test_drop_path_only_in_training():
  # V2: no layer scale (1e-6 at init) hiding the dropped branches.
  model = models.get_model("convnext", CLASSES, variant="atto", version=2,
                           dims=(8, 8, 8, 8), depths=(1, 1, 1, 1), drop_path=0.5)
  x = fh.images(32)
  variables = model.init(jax.random.key(0), x)
  rng = {"dropout": jax.random.key(1)}
  eval_taps = model.apply(variables, x)[1]["pre_logits"]
  assert np.array_equal(eval_taps, model.apply(variables, x)[1]["pre_logits"])
  train = model.apply(variables, x, train=True, rngs=rng)[1]["pre_logits"]
  assert not np.allclose(train, eval_taps)
  assert convnext.drop_path_rates((1, 2), 0.5) == [[0.0], [0.25, 0.5]]


@pytest.mark.parametrize("options,culprit", [
    ({"variant": "huge"}, "variant='huge' is unknown; use one of atto, femto"),
    ({"version": 3}, "version=3"),
    ({"dims": (8, 8)}, "dims=[8, 8] must be four"),
    ({"drop_path": 1.0}, "drop_path=1.0"),
    ({"conv_impl": "fast"}, "conv_impl='fast'"),
])
def test_bad_options_are_one_line(options, culprit):
  with pytest.raises(UserError) as info:
    models.get_model("convnext", CLASSES, **options)
  assert culprit in str(info.value) and "\n" not in str(info.value)


def test_published_names_are_timm_hub_checkpoints():
  pretrained = set(fh.timm.list_pretrained("convnext*"))
  for entry in convnext.WEIGHTS.published:
    assert entry.hub in pretrained and not entry.path
    model = models.get_model("convnext", entry.num_classes, **entry.options)
    assert timm_name(model.variant, model.version) == entry.hub.split(".")[0]


def test_fetch_downloads_a_hub_only_name_that_then_loads_as_a_teacher(
    tmp_path, monkeypatch, capsys):
  """funmatch-fetch --source hub, from a file:// stand-in for the timm hub."""
  from conftest import run_cli  # pylint: disable=import-outside-toplevel
  from funmatch.train import cli  # pylint: disable=import-outside-toplevel
  from funmatch.weights import catalog  # pylint: disable=import-outside-toplevel
  name = "convnext_atto.d2_in1k"
  network = fh.randomize(fh.timm.create_model("convnext_atto"), seed=2, scale=0.1)
  hub = tmp_path / "hub" / name / "resolve" / "main"
  hub.mkdir(parents=True)
  fh.save_state(network, str(hub / "model.safetensors"))
  monkeypatch.setattr(catalog, "HUB", (tmp_path / "hub").as_uri()
                      + "/{hub}/resolve/main/model.safetensors")
  monkeypatch.setenv("FUNMATCH_CACHE", str(tmp_path / "cache"))
  code, out, err = run_cli(cli.fetch_main, [name], capsys)
  assert code == 2 and "on the timm hub only; fetch it with --source hub" in err
  code, out, err = run_cli(cli.fetch_main, [name, "--source=hub"], capsys)
  assert code == 0, err
  path = catalog.resolve(name, "config.teacher")
  assert path.endswith(f"{name}.timm.safetensors")
  entry = catalog.entry(name)
  model = models.get_model("convnext", entry.num_classes, **entry.options)
  params = weights_layouts.load("convnext", path, fh.init_params(model, 32),
                                strict_head=True)
  x = fh.images(32)
  fh.assert_close(np.asarray(model.apply({"params": params}, x)[0]),
                  fh.timm_logits(network, x))
