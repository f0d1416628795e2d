"""Image folders: root/<class>/*.jpg|jpeg|png, one class per sub-folder.

Listings, image checks and cached reads go through funmatch.fileio (paths or
gs:// URLs); reading files while training goes through tf.io.read_file, which
reaches gs:// with TensorFlow's own GCS filesystem.
"""

import concurrent.futures
import io
import os
from typing import Any, Optional, Sequence

import numpy as np

from funmatch import fileio
from funmatch.data.source import ArraySource
from funmatch.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def open_folder(cfg: Any, where: str) -> ArraySource:
  """The folder `cfg.root`, listed and (verify_images=True) checked image by image."""
  root = _root(cfg, where)
  names = _class_names(root, cfg.get("classes", None), where)
  paths, labels = _listing(root, names)
  if cfg.get("verify_images", True):
    verify_images(paths, root)
  cache_raw = cfg.get("cache_raw", False)  # small folders: no disk reads per epoch
  if cache_raw:
    holds, load = "encoded", lambda: (_read_files(paths), labels)
  else:
    holds, load = "paths", lambda: (np.array(paths, dtype=object), labels)
  return ArraySource(
      holds, load, config=cfg, where=where, kind="folder", name=f"folder {root}",
      num_examples=len(labels), num_classes=len(names), class_names=tuple(names),
      access="memory" if cache_raw else "files",
      repair="fix or remove the bad file (verify_images=True names it before training)")


def _root(cfg: Any, where: str) -> str:
  root = cfg.get("root", None)
  if not root or not isinstance(root, str):
    raise UserError(f"{where}.root must be a directory (root/<class>/*.jpg) when "
                    "source='folder'")
  root = fileio.abspath(root)
  if not fileio.isdir(root):
    raise UserError(f"{where}.root={root} is not a directory; expected "
                    "root/<class>/*.jpg|jpeg|png")
  return root


def _class_names(root: str, classes: Optional[Sequence[str]],
                 where: str) -> list[str]:
  found = sorted(name for name, is_dir in fileio.scandir(root)
                 if is_dir and not name.startswith("."))
  if classes is None:
    if not found:
      raise UserError(f"folder {root} has no class sub-folders; expected "
                      "root/<class>/*.jpg|jpeg|png")
    return found
  classes = list(classes)
  missing = [c for c in classes if c not in found]
  extra = [c for c in found if c not in classes]
  if missing or extra or len(set(classes)) != len(classes):
    raise UserError(
        f"{where}.classes does not match the sub-folders of {root} (missing "
        f"folders: {missing}, folders not listed: {extra}); fix the list or the "
        "folders")
  return classes


def _list_images(class_dir: str) -> list[str]:
  return sorted(
      fileio.join(class_dir, name) for name, is_dir in fileio.scandir(class_dir)
      if not is_dir and name.lower().endswith(IMAGE_EXTENSIONS)
      and not name.startswith("."))


def _listing(root: str, names: Sequence[str]) -> tuple[list[str], np.ndarray]:
  """(paths sorted by class then name, int32 labels)."""
  paths, labels = [], []
  for label, name in enumerate(names):
    files = _list_images(fileio.join(root, name))
    if not files:
      raise UserError(f"folder {fileio.join(root, name)} has no .jpg/.jpeg/.png "
                      "images; add images or remove the folder")
    paths.extend(files)
    labels.extend([label] * len(files))
  return paths, np.array(labels, np.int32)


def _read_files(paths: Sequence[str]) -> np.ndarray:
  values = np.empty(len(paths), dtype=object)
  for i, path in enumerate(paths):
    values[i] = fileio.read_bytes(path)
  return values


def check_image_file(path: str) -> Optional[str]:
  """None if `path` is a decodable JPEG/PNG, else the reason it is not.

  Decodes the whole file (catching truncation and corrupt data); JPEGs are
  decoded at 1/8 scale via PIL's draft mode, which still reads every byte of
  the compressed stream but skips most of the pixel work.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    data = fileio.read_bytes(path)  # one read, also from object storage
    if not (data.startswith(_JPEG_MAGIC) or data.startswith(_PNG_MAGIC)):
      return "not a JPEG or PNG file"
    with Image.open(io.BytesIO(data)) as image:
      if image.format == "JPEG":
        image.draft("RGB", (1, 1))
      image.load()
  except Exception as e:  # pylint: disable=broad-except
    return f"{type(e).__name__}: {e}"
  return None


def verify_images(paths: Sequence[str], root: str) -> None:
  """Raises UserError naming the unreadable images among `paths`, if any."""
  # Threads, not cores: the work is mostly waiting for reads.
  workers = min(32, 2 * (os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    results = list(pool.map(check_image_file, paths))
  bad = [(path, why) for path, why in zip(paths, results) if why]
  if bad:
    shown = "; ".join(f"{p} ({why})" for p, why in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise UserError(f"unreadable image in folder {root}: {shown}{more}; "
                    "delete or replace it (or set verify_images=False to skip "
                    "this check)")
