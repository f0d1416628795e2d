"""Every architecture's weights in and out, driven by its `WeightsSpec` alone.

A model file declares its layouts (`spec.Layout`: the map from funmatch's param
names, '/'-joined flax paths such as `block1/unit01/a/group_norm/scale`, to one
kind of file's names and array layouts), its head and its timm twin; this module
does the rest with the same rules for every model:

    params = load("bit", "BiT-M-R50x1.npz", init_params)    # any known layout
    save_params("bit", "out.safetensors", params, options=options,
                format="timm", resolution=224)
    layout = detect("vit", files.peek(path))                 # metadata, else names

dont_load patterns keep init values, a head of another class count keeps the
initial head (an error for teachers), and any other mismatch is one line naming
the first mismatched names and both shapes. Files are read and written by
`files` only (never running code from a file).
"""

import dataclasses
import logging
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax
import numpy as np

from funmatch import models
from funmatch.errors import UserError
from funmatch.models.spec import (  # pylint: disable=unused-import
    FUNMATCH, Layout, WeightsSpec, flat_params, hwio_to_oihw, oihw_to_hwio, unwrap)
from funmatch.weights import files

Params = Mapping[str, Any]
SAVE_FORMATS = ("npz", "safetensors", "timm")
SUFFIXES = {"npz": ".npz", "safetensors": ".safetensors",
            "timm": ".safetensors"}
# Options that describe how a model runs, not what it computes.
_RUNTIME_OPTIONS = ("dtype",)


def unflat_params(flat: Mapping[str, Any], wrapped: bool) -> Params:
  tree = flax.traverse_util.unflatten_dict(
      {tuple(name.split("/")): value for name, value in flat.items()})
  return {"params": tree} if wrapped else tree


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


# ---------------------------------------------------------------------------
# What a spec says about params and files.


def num_classes(model: str, params: Params) -> int:
  """The class count of model `model`'s head in `params` (0: no head)."""
  head = models.weights_spec(model).head
  kernel = flat_params(params).get(head[0]) if head else None
  return 0 if kernel is None else int(np.shape(kernel)[-1])


def describe(model: str, params: Params) -> str:
  """A 'depth=[3, 4, 6, 3], width=1, num_classes=10'-style summary of params."""
  return models.weights_spec(model).describe(params)


def freeze(model: str, module: Any, params: Params) -> tuple:
  """The (module, params) a frozen model runs as (same function, cheaper)."""
  how = models.weights_spec(model).freeze
  return (module, params) if how is None else how(module, params)


def detect(model: str, weights: files.Weights) -> Layout:
  """The layout of a file of model `model`: its recorded metadata, else its names."""
  spec = models.weights_spec(model)
  names = list(weights.names)
  if spec.check_file is not None:
    reason = spec.check_file(weights.path, names)
    if reason:
      raise UserError(reason)
  recorded = weights.metadata.get("layout")
  for layout in spec.layouts:
    if recorded == layout.name:
      return layout
  for layout in spec.layouts:
    if layout.marker is not None and any(layout.marker(name) for name in names):
      return layout
  shown = ", ".join(sorted(names)[:3])
  raise UserError(f"weights file {weights.path} is not in any {spec.what} layout "
                  f"funmatch knows (its first names: {shown}); check that it holds "
                  f"{spec.what} weights, or re-export it with funmatch.")


def implied_options(model: str, weights_path: str) -> Dict[str, Any]:
  """What a weights file says about model `model`'s 'auto' options.

  A funmatch export records them; otherwise the file's layout implies them
  (BiT: official and timm files pad the stem with zeros, big_vision's with
  -inf; ViT: official files use the tanh GELU, timm's the exact one).
  """
  auto = models.weights_spec(model).auto_options
  if not auto:
    return {}
  weights = files.peek(weights_path)
  implied = dict(detect(model, weights).implies)
  recorded = weights.metadata.get("options", {})
  implied.update({k: v for k, v in recorded.items() if k in auto})
  return implied


# ---------------------------------------------------------------------------
# Loading.


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


