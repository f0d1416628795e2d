"""Random-access TFDS: ArrayRecord files read by index resume exactly at any scale.

The dataset (tests/tfds_testdata.py, session fixture `jpeg_tfds`) is 40 + 13
JPEGs of four sizes in 3 shards, prepared as ArrayRecord, as TFRecord, and as
both in one directory, by a builder TFDS never registers.
"""
import logging
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from ml_collections import ConfigDict

import tfds_testdata as testdata
from conftest import repo_path, run_cli
from funmatch.data import pipeline
from funmatch.data import preprocess as pp
from funmatch.data import sources
from funmatch.errors import UserError

VIEWS = {"student": 16, "teacher": 24}
N = testdata.NUM_TRAIN


def _cfg(data_dir, **kwargs):
  fields = dict(source="tfds", name=testdata.NAME, data_dir=data_dir, batch_size=12,
                crop_area_min=0.3, shuffle_buffer=16)
  return ConfigDict({**fields, **kwargs})


def _batches(ds, count):
  return list(ds.take(count).as_numpy_iterator())


def _assert_batches_equal(got, expected):
  assert len(got) == len(expected)
  for a, b in zip(got, expected):
    for key in ("index", "label"):
      np.testing.assert_array_equal(a[key], b[key])
    for name in VIEWS:
      np.testing.assert_array_equal(a["images"][name], b["images"][name])


def _record_reader(data_dir, split="train"):
  """An independent reader: TFDS's own data source, decoded by TFDS."""
  return tfds.data_source(testdata.NAME, split=split, data_dir=data_dir,
                          decoders={"image": tfds.decode.SkipDecoding()})


def _sharding():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


# ---------------------------------------------------------------------------
# Mode selection.


def test_the_builder_never_enters_the_registry(jpeg_tfds):
  assert testdata.NAME not in tfds.list_builders(with_community_datasets=False)
  with pytest.raises(tfds.core.registered.DatasetNotFoundError):
    tfds.builder(testdata.NAME)  # without data_dir there is nothing to find
  assert sources.open_source(_cfg(jpeg_tfds["array_record"])).num_examples == N


def test_random_access_is_picked_when_array_record_files_exist(jpeg_tfds):
  for key, access in (("array_record", "array_record"), ("both", "array_record"),
                      ("tfrecord", "streaming")):
    info = sources.open_source(_cfg(jpeg_tfds[key]))
    assert (info.access, info.random_access) == (access, access != "streaming")
    assert info.class_names == testdata.CLASSES
  forced = sources.open_source(_cfg(jpeg_tfds["both"], random_access=False))
  assert forced.access == "streaming"
  cached = sources.open_source(_cfg(jpeg_tfds["array_record"], cache_raw=True))
  assert cached.access == "memory"
  assert sources.open_source(_cfg(jpeg_tfds["array_record"],
                                  split="train[:75%]")).num_examples == 30


# ---------------------------------------------------------------------------
# (a) the batches the index stream prescribes.


def test_batches_follow_the_index_stream_and_the_records(jpeg_tfds):
  data_dir = jpeg_tfds["array_record"]
  cfg = _cfg(data_dir)
  batches = _batches(pipeline.train_dataset(sources.open_source(cfg),
                                            VIEWS, seed=3), 7)  # > 2 epochs
  stream = np.concatenate([b["index"] for b in batches])
  expected = np.concatenate([pipeline.epoch_permutation(3, e, N).numpy()
                             for e in range(3)])
  np.testing.assert_array_equal(stream, expected[:len(stream)])
  records = _record_reader(data_dir)
  spec = pp.spec_from_config(cfg)
  for step in (0, 4):
    batch = batches[step]
    for i in (0, 5, 11):
      record = records[int(batch["index"][i])]
      assert batch["label"][i] == record["label"]
      crop = pp.shared_crop(record["image"], True,
                            pipeline.example_seed(3, step * 12 + i), spec)
      np.testing.assert_allclose(batch["images"]["teacher"][i],
                                 pp.value_range(pp.resize(crop, 24)).numpy(),
                                 atol=1e-6)


