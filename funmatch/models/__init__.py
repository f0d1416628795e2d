"""Model registry: config names -> flax modules returning (logits, taps).

    model = get_model("bit", num_classes=10, depth=50, width=1)
    logits, taps = model.apply({"params": params}, images, train=False)

Model modules are imported on first use, so `import funmatch.models` stays
cheap and a typo in one model file cannot break the others.
"""

import dataclasses
import importlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from funmatch.errors import UserError

# name -> module path holding a `Model` class.
_REGISTRY = {
    "bit": "funmatch.models.bit",
    "mobilenet_v3": "funmatch.models.mobilenet_v3",
    "vit": "funmatch.models.vit",
}


def model_names() -> tuple:
  """The names `get_model` accepts."""
  return tuple(sorted(_REGISTRY))


def model_class(name: str) -> type:
  """The `Model` class registered as `name`."""
  if name not in _REGISTRY:
    raise UserError(f"unknown model {name!r}; valid models: "
                    f"{', '.join(model_names())}.")
  return importlib.import_module(_REGISTRY[name]).Model


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
