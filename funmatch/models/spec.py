"""What a model file declares about its weights: plain data, no I/O.

Each model module (bit.py, vit.py, ...) ends with one `WEIGHTS = WeightsSpec(...)`:
the layouts of the files it reads and writes, its head, the options whose 'auto'
the weights decide, how a frozen copy runs, how timm builds the same network, and
the published names of its weights. `funmatch.weights` reads, writes, detects
and names files for every architecture from these specs alone, the way timm's
`_builder.load_pretrained` serves every timm model from its `default_cfgs`.

This module imports nothing from funmatch, so a model file can declare its spec
without reaching up into the weights layer. It also holds the few array helpers
the specs' name tables and summaries use (flat param names, kernel layouts).
"""
import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import flax
import numpy as np

Params = Mapping[str, Any]


def unwrap(params: Params) -> Tuple[Params, bool]:
  """Accepts the params tree or a variables dict {'params': tree}."""
  if set(params.keys()) == {"params"}:
    return params["params"], True
  return params, False


def flat_params(params: Params) -> dict:
  """{'a/b/kernel': leaf} of a params tree (or {'params': tree})."""
  tree = flax.core.unfreeze(unwrap(params)[0])
  return flax.traverse_util.flatten_dict(tree, sep="/")


# Tensor layouts: flax keeps HWIO conv kernels and [in, out] dense kernels,
# PyTorch OIHW and [out, in].


def hwio_to_oihw(kernel: np.ndarray) -> np.ndarray:
  return np.transpose(kernel, (3, 2, 0, 1))


def oihw_to_hwio(weight: np.ndarray) -> np.ndarray:
  return np.transpose(weight, (2, 3, 1, 0))


def _identity(_name: str, value: np.ndarray, *_shape) -> np.ndarray:
  return value


def _no_change(arrays: dict) -> dict:
  return arrays


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one kind of file names and lays out a model's params.

  Only the direction funmatch name -> file name is written down: loading inverts
  it over the params the model has, so a file name the model does not produce
  is, by construction, a name that does not fit.

  Attributes:
    name: short id recorded in metadata ('bit_official', 'timm', ...).
    file_name: funmatch param name ('/'-joined flax path) -> the name in the file.
    to_file: (param name, value in funmatch layout) -> value as stored.
    to_model: (param name, value as stored, the model's shape or None) -> value in
      funmatch layout.
    prepare: file arrays -> arrays keyed by `file_name`s (split a fused qkv, undo
      a naming quirk); runs before loading.
    finish: the inverse of prepare; runs after `to_file` when saving.
    implies: model options this layout implies (e.g. BiT's stem padding).
    marker: a test on one file name that only this layout's files pass; detection
      tries the spec's layouts in order (None: found only by recorded metadata).
  """
  name: str
  file_name: Callable[[str], str]
  to_file: Callable[..., np.ndarray] = _identity
  to_model: Callable[..., np.ndarray] = _identity
  prepare: Callable[[dict], dict] = _no_change
  finish: Callable[[dict], dict] = _no_change
  implies: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  marker: Optional[Callable[[str], bool]] = None


FUNMATCH = Layout("funmatch", file_name=lambda name: name,
                  marker=None)


@dataclasses.dataclass(frozen=True)
class Published:
  """One published weights file of an architecture (see funmatch.weights.catalog).

  `path` is inside the public bucket ('distill/R50x1_224.npz') or empty when the
  file lives only on the timm hub (`hub`, e.g. 'convnext_tiny.fb_in22k_ft_in1k').
  """
  name: str
  options: Mapping[str, Any]
  num_classes: int
  res: int
  description: str
  path: str = ""
  hub: str = ""
  sha256: str = ""


@dataclasses.dataclass(frozen=True)
class WeightsSpec:
  """Everything `funmatch.weights` needs to know about one architecture's files.

  Attributes:
    what: the architecture in messages ('BiT', 'ViT', 'ConvNeXt').
    layouts: every layout its files may have, in detection order.
    formats: export format ('npz', 'safetensors', 'timm') -> the layout name it
      writes.
    head: the head's param names, kernel first (its last axis is the class count).
    describe: params -> 'depth=[3, 4, 6, 3], width=1, num_classes=10'-style
      summary for mismatch messages.
    describe_file: a file's arrays, as stored -> what the file holds, in the words of
      `describe` (named in mismatch messages beside what the config asks for);
      None: the message names the model only.
    hint: what to do when a file does not fit the model (ends the error line).
    auto_options: option -> its default when left 'auto' and no weights decide.
    dont_load_names: param name -> the names a dont_load regex is searched in
      (BiT: also the official name).
    check_file: (path, file names) -> a one-line reason the file cannot be used
      by this architecture at all, or None.
    freeze: (module, params) -> the cheaper (module, params) a frozen teacher runs
      as; None: as it trains.
    timm: (module, params) -> {'model_name', 'kwargs', 'code'}: how timm builds a
      network computing the same function; None: no timm export.
    build_timm: that dict -> the timm module (imports timm); None: timm.create_model.
    published: the architecture's published weights, by name.
  """
  what: str
  layouts: Sequence[Layout]
  formats: Mapping[str, str]
  head: Tuple[str, ...] = ()
  describe: Callable[[Params], str] = lambda params: ""
  describe_file: Optional[Callable[[Mapping[str, Any]], str]] = None
  hint: str = ""
  auto_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  dont_load_names: Callable[[str], Sequence[str]] = lambda name: (name,)
  check_file: Optional[Callable[[str, Sequence[str]], Optional[str]]] = None
  freeze: Optional[Callable[[Any, Params], tuple]] = None
  timm: Optional[Callable[[Any, Params], dict]] = None
  build_timm: Optional[Callable[[Mapping[str, Any]], Any]] = None
  published: Sequence[Published] = ()

  def with_defaults(self, options: Mapping[str, Any]) -> dict:
    """`options` with each auto option left 'auto' (or unset) as its default:
    what the model runs as when no weights decide."""
    resolved = dict(options)
    for option, default in self.auto_options.items():
      if resolved.get(option, "auto") == "auto":
        resolved[option] = default
    return resolved

  def layout(self, name: str) -> Layout:
    """The layout called `name` (KeyError if the spec has none)."""
    for layout in self.layouts:
      if layout.name == name:
        return layout
    raise KeyError(name)
