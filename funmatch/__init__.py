"""funmatch: function-matching knowledge distillation for vision models (JAX/Flax)."""
import time

__version__ = "0.1.0"
# When funmatch was first imported: the start of a command's start-up time.
IMPORTED_AT = time.perf_counter()


def load_student(path_or_workdir: str, step: int | None = None):
  """A trained student: `.module`, `.params`, `.preprocessing`, `.predict(images)`.

  `path_or_workdir` is a funmatch workdir (its latest checkpoint, or `step`), a
  funmatch export (.npz / .safetensors) or a published name (docs/weights.md).
  Imported on call, so `import funmatch` stays light (and never imports
  TensorFlow). See funmatch/student.py.
  """
  from funmatch import student  # pylint: disable=import-outside-toplevel
  return student.load_student(path_or_workdir, step)
