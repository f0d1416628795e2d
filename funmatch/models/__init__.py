"""Model registry: config names -> flax modules returning (logits, taps).

    model = get_model("bit", num_classes=10, depth=50, width=1)
    logits, taps = model.apply({"params": params}, images, train=False)

Each model module holds its `Model` and, beside it, its weights: the layouts
of the files it reads and writes (`load`, `save`, `detect_layout`), the form a
frozen teacher runs in (`freeze`), the options whose 'auto' the weights decide
(`AUTO_OPTIONS`), and how timm builds the same network (`timm_spec`,
`build_timm`). The calls here are the same for every model; nothing outside
funmatch/models branches on a model's name:

    options = resolve_options("bit", config_options, init_path)  # the 'auto's
    model = get_model("bit", num_classes, **options)
    params = load_params("bit", init_path, init_params)
    save_params("bit", "out.safetensors", params, options=options,
                format="timm", resolution=224)

Model modules are imported on first use, so `import funmatch.models` stays
cheap and a typo in one model file cannot break the others. Files are read and
written by `formats` only (never running code from a file).
"""

import dataclasses
import importlib
import logging
from typing import Any, Dict, Mapping, Optional, Sequence

import flax.linen as nn
import numpy as np

from funmatch.errors import UserError
from funmatch.models import formats

# name -> module path holding a `Model` class.
_REGISTRY = {
    "bit": "funmatch.models.bit",
    "convnext": "funmatch.models.convnext",
    "mobilenet_v3": "funmatch.models.mobilenet_v3",
    "swin": "funmatch.models.swin",
    "vit": "funmatch.models.vit",
}


def model_names() -> tuple:
  """The names `get_model` accepts."""
  return tuple(sorted(_REGISTRY))


def model_module(name: str):
  """The module of model `name` (its Model, load, save, freeze, layouts)."""
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


# --------------------------------------------------------------------------
# Weights.
# --------------------------------------------------------------------------

SAVE_FORMATS = ("npz", "safetensors", "timm")
SUFFIXES = {"npz": ".npz", "safetensors": ".safetensors",
            "timm": ".safetensors"}
# Options that describe how a model runs, not what it computes.
_RUNTIME_OPTIONS = ("dtype",)


def auto_options(name: str) -> Dict[str, Any]:
  """Options of model `name` that may be 'auto' -> what 'auto' means alone.

  E.g. BiT's stem_pool_padding: 'zeros' unless the weights say otherwise.
  """
  return dict(getattr(model_module(name), "AUTO_OPTIONS", {}))


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


def implied_options(name: str, weights_path: str) -> Dict[str, Any]:
  """What a weights file says about model `name`'s 'auto' options.

  A funmatch export records them; otherwise the file's layout implies them
  (BiT: official and timm files pad the stem with zeros, big_vision's with
  -inf; ViT: official files use the tanh GELU, timm's the exact one).
  """
  module = model_module(name)
  auto = getattr(module, "AUTO_OPTIONS", {})
  if not auto:
    return {}
  weights = formats.peek(weights_path)
  implied = dict(module.detect_layout(weights).implies)
  recorded = weights.metadata.get("options", {})
  implied.update({k: v for k, v in recorded.items() if k in auto})
  return implied


def resolve_options(name: str, options: Mapping[str, Any],
                    weights_path: str = "",
                    implied: Optional[Mapping[str, Any]] = None
                    ) -> Dict[str, Any]:
  """`options` with every 'auto' (or unset) weights-dependent option decided.

  Left 'auto', an option takes the value `implied` gives (what the caller
  knows of the weights: a named file's catalog entry, a workdir's config),
  else what the file at `weights_path` says (`implied_options`), else the
  model's default. An explicit value that disagrees is kept, with a warning.
  Build the model with the result and record it: it is what `save_params`
  writes and what a resumed run must rebuild.
  """
  auto = auto_options(name)
  resolved = dict(options)
  known = {}
  if auto and weights_path:
    known.update(implied_options(name, weights_path))
  known.update({k: v for k, v in (implied or {}).items() if k in auto})
  for option, default in auto.items():
    value = resolved.get(option, "auto")
    if value == "auto":
      resolved[option] = known.get(option, default)
    elif option in known and known[option] != value:
      logging.warning("%s %s=%r, but its weights (%s) imply %r; keeping %r.",
                      name, option, value, weights_path or "init",
                      known[option], value)
  return resolved


