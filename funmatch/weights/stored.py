"""A stored model: the student of a workdir, a funmatch export or a published name.

    stored = StoredModel.open("/tmp/digits_fm")          # or an export, or a name
    module, params = stored.module(), stored.params
    stored.export("student.safetensors", "timm")

The one reader of a workdir's config.json (the student's options, the class names
and count, the eval preprocessing) and of an export's metadata. `funmatch.student`,
funmatch-eval, funmatch-export and an init that names a workdir all read a stored
model through it, so they agree on what the stored model is.
"""
import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import numpy as np

from funmatch import fileio, models
from funmatch.errors import UserError
from funmatch.weights import catalog, files, layouts

CONFIG_FILE = "config.json"


def read_config(workdir: str) -> Optional[dict]:
  """A workdir's config.json ({'mode', 'config', 'data', ...}), None if absent."""
  path = fileio.join(workdir, CONFIG_FILE)
  if not fileio.exists(path):
    return None
  try:
    return json.loads(fileio.read_text(path))
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {path} ({e}); it is not a funmatch workdir or it is "
                    "damaged: use another --workdir") from None


def run_preprocessing(config: Mapping[str, Any]) -> dict:
  """The eval preprocessing of a run's config, as `layouts.preprocessing_metadata`.

  That of its first eval set (by name), which funmatch-eval measures with, else
  the eval settings of its training data.
  """
  evals = dict(config.get("evals") or {})
  data = evals[sorted(evals)[0]] if evals else dict(config.get("input") or {})
  return layouts.preprocessing_metadata(
      data.get("eval_crop", "resize_small_central"),
      data.get("eval_resize_ratio", 1.143), data.get("resize_antialias", False))


def _constructor_options(options: Mapping[str, Any]) -> dict:
  """JSON options as the constructor takes them (lists -> tuples)."""
  return {k: (tuple(v) if isinstance(v, list) else v) for k, v in options.items()}


