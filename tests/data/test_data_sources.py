"""Sources: the fixed digits split, image folders, and prepared TFDS datasets."""

import io
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from ml_collections import ConfigDict
from PIL import Image
from sklearn.datasets import load_digits

from funmatch.data import preprocess
from funmatch.data import sources
from funmatch.errors import UserError

NUM_TFDS_TRAIN = 30


def _bilinear_matrix(n_in, n_out):
  """[n_out, n_in] weights of half-pixel-centre bilinear resampling."""
  weights = np.zeros((n_out, n_in))
  for d in range(n_out):
    s = (d + 0.5) * n_in / n_out - 0.5
    lo = int(np.floor(s))
    weights[d, np.clip(lo, 0, n_in - 1)] += 1 - (s - lo)
    weights[d, np.clip(lo + 1, 0, n_in - 1)] += s - lo
  return weights


# ---------------------------------------------------------------------------
# Digits.


def test_digits_split_is_fixed_stratified_and_disjoint():
  train = sources.digits_split_indices("train")
  test = sources.digits_split_indices("test")
  np.testing.assert_array_equal(train, sources.digits_split_indices("train"))
  assert len(train) == 1352 and len(test) == 445
  assert not set(train) & set(test)
  np.testing.assert_array_equal(np.sort(np.concatenate([train, test])),
                                np.arange(1797))
  labels = load_digits().target
  for c in range(10):
    members = np.flatnonzero(labels == c)
    # Every 4th member of each class (in file order) is a test example.
    np.testing.assert_array_equal(np.intersect1d(members, test), members[3::4])


def test_digits_images_are_upsampled_uint8_rgb():
  images, labels = sources.digits("train", 32)
  raw = load_digits()
  idx = sources.digits_split_indices("train")
  assert images.shape == (1352, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, raw.target[idx])
  assert images.min() == 0 and images.max() == 255
  np.testing.assert_array_equal(images[..., 0], images[..., 2])
  weights = _bilinear_matrix(8, 32)
  for i in (0, 17, 1351):
    reference = weights @ (raw.images[idx[i]] * 255 / 16) @ weights.T
    assert np.abs(images[i, ..., 1] - np.round(reference)).max() <= 1
  small, _ = sources.digits("test", 16)
  assert small.shape == (445, 16, 16, 3)


def test_digits_info_and_config_errors():
  info = sources.open_source(ConfigDict({"source": "digits", "split": "test"}))
  assert (info.num_examples, info.num_classes, info.random_access) == (445, 10, True)
  with pytest.raises(UserError, match="input.source"):
    sources.open_source(ConfigDict({"source": "imagenet"}))
  with pytest.raises(UserError, match="evals.x.split"):
    sources.open_source(ConfigDict({"source": "digits", "split": "val"}),
                        where="evals.x")
  with pytest.raises(UserError, match="batch_size"):
    sources.open_source(ConfigDict({"source": "digits", "batch_size": 0}))
  with pytest.raises(UserError, match="crop"):
    sources.open_source(ConfigDict({"source": "digits", "crop": "centre"}))


# ---------------------------------------------------------------------------
# Image folders.


def _write_image(path, value, fmt, size=(12, 10)):
  image = np.full(size + (3,), value, np.uint8)
  image[0, 0] = (value, 255 - value, 7)
  Image.fromarray(image).save(path, format=fmt)


def _folder(root, layout):
  """layout: {class: [(filename, pixel value), ...]}; formats from extensions."""
  for name, files in layout.items():
    os.makedirs(root / name, exist_ok=True)
    for filename, value in files:
      fmt = "PNG" if filename.lower().endswith(".png") else "JPEG"
      _write_image(root / name / filename, value, fmt)
  return root


def _folder_cfg(root, **kwargs):
  return ConfigDict(dict(source="folder", root=str(root), batch_size=4, **kwargs))


def test_folder_lists_classes_alphabetically(tmp_path):
  root = _folder(tmp_path / "data", {
      "zebra": [("b.png", 10), ("a.JPG", 20)],
      "ant": [("x.jpeg", 30)],
      "cat": [("c.PNG", 40), ("d.png", 50), ("e.jpg", 60)]})
  (root / "ant" / "notes.txt").write_text("not an image")
  os.makedirs(root / ".hidden")
  info = sources.open_source(_folder_cfg(root))
  assert info.class_names == ("ant", "cat", "zebra")
  assert (info.num_examples, info.num_classes) == (6, 3)
  data = sources.open_source(_folder_cfg(root))
  assert data.holds == "paths"
  names = [os.path.relpath(p, root) for p in data.values]
  assert names == ["ant/x.jpeg", "cat/c.PNG", "cat/d.png", "cat/e.jpg",
                   "zebra/a.JPG", "zebra/b.png"]
  np.testing.assert_array_equal(data.labels, [0, 1, 1, 1, 2, 2])
  info = sources.open_source(_folder_cfg(root, classes=["zebra", "ant", "cat"]))
  assert info.class_names == ("zebra", "ant", "cat")
  with pytest.raises(UserError, match="classes"):
    sources.open_source(_folder_cfg(root, classes=["ant", "cat"]))


