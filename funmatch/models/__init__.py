"""Model registry: config names -> flax modules returning (logits, taps).

    model = get_model("bit", num_classes=10, depth=50, width=1)
    logits, taps = model.apply({"params": params}, images, train=False)

Each model module holds its `Model` and ends with a declarative
`WEIGHTS = spec.WeightsSpec(...)`: the layouts of the files it reads and writes,
its head, the options whose 'auto' the weights decide, the form a frozen
teacher runs in, how timm builds the same network and its published names.
`weights_spec(name)` hands it to funmatch.weights, which loads, saves and names
files for every model from the specs alone; nothing outside funmatch/models
branches on a model's name.

Model modules are imported on first use, so `import funmatch.models` stays
cheap (no flax or JAX: the CLI's --help imports it) and a typo in one model
file cannot break the others.
"""

import dataclasses
import importlib
from typing import Any

from funmatch.errors import UserError

# name -> module path holding a `Model` class.
_REGISTRY = {
    "bit": "funmatch.models.bit",
    "convnext": "funmatch.models.convnext",
    "mobilenet_v3": "funmatch.models.mobilenet_v3",
    "swin": "funmatch.models.swin",
    "vit": "funmatch.models.vit",
}


# Keys of a model sub-config that the trainer reads itself; every other key is
# passed to the model constructor (e.g. depth, width).
MODEL_META_KEYS = ("model", "res", "init", "init_sha256", "dont_load", "dtype")


def model_names() -> tuple:
  """The names `get_model` accepts."""
  return tuple(sorted(_REGISTRY))


def model_module(name: str):
  """The module of model `name` (its Model and WEIGHTS)."""
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


def get_model(name: str, num_classes: int, **kwargs: Any):
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


def weights_spec(name: str):
  """The `spec.WeightsSpec` model `name` declares: its weight files' layouts,
  head, 'auto' options, frozen form, timm twin and published names
  (funmatch.weights reads, writes and names files from it alone)."""
  return model_module(name).WEIGHTS