def load(model: str, weights: Any, init_params: Params,
         dont_load: Sequence[str] = (), strict_head: bool = False) -> Params:
  """Params of model `model` from a weights file of any layout its spec knows.

  Args:
    model: a registry name ('bit', 'vit', 'mobilenet_v3', ...).
    weights: .npz, .safetensors, or .pth/.pt/.bin (needs torch), or a file
      `files.read` already read. The layout is told by the metadata, else by
      the names.
    init_params: the model's initial params; fix the structure of the result
      and supply the values not loaded.
    dont_load: regexes (re.search) over param names (and the spec's other
      names of a param, e.g. BiT's official ones) to keep from init.
    strict_head: teachers: a stored head of another class count (or none) is
      an error; students get the fresh head of `init_params` instead.

  Returns:
    params with the structure of `init_params`; loaded leaves are float32
    numpy arrays, the others are `init_params`' own leaves.

  Raises:
    UserError: one line naming the file and what to do (missing, damaged,
      pickled objects, unknown layout, names/shapes that do not fit).
  """
  spec = models.weights_spec(model)
  if not isinstance(weights, files.Weights):
    weights = files.read(weights)
  patterns = compile_patterns(dont_load, f"{spec.what} dont_load")
  skip = lambda name: any(p.search(other) for p in patterns
                          for other in spec.dont_load_names(name))
  return fit(weights.path, weights.arrays, init_params, detect(model, weights),
             head=spec.head, skip=skip, strict_head=strict_head,
             model_description=spec.describe(init_params), hint=spec.hint,
             file_description=spec.describe_file(weights.arrays) if spec.describe_file else "")


def fit(source: str, arrays: Mapping[str, np.ndarray], init_params: Params,
        layout: Layout, *, head: Sequence[str] = (),
        skip=lambda name: False, strict_head: bool = False,
        model_description: str = "", hint: str = "",
        file_description: str = "") -> Params:
  """Fits a file's arrays, named per `layout`, to the params of a model.

  `head` names the head's params (kernel first); `skip(name)` keeps a param
  from init (dont_load); `model_description` (what the config asks for),
  `file_description` (what the file holds) and `hint` go into the error.
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
    holds = f", holding {file_description}" if file_description else ""
    raise mismatch(f"weights file {source} ({layout.name} layout{holds})",
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


# ---------------------------------------------------------------------------
# Saving.


def to_arrays(params: Params, layout: Layout) -> Dict[str, np.ndarray]:
  """The model's params as `layout`'s file arrays (float32)."""
  arrays = {}
  for name, value in flat_params(params).items():
    arrays[layout.file_name(name)] = np.asarray(
        layout.to_file(name, np.asarray(value, np.float32)))
  return layout.finish(arrays)


def format_layout(model: str, format: str) -> Layout:  # pylint: disable=redefined-builtin
  """The layout model `model`'s files of `format` ('npz', ...) are written in."""
  spec = models.weights_spec(model)
  if format not in spec.formats:
    raise UserError(f"{spec.what} has no {format!r} export; use one of "
                    f"{', '.join(spec.formats)}.")
  return spec.layout(spec.formats[format])


def file_arrays(model: str, params: Params,
                format: str = "npz") -> Dict[str, np.ndarray]:  # pylint: disable=redefined-builtin
  """Params as a `format` export of model `model` holds them (no metadata)."""
  return to_arrays(params, format_layout(model, format))


def check_format(format: str, path: str) -> None:  # pylint: disable=redefined-builtin
  """A known format and a file name it can write, or a one-line UserError."""
  if format not in SAVE_FORMATS:
    raise UserError(f"unknown weights format {format!r}; use one of "
                    f"{', '.join(SAVE_FORMATS)}.")
  suffix = SUFFIXES[format]
  if not path.endswith(suffix):
    raise UserError(f"output {path}: the {format!r} format writes a "
                    f"{suffix} file; name it *{suffix}.")


def preprocessing_metadata(eval_crop: str = "resize_small_central",
                           eval_resize_ratio: float = 1.143,
                           antialias: bool = False) -> Dict[str, Any]:
  """How images reach a model in evaluation, as recorded with its weights.

  funmatch models take RGB images in [-1, 1], i.e. x / 127.5 - 1, the same
  as mean = std = 0.5 on [0, 1] (timm's convention). 'resize_small_central'
  area-resizes the shorter side to round(ratio * resolution), then takes the
  central resolution x resolution crop; 'resize' squashes the whole image to
  resolution x resolution (bilinear, half-pixel centres, antialiased only if
  `antialias`). `funmatch/images.py` implements both in numpy.
  """
  return {"value_range": [-1, 1], "mean": [0.5, 0.5, 0.5],
          "std": [0.5, 0.5, 0.5], "eval_crop": str(eval_crop),
          "resize_small_ratio": float(eval_resize_ratio),
          "interpolation": ("area" if eval_crop == "resize_small_central"
                            else "bilinear"),
          "antialias": bool(antialias)}


