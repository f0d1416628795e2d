"""Naming layouts of weight files and fitting a file's arrays to a model.

A `Layout` is the map from funmatch's param names ('/'-joined flax paths,
e.g. `block1/unit01/a/group_norm/scale`) to the names and array layouts of
one kind of file (official BiT npz, big_vision, timm, ...). Only that one
direction is written down: loading inverts it over the params the model
actually has, so every file name the model does not produce is, by
construction, a name that does not fit.

Model modules declare their layouts; `load` and `to_arrays` here do the rest,
with the same rules for every model: dont_load patterns keep init values, a
head of another class count keeps the initial head, and any other mismatch
is one line naming the first mismatched name and both shapes.
"""

import dataclasses
import logging
import re
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax
import numpy as np

from funmatch.errors import UserError

Params = Mapping[str, Any]


def _identity(_name: str, value: np.ndarray, *_shape) -> np.ndarray:
  return value


def _no_change(arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  return arrays


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one kind of file names and lays out a model's params.

  Attributes:
    name: short id recorded in metadata ('bit_official', 'timm', ...).
    file_name: funmatch param name -> the name in the file.
    to_file: (param name, value in funmatch layout) -> value as stored.
    to_model: (param name, value as stored, the model's shape) -> value in
      funmatch layout (the shape is None when only the last axis matters).
    prepare: file arrays -> arrays keyed by `file_name`s (e.g. to split a
      fused qkv into its parts, or undo a naming quirk); runs before loading.
    finish: arrays keyed by `file_name`s -> the file's arrays (the inverse of
      prepare, e.g. to fuse q, k, v); runs after `to_file` when saving.
    implies: model options this layout implies (e.g. the stem padding).
  """
  name: str
  file_name: Callable[[str], str]
  to_file: Callable[[str, np.ndarray], np.ndarray] = _identity
  to_model: Callable[[str, np.ndarray, Optional[Tuple[int, ...]]],
                     np.ndarray] = _identity
  prepare: Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]] = (
      _no_change)
  finish: Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]] = (
      _no_change)
  implies: Mapping[str, Any] = dataclasses.field(default_factory=dict)


FUNMATCH = Layout("funmatch", file_name=lambda name: name)


def unwrap(params: Params) -> Tuple[Params, bool]:
  """Accepts the params tree or a variables dict {'params': tree}."""
  if set(params.keys()) == {"params"}:
    return params["params"], True
  return params, False


def flat_params(params: Params) -> Dict[str, Any]:
  """{'a/b/kernel': leaf} of a params tree (or {'params': tree})."""
  tree = flax.core.unfreeze(unwrap(params)[0])
  return flax.traverse_util.flatten_dict(tree, sep="/")


def unflat_params(flat: Mapping[str, Any], wrapped: bool) -> Params:
  tree = flax.traverse_util.unflatten_dict(
      {tuple(name.split("/")): value for name, value in flat.items()})
  return {"params": tree} if wrapped else tree


# Tensor layouts: flax keeps HWIO conv kernels and [in, out] dense kernels,
# PyTorch OIHW and [out, in].


def hwio_to_oihw(kernel: np.ndarray) -> np.ndarray:
  return np.transpose(kernel, (3, 2, 0, 1))


def oihw_to_hwio(weight: np.ndarray) -> np.ndarray:
  return np.transpose(weight, (2, 3, 1, 0))


def fit_shape(value: np.ndarray,
              shape: Tuple[int, ...]) -> Optional[np.ndarray]:
  """`value` reshaped to `shape` if only size-1 dims differ, else None.

  Dropping size-1 dims never reorders elements, so GN scales stored as
  [1, 1, 1, C] or a head kernel stored as [C, K] fit unambiguously, while a
  transposed [K, C] kernel does not.
  """
  if value.shape == tuple(shape):
    return value
  squeeze = lambda s: tuple(d for d in s if d != 1)
  if squeeze(value.shape) == squeeze(shape):
    return value.reshape(shape)
  return None


def compile_patterns(dont_load: Sequence[str], what: str = "dont_load"):
  """Regexes from `dont_load`; a bad one is a UserError naming it."""
  if isinstance(dont_load, str):
    dont_load = (dont_load,)
  patterns = []
  for pattern in dont_load:
    try:
      patterns.append(re.compile(pattern))
    except re.error as e:
      raise UserError(f"{what} pattern {pattern!r} is not a valid regex "
                      f"({e}); fix the pattern.") from None
  return patterns


def to_arrays(params: Params, layout: Layout) -> Dict[str, np.ndarray]:
  """The model's params as `layout`'s file arrays (float32)."""
  arrays = {}
  for name, value in flat_params(params).items():
    arrays[layout.file_name(name)] = np.asarray(
        layout.to_file(name, np.asarray(value, np.float32)))
  return layout.finish(arrays)


def save(path: str, params: Params, layout: Layout,
         metadata: Mapping[str, Any]) -> str:
  """Writes params in `layout` with metadata (.npz or .safetensors by name)."""
  # pylint: disable-next=import-outside-toplevel
  from funmatch.models import formats
  arrays = to_arrays(params, layout)
  write = (formats.write_npz if path.endswith(".npz")
           else formats.write_safetensors)
  return write(path, arrays, {"layout": layout.name, **metadata})


def _shape(value) -> list:
  return list(np.shape(value))


def _file_shape(layout: Layout, name: str, model_shape) -> list:
  """A model shape as the file would store it (for error messages)."""
  return _shape(layout.to_file(name, np.zeros(model_shape, np.float32)))


def _natural(name: str):
  """Sort key with digit runs compared as numbers (blocks.2 < blocks.10)."""
  return [int(part) if part.isdigit() else part
          for part in re.split(r"(\d+)", name)]


def _first(items: Sequence[str], count: int = 3) -> str:
  shown = ", ".join(items[:count])
  return shown + (f", ... ({len(items) - count} more)" if len(items) > count
                  else "")


def _head_in_use(source, arrays, layout, init_flat, head_kernel,
                 strict: bool) -> bool:
  """Whether the file's head should be loaded; logs why when not.

  strict (a teacher, whose head is its function): a file without a head,
  or with another class count, is an error instead.
  """
  file_kernel = layout.file_name(head_kernel)
  if head_kernel not in init_flat:
    if file_kernel in arrays:
      logging.info("%s: the model has no head; ignoring the file's head.",
                   source)
    return False
  model_classes = np.shape(init_flat[head_kernel])[-1]
  if file_kernel not in arrays:
    if strict:
      raise UserError(f"weights file {source} has no classifier head "
                      f"({file_kernel}) but the model needs one with "
                      f"{model_classes} classes; use weights trained on "
                      "this dataset (e.g. a funmatch-train run).")
    logging.info("%s has no head; keeping the initial head.", source)
    return False
  file_classes = np.shape(layout.to_model(head_kernel, arrays[file_kernel],
                                          None))[-1]
  if file_classes != model_classes:
    if strict:
      raise UserError(f"weights file {source} has a head with "
                      f"{file_classes} classes but the model has "
                      f"{model_classes}; use weights trained on this dataset"
                      " (e.g. a funmatch-train run) or a dataset with the "
                      "same classes.")
    logging.info("%s: head has %d classes, model %d; keeping the initial "
                 "head.", source, file_classes, model_classes)
    return False
  return True


def load(source: str, arrays: Mapping[str, np.ndarray], init_params: Params,
         layout: Layout, *, head: Sequence[str] = (),
         skip: Callable[[str], bool] = lambda name: False,
         strict_head: bool = False, model_description: str = "",
         hint: str = "") -> Params:
  """Fits a file's arrays, named per `layout`, to the params of a model.

  Args:
    source: the file (for messages).
    arrays: the file's arrays.
    init_params: params of the target model; fix the structure of the result
      and supply every value not loaded.
    layout: how the file names and lays out the params.
    head: the model's head param names (kernel first); a file head of
      another class count is not loaded (the initial head is kept, logged).
    skip: param names whose values are kept from init (dont_load).
    strict_head: a missing head or one of another class count is an error.
    model_description: e.g. 'bit depth=50, width=1' (for the error).
    hint: what to do about a mismatch (ends the error line).

  Returns:
    params with the structure of `init_params`; loaded leaves are float32
    numpy arrays, the others are `init_params`' own leaves.
  """
  tree, wrapped = unwrap(init_params)
  init_flat = flat_params(tree)
  arrays = layout.prepare(dict(arrays))
  by_file = {layout.file_name(name): name for name in init_flat}
  head_names = set(head)
  load_head = bool(head) and _head_in_use(source, arrays, layout, init_flat,
                                          head[0], strict_head)
  ignored = {layout.file_name(name) for name in head_names}  # used or not

  loaded, missing, clashes = {}, [], []
  for name, init_value in init_flat.items():
    file_name = layout.file_name(name)
    if skip(name) or (name in head_names and not load_head):
      loaded[name] = init_value
    elif file_name not in arrays:
      missing.append(
          f"{file_name} {_file_shape(layout, name, np.shape(init_value))}")
    else:
      stored = np.asarray(arrays[file_name])
      value = layout.to_model(name, stored, np.shape(init_value))
      value = fit_shape(np.asarray(value, np.float32), np.shape(init_value))
      if value is None:
        clashes.append(
            f"{file_name} file {_shape(stored)} vs model "
            f"{_file_shape(layout, name, np.shape(init_value))}")
      loaded[name] = value
  unexpected = [file_name for file_name in arrays
                if file_name not in by_file and file_name not in ignored
                and not skip(file_name)]
  if missing or unexpected or clashes:
    raise mismatch(f"weights file {source} ({layout.name} layout)",
                   f"the model ({model_description})", clashes, missing,
                   unexpected, hint)
  return unflat_params(loaded, wrapped)


def mismatch(source: str, target: str, clashes: Sequence[str],
             missing: Sequence[str], unexpected: Sequence[str],
             hint: str) -> UserError:
  """One line: what does not fit what, the first names of each kind, hint."""
  # Sorted (numbers by value): params pass through jax, which sorts dict
  # keys, so no creation order survives to be reported.
  problems = [f"{len(names)} {label} ({_first(sorted(names, key=_natural))})"
              for label, names in (("shape clashes", clashes),
                                   ("missing", missing),
                                   ("unexpected", unexpected)) if names]
  return UserError(f"{source} does not fit {target}: {'; '.join(problems)}; "
                   f"{hint}")


def check_same_shapes(source: str, params: Params, init_params: Params,
                      target: str, hint: str) -> None:
  """`params` must have exactly the names and shapes of `init_params`."""
  have, want = flat_params(params), flat_params(init_params)
  clashes = [f"{name} {_shape(have[name])} vs {_shape(value)}"
             for name, value in want.items()
             if name in have and np.shape(have[name]) != np.shape(value)]
  missing = [name for name in want if name not in have]
  unexpected = [name for name in have if name not in want]
  if clashes or missing or unexpected:
    raise mismatch(source, target, clashes, missing, unexpected, hint)


def detect(source: str, names: Sequence[str],
           markers: Sequence[Tuple[Callable[[str], bool], Any]],
           what: str) -> Any:
  """The first layout one of whose marker tests accepts a name in `names`."""
  for accepts, layout in markers:
    if any(accepts(name) for name in names):
      return layout
  shown = ", ".join(sorted(names)[:3])
  raise UserError(f"weights file {source} is not in any {what} layout funmatch"
                  f" knows (its first names: {shown}); check that it holds "
                  f"{what} weights, or re-export it with funmatch.")
