"""A trained student in Python: `funmatch.load_student(path_or_workdir)`.

    student = funmatch.load_student("/tmp/digits_fm")   # or an export, or a name
    logits = student.predict(images)                     # uint8 [N, H, W, 3]
    print(student.class_names[logits[0].argmax()])

A workdir gives its latest (or `step`) checkpoint, its model options and eval
preprocessing from its config.json; a funmatch export (.npz / .safetensors) gives
all of it in its metadata; a published name (docs/weights.md) its catalog entry.
Neither the teacher nor the training data is needed, and TensorFlow is not used:
images go through funmatch/images.py, numpy's copy of the eval view.
"""
import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from funmatch import config_util, fileio, images, models
from funmatch.errors import UserError
from funmatch.models import catalog, formats, layouts

BATCH_SIZE = 64


def run_preprocessing(config: Mapping[str, Any]) -> dict[str, Any]:
  """The eval preprocessing of a run's config, as `models.preprocessing_metadata`.

  That of its first eval set (by name), which funmatch-eval measures with, else
  the eval settings of its training data.
  """
  evals = dict(config.get("evals") or {})
  data = evals[sorted(evals)[0]] if evals else dict(config.get("input") or {})
  return models.preprocessing_metadata(
      data.get("eval_crop", "resize_small_central"),
      data.get("eval_resize_ratio", 1.143), data.get("resize_antialias", False))


