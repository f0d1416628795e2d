"""funmatch-predict: a student's top classes for image files, as a table and JSON.

Images are decoded with PIL and preprocessed with funmatch's eval view in numpy
(funmatch/images.py), so a PNG gets exactly the logits funmatch-eval computes.
An image that does not decode is reported by name after the others are
classified (and written), and the command then exits 2.
"""
import json
import os
from typing import Optional, Sequence

import numpy as np

from funmatch import images, student as student_lib
from funmatch.errors import UserError


def classify(student: student_lib.Student, paths: Sequence[str], topk: int):
  """([{image, top: [{class, name, probability}]}], [{image, error}])."""
  decoded, errors = [], []
  for path in paths:
    try:
      decoded.append((path, images.decode(path)))
    except UserError as e:
      errors.append({"image": path, "error": str(e)})
  predictions = []
  if decoded:
    logits = student.predict([image for _, image in decoded])
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    k = min(topk, logits.shape[-1])
    for (path, _), p in zip(decoded, probabilities):
      top = np.argsort(-p, kind="stable")[:k]
      predictions.append({"image": path, "top": [
          {"class": int(c), "name": _name(student, int(c)),
           "probability": float(p[c])} for c in top]})
  return predictions, errors


def _name(student: student_lib.Student, index: int) -> str:
  names = student.class_names
  return names[index] if names and index < len(names) else str(index)


def format_table(predictions) -> str:
  """One row per image: its path, then the top classes with probabilities."""
  width = max([len("image")] + [len(p["image"]) for p in predictions])
  lines = [f"{'image':<{width}}  top classes (probability)"]
  for prediction in predictions:
    top = ", ".join(f"{t['name']} ({t['probability']:.3f})" for t in prediction["top"])
    lines.append(f"{prediction['image']:<{width}}  {top}")
  return "\n".join(lines)


def run(model: str, inputs: Sequence[str], topk: int, output: str,
        step: Optional[int]) -> int:
  """The command: load, classify, print, write; UserError for bad images at the end."""
  if topk < 1:
    raise UserError(f"--topk must be >= 1, got {topk}")
  if output and os.path.isdir(output):
    raise UserError(f"--output {output} is a directory; give a .json file path")
  paths = student_lib.image_files(inputs)
  student = student_lib.load_student(model, step)
  predictions, errors = classify(student, paths, topk)
  if predictions:
    print(format_table(predictions), flush=True)
  if output:
    _write_json(output, {"model": model, "step": student.step,
                         "predictions": predictions, "errors": errors})
    print(f"wrote {output}", flush=True)
  if errors:
    others = f"; the other {len(predictions)} were classified" if predictions else ""
    raise UserError(f"{len(errors)} image(s) could not be classified: "
                    f"{errors[0]['error']}{others}")
  return 0


def _write_json(path: str, content) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(content, f, indent=2)
  os.replace(tmp, path)
