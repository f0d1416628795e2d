"""Named weights: the catalog, the cache, sha256, funmatch-fetch (never the network).

The published files are hundreds of MB and the tests are offline, so the files
here are tiny models the tests write; a catalog entry for them is added for the
test (`tiny`). Downloads come from a file:// mirror laid out like the bucket, and
any attempt to reach the network in training fails the test.
"""
import os
import urllib.request

import jax
import numpy as np
import pytest

from conftest import repo_path, run_cli
from funmatch import config_util, models
from funmatch.errors import UserError
from funmatch.models import bit
from funmatch.train import cli
from funmatch.weights import catalog, layouts
from funmatch.weights import files as formats
from funmatch.weights import init as weights

TINY = dict(depth=[1, 1, 1, 1], width=0.5)
RES = 16


def one_line(call, *args, **kwargs) -> str:
  with pytest.raises(UserError) as info:
    call(*args, **kwargs)
  assert "\n" not in str(info.value)
  return str(info.value)


@pytest.fixture
def offline(monkeypatch):
  """Any network access fails the test."""
  def refuse(*args, **kwargs):
    raise AssertionError(f"network access: {args}")
  monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def cache_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("FUNMATCH_CACHE", str(tmp_path / "cache"))
  return tmp_path / "cache"


@pytest.fixture
def tiny(monkeypatch):
  """A catalog entry for a tiny BiT trained as big_vision trains (-inf stem padding)."""
  entry = catalog.Entry("FunMatch-test-tiny", "distill/tiny.npz", "bit",
                        {**TINY, "stem_pool_padding": "neg_inf"}, 10, RES, "a test model")
  monkeypatch.setitem(catalog.ENTRIES, entry.name, entry)
  return entry


@pytest.fixture(scope="module")
def tiny_params():
  model = bit.Model(10, **TINY, stem_pool_padding="neg_inf")
  params = model.init(jax.random.key(3), np.zeros((1, RES, RES, 3), np.float32))["params"]
  # A non-zero head, so a head that was not loaded would show.
  return jax.tree.map(lambda x: np.asarray(x) + 0.01, params)