@dataclasses.dataclass
class Student:
  """A model ready to classify images.

  Attributes:
    module: the flax module; `module.apply({"params": params}, x)` gives
      `(logits, taps)` for float32 [N, res, res, 3] images in [-1, 1].
    params: its params (numpy arrays).
    preprocessing: images.Preprocessing: uint8 [H, W, 3] -> model input.
    class_names: the dataset's class names, when known (else None).
    model: the registry name ('bit', 'vit', 'mobilenet_v3') and `options` its
      constructor arguments; `source` what it was loaded from, `step` the
      checkpoint step (None for files).
  """
  module: Any
  params: Any
  preprocessing: images.Preprocessing
  class_names: Optional[tuple[str, ...]]
  model: str
  options: dict[str, Any]
  source: str
  step: Optional[int] = None
  _apply: Any = dataclasses.field(default=None, repr=False)

  @property
  def res(self) -> int:
    return self.preprocessing.res

  @property
  def num_classes(self) -> int:
    return int(self.module.num_classes)

  def preprocess(self, batch: Any) -> np.ndarray:
    """uint8 images (one [H, W, 3], a [N, H, W, 3] array or a list of arrays of any
    sizes) -> float32 [N, res, res, 3], funmatch's eval view."""
    if isinstance(batch, np.ndarray) and batch.ndim == 3:
      batch = batch[None]
    views = [self.preprocessing(np.asarray(image)) for image in batch]
    if not views:
      return np.zeros((0, self.res, self.res, 3), np.float32)
    return np.stack(views)

  def predict(self, batch: Any, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Logits float32 [N, num_classes] of uint8 images (see `preprocess`)."""
    x = self.preprocess(batch)
    if self._apply is None:
      import jax  # pylint: disable=import-outside-toplevel
      self._apply = jax.jit(
          lambda params, x: self.module.apply({"params": params}, x, train=False)[0])
    logits = []
    for start in range(0, len(x), batch_size):
      chunk = x[start:start + batch_size]
      # Pad to a fixed batch so every call reuses one compilation.
      padded = np.zeros((batch_size, *chunk.shape[1:]), np.float32)
      padded[:len(chunk)] = chunk
      out = np.asarray(self._apply(self.params, padded), np.float32)
      logits.append(out[:len(chunk)])
    if not logits:
      return np.zeros((0, self.num_classes), np.float32)
    return np.concatenate(logits)


def load_student(path_or_workdir: str, step: Optional[int] = None) -> Student:
  """The student of a workdir, a funmatch export or a published name (paths and
  workdirs may be gs:// URLs).

  Raises UserError (one line) for anything that is none of these, a step
  without a checkpoint, or a weights file without funmatch metadata.
  """
  source = os.fspath(path_or_workdir)
  if fileio.isdir(source):
    return _from_workdir(source, step)
  if step is not None:
    raise UserError(f"step={step} applies to workdirs; {source} is not one")
  if fileio.isfile(source):
    return _from_file(source, formats.read(source))
  if catalog.is_name(source):
    found = catalog.entry(source)
    path = catalog.resolve(source, "the model")
    return _from_file(path, formats.read(path), found)
  raise UserError(f"{source} is neither a workdir, a weights file nor a published "
                  "name; check the path")


def _build(model: str, options: Mapping[str, Any], num_classes: int, res: int):
  """The module and zero params of its structure (no initialiser runs: cheap)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  module = models.get_model(model, num_classes, **options)
  shapes = jax.eval_shape(module.init, jax.random.key(0),
                          jnp.zeros((1, res, res, 3), jnp.float32))["params"]
  return module, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _from_workdir(workdir: str, step: Optional[int]) -> Student:
  from funmatch import checkpoint  # pylint: disable=import-outside-toplevel
  from funmatch.train import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  from funmatch.train import weights  # pylint: disable=import-outside-toplevel
  stored = workdir_lib.read_config(workdir)
  if stored is None:
    raise UserError(f"{workdir} holds no funmatch run (no {workdir_lib.CONFIG_FILE}); "
                    "point to a training workdir or an exported weights file")
  config = stored["config"]
  student = dict(config["student"])
  step, params = checkpoint.restore_params(workdir, step)
  model = student["model"]
  options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in student.items()
             if k not in config_util.MODEL_META_KEYS}
  options.update(weights.workdir_options(workdir, model))
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  options["dtype"] = jnp.dtype(student.get("dtype", "float32"))
  data = stored.get("data") or {}
  num_classes = int(data.get("num_classes") or models.num_classes(model, params))
  res = int(student["res"])
  module, init = _build(model, options, num_classes, res)
  layouts.check_same_shapes(f"the checkpoint of step {step} in {workdir}", params, init,
                            "its config.json's student", "the workdir is damaged")
  names = data.get("class_names")
  return Student(module, params,
                 images.Preprocessing.from_metadata(res, run_preprocessing(config)),
                 tuple(names) if names else None, model,
                 {k: v for k, v in options.items() if k != "dtype"}, workdir, step)


def _from_file(path: str, weights: formats.Weights,
               found: Optional[catalog.Entry] = None) -> Student:
  meta = weights.metadata
  if meta.get("producer") == "funmatch":
    model, options = meta["model"], dict(meta["options"])
    num_classes, res = int(meta["num_classes"]), int(meta["resolution"])
    preprocessing = meta.get("preprocessing") or models.preprocessing_metadata()
    names = meta.get("class_names")
  elif found is not None:
    model, options = found.model, dict(found.options)
    num_classes, res = found.num_classes, found.res
    preprocessing, names = models.preprocessing_metadata(), None
  else:
    raise UserError(f"{path} has no funmatch metadata (architecture, classes, "
                    "resolution); export it with funmatch-export, or build the model "
                    "with funmatch.models and load it with models.load_params")
  options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in options.items()}
  module, init = _build(model, options, num_classes, res)
  params = models.load_params(model, weights, init, strict_head=True)
  return Student(module, params, images.Preprocessing.from_metadata(res, preprocessing),
                 tuple(names) if names else None, model, options, path)


def image_files(paths: Sequence[str]) -> list[str]:
  """The image files among `paths` (files as given; folders searched, sorted)."""
  found = []
  for path in paths:
    if os.path.isdir(path):
      for root, dirs, files in os.walk(path):
        dirs.sort()
        found.extend(os.path.join(root, name) for name in sorted(files)
                     if name.lower().endswith(images.EXTENSIONS)
                     and not name.startswith("."))
    elif os.path.exists(path):
      found.append(path)
    else:
      raise UserError(f"--images {path} does not exist; give image files or folders")
  if not found:
    raise UserError(f"no .jpg/.jpeg/.png images in {', '.join(paths)}")
  return found
