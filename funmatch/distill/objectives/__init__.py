"""Training objectives: one per method, one interface.

An objective is called inside the jitted step as
  `loss, metrics = objective(aux_params, student_out, teacher_outs, batch, rng)`
where `student_out` is the student's `(logits, taps)`, `teacher_outs` maps each
teacher name to its `(logits, taps)` (computed frozen, without gradient) and
`batch` holds at least `label` (int [B]) and `label_probs` (the labels mixed the
same way as the images, [B, C]). `aux_params` are the objective's own trainable,
training-only parameters (empty for function matching); `init_aux(rng,
student_out, teacher_outs)` creates them.
"""
import ml_collections

from funmatch.distill.objectives.function_matching import FunctionMatching
from funmatch.distill.objectives.supervised import Supervised
from funmatch.errors import UserError

OBJECTIVES = {
    "function_matching": FunctionMatching,
    "supervised": Supervised,
}


def make_objective(config: ml_collections.ConfigDict):
  """Builds the objective named by `config.objective` from its config fields."""
  name = config.objective
  if name not in OBJECTIVES:
    raise UserError(f"unknown config.objective '{name}'; "
                    f"choose one of: {', '.join(OBJECTIVES)}")
  return OBJECTIVES[name].from_config(config)
