"""Opens a configured split: `open_source(cfg, where)` -> a `DataSource`.

The one place a config section becomes a source. It validates the whole
section (source fields and the preprocessing fields the pipeline will read)
and describes the split from metadata only (file listings, TFDS dataset_info,
image headers, shard indexes), never building a tf.data pipeline and never
downloading, so the trainer can reject a bad config before touching the
workdir. A run opens each configured split once (train/build.py's data
stage) and hands the object to the pipeline and the evaluator.

The kinds: funmatch/data/digits.py, folder.py and tfds_source.py; the object
they make: funmatch/data/source.py.
"""

from typing import Any

from funmatch.data import digits as digits_lib
from funmatch.data import folder
from funmatch.data import preprocess
from funmatch.data import tfds_source
from funmatch.data.source import KINDS, DataSource
from funmatch.errors import UserError

# Kept under their old names for callers that want the toy data itself.
digits = digits_lib.digits
digits_split_indices = digits_lib.split_indices
check_image_file = folder.check_image_file


def source_type(cfg: Any, where: str = "input") -> str:
  source = cfg.get("source", None)
  if source not in KINDS:
    raise UserError(f"{where}.source={source!r} is unknown; use one of {KINDS}")
  return source


def check_batch_size(cfg: Any, where: str = "input") -> int:
  batch_size = cfg.get("batch_size", 512)
  if (not isinstance(batch_size, int) or isinstance(batch_size, bool)
      or batch_size <= 0):
    raise UserError(f"{where}.batch_size={batch_size!r} must be a positive integer")
  return batch_size


def check_settings(cfg: Any, where: str = "input") -> None:
  """UserError for a bad batch size, preprocessing field or shuffle buffer."""
  check_batch_size(cfg, where)
  preprocess.spec_from_config(cfg, where)
  shuffle_buffer = cfg.get("shuffle_buffer", 50_000)
  if not isinstance(shuffle_buffer, int) or shuffle_buffer <= 0:
    raise UserError(f"{where}.shuffle_buffer={shuffle_buffer!r} must be a "
                    "positive integer")


def open_source(cfg: Any, where: str = "input") -> DataSource:
  """Validates `cfg` (source + preprocessing fields) and opens its split."""
  kind = source_type(cfg, where)
  check_settings(cfg, where)
  if kind == "tfds":
    return tfds_source.open_tfds(cfg, where)
  if tfds_source.random_access_setting(cfg, where) is False:
    raise UserError(f"{where}.random_access=False: a {kind} source is always read "
                    "by index; only TFDS can stream (remove the setting)")
  if kind == "digits":
    return digits_lib.open_digits(cfg, where)
  return folder.open_folder(cfg, where)