def load_params(name: str, path: Any, init_params: Any,
                dont_load: Sequence[str] = (),
                strict_head: bool = False) -> Any:
  """Params of model `name` from a weights file of any layout it knows.

  Args:
    name: a registry name ('bit', 'vit', 'mobilenet_v3').
    path: .npz, .safetensors, or .pth/.pt/.bin (needs torch), or a file
      `formats.read` already read.
    init_params: the model's initial params; fix the structure of the result
      and supply the values not loaded.
    dont_load: regexes (re.search) over param names to keep from init.
    strict_head: teachers: a stored head of another class count (or none) is
      an error; students get the fresh head of `init_params` instead.

  Raises:
    UserError: one line naming the file and what to do (missing, damaged,
      pickled objects, unknown layout, names/shapes that do not fit).
  """
  weights = path if isinstance(path, formats.Weights) else formats.read(path)
  return model_module(name).load(weights, init_params, tuple(dont_load),
                                 strict_head)


def freeze(name: str, module: nn.Module, params: Any) -> tuple:
  """The (module, params) a frozen model runs as (same function, cheaper)."""
  return model_module(name).freeze(module, params)


def num_classes(name: str, params: Any) -> int:
  """The class count of model `name`'s head in `params` (0: no head)."""
  return model_module(name).num_classes(params)


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


def check_format(format: str, path: str) -> None:  # pylint: disable=redefined-builtin
  """A known format and a file name it can write, or a one-line UserError."""
  if format not in SAVE_FORMATS:
    raise UserError(f"unknown weights format {format!r}; use one of "
                    f"{', '.join(SAVE_FORMATS)}.")
  suffix = SUFFIXES[format]
  if not path.endswith(suffix):
    raise UserError(f"output {path}: the {format!r} format writes a "
                    f"{suffix} file; name it *{suffix}.")


def save_params(
    name: str, path: str, params: Any, *, resolution: int,
    format: str = "npz",  # pylint: disable=redefined-builtin
    options: Optional[Mapping[str, Any]] = None,
    preprocessing: Optional[Mapping[str, Any]] = None,
    metadata: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """Writes params in one of `SAVE_FORMATS`; returns the metadata written.

  Formats: 'npz' (BiT in the official BiT naming, ViT in the official ViT
  naming, MobileNetV3 its flax names joined by '/'), 'safetensors'
  (funmatch's names), 'timm' (a .safetensors timm state dict; the metadata
  says which timm model loads it, see `timm_model`).

  Args:
    name: a registry name.
    path: the file to write (.npz for 'npz', .safetensors otherwise); it
      appears atomically.
    params: the model's params.
    resolution: the image size the model was trained / evaluated at.
    options: the model's options as built (after `resolve_options`; an
      option left 'auto' is recorded as the default it ran as). num_classes
      comes from the params.
    preprocessing: how images reach the model (default:
      `preprocessing_metadata()`).
    metadata: extra JSON-able entries (e.g. the run's step, class_names).

  Every file's metadata holds: producer, model, options (all constructor
  kwargs), num_classes, layout, resolution, preprocessing, and for 'timm'
  the timm model name / kwargs / code that build it: enough to rebuild the
  model from the file alone (`funmatch.load_student(path)`).
  """
  check_format(format, path)
  module = model_module(name)
  # An option still 'auto' ran as its default (the model's own rule).
  options = {k: v for k, v in resolve_options(name, options or {}).items()
             if k not in _RUNTIME_OPTIONS}
  model = get_model(name, module.num_classes(params), **options)
  architecture = _architecture(model)
  record = {"producer": "funmatch", "model": name,
            "options": architecture, "num_classes": model.num_classes,
            "resolution": int(resolution),
            "preprocessing": dict(preprocessing or preprocessing_metadata()),
            **(metadata or {})}
  return module.save(path, params, model, format, record)


def timm_model(path: str):
  """The timm (PyTorch) model of a funmatch 'timm' export, weights loaded.

  Builds it from the file's metadata alone (its `timm` entry), then loads
  the state dict strictly; needs torch and timm (`pip install
  "funmatch[torch]"`).
  """
  weights = formats.read(path)
  spec = weights.metadata.get("timm")
  if not spec or weights.metadata.get("layout") != "timm":
    raise UserError(f"{path} is not a funmatch 'timm' export (its metadata "
                    "has no timm entry); export it with --format timm.")
  try:
    import torch  # pylint: disable=import-outside-toplevel
    network = model_module(weights.metadata["model"]).build_timm(spec)
  except ImportError as e:
    raise UserError(f"building the timm model of {path} needs torch and "
                    f'timm ({e}); pip install "funmatch[torch]".') from None
  network.load_state_dict({name: torch.from_numpy(np.array(value))
                           for name, value in weights.arrays.items()})
  return network.eval()
