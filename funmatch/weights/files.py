"""Weight files in and out, never running code from a file.

Reads `.npz` (numpy, `allow_pickle=False`), `.safetensors` and PyTorch
`.pth` / `.pt` / `.bin` (`torch.load(weights_only=True)`, torch imported only
then) into flat `{name: numpy array}` dicts plus funmatch's metadata. A file
that holds pickled Python objects is refused: unpickling can run arbitrary
code, and a restricted unpickler that says no is the only safe answer.

Writes `.npz` and `.safetensors`, atomically (a temporary file beside the
target, then a rename; on gs:// one upload), so a reader never sees half a file.
Paths may be gs:// URLs: reads go through a local copy (funmatch.fileio).

Metadata is one JSON object (see `weights.layouts.save_params` for its keys):
  .safetensors  the header's string metadata, key `funmatch` (plus
                `format: pt`, the key timm / Hugging Face writers add);
  .npz          a 0-d unicode array under the reserved name `__funmatch__`
                (a string array, so `allow_pickle=False` still reads it, and
                tools that look weights up by name ignore it).
"""

import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from funmatch import fileio
from funmatch.errors import UserError

METADATA_KEY = "__funmatch__"  # npz member holding the metadata JSON
SAFETENSORS_METADATA_KEY = "funmatch"
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
READ_SUFFIXES = (".npz", ".safetensors") + TORCH_SUFFIXES
_TORCH_EXTRA = 'pip install "funmatch[torch]"'
_USE_SAFETENSORS = ("re-save its weights as .safetensors (e.g. "
                    "safetensors.torch.save_file(model.state_dict(), ...))")


@dataclasses.dataclass
class Weights:
  """What a weights file holds: flat arrays, funmatch metadata, its kind.

  `arrays` is None when only the names were read (`peek`).
  """
  path: str
  arrays: Optional[Dict[str, np.ndarray]]
  metadata: Dict[str, Any]
  kind: str  # 'npz' | 'safetensors' | 'torch'
  names: Tuple[str, ...] = ()

  def __post_init__(self):
    if self.arrays is not None:
      self.names = tuple(self.arrays)


def _reason(error: BaseException) -> str:
  """The exception as a short single line, for inclusion in a UserError."""
  return " ".join(f"{type(error).__name__}: {error}".split())[:160]


def _pickled(path: str, why: str) -> UserError:
  return UserError(
      f"refusing {path}: it holds pickled Python objects ({why}), which could "
      f"run code when loaded; {_USE_SAFETENSORS} or as an .npz of plain "
      "arrays.")


def kind_of(path: str) -> str:
  """'npz' | 'safetensors' | 'torch' from the file name."""
  lower = path.lower()
  if lower.endswith(".npz"):
    return "npz"
  if lower.endswith(".safetensors"):
    return "safetensors"
  if lower.endswith(TORCH_SUFFIXES):
    return "torch"
  raise UserError(f"{path}: unknown weights file type; use one of "
                  f"{', '.join(READ_SUFFIXES)}.")


def read(path: str, kind: str = "") -> Weights:
  """Reads a weights file; any problem is a one-line UserError naming it.

  `kind` ('npz' | 'safetensors' | 'torch') overrides the file name's suffix.
  """
  kind = kind or kind_of(path)
  if not fileio.isfile(path):
    raise UserError(f"weights file {path} does not exist; check the path.")
  reader = {"npz": _read_npz, "safetensors": _read_safetensors,
            "torch": _read_torch}[kind]
  arrays, metadata = _on_local_copy(path, reader)
  if not arrays:
    raise UserError(f"weights file {path} holds no arrays; re-download or "
                    "re-export it.")
  return Weights(path, arrays, metadata, kind)


def peek(path: str, kind: str = "") -> Weights:
  """The names and metadata of a file without reading its arrays.

  npz and safetensors keep a directory of their contents, so this is cheap;
  a PyTorch file has to be read whole. `kind` overrides the suffix.
  """
  kind = kind or kind_of(path)
  if kind == "torch" or not fileio.isfile(path):
    return peek_by_reading(path, kind)
  weights = _on_local_copy(path, lambda local: _peek_local(local, kind))
  weights.path = path
  return weights


def _on_local_copy(path: str, read):
  """read(local path) on `path` or its download; messages name `path`."""
  local = fileio.local_copy(path)
  try:
    return read(local)
  except UserError as e:
    if local == path:
      raise
    raise UserError(str(e).replace(local, path)) from None


