"""Training objectives: one per method, one contract (`base.Objective`).

`config.objective` names the method; its settings live in `config.objective_args`
(`config_util.set_objective(config, name)` writes them out with their defaults).
"""
import dataclasses
import importlib
from typing import Any

import ml_collections

from funmatch.distill.objectives.base import Objective
from funmatch.errors import UserError

# name -> "module:Class"; modules load on first use.
OBJECTIVES = {
    "function_matching": "funmatch.distill.objectives.function_matching:FunctionMatching",
    "supervised": "funmatch.distill.objectives.supervised:Supervised",
    "tinymim": "funmatch.distill.objectives.tinymim:TinyMIM",
    "vitkd": "funmatch.distill.objectives.vitkd:ViTKD",
    "nkd": "funmatch.distill.objectives.nkd:NKD",
    "seed": "funmatch.distill.objectives.seed:SEED",
    "ofakd": "funmatch.distill.objectives.ofakd:OFAKD",
}


def objective_class(name: str) -> type:
  if name not in OBJECTIVES:
    raise UserError(f"unknown config.objective '{name}'; "
                    f"choose one of: {', '.join(OBJECTIVES)}")
  module, cls = OBJECTIVES[name].split(":")
  return getattr(importlib.import_module(module), cls)


def default_args(name: str) -> dict[str, Any]:
  """The settings of objective `name` with their defaults (its dataclass fields)."""
  return {f.name: f.default for f in dataclasses.fields(objective_class(name))}


def make_objective(config: ml_collections.ConfigDict) -> Objective:
  """Builds the objective named by `config.objective` from config.objective_args."""
  return objective_class(config.objective).from_config(config)
