"""Train/eval pipelines: teaching modes, exact resume, host slicing, eval coverage."""

import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from ml_collections import ConfigDict
from PIL import Image

from funmatch.data import pipeline
from funmatch.data import preprocess as pp
from funmatch.data import sources
from funmatch.teaching import CROPS
from funmatch.errors import UserError

VIEWS = {"student": 16, "teacher": 32}
NUM_TFDS = 40


def _digits(split="train", batch_size=8, **kwargs):
  return ConfigDict(dict(source="digits", split=split, batch_size=batch_size,
                         image_size=32, **kwargs))


def _batches(ds, count):
  return list(ds.take(count).as_numpy_iterator())


def _mesh_sharding():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def _box_mean_2x(images):
  b, h, w, c = images.shape
  return images.reshape(b, h // 2, 2, w // 2, 2, c).mean((2, 4))


# ---------------------------------------------------------------------------
# Teaching modes.


@pytest.mark.parametrize("teaching", ["function_matching", "consistent"])
def test_consistent_views_are_one_crop_at_each_resolution(teaching):
  cfg = _digits(crop_area_min=0.3)
  spec = pp.spec_from_config(cfg)
  images, _ = sources.digits("train", 32)
  batches = _batches(pipeline.train_dataset(sources.open_source(cfg),
                                            VIEWS, seed=3, crops=CROPS[teaching]), 2)
  for step, batch in enumerate(batches):
    for i in range(0, 8, 3):
      position = step * 8 + i
      crop = pp.shared_crop(images[batch["index"][i]], False,
                            pipeline.example_seed(3, position), spec)
      for name, res in VIEWS.items():
        expected = pp.value_range(pp.resize(crop, res)).numpy()
        np.testing.assert_allclose(batch["images"][name][i], expected, atol=1e-5)
  # Independent of the reconstruction: the 32px view box-averaged to 16px is
  # close to the 16px view (bilinear vs box filter only), unlike other crops.
  student = batches[0]["images"]["student"]
  teacher_small = _box_mean_2x(batches[0]["images"]["teacher"])
  same = np.abs(student - teacher_small).mean()
  shuffled = np.abs(student - np.roll(teacher_small, 1, axis=0)).mean()
  assert same < 0.25 * shuffled


def test_same_resolution_views_identical_only_when_consistent():
  views = {"a": 24, "b": 24}
  consistent = _batches(pipeline.train_dataset(
      sources.open_source(_digits()), views, seed=0, crops="shared"), 1)[0]["images"]
  np.testing.assert_array_equal(consistent["a"], consistent["b"])
  independent = _batches(pipeline.train_dataset(
      sources.open_source(_digits()), views, seed=0, crops="independent"), 1)[0]["images"]
  differs = [not np.array_equal(a, b)
             for a, b in zip(independent["a"], independent["b"])]
  assert sum(differs) >= 6


def test_independent_views_use_their_own_crops():
  cfg = _digits()
  spec = pp.spec_from_config(cfg)
  images, _ = sources.digits("train", 32)
  batch = _batches(pipeline.train_dataset(sources.open_source(cfg), VIEWS, seed=1,
                                          crops="independent"), 1)[0]
  for i in (0, 5):
    seed = pipeline.example_seed(1, i)
    for name, res in VIEWS.items():
      view_seed = pp.fold_in(seed, pipeline.view_tag(name))
      expected = pp.random_view(images[batch["index"][i]], view_seed, res, spec)
      np.testing.assert_allclose(batch["images"][name][i], expected.numpy(),
                                 atol=1e-5)


def test_fixed_teacher_view_is_the_same_every_epoch():
  # 445 test digits, batch 89: every epoch is exactly 5 batches.
  cfg = _digits(split="test", batch_size=89)
  spec = pp.spec_from_config(cfg)
  images, _ = sources.digits("test", 32)
  batches = _batches(pipeline.train_dataset(sources.open_source(cfg),
                                            VIEWS, seed=2, crops="fixed"),
                     10)
  by_epoch = [{}, {}]
  for step, batch in enumerate(batches):
    for i, index in enumerate(batch["index"]):
      by_epoch[step // 5][index] = (batch["images"]["student"][i],
                                    batch["images"]["teacher"][i])
  assert sorted(by_epoch[0]) == sorted(by_epoch[1]) == list(range(445))
  students_differ = 0
  for index in range(445):
    (s0, t0), (s1, t1) = by_epoch[0][index], by_epoch[1][index]
    np.testing.assert_array_equal(t0, t1)
    students_differ += not np.array_equal(s0, s1)
  assert students_differ > 400
  for index in (0, 100):
    np.testing.assert_allclose(by_epoch[0][index][1],
                               pp.eval_view(images[index], 32, spec).numpy(),
                               atol=1e-6)


def test_crops_and_batch_errors():
  # The teaching plan makes crops and views; a mismatch is a programming error.
  with pytest.raises(ValueError, match="crops"):
    pipeline.train_dataset(sources.open_source(_digits()), VIEWS, seed=0, crops="patient")
  with pytest.raises(ValueError, match="student"):
    pipeline.train_dataset(sources.open_source(_digits()),
                           {"teacher": 32}, seed=0, crops="fixed")
  with pytest.raises(UserError, match="batch_size=10.*processes"):
    pipeline.train_dataset(sources.open_source(_digits(batch_size=10)), VIEWS, seed=0,
                           process_count=3)


# ---------------------------------------------------------------------------
# Order: epochs, exact resume, hosts.


def test_each_epoch_is_a_permutation_and_epochs_differ():
  n = 1352
  batches = _batches(pipeline.train_dataset(sources.open_source(_digits(batch_size=64)),
                                            {"s": 8},
                                            seed=5), 43)
  stream = np.concatenate([b["index"] for b in batches])
  np.testing.assert_array_equal(np.sort(stream[:n]), np.arange(n))
  np.testing.assert_array_equal(np.sort(stream[n:2 * n]), np.arange(n))
  assert not np.array_equal(stream[:n], stream[n:2 * n])
  np.testing.assert_array_equal(stream[:n],
                                pipeline.epoch_permutation(5, 0, n).numpy())
  images, labels = sources.digits("train", 32)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]),
                                labels[stream])
  del images