def test_folder_errors_name_the_culprit(tmp_path):
  with pytest.raises(UserError, match="nowhere"):
    sources.open_source(_folder_cfg(tmp_path / "nowhere"))
  os.makedirs(tmp_path / "flat")
  _write_image(tmp_path / "flat" / "a.png", 1, "PNG")
  with pytest.raises(UserError, match="no class sub-folders"):
    sources.open_source(_folder_cfg(tmp_path / "flat"))
  root = _folder(tmp_path / "data", {"a": [("1.png", 1)]})
  os.makedirs(root / "empty")
  (root / "empty" / "readme.txt").write_text("x")
  with pytest.raises(UserError, match=f"{root / 'empty'} has no"):
    sources.open_source(_folder_cfg(root))


def test_folder_rejects_unreadable_images_by_path(tmp_path):
  root = _folder(tmp_path / "data", {"a": [("1.png", 1), ("2.jpg", 2)],
                                     "b": [("3.jpg", 3)]})
  assert sources.open_source(_folder_cfg(root)).num_examples == 3
  garbage = root / "b" / "garbage.jpg"
  garbage.write_bytes(os.urandom(2000))
  with pytest.raises(UserError, match="garbage.jpg"):
    sources.open_source(_folder_cfg(root))
  # Skipping the check is possible (the pipeline then fails when reading).
  assert sources.open_source(
      _folder_cfg(root, verify_images=False)).num_examples == 4
  garbage.unlink()

  def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])

  big = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
  Image.fromarray(big).save(root / "a" / "cut.jpg", quality=90)
  truncate(root / "a" / "cut.jpg")
  with pytest.raises(UserError, match="cut.jpg"):
    sources.open_source(_folder_cfg(root))
  (root / "a" / "cut.jpg").unlink()
  Image.fromarray(big).save(root / "a" / "cut.png")
  truncate(root / "a" / "cut.png")
  with pytest.raises(UserError, match="cut.png"):
    sources.open_source(_folder_cfg(root))


def test_folder_and_tfds_metadata_on_gcs(tmp_path, tfds_dir, gcs):
  """Listings, image checks, cached reads and TFDS metadata through fileio/epath on
  gs:// (the emulator); streamed reads go through TensorFlow's GCS filesystem,
  which no emulator can stand in for (docs/cloud.md)."""
  import uuid  # pylint: disable=import-outside-toplevel
  from funmatch import fileio  # pylint: disable=import-outside-toplevel
  local = _folder(tmp_path / "data", {"b": [("2.jpg", 2)], "a": [("1.png", 1), ("0.jpg", 3)]})
  remote = f"{gcs.root}/{uuid.uuid4().hex[:12]}"
  for directory, _, files in os.walk(tmp_path):
    for name in files:
      path = os.path.join(directory, name)
      fileio.upload_file(path, f"{remote}/{os.path.relpath(path, tmp_path)}")
  info = sources.open_source(_folder_cfg(f"{remote}/data"))
  assert (info.class_names, info.num_examples) == (("a", "b"), 3)
  cached = sources.open_source(_folder_cfg(f"{remote}/data", cache_raw=True))
  expected = sources.open_source(_folder_cfg(local, cache_raw=True))
  assert list(cached.values) == list(expected.values)
  np.testing.assert_array_equal(cached.labels, expected.labels)
  fileio.write_atomic(f"{remote}/data/b/bad.jpg", b"\xff\xd8\xff not a jpeg")
  with pytest.raises(UserError, match="bad.jpg"):
    sources.open_source(_folder_cfg(f"{remote}/data"))

  for directory, _, files in os.walk(tfds_dir):
    for name in files:
      path = os.path.join(directory, name)
      fileio.upload_file(path, f"{remote}/tfds/{os.path.relpath(path, tfds_dir)}")
  info = sources.open_source(_tfds_cfg(f"{remote}/tfds", split="train[:50%]"))
  assert (info.num_examples, info.num_classes) == (15, 3)
  with pytest.raises(UserError, match=f"not prepared in data_dir {remote}/nothing"):
    sources.open_source(_tfds_cfg(f"{remote}/nothing"))


