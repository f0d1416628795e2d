"""Published weights by name: the paper's teachers and students, BiT upstream.

A model's `init` may be one of these names instead of a path. Each name maps to
its public file (the gs:// path; the https mirror of the same bucket), the timm
hub name where timm publishes the same weights, and the architecture it needs.
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

from funmatch import cache
from funmatch.errors import UserError
from funmatch.models import formats

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


def _paper(name, path, classes, res, description, hub="", depth=152, width=2):
  # The paper trained every model with big_vision's bit_paper, whose stem
  # max-pool pads with -inf (timm's ports of the same weights pad with zeros).
  return Entry(name, f"distill/{path}", "bit",
               {"depth": depth, "width": width, "stem_pool_padding": "neg_inf"},
               classes, res, description, hub)


def _bit(upstream: str, depth: int, width: int, ilsvrc: bool) -> Entry:
  # Official BiT (big_transfer) code pads the stem max-pool with zeros.
  name = f"BiT-{upstream}-R{depth}x{width}" + ("-ILSVRC2012" if ilsvrc else "")
  hub = ""
  if upstream == "M":
    hub = f"resnetv2_{depth}x{width}_bit.goog_in21k" + ("_ft_in1k" if ilsvrc else "")
  if ilsvrc:
    classes, res = 1000, (480 if (depth, width) == (152, 4) else 448)
    what = "BiT-M (ImageNet-21k) fine-tuned on ImageNet-1k"
  else:
    classes, res = (21843 if upstream == "M" else 1000), 224
    what = ("BiT-M upstream (ImageNet-21k)" if upstream == "M"
            else "BiT-S upstream (ImageNet-1k)")
  return Entry(name, f"{name}.npz", "bit",
               {"depth": depth, "width": width, "stem_pool_padding": "zeros"},
               classes, res, f"{what}, R{depth}x{width}", hub)


_SIZES = ((50, 1), (50, 3), (101, 1), (101, 3), (152, 2), (152, 4))

ENTRIES: Dict[str, Entry] = {e.name: e for e in (
    # The paper's students (Beyer et al. 2022, Table 1).
    _paper("FunMatch-224px-i1k82.8", "R50x1_224.npz", 1000, 224,
           "BiT-R50x1 student distilled on ImageNet-1k at 224px, 82.8% top-1",
           hub="resnetv2_50x1_bit.goog_distilled_in1k", depth=50, width=1),
    _paper("FunMatch-160px-i1k80.5", "R50x1_160.npz", 1000, 160,
           "BiT-R50x1 student distilled on ImageNet-1k at 160px, 80.5% top-1",
           depth=50, width=1),
    # The paper's teachers: BiT-M R152x2 fine-tuned per dataset.
    _paper("FunMatch-teacher-224px-i1k", "R152x2_T_224.npz", 1000, 224,
           "BiT-M R152x2 teacher, ImageNet-1k, 224px (inception crop), 83.0%",
           hub="resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k"),
    _paper("FunMatch-teacher-384px-i1k", "R152x2_T_384.npz", 1000, 384,
           "BiT-M R152x2 teacher, ImageNet-1k, 384px (resize crop), 84.3%",
           hub="resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k_384"),
    _paper("FunMatch-teacher-128px-flowers", "R152x2_T_flowers128.npz", 102,
           128, "BiT-M R152x2 teacher, Oxford Flowers-102, 128px"),
    _paper("FunMatch-teacher-128px-pet", "R152x2_T_pet128.npz", 37, 128,
           "BiT-M R152x2 teacher, Oxford-IIIT Pets, 128px"),
    _paper("FunMatch-teacher-128px-food", "R152x2_T_food128.npz", 101, 128,
           "BiT-M R152x2 teacher, Food-101, 128px"),
    _paper("FunMatch-teacher-128px-sun", "R152x2_T_sun128.npz", 397, 128,
           "BiT-M R152x2 teacher, SUN397, 128px"),
    # BiT upstream (Kolesnikov et al. 2020) and its ImageNet-1k fine-tunes.
    *(_bit(up, d, w, False) for up in ("S", "M") for d, w in _SIZES),
    *(_bit("M", d, w, True) for d, w in _SIZES),
)}


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
          and not init.lower().endswith(formats.READ_SUFFIXES)
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
  actual = formats.sha256(path)
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
      formats.peek(partial, kind=formats.kind_of(target))
    except UserError:
      raise UserError(f"the download of {url} is not a whole weights file; run "
                      f"funmatch-fetch {found.name} again") from None
    os.replace(partial, target)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  progress(f"{found.name}: saved {target} (sha256 {formats.sha256(target)})")
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
                 f"{found.gcs_path}{hub}")
  lines.append(f"cache: {directory()}")
  return "\n".join(lines)