def test_start_step_resumes_exactly():
  cfg = _digits(batch_size=64)  # 1352 % 64 != 0: batch 21 spans two epochs
  reference = _batches(pipeline.train_dataset(sources.open_source(cfg),
                                              VIEWS, seed=7), 24)
  for step in (1, 21, 23):
    resumed = _batches(pipeline.train_dataset(sources.open_source(cfg), VIEWS, seed=7,
                                              start_step=step), 1)[0]
    for key in ("label", "index"):
      np.testing.assert_array_equal(resumed[key], reference[step][key])
    for name in VIEWS:
      np.testing.assert_array_equal(resumed["images"][name],
                                    reference[step]["images"][name])
  other_seed = _batches(pipeline.train_dataset(sources.open_source(cfg),
                                               VIEWS, seed=8), 1)[0]
  assert not np.array_equal(other_seed["index"], reference[0]["index"])


def test_hosts_take_their_slice_of_every_global_batch():
  cfg = _digits(batch_size=32)
  for start_step in (0, 40):
    whole = _batches(pipeline.train_dataset(sources.open_source(cfg), VIEWS, seed=4,
                                            start_step=start_step), 3)
    hosts = [_batches(pipeline.train_dataset(
        sources.open_source(cfg), VIEWS, seed=4, start_step=start_step, process_index=p,
        process_count=2), 3) for p in range(2)]
    for k in range(3):
      assert len(hosts[0][k]["label"]) == 16
      for key in ("label", "index"):
        np.testing.assert_array_equal(
            np.concatenate([hosts[0][k][key], hosts[1][k][key]]), whole[k][key])
      np.testing.assert_array_equal(
          np.concatenate([hosts[0][k]["images"]["teacher"],
                          hosts[1][k]["images"]["teacher"]]),
          whole[k]["images"]["teacher"])