def test_check_image_file_accepts_what_tensorflow_decodes(tmp_path):
  image = np.random.default_rng(1).integers(0, 256, (20, 30, 3), np.uint8)
  for name, fmt, mode in [("rgb.png", "PNG", "RGB"), ("gray.png", "PNG", "L"),
                          ("rgba.png", "PNG", "RGBA"), ("p.jpg", "JPEG", "RGB"),
                          ("g.jpg", "JPEG", "L")]:
    path = tmp_path / name
    Image.fromarray(image).convert(mode).save(path, format=fmt)
    assert sources.check_image_file(str(path)) is None
    decoded = preprocess.decode(tf.io.read_file(str(path))).numpy()
    assert decoded.shape == (20, 30, 3)
  gif = tmp_path / "anim.png"
  Image.fromarray(image).save(gif, format="GIF")  # a GIF named .png
  assert "not a JPEG or PNG" in sources.check_image_file(str(gif))


# ---------------------------------------------------------------------------
# TFDS (a tiny dataset written by TFDS's own writer, no network).


class FunmatchTinySources(tfds.core.GeneratorBasedBuilder):
  """Images whose pixel (0, 0, 0) is the example id; label = id % 3."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=["red", "green", "blue"]),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, NUM_TFDS_TRAIN),
            "test": self._generate_examples(100, 7)}

  def _generate_examples(self, first, count):
    for i in range(first, first + count):
      image = np.full((10 + i % 5, 12, 3), 50, np.uint8)
      image[0, 0, 0] = i
      yield i, {"image": image, "label": i % 3}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  FunmatchTinySources(data_dir=data_dir).download_and_prepare()
  return data_dir


def _tfds_cfg(data_dir, **kwargs):
  fields = dict(source="tfds", name="funmatch_tiny_sources", data_dir=data_dir,
                batch_size=4)
  return ConfigDict({**fields, **kwargs})


def _ids(encoded):
  return [int(preprocess.decode(e).numpy()[0, 0, 0]) for e in encoded]


def test_tfds_info_reads_splits_and_slices(tfds_dir):
  info = sources.open_source(_tfds_cfg(tfds_dir))
  assert (info.num_examples, info.num_classes) == (NUM_TFDS_TRAIN, 3)
  assert info.class_names == ("red", "green", "blue")
  assert not info.random_access
  assert sources.open_source(
      _tfds_cfg(tfds_dir, split="train[:50%]")).num_examples == 15
  assert sources.open_source(
      _tfds_cfg(tfds_dir, split="test[2:]", cache_raw=True)).random_access


@pytest.mark.parametrize("split", ["validation", "train[:abc]", "train[5:3%"])
def test_tfds_bad_split_is_a_user_error(tfds_dir, split):
  with pytest.raises(UserError, match="split"):
    sources.open_source(_tfds_cfg(tfds_dir, split=split))


def test_tfds_not_prepared_names_the_data_dir(tmp_path, tfds_dir):
  empty = str(tmp_path / "empty_tfds")
  with pytest.raises(UserError, match=f"not prepared in data_dir {empty}.*tfds build"):
    sources.open_source(_tfds_cfg(empty))
  with pytest.raises(UserError, match="not found"):
    sources.open_source(_tfds_cfg(tfds_dir, name="no_such_dataset_anywhere"))
  with pytest.raises(UserError, match="image_key"):
    sources.open_source(_tfds_cfg(tfds_dir, image_key="picture"))


def test_tfds_cache_raw_holds_the_whole_split(tfds_dir):
  data = sources.open_source(_tfds_cfg(tfds_dir, split="train[10:]",
                                              cache_raw=True))
  assert data.holds == "encoded" and data.num_examples == NUM_TFDS_TRAIN - 10
  ids = _ids(data.values)
  assert len(set(ids)) == len(ids) and set(ids) <= set(range(NUM_TFDS_TRAIN))
  np.testing.assert_array_equal(data.labels, np.array(ids) % 3)


def test_tfds_hosts_read_disjoint_parts_covering_the_split(tfds_dir):
  source = sources.open_source(_tfds_cfg(tfds_dir))
  assert sum(source.host_sizes(3)) == NUM_TFDS_TRAIN
  seen = []
  for p in range(3):
    ds, count = source.stream(process_index=p, process_count=3, shuffle_seed=None)
    pairs = list(ds.as_numpy_iterator())
    assert len(pairs) == count
    seen += _ids([e for e, _ in pairs])
    assert all(label == i % 3 for (_, label), i in zip(pairs, seen[-count:]))
  assert sorted(seen) == list(range(NUM_TFDS_TRAIN))
