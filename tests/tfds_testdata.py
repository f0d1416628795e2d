"""A small TFDS dataset of JPEG files, prepared offline in every file format.

The builder class is defined inside `skip_registration()`, so it never enters
TFDS's global registry: funmatch reads the prepared files from data_dir alone,
exactly as it reads a user's own dataset, and nothing leaks between tests.
"""
import json
import os
import shutil

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NAME = "funmatch_jpeg_records"
CLASSES = ("cat", "dog", "fox")
SIZES = ((36, 48), (48, 36), (40, 40), (30, 52))  # (height, width)
NUM_TRAIN, NUM_TEST = 40, 13
NUM_SHARDS = 3


def file_name(example_id: int) -> str:
  return f"{CLASSES[example_id % 3]}/{example_id:03d}.jpg"


def write_jpegs(root: str, count: int, first_id: int = 0) -> None:
  """Smooth random pictures (real crops and flips differ), a few sizes."""
  for example_id in range(first_id, first_id + count):
    rng = np.random.default_rng(example_id)
    height, width = SIZES[example_id % len(SIZES)]
    coarse = rng.integers(0, 256, (4, 5, 3)).astype(np.uint8)
    picture = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
    path = os.path.join(root, file_name(example_id))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    picture.save(path, "JPEG", quality=90)


def builder_class(image_dir: str):
  """A GeneratorBasedBuilder over the JPEGs in image_dir (no download)."""
  with tfds.core.registered.skip_registration():

    class FunmatchJpegRecords(tfds.core.GeneratorBasedBuilder):
      """JPEG files; label = id % 3; 'file_name' names each example."""

      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3),
                                             encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=CLASSES),
                "file_name": tfds.features.Text(),
            }))

      def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        return {"train": self._generate_examples(0, NUM_TRAIN),
                "test": self._generate_examples(NUM_TRAIN, NUM_TEST)}

      def _generate_examples(self, first_id, count):
        for example_id in range(first_id, first_id + count):
          name = file_name(example_id)
          yield name, {"image": os.path.join(image_dir, name),
                       "label": example_id % 3, "file_name": name}

  return FunmatchJpegRecords


def prepare(image_dir: str, data_dir: str, file_format: str) -> str:
  """Prepares the dataset in data_dir in one file format; returns data_dir."""
  config = tfds.download.DownloadConfig(num_shards=NUM_SHARDS,
                                        try_download_gcs=False)
  builder_class(image_dir)(data_dir=data_dir, file_format=file_format
                           ).download_and_prepare(download_config=config)
  return data_dir


def version_dir(data_dir: str) -> str:
  return os.path.join(data_dir, NAME, "1.0.0")


def shard_path(data_dir: str, file_format: str, index: int, split: str = "train"
               ) -> str:
  return os.path.join(version_dir(data_dir), f"{NAME}-{split}.{file_format}-"
                      f"{index:05d}-of-{NUM_SHARDS:05d}")


def merge_formats(tfrecord_dir: str, array_record_dir: str, data_dir: str) -> str:
  """Both formats in one dataset dir, as `tfds convert_format` leaves it."""
  shutil.copytree(tfrecord_dir, data_dir)
  source = version_dir(array_record_dir)
  for name in os.listdir(source):
    if ".array_record-" in name:
      shutil.copy(os.path.join(source, name), version_dir(data_dir))
  info_path = os.path.join(version_dir(data_dir), "dataset_info.json")
  with open(info_path) as f:
    info = json.load(f)
  info["alternativeFileFormats"] = ["array_record"]
  with open(info_path, "w") as f:
    json.dump(info, f)
  return data_dir


def prepare_all(root: str) -> dict[str, str]:
  """{'array_record', 'tfrecord', 'both': data_dir} of the same JPEGs."""
  image_dir = os.path.join(root, "jpegs")
  write_jpegs(image_dir, NUM_TRAIN + NUM_TEST)
  dirs = {fmt: prepare(image_dir, os.path.join(root, fmt), fmt)
          for fmt in ("array_record", "tfrecord")}
  dirs["both"] = merge_formats(dirs["tfrecord"], dirs["array_record"],
                               os.path.join(root, "both"))
  dirs["jpegs"] = image_dir
  return dirs


def copy_dataset(data_dir: str, destination: str) -> str:
  """A private copy to damage without touching the shared one."""
  shutil.copytree(data_dir, destination)
  return destination