@dataclasses.dataclass
class StoredModel:
  """What a stored model is: enough to rebuild and run it.

  Attributes:
    model: the registry name; `options` its constructor options (every 'auto'
      decided, no dtype), `dtype` the dtype it ran in.
    num_classes, res: its head's class count and its input resolution.
    preprocessing: the eval preprocessing (`layouts.preprocessing_metadata`).
    class_names: the dataset's class names, when known.
    source: the workdir, file or name it came from; `step` the checkpoint step
      (None for files).
    params: its params (numpy arrays); None when read without them.
    config: a workdir's whole run config (None for files).
  """
  model: str
  options: dict
  num_classes: int
  res: int
  preprocessing: dict
  class_names: Optional[tuple]
  source: str
  step: Optional[int] = None
  params: Any = None
  dtype: str = "float32"
  config: Optional[dict] = None

  # -------------------------------------------------------------------------
  # Reading.

  @classmethod
  def open(cls, source: str, step: Optional[int] = None) -> "StoredModel":
    """A workdir, a funmatch export or a published name (paths may be gs://)."""
    source = os.fspath(source)
    if fileio.isdir(source):
      return cls.from_workdir(source, step)
    if step is not None:
      raise UserError(f"step={step} applies to workdirs; {source} is not one")
    if fileio.isfile(source):
      return cls.from_file(source)
    if catalog.is_name(source):
      return cls.from_name(source)
    raise UserError(f"{source} is neither a workdir, a weights file nor a published "
                    "name; check the path")

  @classmethod
  def from_workdir(cls, workdir: str, step: Optional[int] = None, *,
                   restore: bool = True, what: str = "") -> "StoredModel":
    """The student of a funmatch-train/distill workdir at `step` (default: latest).

    restore=False reads config.json only (params None, `step` as given).
    `what` names the workdir in the error for a directory without a run.
    """
    stored = read_config(workdir)
    if stored is None:
      if what:
        raise UserError(f"{what}={workdir} is a directory without {CONFIG_FILE}; "
                        "point it to a funmatch-train/distill workdir or a weights file")
      raise UserError(f"{workdir} holds no funmatch run (no {CONFIG_FILE}); "
                      "point to a training workdir or an exported weights file")
    config = stored["config"]
    student = dict(config.get("student", {"model": ""}))
    model = student["model"]
    # A workdir written before an 'auto' option existed ran its default.
    options = models.weights_spec(model).with_defaults(_constructor_options(
        {k: v for k, v in student.items() if k not in models.MODEL_META_KEYS}))
    params = None
    if restore:
      from funmatch import checkpoint  # pylint: disable=import-outside-toplevel
      step, params = checkpoint.restore_params(workdir, step)
    data = stored.get("data") or {}
    num_classes = int(data.get("num_classes")
                      or (layouts.num_classes(model, params) if params is not None else 0))
    names = data.get("class_names")
    return cls(model, options, num_classes, int(student.get("res", 0)),
               run_preprocessing(config), tuple(names) if names else None, workdir,
               step, params, str(student.get("dtype", "float32")), config)

  @classmethod
  def from_file(cls, path: str, entry: Optional[catalog.Entry] = None) -> "StoredModel":
    """A funmatch export (its metadata says everything), or a published file
    whose catalog `entry` says what its metadata does not."""
    weights = files.read(path)
    meta = weights.metadata
    if meta.get("producer") == "funmatch":
      model, options = meta["model"], dict(meta["options"])
      num_classes, res = int(meta["num_classes"]), int(meta["resolution"])
      preprocessing = meta.get("preprocessing") or layouts.preprocessing_metadata()
      names = meta.get("class_names")
    elif entry is not None:
      model, options = entry.model, dict(entry.options)
      num_classes, res = entry.num_classes, entry.res
      preprocessing, names = layouts.preprocessing_metadata(), None
    else:
      raise UserError(f"{path} has no funmatch metadata (architecture, classes, "
                      "resolution); export it with funmatch-export, or build the model "
                      "with funmatch.models and load it with weights.layouts.load")
    stored = cls(model, _constructor_options(options), num_classes, res,
                 dict(preprocessing), tuple(names) if names else None, path)
    stored.params = layouts.load(model, weights, stored.init_params(), strict_head=True)
    return stored

  @classmethod
  def from_name(cls, name: str) -> "StoredModel":
    """A published name (funmatch.weights.catalog), read from the local cache."""
    entry = catalog.entry(name)
    return cls.from_file(catalog.resolve(name, "the model"), entry)

  # -------------------------------------------------------------------------
  # Building and writing.

  def module(self, dtype: Any = None):
    """The flax module (in `dtype`, default the dtype it ran in)."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    return models.get_model(self.model, self.num_classes, **self.options,
                            dtype=jnp.dtype(dtype or self.dtype))

  def init_params(self, module: Any = None) -> Any:
    """Zero params of the module's structure (no initialiser runs: cheap)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    module = module or self.module()
    shapes = jax.eval_shape(module.init, jax.random.key(0),
                            jnp.zeros((1, self.res, self.res, 3), jnp.float32))["params"]
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)

  def check_params(self, init_params: Any, target: str, hint: str) -> None:
    """The stored params must have the names and shapes of `init_params`."""
    where = (f"the checkpoint of step {self.step} in {self.source}"
             if self.step is not None else self.source)
    layouts.check_same_shapes(where, self.params, init_params, target, hint)

  def export(self, path: str, format: str = "npz",  # pylint: disable=redefined-builtin
             metadata: Optional[Mapping[str, Any]] = None) -> dict:
    """Writes the params as a funmatch export (`layouts.save_params`); returns
    its metadata. A workdir's export records its step, source and class names."""
    extra = {}
    if self.config is not None:
      extra = {"step": self.step, "source": fileio.abspath(self.source)}
    if self.class_names:
      extra["class_names"] = list(self.class_names)
    return layouts.save_params(self.model, path, self.params, format=format,
                               options=self.options, resolution=self.res,
                               preprocessing=self.preprocessing,
                               metadata={**extra, **(metadata or {})})
