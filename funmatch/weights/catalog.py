"""Published weights by name: the paper's teachers and students, BiT upstream.

A model's `init` may be one of these names instead of a path. Each model file
declares its published names (`WEIGHTS.published`); each name maps to its public
file (the gs:// path; the https mirror of the same bucket) and/or the timm hub
name where timm publishes the same weights, and the architecture it needs.
The file is read from the local cache, `<FUNMATCH_CACHE>/weights/<name><suffix>`
(`funmatch.cache.root()`, default ~/.cache/funmatch):

    funmatch-fetch FunMatch-teacher-224px-i1k      # once, on a machine online
    --config.teacher.init=FunMatch-teacher-224px-i1k

Only `fetch` (the funmatch-fetch command) downloads; resolving a name for
training never touches the network, so a run never downloads by surprise. A
name that is not cached is a one-line error saying how to get the file.
"""

import dataclasses
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, Mapping

from funmatch import cache, models
from funmatch.errors import UserError
from funmatch.weights import files

BUCKET = "bit_models"
# The public https face of gs://bit_models; FUNMATCH_WEIGHTS_MIRROR replaces it
# (an internal mirror, or a file:// directory laid out like the bucket).
MIRROR = "https://storage.googleapis.com"
HUB = "https://huggingface.co/timm/{hub}/resolve/main/model.safetensors"
SOURCES = ("bucket", "hub")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One published file and the model it needs."""
  name: str
  path: str                  # inside the bucket, e.g. 'distill/R50x1_224.npz'
                             # ('': on the timm hub only)
  model: str                 # registry name
  options: Mapping[str, Any]  # depth, width, stem_pool_padding, ...
  num_classes: int
  res: int                   # the resolution it was trained / fine-tuned at
  description: str
  hub: str = ""              # timm's name on the Hugging Face hub, if any
  sha256: str = ""           # known digest of the bucket file, if any

  @property
  def gcs_path(self) -> str:
    return f"gs://{BUCKET}/{self.path}"

  def url(self, source: str = "bucket") -> str:
    if source == "hub":
      return HUB.format(hub=self.hub)
    mirror = os.environ.get("FUNMATCH_WEIGHTS_MIRROR") or MIRROR
    return f"{mirror.rstrip('/')}/{BUCKET}/{self.path}"


def _entries() -> Dict[str, Entry]:
  """Every architecture's published weights (its spec's `published`)."""
  return {published.name: Entry(
      published.name, published.path, model, dict(published.options),
      published.num_classes, published.res, published.description,
      published.hub, published.sha256)
          for model in models.model_names()
          for published in models.weights_spec(model).published}


ENTRIES: Dict[str, Entry] = _entries()


def names() -> tuple:
  return tuple(ENTRIES)


def known(name: str) -> bool:
  return _strip_suffix(name) in ENTRIES


def entry(name: str) -> Entry:
  """The catalog entry of `name`; an unknown name lists the known ones."""
  found = ENTRIES.get(_strip_suffix(name))
  if found is None:
    raise UserError(f"unknown weights name {name!r}; known names: "
                    f"{', '.join(ENTRIES)} (or give a file path or a workdir).")
  return found


def _strip_suffix(name: str) -> str:
  return name[:-len(".npz")] if name.endswith(".npz") else name


def is_name(init: str) -> bool:
  """Whether `init` is meant as a weights name, not a path.

  A catalog name (with or without .npz) is one; so is anything without a
  directory separator or a weights-file suffix, so that a misspelt name gets
  the list of known names rather than 'file not found'.
  """
  if _strip_suffix(init) in ENTRIES:
    return True
  return (os.sep not in init and "/" not in init and "://" not in init
          and not init.lower().endswith(files.READ_SUFFIXES)
          and not init.startswith((".", "~")))


def directory() -> str:
  """Where named weights are cached: <FUNMATCH_CACHE>/weights."""
  return os.path.join(cache.root(), "weights")


def cache_path(name: str, source: str = "bucket") -> str:
  """The cache file of `name` from `source` ('bucket' npz or timm 'hub')."""
  found = entry(name)
  suffix = ".timm.safetensors" if source == "hub" else ".npz"
  return os.path.join(directory(), found.name + suffix)


def resolve(init: str, what: str) -> str:
  """The local file of the weights name `init` (the cache), never downloading.

  Raises a one-line UserError for an unknown name (listing the known ones) or a
  name that is not cached (saying how to get it).
  """
  found = entry(init)
  for source in SOURCES:
    path = cache_path(found.name, source)
    if os.path.isfile(path):
      return path
  if not found.path:  # on the timm hub only
    raise UserError(
        f"{what}.init={init} is not in the weights cache {directory()}; on a "
        f"machine with network run `funmatch-fetch --source hub {found.name}` (it "
        f"downloads {found.url('hub')}) and copy the file to "
        f"{cache_path(found.name, 'hub')}.")
  raise UserError(
      f"{what}.init={init} is not in the weights cache {directory()}; on a "
      f"machine with network run `funmatch-fetch {found.name}` (it downloads "
      f"{found.url()}) and copy the file to {cache_path(found.name)}, or set "
      f"{what}.init={found.gcs_path} (read from Cloud Storage) or a copy of it.")


def check_sha256(path: str, expected: str, what: str, shown: str = "") -> None:
  """The file's SHA-256 must be `expected` (hex, any case); UserError if not.

  `shown` names the file in the message (default: its path).
  """
  expected = expected.strip().lower()
  actual = files.sha256(path)
  if actual != expected:
    raise UserError(f"{shown or path} has sha256 {actual} but {what} is {expected}; "
                    "the file is damaged or not the one meant: download it "
                    "again (funmatch-fetch) or fix the expected digest.")


def fetch(name: str, source: str = "bucket", sha256: str = "",
          force: bool = False,
          progress: Callable[[str], None] = lambda line: None) -> str:
  """Downloads `name` into the cache (if not there yet); returns its path.

  The download goes to a temporary file beside the target, is checked
  (`sha256` if given, else the entry's known digest; then that the file reads
  as weights) and only then renamed into place, so the cache never holds half
  a file. The one place funmatch downloads weights: only funmatch-fetch calls
  it.
  """
  found = entry(name)
  if source not in SOURCES:
    raise UserError(f"unknown source {source!r}; use one of {', '.join(SOURCES)}.")
  if source == "hub" and not found.hub:
    raise UserError(f"{found.name} is not on the timm hub; fetch it from the "
                    "bucket (the default source).")
  if source == "bucket" and not found.path:
    raise UserError(f"{found.name} is on the timm hub only; fetch it with "
                    "--source hub.")
  target = cache_path(found.name, source)
  expected = sha256 or (found.sha256 if source == "bucket" else "")
  if os.path.isfile(target) and not force:
    if expected:
      check_sha256(target, expected, "the expected sha256")
    progress(f"{found.name}: already in the cache at {target}")
    return target
  url = found.url(source)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  fd, partial = tempfile.mkstemp(dir=os.path.dirname(target), suffix=".part")
  try:
    with os.fdopen(fd, "wb") as out:
      progress(f"{found.name}: downloading {url}")
      _download(url, out)
    if expected:
      check_sha256(partial, expected, "the expected sha256", shown=url)
    try:
      files.peek(partial, kind=files.kind_of(target))
    except UserError:
      raise UserError(f"the download of {url} is not a whole weights file; run "
                      f"funmatch-fetch {found.name} again") from None
    os.replace(partial, target)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  progress(f"{found.name}: saved {target} (sha256 {files.sha256(target)})")
  return target


def _download(url: str, out) -> None:
  try:
    with urllib.request.urlopen(url, timeout=60) as response:  # nosec: fixed hosts
      shutil.copyfileobj(response, out, 1 << 20)
  except (urllib.error.URLError, OSError, ValueError) as e:
    reason = getattr(e, "reason", None) or e
    raise UserError(f"cannot download {url} ({reason}); this machine may be "
                    "offline: run funmatch-fetch on one with network and copy "
                    f"{directory()} over.") from None


def table() -> str:
  """Every name with its location and whether it is cached (funmatch-fetch)."""
  width = max(len(name) for name in ENTRIES)
  lines = [f"{'name':<{width}}  cached  location (timm hub name)"]
  for found in ENTRIES.values():
    cached = any(os.path.isfile(cache_path(found.name, s)) for s in SOURCES)
    hub = f" ({found.hub})" if found.hub else ""
    lines.append(f"{found.name:<{width}}  {'yes' if cached else 'no ':<6}  "
                 f"{found.gcs_path if found.path else 'timm hub'}{hub}")
  lines.append(f"cache: {directory()}")
  return "\n".join(lines)
