"""`.npz` weight files: read safely, write atomically, and the flat '/'-joined layout.

Loading never runs code from a file: `np.load(allow_pickle=False)` refuses object
arrays. Models whose flax names already are the official ones (ViT) or that have
no other layout (MobileNetV3) store their params flat: the flax path joined by '/'.
Files are read and written through funmatch.fileio: a path or a gs:// URL.
"""
import re
from typing import Any, Sequence

import flax
import numpy as np

from funmatch import fileio
from funmatch.errors import UserError


def read(path: str) -> dict[str, np.ndarray]:
  """All arrays of an `.npz`, or a one-line UserError naming the path."""
  if not fileio.isfile(path):
    raise UserError(f"weights file not found: {path}; check the path")
  try:
    with fileio.open(path, "rb") as f:  # zip members are read by seeking
      archive = np.load(f, allow_pickle=False)
      if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError("a single .npy array, not an .npz archive")
      with archive:
        return {name: np.asarray(archive[name]) for name in archive.files}
  except Exception as e:  # pylint: disable=broad-except
    # Whatever the parser trips on (bad zip, truncated member, pickles, ...), the
    # cause is the file: say so in one line.
    reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
    raise UserError(f"{path} is not a valid .npz weights file ({reason}); "
                    "re-download or re-export it") from None


def write(path: str, arrays: dict[str, np.ndarray]) -> str:
  """Writes `arrays` to `path` whole or not at all (fileio.atomic_open); returns `path`."""
  with fileio.atomic_open(path, "wb") as f:
    np.savez(f, **arrays)
  return path


def flatten(params: Any) -> dict[str, np.ndarray]:
  """Params as {'a/b/kernel': array}: the flax path joined by '/'."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def mismatch_message(source: str, missing, unexpected, clashes) -> str:
  parts = []
  for label, names in (("missing", missing), ("unexpected", unexpected),
                       ("shape clashes", clashes)):
    if names:
      more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
      parts.append(f"{label} {len(names)}: {', '.join(names[:3])}{more}")
  return (f"{source} does not fit the configured model: {'; '.join(parts)}; "
          "check the model's depth/width/variant/num_classes in the config")


def load_flat(path: str, init_params: Any, dont_load: Sequence[str] = ()) -> Any:
  """Params with the structure of `init_params` from a flat '/'-joined `.npz`.

  Names that fullmatch a `dont_load` regex keep their `init_params` value.
  """
  arrays = read(path)
  init_flat = flatten(init_params)
  skip = [re.compile(p) for p in dont_load]
  skipped = lambda k: any(r.fullmatch(k) for r in skip)
  missing = [k for k in init_flat if k not in arrays and not skipped(k)]
  unexpected = [k for k in arrays if k not in init_flat]
  clashes = [f"{k} {arrays[k].shape} vs {init_flat[k].shape}" for k in init_flat
             if k in arrays and arrays[k].shape != init_flat[k].shape and not skipped(k)]
  if missing or unexpected or clashes:
    raise UserError(mismatch_message(path, missing, unexpected, clashes))
  loaded = {k: (init_flat[k] if skipped(k) else arrays[k]) for k in init_flat}
  return flax.traverse_util.unflatten_dict(
      {tuple(k.split("/")): v for k, v in loaded.items()})
