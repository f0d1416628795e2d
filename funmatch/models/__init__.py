"""Model registry: config names -> flax modules returning (logits, taps).

    model = get_model("bit", num_classes=10, depth=50, width=1)
    logits, taps = model.apply({"params": params}, images, train=False)

Model modules are imported on first use, so `import funmatch.models` stays
cheap and a typo in one model file cannot break the others.

Weights, for every model through the same four calls (each model module owns
its file layouts; nothing here branches on a model's name):

    options = resolve_options("bit", config_options, init_path)  # 'auto's
    model = get_model("bit", num_classes, **options)
    params = load_params("bit", init_path, model_init_params)
    save_params("bit", "out.safetensors", params, options=options,
                format="timm", resolution=224)

A model module provides: `Model`, `load(init_params, weights, dont_load,
strict_head)`, `save(path, params, model, format, metadata)`,
`detect_layout(weights)`, `SAVE_LAYOUTS` (format -> layout), `AUTO_OPTIONS`
(optional: options whose 'auto' the weights decide), `num_classes(params)`,
`timm_spec(model, params)` and `build_timm(spec)`.
"""

import dataclasses
import importlib
import logging
from typing import Any, Dict, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from funmatch.errors import UserError
from funmatch.models import formats

# name -> module path holding a `Model` class.
_REGISTRY = {
    "bit": "funmatch.models.bit",
    "mobilenet_v3": "funmatch.models.mobilenet_v3",
    "vit": "funmatch.models.vit",
}


def model_names() -> tuple:
  """The names `get_model` accepts."""
  return tuple(sorted(_REGISTRY))


def model_module(name: str):
  """The module registered as `name` (its Model, load, layouts, ...)."""
  if name not in _REGISTRY:
    raise UserError(f"unknown model {name!r}; valid models: "
                    f"{', '.join(model_names())}.")
  return importlib.import_module(_REGISTRY[name])


def model_class(name: str) -> type:
  """The `Model` class registered as `name`."""
  return model_module(name).Model


