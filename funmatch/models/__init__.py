"""Model registry: config names -> flax modules returning (logits, taps).

    model = get_model("bit", num_classes=10, depth=50, width=1)
    logits, taps = model.apply({"params": params}, images, train=False)

Each model module holds its `Model` and, beside it, its weights: `load(path,
init_params, dont_load, strict_head)`, `save(path, params)` and `freeze(module,
params)` (the form a frozen teacher runs in). Nothing outside funmatch/models
branches on a model's name. Model modules are imported on first use, so
`import funmatch.models` stays cheap and a typo in one model file cannot break
the others.
"""

import dataclasses
import importlib
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax

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


def model_module(name: str):
  """The module of model `name` (its Model, load, save and freeze)."""
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


def load_params(name: str, path: str, init_params: Any, dont_load: Sequence[str] = (),
                strict_head: bool = False) -> Any:
  """Params of model `name` from a weights file, with the structure of `init_params`.

  strict_head (teachers): a stored head of another class count is an error;
  otherwise (students) it is replaced by the fresh head of `init_params`.
  """
  return model_module(name).load(path, init_params, dont_load=tuple(dont_load),
                                 strict_head=strict_head)


def save_params(name: str, path: str, params: Any) -> str:
  """Writes params of model `name` to `path` in its exchange layout; returns `path`."""
  return model_module(name).save(path, params)


def freeze(name: str, module: nn.Module, params: Any) -> tuple[nn.Module, Any]:
  """The (module, params) a frozen model of `name` runs as (same function, cheaper)."""
  return model_module(name).freeze(module, params)