def _peek_local(path: str, kind: str) -> Weights:
  if kind == "safetensors":
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    try:
      with safe_open(path, framework="np") as f:
        header, names = f.metadata() or {}, tuple(f.keys())
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"weights file {path} is not a valid .safetensors "
                      f"({_reason(e)}); re-download or re-export it.") \
          from None
    metadata = {}
    if SAFETENSORS_METADATA_KEY in header:
      metadata = _parse_metadata(path, header[SAFETENSORS_METADATA_KEY])
    return Weights(path, None, metadata, kind, names)
  try:
    with np.load(path, allow_pickle=False) as archive:
      names = tuple(archive.files)
      text = str(archive[METADATA_KEY]) if METADATA_KEY in names else ""
    pickled = _object_member(path)
  except Exception:  # pylint: disable=broad-except
    return peek_by_reading(path, kind)
  if pickled:
    raise _pickled(path, f"array {pickled!r} has dtype object")
  metadata = _parse_metadata(path, text) if text else {}
  return Weights(path, None, metadata, kind,
                 tuple(n for n in names if n != METADATA_KEY))


def _object_member(path: str) -> str:
  """The first member of an .npz whose dtype holds Python objects ('' if none).

  Reads only the .npy headers, so a peek refuses a pickle as `read` would.
  """
  import zipfile  # pylint: disable=import-outside-toplevel
  readers = {(1, 0): np.lib.format.read_array_header_1_0,
             (2, 0): np.lib.format.read_array_header_2_0}
  with zipfile.ZipFile(path) as archive:
    for info in archive.infolist():
      with archive.open(info) as member:
        reader = readers.get(np.lib.format.read_magic(member))
        if reader is None:
          raise ValueError("an .npy header version this check does not know")
        if reader(member)[2].hasobject:
          return info.filename[:-len(".npy")]
  return ""


def peek_by_reading(path: str, kind: str = "") -> Weights:
  """`peek` the slow way, so a damaged file gets `read`'s exact error."""
  weights = read(path, kind)
  return Weights(path, None, weights.metadata, weights.kind, weights.names)


def read_metadata(path: str) -> Dict[str, Any]:
  """Only the funmatch metadata of a file ({} when it has none)."""
  return peek(path).metadata


def _parse_metadata(path: str, text: str) -> Dict[str, Any]:
  try:
    metadata = json.loads(text)
  except ValueError as e:
    raise UserError(f"weights file {path}: its funmatch metadata is not "
                    f"valid JSON ({_reason(e)}); re-export it.") from None
  if not isinstance(metadata, dict):
    raise UserError(f"weights file {path}: its funmatch metadata is not a "
                    "JSON object; re-export it.")
  return metadata


def _looks_pickled(path: str) -> bool:
  """Whether a file starts like a pickle (protocol 2-5 header)."""
  with open(path, "rb") as f:
    head = f.read(2)
  return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _read_npz(path: str):
  try:
    archive = np.load(path, allow_pickle=False)
  except ValueError as e:
    # numpy calls anything neither zip nor .npy "pickled data".
    if "pickle" in str(e) and _looks_pickled(path):
      raise _pickled(path, "a pickle, not an .npz") from None
    raise UserError(f"weights file {path} is not a valid .npz "
                    f"({_reason(e)}); re-download or re-export it.") from None
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"weights file {path} is not a valid .npz "
                    f"({_reason(e)}); re-download or re-export it.") from None
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise UserError(f"weights file {path} is not a valid .npz (a single "
                    ".npy array, not an archive of named arrays); re-export "
                    "it.")
  arrays = {}
  with archive:
    for name in archive.files:
      try:
        arrays[name] = np.asarray(archive[name])
      except ValueError as e:
        if "allow_pickle" in str(e):
          raise _pickled(path, f"array {name!r} has dtype object") from None
        raise UserError(f"weights file {path}: array {name!r} is damaged "
                        f"({_reason(e)}); re-download or re-export it.") \
            from None
      except Exception as e:  # pylint: disable=broad-except
        # Truncated members surface here (zlib/zip/EOF errors).
        raise UserError(f"weights file {path}: array {name!r} is damaged "
                        f"({_reason(e)}); re-download or re-export it.") \
            from None
  metadata = {}
  if METADATA_KEY in arrays:
    metadata = _parse_metadata(path, str(arrays.pop(METADATA_KEY)))
  return arrays, metadata