def test_array_record_files_on_gcs_give_the_local_batches(jpeg_tfds, gcs):
  """ArrayRecord in a bucket (the emulator) is read by index like on a disk: the
  shard checks pass and the batches are the local files' batches."""
  import uuid  # pylint: disable=import-outside-toplevel
  from funmatch import fileio  # pylint: disable=import-outside-toplevel
  local = jpeg_tfds["array_record"]
  remote = f"{gcs.root}/{uuid.uuid4().hex[:12]}"
  for directory, _, files in os.walk(local):
    for name in files:
      path = os.path.join(directory, name)
      fileio.upload_file(path, f"{remote}/{os.path.relpath(path, local)}")
  info = sources.open_source(_cfg(remote))
  assert info.access == "array_record" and info.num_examples == N
  _assert_batches_equal(_batches(pipeline.train_dataset(sources.open_source(_cfg(remote)),
                                                        VIEWS, seed=3), 2),
                        _batches(pipeline.train_dataset(sources.open_source(_cfg(local)),
                                                        VIEWS, seed=3), 2))


def test_index_names_the_same_example_in_every_mode(jpeg_tfds):
  """Index i is the same record from ArrayRecord, memory or TFRecord order, so
  a run may switch between cache_raw and ArrayRecord and keep its batches."""
  from_files = _batches(pipeline.train_dataset(
      sources.open_source(_cfg(jpeg_tfds["array_record"])), VIEWS, seed=5, start_step=2), 3)
  for data_dir in (jpeg_tfds["array_record"], jpeg_tfds["tfrecord"]):
    in_memory = _batches(pipeline.train_dataset(
        sources.open_source(_cfg(data_dir, cache_raw=True)), VIEWS, seed=5, start_step=2), 3)
    _assert_batches_equal(in_memory, from_files)
  streamed_names = [ex["file_name"] for ex in tfds.builder(
      testdata.NAME, data_dir=jpeg_tfds["tfrecord"]).as_dataset(
          split="train", shuffle_files=False).as_numpy_iterator()]
  records = _record_reader(jpeg_tfds["array_record"])
  assert [records[i]["file_name"] for i in range(N)] == streamed_names


# ---------------------------------------------------------------------------
# (b) exact resume, (c) host-count change.


def test_start_step_gives_exactly_the_uninterrupted_batches(jpeg_tfds):
  cfg = _cfg(jpeg_tfds["array_record"])  # 40 % 12 != 0: batches span epochs
  reference = _batches(pipeline.train_dataset(sources.open_source(cfg), VIEWS, seed=7), 9)
  for step in (1, 3, 6):
    resumed = _batches(pipeline.train_dataset(sources.open_source(cfg),
                                              VIEWS, seed=7, start_step=step),
                       9 - step)
    _assert_batches_equal(resumed, reference[step:])


def test_two_hosts_together_give_the_one_host_batch(jpeg_tfds):
  cfg = _cfg(jpeg_tfds["array_record"])
  for start_step in (0, 5):
    whole = _batches(pipeline.train_dataset(sources.open_source(cfg), VIEWS, seed=2,
                                            start_step=start_step), 3)
    hosts = [_batches(pipeline.train_dataset(
        sources.open_source(cfg), VIEWS, seed=2, start_step=start_step, process_index=p,
        process_count=2), 3) for p in range(2)]
    for k in range(3):
      assert len(hosts[0][k]["index"]) == 6
      joined = {"index": np.concatenate([h[k]["index"] for h in hosts]),
                "label": np.concatenate([h[k]["label"] for h in hosts]),
                "images": {name: np.concatenate([h[k]["images"][name]
                                                 for h in hosts])
                           for name in VIEWS}}
      _assert_batches_equal([joined], [whole[k]])


def test_sliced_split_reads_its_own_records(jpeg_tfds):
  data_dir = jpeg_tfds["array_record"]
  everything = _record_reader(data_dir)
  data = sources.open_source(_cfg(data_dir, split="train[10:]"))
  assert data.num_examples == N - 10
  records = _record_reader(data_dir, "train[10:]")
  for i in (0, 17, N - 11):
    assert records[i]["file_name"] == everything[i + 10]["file_name"]
  batch = _batches(pipeline.train_dataset(
      sources.open_source(_cfg(data_dir, split="train[10:]")), VIEWS, seed=0), 1)[0]
  assert batch["index"].max() < N - 10