def _architecture(module: Any) -> Dict[str, Any]:
  """The constructor kwargs of a model instance, as JSON values."""
  def plain(value):
    if isinstance(value, (tuple, list)):
      return [plain(v) for v in value]
    if isinstance(value, np.generic):
      return value.item()
    return value
  return {f.name: plain(getattr(module, f.name))
          for f in dataclasses.fields(module)
          if f.name not in ("num_classes", "parent", "name")
          + _RUNTIME_OPTIONS}


def save(model: str, path: str, params: Params, module: Any,
         format: str = "npz",  # pylint: disable=redefined-builtin
         metadata: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """Writes params in the layout `format` names (.npz or .safetensors by the
  path); returns the metadata written. A 'timm' file's metadata also says how
  timm builds `module` (`save_params` is the usual entry: it fills `metadata`).
  """
  layout = format_layout(model, format)
  record = dict(metadata or {})
  if format == "timm":
    timm = models.weights_spec(model).timm
    if timm is None:
      raise UserError(f"model {model!r} has no timm twin; export it as 'npz' or "
                      "'safetensors' instead.")
    record["timm"] = timm(module, params)
  write = files.write_npz if path.endswith(".npz") else files.write_safetensors
  write(path, to_arrays(params, layout), {"layout": layout.name, **record})
  return {"layout": layout.name, **record}


def save_params(
    model: str, path: str, params: Any, *, resolution: int,
    format: str = "npz",  # pylint: disable=redefined-builtin
    options: Optional[Mapping[str, Any]] = None,
    preprocessing: Optional[Mapping[str, Any]] = None,
    metadata: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """Writes params in one of `SAVE_FORMATS`; returns the metadata written.

  Formats: 'npz' (BiT in the official BiT naming, ViT in the official ViT
  naming, others in funmatch's), 'safetensors' (funmatch's names) and 'timm'
  (a .safetensors timm loads strictly; its metadata says how timm builds it).

  Args:
    model: a registry name; params: the model's params.
    resolution: the image size the model was trained / evaluated at.
    options: the model's options as built (an option left 'auto' is recorded
      as the default it ran as). num_classes comes from the params.
    preprocessing: how images reach the model (default:
      `preprocessing_metadata()`).
    metadata: extra JSON-able entries (e.g. the run's step, class_names).

  Every file's metadata holds: producer, model, options (all constructor
  kwargs), num_classes, layout, resolution, preprocessing, and for 'timm'
  the timm model name / kwargs / code that build it: enough to rebuild the
  model from the file alone (`funmatch.load_student(path)`).
  """
  check_format(format, path)
  spec = models.weights_spec(model)
  options = {k: v for k, v in spec.with_defaults(options or {}).items()
             if k not in _RUNTIME_OPTIONS}
  module = models.get_model(model, num_classes(model, params), **options)
  record = {"producer": "funmatch", "model": model,
            "options": _architecture(module), "num_classes": module.num_classes,
            "resolution": int(resolution),
            "preprocessing": dict(preprocessing or preprocessing_metadata()),
            **(metadata or {})}
  return save(model, path, params, module, format, record)


def timm_model(path: str):
  """The timm (PyTorch) model of a funmatch 'timm' export, weights loaded.

  Builds it from the file's metadata alone (its `timm` entry), then loads
  the state dict strictly; needs torch and timm (`pip install
  "funmatch[torch]"`).
  """
  weights = files.read(path)
  recipe = weights.metadata.get("timm")
  if not recipe or weights.metadata.get("layout") != "timm":
    raise UserError(f"{path} is not a funmatch 'timm' export (its metadata "
                    "has no timm entry); export it with --format timm.")
  spec = models.weights_spec(weights.metadata["model"])
  try:
    import torch  # pylint: disable=import-outside-toplevel
    network = (spec.build_timm or _create_timm)(recipe)
  except ImportError as e:
    raise UserError(f"building the timm model of {path} needs torch and "
                    f'timm ({e}); pip install "funmatch[torch]".') from None
  network.load_state_dict({name: torch.from_numpy(np.array(value))
                           for name, value in weights.arrays.items()})
  return network.eval()


def _create_timm(recipe: Mapping[str, Any]):
  """A registered timm model by its name (the default `build_timm`)."""
  import timm  # pylint: disable=import-outside-toplevel
  return timm.create_model(recipe["model_name"], pretrained=False, **recipe["kwargs"])