def write_official(path, params) -> str:
  """An official-layout BiT .npz, no metadata (as the bucket's files)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return formats.write_npz(str(path), layouts.file_arrays("bit", params), {})


def model_config(init, **extra):
  return config_util.model_config("bit", RES, init=init, **TINY, **extra)


# ---------------------------------------------------------------------------
# The catalog.


def test_catalog_lists_the_papers_and_bits_weights():
  names = catalog.names()
  for name in ("FunMatch-224px-i1k82.8", "FunMatch-160px-i1k80.5",
               "FunMatch-teacher-224px-i1k", "FunMatch-teacher-384px-i1k",
               "FunMatch-teacher-128px-flowers", "FunMatch-teacher-128px-pet",
               "FunMatch-teacher-128px-food", "FunMatch-teacher-128px-sun",
               "BiT-M-R50x1", "BiT-S-R152x4", "BiT-M-R152x2-ILSVRC2012"):
    assert name in names
  assert catalog.entry("FunMatch-teacher-224px-i1k").gcs_path == (
      "gs://bit_models/distill/R152x2_T_224.npz")
  assert catalog.entry("FunMatch-224px-i1k82.8").url() == (
      "https://storage.googleapis.com/bit_models/distill/R50x1_224.npz")
  assert catalog.entry("BiT-M-R50x1.npz").gcs_path == "gs://bit_models/BiT-M-R50x1.npz"
  assert catalog.entry("FunMatch-teacher-384px-i1k").hub == (
      "resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k_384")
  for entry in catalog.ENTRIES.values():
    # Every entry's architecture is one funmatch builds.
    model = models.get_model(entry.model, entry.num_classes, **entry.options)
    if not entry.path:  # on the timm hub only (ConvNeXt, Swin): named as timm names it
      assert entry.hub == entry.name
      continue
    assert entry.gcs_path.startswith("gs://bit_models/") and entry.path.endswith(".npz")
    assert model.stem_pool_padding in ("zeros", "neg_inf")


def test_names_and_paths_are_told_apart(tmp_path):
  assert catalog.is_name("FunMatch-224px-i1k82.8")
  assert catalog.is_name("BiT-M-R50x9")  # a misspelt name is still meant as a name
  for path in ("/models/t.npz", "t.npz", "runs/teacher", "./teacher", "x.safetensors"):
    assert not catalog.is_name(path)


def test_unknown_name_lists_the_known_ones():
  message = one_line(weights.locate, model_config("BiT-M-R50x9"), "config.teacher")
  assert "config.teacher.init=BiT-M-R50x9 is neither a file or workdir nor a known" in message
  assert "FunMatch-224px-i1k82.8" in message and "BiT-M-R152x2-ILSVRC2012" in message


def test_the_recipes_name_their_teachers():
  for recipe, arg, teachers in (
      ("bit_i1k", None, {"teacher": "FunMatch-teacher-224px-i1k"}),
      ("bit_i1k_160", None, {"teacher": "FunMatch-teacher-224px-i1k"}),
      ("bit_i1k_ensemble", None, {"teacher": "FunMatch-teacher-224px-i1k",
                                  "teacher384": "FunMatch-teacher-384px-i1k"}),
      ("mobilenet_i1k", None, {"teacher": "FunMatch-teacher-224px-i1k"}),
      ("flowers_pet", "data=pet", {"teacher": "FunMatch-teacher-128px-pet"}),
      ("food_sun", "target=flowers", {"teacher": "FunMatch-teacher-128px-flowers"})):
    config = config_util.load_recipe(repo_path("configs", "x.py"), recipe).get_config(arg)
    for name, init in teachers.items():
      assert config[name].init == init, recipe
      entry = catalog.entry(init)
      assert (entry.options["depth"], entry.options["width"]) == (
          config[name].depth, config[name].width)
      assert config[name].stem_pool_padding == "auto"  # follows the weights
    if config.student.model == "bit":
      assert config.student.stem_pool_padding == "neg_inf"  # the paper's students


# ---------------------------------------------------------------------------
# The cache: a hit, a miss, sha256.


def test_named_init_is_read_from_the_cache(cache_dir, tiny, tiny_params, offline):
  path = write_official(cache_dir / "weights" / "FunMatch-test-tiny.npz", tiny_params)
  config = model_config("FunMatch-test-tiny")
  assert weights.locate(config, "config.teacher").path == path
  # The official layout implies zeros, the catalog says how the model was trained.
  assert weights.resolve_options(config, "config.teacher") == {
      "stem_pool_padding": "neg_inf"}
  model = bit.Model(10, **TINY, stem_pool_padding="neg_inf")
  init = jax.tree.map(np.zeros_like, tiny_params)
  loaded = weights.initial_params(config, init, what="config.teacher", teacher=True)
  x = np.random.default_rng(0).uniform(-1, 1, (2, RES, RES, 3)).astype(np.float32)
  np.testing.assert_allclose(model.apply({"params": loaded}, x)[0],
                             model.apply({"params": tiny_params}, x)[0], rtol=1e-6)
  # init_sha256: the right digest passes, another is one line naming both.
  config.init_sha256 = formats.sha256(path).upper()
  weights.initial_params(config, init, what="config.teacher", teacher=True)
  config.init_sha256 = "0" * 64
  message = one_line(weights.locate, config, "config.teacher")
  assert formats.sha256(path) in message and "0" * 64 in message
  assert "config.teacher.init_sha256" in message


def test_a_digest_is_checked_once_per_build(cache_dir, tiny, tiny_params, offline,
                                           monkeypatch):
  path = write_official(cache_dir / "weights" / "FunMatch-test-tiny.npz", tiny_params)
  config = model_config("FunMatch-test-tiny", init_sha256=formats.sha256(path))
  checked, check = [], catalog.check_sha256
  monkeypatch.setattr(catalog, "check_sha256",
                      lambda *args, **kwargs: (checked.append(args[0]), check(*args, **kwargs)))
  init = jax.tree.map(np.zeros_like, tiny_params)
  # A build's stages: the options (a header read), then the weights (the digest).
  weights.resolve_options(config, "config.teacher")
  weights.initial_params(config, init, what="config.teacher", teacher=True)
  assert checked == [path]
  # Nothing is remembered between builds: the next one checks again.
  weights.initial_params(config, init, what="config.teacher", teacher=True)
  assert checked == [path, path]


def test_a_name_not_in_the_cache_says_how_to_get_it(cache_dir, offline):
  config = model_config("FunMatch-teacher-224px-i1k")
  message = one_line(weights.locate, config, "config.teacher")
  assert "config.teacher.init=FunMatch-teacher-224px-i1k is not in the weights cache" in message
  assert "funmatch-fetch FunMatch-teacher-224px-i1k" in message
  assert str(cache_dir / "weights" / "FunMatch-teacher-224px-i1k.npz") in message
  assert "https://storage.googleapis.com/bit_models/distill/R152x2_T_224.npz" in message
  assert not cache_dir.exists()  # nothing was downloaded or created


def test_sha256_of_a_file_init(tmp_path, tiny_params):
  path = write_official(tmp_path / "t.npz", tiny_params)
  message = one_line(weights.locate, model_config(path, init_sha256="ab" * 32),
                     "config.student")
  assert path in message and "sha256" in message
  message = one_line(weights.locate, model_config(str(tmp_path), init_sha256="ab" * 32),
                     "config.student")
  assert "workdir" in message


# ---------------------------------------------------------------------------
# funmatch-fetch.


@pytest.fixture
def mirror(monkeypatch, tmp_path, tiny, tiny_params):
  """A file:// mirror of the bucket holding the tiny entry's file."""
  root = tmp_path / "mirror"
  path = write_official(root / "bit_models" / tiny.path, tiny_params)
  monkeypatch.setenv("FUNMATCH_WEIGHTS_MIRROR", root.as_uri())
  return path