def _read_safetensors(path: str):
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  try:
    with safe_open(path, framework="np") as f:
      header = f.metadata() or {}
      arrays = {name: f.get_tensor(name) for name in f.keys()}
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"weights file {path} is not a valid .safetensors "
                    f"({_reason(e)}); re-download or re-export it.") from None
  metadata = {}
  if SAFETENSORS_METADATA_KEY in header:
    metadata = _parse_metadata(path, header[SAFETENSORS_METADATA_KEY])
  return arrays, metadata


def _import_torch(path: str):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError(f"reading {path} (a PyTorch file) needs torch: "
                    f"{_TORCH_EXTRA}, or convert it to .safetensors.") from None
  return torch


def _state_dict(loaded: Any, torch) -> Mapping[str, Any]:
  """The tensors of a torch.load result: a state dict or a wrapper of one."""
  if isinstance(loaded, Mapping):
    for key in ("state_dict", "model", "state_dict_ema"):
      if isinstance(loaded.get(key), Mapping):
        return _state_dict(loaded[key], torch)
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
  return {}


def _read_torch(path: str):
  torch = _import_torch(path)
  try:
    # weights_only: a restricted unpickler that only builds tensors and
    # containers; anything else (a class, a __reduce__ call) is refused.
    loaded = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    # The restricted unpickler names the class or function it refused.
    if "Unsupported global" in text or "Unsupported class" in text:
      raise _pickled(path, "torch.load(weights_only=True) refused it") \
          from None
    # Its other refusals are long advice texts; the first line is enough.
    reason = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
    raise UserError(f"weights file {path} is not a valid PyTorch file "
                    f"({reason[:160]}); re-download or re-export it.") \
        from None
  tensors = _state_dict(loaded, torch)
  prefix = "module."  # torch.nn.DataParallel wraps every name
  if tensors and all(name.startswith(prefix) for name in tensors):
    tensors = {name[len(prefix):]: t for name, t in tensors.items()}
  arrays = {}
  for name, tensor in tensors.items():
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
      tensor = tensor.float()
    arrays[name] = tensor.numpy()
  return arrays, {}


def sha256(path: str) -> str:
  """The hex SHA-256 of a file's bytes (what `init_sha256` is checked against)."""
  digest = hashlib.sha256()
  with fileio.open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _atomic_write(path: str, write) -> str:
  """Runs write(tmp_path), then renames tmp_path to path (uploads it on gs://)."""
  if fileio.is_remote(path):
    with tempfile.TemporaryDirectory(prefix="funmatch-export-") as directory:
      local = os.path.join(directory, fileio.basename(path))
      write(local)
      fileio.upload_file(local, path)
    return path
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  suffix = os.path.splitext(path)[1]
  fd, tmp_path = tempfile.mkstemp(dir=directory, suffix=".tmp" + suffix)
  os.close(fd)
  try:
    write(tmp_path)
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise
  return path


def write_npz(path: str, arrays: Mapping[str, np.ndarray],
              metadata: Mapping[str, Any]) -> str:
  """Writes arrays (+ metadata under `__funmatch__`) as an .npz; returns path.

  Empty metadata writes no `__funmatch__` member.
  """
  if METADATA_KEY in arrays:
    raise ValueError(f"{METADATA_KEY} is reserved for metadata")
  members = {name: np.asarray(value) for name, value in arrays.items()}
  if metadata:  # Without, the file holds exactly the model's arrays.
    members[METADATA_KEY] = np.array(json.dumps(dict(metadata),
                                                sort_keys=True))

  def write(tmp_path):
    with open(tmp_path, "wb") as f:
      np.savez(f, **members)
  return _atomic_write(path, write)


def write_safetensors(path: str, arrays: Mapping[str, np.ndarray],
                      metadata: Mapping[str, Any]) -> str:
  """Writes arrays (+ metadata) as a .safetensors file; returns path."""
  # pylint: disable-next=import-outside-toplevel
  from safetensors.numpy import save_file
  tensors = {name: np.ascontiguousarray(value)
             for name, value in arrays.items()}
  header = {"format": "pt",
            SAFETENSORS_METADATA_KEY: json.dumps(dict(metadata),
                                                 sort_keys=True)}
  return _atomic_write(path, lambda tmp: save_file(tensors, tmp, header))
