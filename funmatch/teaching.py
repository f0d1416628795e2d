"""The teaching plan: how teacher(s) and student see each example, decided once.

Beyer et al. (Figure 3) compare four modes (`config.teaching`):
  fixed              the student gets a random crop, each teacher the eval view
  independent        every model its own random crop and flip
  consistent         one shared crop and flip, every model at its own resolution
  function_matching  consistent + mixup (one coefficient draw for every view)
funmatch-train (labels, one model) uses the shared crop and mixup when mixup.p > 0.

`plan(config, mode)` turns the config into a `TeachingPlan`; the input pipeline
reads its `crops` and `views`, the train step its `mixup`. Nothing else looks at
`config.teaching`.
"""
import dataclasses
from typing import Mapping

from funmatch.errors import UserError

MODES = ("function_matching", "consistent", "independent", "fixed")
STUDENT_VIEW = "student"
# How the views of one example are cropped (see the module docstring).
CROPS = {"function_matching": "shared", "consistent": "shared",
         "independent": "independent", "fixed": "fixed"}


@dataclasses.dataclass(frozen=True)
class Mixup:
  p: float            # Beta(p, p) for the batch coefficient
  per_example: bool   # Uniform[0, 1] per example instead


@dataclasses.dataclass(frozen=True)
class TeachingPlan:
  views: Mapping[str, int]   # model name ('student', each teacher) -> resolution
  crops: str                 # 'shared' | 'independent' | 'fixed'
  mixup: Mixup | None        # None: no mixup


def plan(config, mode: str, teachers: Mapping[str, int] = None) -> TeachingPlan:
  """The plan of a run: `mode` is 'distill' or 'train'; `teachers` their resolutions."""
  teaching = config.teaching
  if teaching not in MODES:
    raise UserError(f"unknown config.teaching '{teaching}'; choose one of: "
                    f"{', '.join(MODES)}")
  p = float(config.mixup.p)
  if not p >= 0:
    raise UserError(f"config.mixup.p must be >= 0, got {config.mixup.p}")
  views = {STUDENT_VIEW: int(config.student.res), **dict(teachers or {})}
  for name, res in views.items():
    if res <= 0:
      raise UserError(f"config.{name}.res must be > 0, got {res}")
  if mode == "train":  # labels only: one model, mixup if asked for
    crops, mixes = "shared", p > 0
  else:
    crops, mixes = CROPS[teaching], teaching == "function_matching" and p > 0
  mixup = Mixup(p, bool(config.mixup.per_example)) if mixes else None
  return TeachingPlan(views=views, crops=crops, mixup=mixup)