def model_options(name: str) -> tuple:
  """The keyword arguments model `name` takes besides num_classes."""
  fields = dataclasses.fields(model_class(name))
  return tuple(f.name for f in fields
               if f.name not in ("num_classes", "parent", "name"))


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds model `name` (see `model_names()`) with `num_classes` outputs.

  Raises UserError for an unknown name or keyword, listing the valid ones;
  invalid values are rejected by the model itself, also as UserError.
  """
  cls = model_class(name)
  options = model_options(name)
  unknown = sorted(set(kwargs) - set(options))
  if unknown:
    raise UserError(f"model {name!r} has no option {', '.join(unknown)}; "
                    f"valid options: {', '.join(options)}.")
  try:
    return cls(num_classes=num_classes, **kwargs)
  except (TypeError, ValueError) as e:
    raise UserError(f"model {name!r}: invalid options {kwargs!r} ({e}); "
                    f"valid options: {', '.join(options)}.") from None


def count_params(params: Mapping[str, Any]) -> int:
  """Total number of parameter elements in a pytree."""
  return int(sum(np.prod(np.shape(leaf), dtype=np.int64)
                 for leaf in jax.tree.leaves(params)))


# --------------------------------------------------------------------------
# Weights files.
# --------------------------------------------------------------------------

SAVE_FORMATS = ("npz", "safetensors", "timm")
_SUFFIXES = {"npz": ".npz", "safetensors": ".safetensors",
             "timm": ".safetensors"}
# Options that describe how a model runs, not what it computes.
_RUNTIME_OPTIONS = ("dtype",)


def preprocessing_metadata(eval_crop: str = "resize_small_central",
                           eval_resize_ratio: float = 1.143,
                           antialias: bool = False) -> Dict[str, Any]:
  """How images reach an exported model, as recorded in its file.

  funmatch models take RGB images in [-1, 1], i.e. x / 127.5 - 1, the same
  as mean = std = 0.5 on [0, 1] (timm's convention). Evaluation resizes the
  shorter side to round(ratio * resolution) (bilinear), then takes the
  central resolution x resolution crop ('resize_small_central'), or
  squashes the whole image ('resize').
  """
  return {"value_range": [-1, 1], "mean": [0.5, 0.5, 0.5],
          "std": [0.5, 0.5, 0.5], "eval_crop": eval_crop,
          "resize_small_ratio": float(eval_resize_ratio),
          "interpolation": "bilinear", "antialias": bool(antialias)}


def resolve_options(model_name: str, options: Mapping[str, Any],
                    weights_path: str = "") -> Dict[str, Any]:
  """`options` with every 'auto' (or unset) weights-dependent option decided.

  Some options must match where the weights come from (BiT's stem
  padding: zeros for official/timm, -inf for big_vision; ViT's GELU: tanh
  for official JAX, exact for timm). Left 'auto', they take the value the
  file records (funmatch exports) or its layout implies, else the model's
  default. Call this before building the model, and keep the result: it is
  what `save_params` records. An explicit value that disagrees with the
  file is kept, with a warning.
  """
  module = model_module(model_name)
  auto = getattr(module, "AUTO_OPTIONS", {})
  resolved = dict(options)
  implied = {}
  if auto and weights_path:
    weights = formats.peek(weights_path)
    implied = dict(module.detect_layout(weights).implies)
    recorded = weights.metadata.get("options", {})
    implied.update({k: v for k, v in recorded.items() if k in auto})
  for option, default in auto.items():
    value = resolved.get(option, "auto")
    if value == "auto":
      resolved[option] = implied.get(option, default)
    elif option in implied and implied[option] != value:
      logging.warning("%s %s=%r, but %s implies %r; keeping %r.", model_name,
                      option, value, weights_path, implied[option], value)
  return resolved


def load_params(model_name: str, path: str, init_params: Any,
                dont_load: Sequence[str] = (), strict_head: bool = False):
  """Params for model `model_name` from a weights file of any known layout.

  Args:
    model_name: a registry name ('bit', 'vit', 'mobilenet_v3').
    path: .npz, .safetensors, or .pth/.pt/.bin (needs torch).
    init_params: the model's initial params; fix the structure of the result
      and supply the values not loaded.
    dont_load: regexes (re.search) over param names to keep from init.
    strict_head: a head of another class count (or none) is an error rather
      than replaced by the initial head (for teachers).

  Raises:
    UserError: one line naming the file and what to do (missing, damaged,
      pickled objects, unknown layout, names/shapes that do not fit).
  """
  module = model_module(model_name)
  return module.load(init_params, formats.read(path), tuple(dont_load),
                     strict_head)


def _architecture(model: nn.Module) -> Dict[str, Any]:
  """The constructor kwargs of a model instance, as JSON values."""
  def plain(value):
    if isinstance(value, (tuple, list)):
      return [plain(v) for v in value]
    if isinstance(value, np.generic):
      return value.item()
    return value
  return {f.name: plain(getattr(model, f.name))
          for f in dataclasses.fields(model)
          if f.name not in ("num_classes", "parent", "name")
          + _RUNTIME_OPTIONS}


def save_params(
    model_name: str, path: str, params: Any, *, resolution: int,
    format: str = "npz",  # pylint: disable=redefined-builtin
    options: Optional[Mapping[str, Any]] = None,
    preprocessing: Optional[Mapping[str, Any]] = None,
    metadata: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """Writes params in one of `SAVE_FORMATS`; returns the metadata written.

  Formats: 'npz' (BiT in the official BiT naming, others their flax names
  joined by '/', which for ViT are the official names), 'safetensors'
  (funmatch's names), 'timm' (a .safetensors timm state dict; the metadata
  says which timm model loads it, see `timm_model`).

  Args:
    model_name: a registry name.
    path: the file to write (.npz for 'npz', .safetensors otherwise); it
      appears atomically.
    params: the model's params.
    options: the model's options as built (after `resolve_options`; no
      'auto' left). num_classes comes from the params.
    resolution: the image size the model was trained / evaluated at.
    preprocessing: how images reach the model (default:
      `preprocessing_metadata()`).
    metadata: extra JSON-able entries (e.g. the run's step).

  Every file's metadata holds: producer, model, options (all constructor
  kwargs), num_classes, layout, resolution, preprocessing, and for 'timm'
  the timm model name / kwargs / code that build it.
  """
  if format not in SAVE_FORMATS:
    raise UserError(f"unknown weights format {format!r}; use one of "
                    f"{', '.join(SAVE_FORMATS)}.")
  suffix = _SUFFIXES[format]
  if not path.endswith(suffix):
    raise UserError(f"output {path}: the {format!r} format writes a "
                    f"{suffix} file; name it *{suffix}.")
  module = model_module(model_name)
  options = {k: v for k, v in (options or {}).items()
             if k not in _RUNTIME_OPTIONS}
  model = get_model(model_name, module.num_classes(params), **options)
  architecture = _architecture(model)
  unresolved = [k for k, v in architecture.items() if v == "auto"]
  if unresolved:
    raise ValueError(f"options {unresolved} are 'auto': pass the options "
                     "returned by resolve_options")
  record = {"producer": "funmatch", "model": model_name,
            "options": architecture, "num_classes": model.num_classes,
            "resolution": int(resolution),
            "preprocessing": dict(preprocessing or preprocessing_metadata()),
            **(metadata or {})}
  return module.save(path, params, model, format, record)


def timm_model(path: str):
  """The timm (PyTorch) model of a funmatch 'timm' export, weights loaded.

  Builds it from the file's metadata alone (`timm` entry), then loads the
  state dict strictly; needs torch and timm (`pip install
  "funmatch[torch]"`).
  """
  weights = formats.read(path)
  spec = weights.metadata.get("timm")
  if not spec or weights.metadata.get("layout") != "timm":
    raise UserError(f"{path} is not a funmatch 'timm' export (its metadata "
                    "has no timm entry); export it with format='timm'.")
  try:
    import torch  # pylint: disable=import-outside-toplevel
    network = model_module(weights.metadata["model"]).build_timm(spec)
  except ImportError as e:
    raise UserError(f"building the timm model of {path} needs torch and "
                    f'timm ({e}); pip install "funmatch[torch]".') from None
  network.load_state_dict({name: torch.from_numpy(np.array(value))
                           for name, value in weights.arrays.items()})
  return network.eval()