# ---------------------------------------------------------------------------
# Eval.


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_covers_every_example_once(process_count):
  cfg = _digits(split="test", batch_size=60)  # 445 % 60 != 0
  spec = pp.spec_from_config(cfg)
  images, labels = sources.digits("test", 32)
  assert pipeline.host_range(445, 0, process_count)[0] == 0
  seen, batch_counts = [], []
  for p in range(process_count):
    ds, num_examples, num_batches = pipeline.eval_dataset(
        sources.open_source(cfg), VIEWS, process_index=p, process_count=process_count)
    batches = list(ds.as_numpy_iterator())
    assert num_examples == 445 and len(batches) == num_batches
    batch_counts.append(len(batches))
    for batch in batches:
      assert batch["label"].shape == (60 // process_count,)
      index = batch["index"][batch["mask"]]
      np.testing.assert_array_equal(batch["label"][batch["mask"]], labels[index])
      assert np.all(batch["index"][~batch["mask"]] == -1)
      assert np.all(batch["images"]["student"][~batch["mask"]] == 0)
      seen.extend(index)
    first = batches[0]
    np.testing.assert_allclose(
        first["images"]["teacher"][0],
        pp.eval_view(images[first["index"][0]], 32, spec).numpy(), atol=1e-6)
  assert sorted(seen) == list(range(445))
  assert len(set(batch_counts)) == 1  # every host yields as many batches


def _eval_pass(cfg, process_count):
  """(positions, labels, teacher images, batches per host) of one eval pass."""
  positions, labels, images, counts = [], [], [], []
  for p in range(process_count):
    ds, num_examples, num_batches = pipeline.eval_dataset(
        sources.open_source(cfg), VIEWS, process_index=p, process_count=process_count)
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == num_batches
    counts.append(num_batches)
    for batch in batches:
      mask = batch["mask"]
      positions.extend(batch["index"][mask])
      labels.extend(batch["label"][mask])
      images.extend(batch["images"]["teacher"][mask])
  return num_examples, positions, labels, np.stack(images), counts


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_max_examples_evaluates_the_first_n_once(process_count):
  """A minival: the split's first N examples, each once over all hosts."""
  whole = _eval_pass(_digits(split="test", batch_size=12), 1)
  num_examples, positions, labels, images, counts = _eval_pass(
      _digits(split="test", batch_size=12, max_examples=100), process_count)
  assert num_examples == 100 and positions == list(range(100))
  assert len(set(counts)) == 1  # every host yields as many batches
  np.testing.assert_array_equal(labels, whole[2][:100])
  np.testing.assert_array_equal(images, whole[3][:100])


def test_max_examples_beyond_the_split_or_bad():
  cfg = _digits(split="test", batch_size=60, max_examples=10_000)
  assert pipeline.eval_dataset(sources.open_source(cfg), VIEWS)[1] == 445
  for bad in (-1, 2.5, True, "10"):
    with pytest.raises(UserError, match=r"evals.x.max_examples=.* integer >= 0"):
      pipeline.eval_dataset(sources.open_source(
          _digits(split="test", max_examples=bad), "evals.x"), VIEWS)


def test_host_range_partitions_contiguously():
  for n in (0, 1, 7, 445):
    for count in (1, 2, 3, 8):
      ranges = [pipeline.host_range(n, p, count) for p in range(count)]
      assert ranges[0][0] == 0 and ranges[-1][1] == n
      assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
      sizes = [e - s for s, e in ranges]
      assert max(sizes) - min(sizes) <= 1


def test_device_iterators_give_sharded_global_arrays():
  sharding = _mesh_sharding()
  cfg = _digits(batch_size=16)
  it = pipeline.make_train_iterator(sources.open_source(cfg), VIEWS, seed=9, start_step=2,
                                    sharding=sharding)
  batches = [next(it) for _ in range(4)]
  host = _batches(pipeline.train_dataset(sources.open_source(cfg),
                                         VIEWS, seed=9, start_step=2), 4)
  for batch, expected in zip(batches, host):
    assert set(batch) == {"images", "label"}
    assert isinstance(batch["label"], jax.Array)
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (16,)
    assert batch["images"]["teacher"].shape == (16, 32, 32, 3)
    assert batch["images"]["student"].dtype == np.float32
    assert batch["images"]["student"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(batch["label"]), expected["label"])
    np.testing.assert_array_equal(np.asarray(batch["images"]["student"]),
                                  expected["images"]["student"])
  evals = pipeline.make_eval_iterator(
      sources.open_source(_digits(split="test", batch_size=100)), VIEWS, sharding=sharding)
  assert evals.num_examples == 445 and len(evals) == 5
  first, second = list(evals), list(evals)  # re-iterable: two full passes
  assert len(first) == len(second) == 5
  for a, b in zip(first, second):
    assert set(a) == {"images", "label", "mask"} and a["mask"].dtype == bool
    np.testing.assert_array_equal(np.asarray(a["label"]), np.asarray(b["label"]))
  assert sum(int(b["mask"].sum()) for b in first) == 445


# ---------------------------------------------------------------------------
# TFDS and folders through the pipeline.


class FunmatchTinyPipeline(tfds.core.GeneratorBasedBuilder):
  """Constant images of value 5 * id (any resize keeps it); label = id % 3."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=3),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(NUM_TFDS)}

  def _generate_examples(self, count):
    for i in range(count):
      yield i, {"image": np.full((20 + i % 7, 24, 3), 5 * i, np.uint8),
                "label": i % 3}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  FunmatchTinyPipeline(data_dir=data_dir).download_and_prepare()
  return data_dir


def _tfds(data_dir, **kwargs):
  fields = dict(source="tfds", name="funmatch_tiny_pipeline", data_dir=data_dir,
                batch_size=8, shuffle_buffer=16)
  return ConfigDict({**fields, **kwargs})


def _ids(view):
  """Example ids of constant images from any view of them."""
  return np.round((view[:, 0, 0, 0] + 1) * 127.5 / 5).astype(int)


@pytest.mark.parametrize("process_count", [1, 2])
def test_tfds_eval_covers_every_example_once(tfds_dir, process_count):
  cfg = _tfds(tfds_dir, split="train[5:]", batch_size=6)
  seen, positions = [], []
  lengths = set()
  for p in range(process_count):
    ds, num_examples, num_batches = pipeline.eval_dataset(
        sources.open_source(cfg), VIEWS, process_index=p, process_count=process_count)
    batches = list(ds.as_numpy_iterator())
    assert num_examples == NUM_TFDS - 5 and len(batches) == num_batches
    lengths.add(len(batches))
    for batch in batches:
      ids = _ids(batch["images"]["student"][batch["mask"]])
      np.testing.assert_array_equal(batch["label"][batch["mask"]], ids % 3)
      seen.extend(ids)
      positions.extend(batch["index"][batch["mask"]])
  assert len(lengths) == 1
  assert len(seen) == NUM_TFDS - 5 and len(set(seen)) == NUM_TFDS - 5
  assert positions == list(range(NUM_TFDS - 5))  # hosts' parts in split order


@pytest.mark.parametrize("process_count", [1, 2])
def test_tfds_streaming_max_examples_reads_the_first_n_once(tfds_dir, process_count):
  whole = _eval_pass(_tfds(tfds_dir, split="train[5:]", batch_size=4), 1)
  num_examples, positions, labels, images, counts = _eval_pass(
      _tfds(tfds_dir, split="train[5:]", batch_size=4, max_examples=17), process_count)
  assert num_examples == 17 and positions == list(range(17))
  assert len(set(counts)) == 1
  np.testing.assert_array_equal(_ids(images), _ids(whole[3][:17]))
  np.testing.assert_array_equal(labels, whole[2][:17])


def test_tfds_streaming_train_shards_hosts_and_reshuffles_on_resume(tfds_dir):
  cfg = _tfds(tfds_dir)
  host_ids = []
  for p in range(2):
    batches = _batches(pipeline.train_dataset(sources.open_source(cfg),
                                              VIEWS, seed=0, process_index=p,
                                              process_count=2), 10)
    ids = np.concatenate([_ids(b["images"]["teacher"]) for b in batches])
    for b in batches:
      np.testing.assert_array_equal(b["label"], _ids(b["images"]["student"]) % 3)
      assert b["images"]["teacher"].shape == (4, 32, 32, 3)
    host_ids.append(set(ids))
  assert not host_ids[0] & host_ids[1]
  assert host_ids[0] | host_ids[1] == set(range(NUM_TFDS))
  first = _batches(pipeline.train_dataset(sources.open_source(cfg), VIEWS, seed=0), 1)[0]
  resumed = _batches(pipeline.train_dataset(sources.open_source(cfg),
                                            VIEWS, seed=0, start_step=100), 1)[0]
  assert not np.array_equal(_ids(first["images"]["student"]),
                            _ids(resumed["images"]["student"]))


def test_tfds_cache_raw_resumes_exactly_and_views_are_consistent(tfds_dir):
  cfg = _tfds(tfds_dir, cache_raw=True, crop_area_min=0.5)
  reference = _batches(pipeline.train_dataset(sources.open_source(cfg), VIEWS, seed=1), 7)
  resumed = _batches(pipeline.train_dataset(sources.open_source(cfg),
                                            VIEWS, seed=1, start_step=6), 1)[0]
  for name in VIEWS:
    np.testing.assert_array_equal(resumed["images"][name],
                                  reference[6]["images"][name])
  data = sources.open_source(cfg)
  spec = pp.spec_from_config(cfg)
  batch = reference[6]
  for i in (0, 7):
    crop = pp.shared_crop(data.values[batch["index"][i]], True,
                          pipeline.example_seed(1, 6 * 8 + i), spec)
    np.testing.assert_allclose(batch["images"]["teacher"][i],
                               pp.value_range(pp.resize(crop, 32)).numpy(),
                               atol=1e-5)


def _jpeg_folder(root, count=6):
  rng = np.random.default_rng(0)
  for c in ("a", "b"):
    os.makedirs(root / c)
    for i in range(count):
      image = rng.integers(0, 256, (30 + i, 40, 3), np.uint8)
      Image.fromarray(image).save(root / c / f"{i}.jpg", quality=90)
  return root


def test_folder_pipeline_decodes_jpegs(tmp_path):
  root = _jpeg_folder(tmp_path / "imgs")
  cfg = ConfigDict(dict(source="folder", root=str(root), batch_size=4))
  for teaching in ("function_matching", "independent", "fixed"):
    batch = _batches(pipeline.train_dataset(sources.open_source(cfg),
                                            VIEWS, seed=0, crops=CROPS[teaching]),
                     1)[0]
    assert batch["images"]["teacher"].shape == (4, 32, 32, 3)
    student = batch["images"]["student"]
    assert -1 <= student.min() < student.max() <= 1
  ds, num_examples, _ = pipeline.eval_dataset(sources.open_source(cfg), VIEWS)
  labels = np.concatenate([b["label"][b["mask"]] for b in ds.as_numpy_iterator()])
  assert num_examples == 12
  np.testing.assert_array_equal(labels, [0] * 6 + [1] * 6)
  # Holding the files' bytes in memory changes nothing but the reads.
  cached = ConfigDict(dict(cfg, cache_raw=True))
  assert sources.open_source(cached).holds == "encoded"
  for a, b in zip(_batches(pipeline.train_dataset(sources.open_source(cfg),
                                                  VIEWS, seed=3), 2),
                  _batches(pipeline.train_dataset(sources.open_source(cached),
                                                  VIEWS, seed=3), 2)):
    np.testing.assert_array_equal(a["images"]["student"], b["images"]["student"])


def test_decode_error_while_iterating_names_the_source(tmp_path):
  root = _jpeg_folder(tmp_path / "imgs", count=2)
  (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(500))
  cfg = ConfigDict(dict(source="folder", root=str(root), batch_size=5,
                        verify_images=False))
  evals = pipeline.make_eval_iterator(sources.open_source(cfg),
                                      VIEWS, sharding=_mesh_sharding())
  with pytest.raises(UserError, match=f"reading folder {root} failed"):
    list(evals)