# ---------------------------------------------------------------------------
# Eval.


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_reads_every_example_once_in_split_order(jpeg_tfds, process_count):
  cfg = _cfg(jpeg_tfds["array_record"], split="test", batch_size=4)
  streamed = _cfg(jpeg_tfds["tfrecord"], split="test", batch_size=4)
  indices, images, counts = [], [], set()
  for p in range(process_count):
    ds, num_examples, num_batches = pipeline.eval_dataset(
        sources.open_source(cfg), VIEWS, process_index=p, process_count=process_count)
    batches = list(ds.as_numpy_iterator())
    assert num_examples == testdata.NUM_TEST and len(batches) == num_batches
    counts.add(len(batches))
    for b in batches:
      indices.extend(b["index"][b["mask"]])
      images.extend(b["images"]["teacher"][b["mask"]])
  assert len(counts) == 1
  assert indices == list(range(testdata.NUM_TEST))
  ds, _, _ = pipeline.eval_dataset(sources.open_source(streamed), VIEWS)
  expected = np.concatenate([b["images"]["teacher"][b["mask"]]
                             for b in ds.as_numpy_iterator()])
  np.testing.assert_array_equal(np.stack(images), expected)


# ---------------------------------------------------------------------------
# (d) streaming.


def test_streaming_still_works_and_says_resume_is_not_exact(jpeg_tfds, caplog):
  for data_dir, kwargs in ((jpeg_tfds["tfrecord"], {}),
                           (jpeg_tfds["both"], {"random_access": False})):
    cfg = _cfg(data_dir, **kwargs)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="funmatch"):
      batches = _batches(pipeline.train_dataset(sources.open_source(cfg),
                                                VIEWS, seed=0), 4)
    assert "resume is NOT exact" in caplog.text and "TFRecord" in caplog.text
    assert all(np.all(b["index"] == -1) for b in batches)
    assert batches[0]["images"]["teacher"].shape == (12, 24, 24, 3)
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="funmatch"):
    pipeline.train_dataset(sources.open_source(_cfg(jpeg_tfds["both"])), VIEWS, seed=0)
  assert "ArrayRecord files read by index" in caplog.text
  assert "resume is exact" in caplog.text


# ---------------------------------------------------------------------------
# (e) bad input: one line naming the file, nothing written.


def _listing(root):
  return sorted((path, os.path.getsize(os.path.join(path, f)))
                for path, _, files in os.walk(root) for f in files)


def _one_line_error(call, match):
  with pytest.raises(UserError, match=match) as error:
    call()
  assert "\n" not in str(error.value)
  return str(error.value)


def test_forced_modes_the_files_cannot_serve(jpeg_tfds):
  before = _listing(os.path.dirname(jpeg_tfds["tfrecord"]))
  message = _one_line_error(
      lambda: sources.open_source(_cfg(jpeg_tfds["tfrecord"], random_access=True)),
      "input.random_access=True")
  assert testdata.version_dir(jpeg_tfds["tfrecord"]) in message
  assert "--file_format=array_record" in message
  _one_line_error(lambda: sources.open_source(
      _cfg(jpeg_tfds["array_record"], random_access=False), where="evals.val"),
                  "evals.val.random_access=False.*cannot stream")
  _one_line_error(lambda: sources.open_source(
      _cfg(jpeg_tfds["array_record"], random_access="yes")), "True, False or None")
  _one_line_error(lambda: sources.open_source(
      _cfg(jpeg_tfds["both"], random_access=False, cache_raw=True)), "drop one")
  _one_line_error(lambda: sources.open_source(
      ConfigDict(dict(source="digits", random_access=False))), "only TFDS can stream")
  assert _listing(os.path.dirname(jpeg_tfds["tfrecord"])) == before


