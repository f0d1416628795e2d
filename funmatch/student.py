"""A trained student in Python: `funmatch.load_student(path_or_workdir)`.

    student = funmatch.load_student("/tmp/digits_fm")   # or an export, or a name
    logits = student.predict(images)                     # uint8 [N, H, W, 3]
    print(student.class_names[logits[0].argmax()])

A workdir gives its latest (or `step`) checkpoint, its model options and eval
preprocessing from its config.json; a funmatch export (.npz / .safetensors) gives
all of it in its metadata; a published name (docs/weights.md) its catalog entry.
Neither the teacher nor the training data is needed, and TensorFlow is not used:
images go through funmatch/images.py, numpy's copy of the eval view. What the
stored model is comes from funmatch.weights.stored (this module is the inference
API over it and imports nothing from funmatch.train).
"""
import dataclasses
import os
from typing import Any, Optional, Sequence

import numpy as np

from funmatch import images
from funmatch.errors import UserError
from funmatch.weights.stored import StoredModel

BATCH_SIZE = 64


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
  stored = StoredModel.open(path_or_workdir, step)
  module = stored.module()
  if stored.config is not None:  # a workdir: its checkpoint must fit its config
    stored.check_params(stored.init_params(module), "its config.json's student",
                        "the workdir is damaged")
  return Student(module, stored.params,
                 images.Preprocessing.from_metadata(stored.res, stored.preprocessing),
                 stored.class_names, stored.model, dict(stored.options), stored.source,
                 stored.step)


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
