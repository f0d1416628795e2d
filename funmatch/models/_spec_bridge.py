"""TEMPORARY: the per-model weights functions of a model declared only by its
`WEIGHTS` spec (ConvNeXt, Swin), over today's models.layouts / formats.

The generic layer of issue 21 (funmatch/weights/) replaces this module; it goes
when that lands. `bind(spec)` returns what `funmatch.models` calls on a model
module: detect_layout, load, save, freeze, num_classes, timm_spec, build_timm.
"""
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from funmatch.errors import UserError
from funmatch.models import formats, layouts


def _as_layout(layout) -> layouts.Layout:
  return layouts.Layout(layout.name, layout.file_name, to_file=layout.to_file,
                        to_model=layout.to_model, prepare=layout.prepare,
                        finish=layout.finish, implies=dict(layout.implies))


def bind(spec) -> Dict[str, Any]:
  """{'load': ..., 'save': ..., ...} for one architecture's spec."""

  def detect_layout(weights: formats.Weights):
    names = list(weights.names)
    if spec.check_file:
      reason = spec.check_file(weights.path, names)
      if reason:
        raise UserError(reason)
    recorded = weights.metadata.get("layout")
    for layout in spec.layouts:
      if layout.name == recorded:
        return _as_layout(layout)
    return layouts.detect(weights.path, names, [
        (layout.marker, _as_layout(layout)) for layout in spec.layouts
        if layout.marker], what=spec.what)

  def load(weights, init_params, dont_load: Sequence[str] = (),
           strict_head: bool = False):
    if isinstance(weights, str):
      weights = formats.read(weights)
    patterns = layouts.compile_patterns(dont_load, f"{spec.what} dont_load")
    layout = detect_layout(weights)
    return layouts.load(
        weights.path, weights.arrays, init_params, layout,
        head=spec.head, strict_head=strict_head,
        skip=lambda name: any(p.search(name) for p in patterns),
        model_description=spec.describe(init_params),
        hint=f"the file holds {spec.describe(layout.prepare(dict(weights.arrays)))}"
        f"; {spec.hint}")

  def save(path: str, params, model, format: str = "npz",  # pylint: disable=redefined-builtin
           metadata: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    record = dict(metadata or {})
    if format == "timm":
      record["timm"] = spec.timm(model, params)
    layout = _as_layout(spec.layout(spec.formats[format]))
    layouts.save(path, params, layout, record)
    return {"layout": layout.name, **record}

  def freeze(module, params):
    return spec.freeze(module, params) if spec.freeze else (module, params)

  def num_classes(params) -> int:
    kernel = layouts.flat_params(params).get(spec.head[0])
    return 0 if kernel is None else int(np.shape(kernel)[-1])

  return {"detect_layout": detect_layout, "load": load, "save": save,
          "freeze": freeze, "num_classes": num_classes,
          "timm_spec": spec.timm, "build_timm": spec.build_timm,
          "AUTO_OPTIONS": dict(spec.auto_options)}