def test_forced_random_access_on_tfrecords_fails_before_the_workdir(
    jpeg_tfds, tmp_path, capsys):
  from funmatch.train import cli  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "run"
  code, _, err = run_cli(cli.distill_main, [
      "--config", repo_path("configs", "digits.py"), "--workdir", str(workdir),
      "--config.input.source=tfds", f"--config.input.name={testdata.NAME}",
      f"--config.input.data_dir={jpeg_tfds['tfrecord']}",
      "--config.input.random_access=True"], capsys)
  assert code == 2 and not workdir.exists()
  lines = err.strip().splitlines()
  assert lines[-1].startswith("funmatch: error: input.random_access=True")


@pytest.mark.parametrize("damage", ["missing", "truncated", "empty"])
def test_missing_or_truncated_shard_is_named_up_front(jpeg_tfds, tmp_path, damage):
  data_dir = testdata.copy_dataset(jpeg_tfds["array_record"], str(tmp_path / "d"))
  shard = testdata.shard_path(data_dir, "array_record", 1)
  if damage == "missing":
    os.remove(shard)
  else:
    with open(shard, "rb") as f:
      content = f.read()
    with open(shard, "wb") as f:
      f.write(content[:len(content) // 2] if damage == "truncated" else b"")
  before = _listing(data_dir)
  message = _one_line_error(lambda: sources.open_source(_cfg(data_dir)),
                            f"shard {shard} ")
  assert "tfds build" in message and "--file_format=array_record" in message
  assert _listing(data_dir) == before
  # The other split's shards are intact: it still reads.
  assert sources.open_source(_cfg(data_dir, split="test")).num_examples == 13


def test_missing_tfrecord_shard_is_named_up_front(jpeg_tfds, tmp_path):
  data_dir = testdata.copy_dataset(jpeg_tfds["tfrecord"], str(tmp_path / "d"))
  shard = testdata.shard_path(data_dir, "tfrecord", 2)
  os.remove(shard)
  _one_line_error(lambda: sources.open_source(_cfg(data_dir)),
                  f"shard {shard} is missing")


def test_garbled_shard_is_named_when_read(jpeg_tfds, tmp_path):
  """A garbled chunk inside a shard passes the cheap up-front check (header and
  index intact) and is caught by its checksum when read."""
  data_dir = testdata.copy_dataset(jpeg_tfds["array_record"], str(tmp_path / "d"))
  shard = testdata.shard_path(data_dir, "array_record", 1)
  with open(shard, "r+b") as f:
    f.seek(100)
    f.write(bytes(range(200)))
  cfg = _cfg(data_dir)
  assert sources.open_source(cfg).access == "array_record"
  evals = pipeline.make_eval_iterator(sources.open_source(cfg),
                                      VIEWS, sharding=_sharding())
  message = _one_line_error(lambda: list(evals), f"ArrayRecord shard {shard} is "
                            "damaged")
  assert "Function" not in message and "Iterator::" not in message
  assert "tfds build" in message
  batches = pipeline.make_train_iterator(sources.open_source(cfg),
                                         VIEWS, seed=0, start_step=0,
                                         sharding=_sharding())
  _one_line_error(lambda: [next(batches) for _ in range(4)],  # all of epoch 0
                  f"ArrayRecord shard {shard} is damaged")


def test_reopening_a_split_keeps_the_open_files_flat(jpeg_tfds):
  if not os.path.isdir("/proc/self/fd"):
    pytest.skip("needs /proc/self/fd")
  cfg = _cfg(jpeg_tfds["array_record"])
  _batches(pipeline.train_dataset(sources.open_source(cfg), VIEWS, seed=0), 4)
  before = len(os.listdir("/proc/self/fd"))
  for seed in range(3):
    _batches(pipeline.train_dataset(sources.open_source(cfg), VIEWS, seed=seed), 4)
    test_split = sources.open_source(_cfg(jpeg_tfds["array_record"], split="test"))
    list(pipeline.eval_dataset(test_split, VIEWS)[0].as_numpy_iterator())
  # The test split's shards open once (+3); nothing grows with each dataset.
  assert len(os.listdir("/proc/self/fd")) <= before + testdata.NUM_SHARDS