def test_fetch_downloads_verifies_and_then_hits_the_cache(cache_dir, mirror, tiny,
                                                          monkeypatch, capsys):
  digest = formats.sha256(mirror)
  code, out, _ = run_cli(cli.fetch_main, [tiny.name, f"--sha256={digest}"], capsys)
  assert code == 0 and "saved" in out
  cached = cache_dir / "weights" / "FunMatch-test-tiny.npz"
  assert cached.read_bytes() == open(mirror, "rb").read()
  assert os.listdir(cache_dir / "weights") == [cached.name]  # no partial files
  # Cached: no second download.
  monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: 1 / 0)
  code, out, _ = run_cli(cli.fetch_main, [tiny.name], capsys)
  assert code == 0 and "already in the cache" in out
  code, out, _ = run_cli(cli.fetch_main, [], capsys)
  assert code == 0 and "FunMatch-test-tiny" in out and "gs://bit_models/distill/tiny.npz" in out


def test_fetch_refuses_a_wrong_digest_or_a_cut_file(cache_dir, mirror, tiny, capsys):
  code, _, err = run_cli(cli.fetch_main, [tiny.name, "--sha256=" + "1" * 64], capsys)
  assert code == 2 and err.count("funmatch: error:") == 1 and "sha256" in err
  with open(mirror, "rb") as f:
    data = f.read()
  with open(mirror, "wb") as f:
    f.write(data[:len(data) // 2])
  code, _, err = run_cli(cli.fetch_main, [tiny.name], capsys)
  assert code == 2 and "is not a whole weights file" in err
  # Neither attempt left anything in the cache.
  assert not (cache_dir / "weights").exists() or not os.listdir(cache_dir / "weights")


def test_fetch_offline_is_one_line(cache_dir, monkeypatch, capsys):
  monkeypatch.setenv("FUNMATCH_WEIGHTS_MIRROR", "http://127.0.0.1:9")
  code, _, err = run_cli(cli.fetch_main, ["FunMatch-160px-i1k80.5"], capsys)
  assert code == 2 and err.count("funmatch: error:") == 1
  assert "cannot download http://127.0.0.1:9/bit_models/distill/R50x1_160.npz" in err
  assert "offline" in err
  code, _, err = run_cli(cli.fetch_main, ["FunMatch-160px-i1k80.5", "--source=hub"], capsys)
  assert code == 2 and "not on the timm hub" in err
