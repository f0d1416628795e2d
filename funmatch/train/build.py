"""Builds everything a run needs from its config, validating before any write.

`build(config, mode)` checks the config, the data sources, the models and the
teachers' files; it creates nothing in the workdir, so a user mistake found here
leaves the workdir untouched.
"""
import dataclasses
import logging
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from funmatch import config_util, models, parallel
from funmatch.distill import objectives
from funmatch.errors import UserError
from funmatch.models import conv
from funmatch.optim import make_optimizer
from funmatch.train import params_io

MODES = ("distill", "train")
TEACHING_MODES = ("function_matching", "consistent", "independent", "fixed")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class Run:
  """A validated run: models, params, data descriptions, optimizer, mesh."""
  config: ml_collections.ConfigDict
  mode: str
  mesh: Any
  num_classes: int
  train_examples: int
  steps_per_epoch: float
  total_steps: int
  views: dict[str, int]                  # model name -> input resolution
  student: nn.Module
  student_params: Any                    # initial student params (host or device)
  teachers: dict[str, nn.Module]
  teacher_params: dict[str, Any]         # frozen, on device (config.sharding)
  objective: Any
  output_shapes: Any                     # (student_out, {teacher: out}) as shapes
  optimizer: Any
  schedule: Any
  mixup: dict[str, Any] | None


@dataclasses.dataclass(frozen=True)
class SyntheticData:
  """Stands in for the data sources in `build`, for tools that feed synthetic batches:
  nothing is read and funmatch.data (so TensorFlow) is never imported."""
  num_classes: int
  num_examples: int  # one "epoch", for config.total_epochs


def _require_keys(config, keys, where="config"):
  for key in keys:
    if key not in config:
      raise UserError(f"{where} has no '{key}'; every recipe needs it (see configs/digits.py)")


def _dtype(model_config, what):
  name = model_config.get("dtype", "float32")
  if name not in DTYPES:
    raise UserError(f"config.{what}.dtype='{name}' is not one of {', '.join(DTYPES)}")
  return jnp.dtype(name)


def build_model(model_config: ml_collections.ConfigDict, num_classes: int,
                what: str, frozen: bool = False) -> tuple[nn.Module, Any]:
  """The flax module and its random init params for a model sub-config."""
  _require_keys(model_config, ("model", "res"), f"config.{what}")
  conv.check_impl(model_config.get("conv_impl"), f"config.{what}.conv_impl")
  kwargs = config_util.model_kwargs(model_config)
  kwargs["dtype"] = _dtype(model_config, what)
  module = models.get_model(model_config.model, num_classes, **kwargs)
  res = int(model_config.res)
  if res <= 0:
    raise UserError(f"config.{what}.res must be > 0, got {res}")
  dummy = jnp.zeros((1, res, res, 3), jnp.float32)
  try:
    params = jax.jit(lambda rng: module.init(rng, dummy, train=False)["params"])(
        jax.random.PRNGKey(0))
  except (ValueError, TypeError) as e:
    raise UserError(f"config.{what} cannot be built: {str(e).splitlines()[0]}") from None
  return module, params


def _signature(model_config) -> dict[str, Any]:
  return {"model": model_config.model, **config_util.model_kwargs(model_config)}


def _load_teacher(config, name, num_classes) -> tuple[nn.Module, Any]:
  if name not in config:
    raise UserError(f"config.teachers names '{name}' but there is no config.{name}; "
                    f"add config.{name} = a model config or remove it from config.teachers")
  teacher_config = config[name]
  if not teacher_config.get("init"):
    raise UserError(f"config.{name}.init is empty: a teacher needs trained weights (an "
                    "official BiT .npz, a funmatch-export file or a funmatch-train workdir)")
  module, init_params = build_model(teacher_config, num_classes, name, frozen=True)
  params = params_io.resolve_init(
      teacher_config.init, teacher_config.model, init_params, what=f"config.{name}",
      dont_load=(), model_signature=_signature(teacher_config), strict_head=True)
  params_io.check_shapes(teacher_config.init, params, init_params, f"config.{name}")
  if teacher_config.model == "bit":
    # The teacher is frozen: standardise its conv kernels once, not every step.
    from funmatch.models import bit  # pylint: disable=import-outside-toplevel
    params = bit.prestandardize(params)
    kwargs = config_util.model_kwargs(teacher_config)
    kwargs["dtype"] = _dtype(teacher_config, name)
    module = models.get_model("bit", num_classes, standardize_weights=False, **kwargs)
  return module, params


def abstract_outputs(student, student_params, teachers, teacher_params, views,
                     batch_size: int = 2):
  """The shapes of the student's and each teacher's `(logits, taps)`; computes nothing."""
  def shapes(module, params, res):
    images = jax.ShapeDtypeStruct((batch_size, res, res, 3), jnp.float32)
    return jax.eval_shape(lambda p, x: module.apply({"params": p}, x, train=False),
                          params, images)
  return (shapes(student, student_params, views["student"]),
          {name: shapes(module, teacher_params[name], views[name])
           for name, module in teachers.items()})


def total_steps_of(config, train_examples: int) -> tuple[int, float]:
  """(total_steps, steps_per_epoch) from total_steps or total_epochs."""
  batch_size = int(config.input.batch_size)
  steps_per_epoch = train_examples / batch_size
  if config.get("total_steps"):
    total = int(config.total_steps)
  elif config.get("total_epochs"):
    total = int(math.ceil(float(config.total_epochs) * steps_per_epoch))
  else:
    raise UserError("set config.total_epochs or config.total_steps (> 0)")
  if total <= 0:
    raise UserError(f"the run has {total} steps; set config.total_epochs or "
                    "config.total_steps to a positive value")
  return total, steps_per_epoch


def _mixup(config, mode) -> dict[str, Any] | None:
  mixup = config.get("mixup", ml_collections.ConfigDict())
  p = float(mixup.get("p", 1.0 if mode == "distill" else 0.0))
  if p < 0:
    raise UserError(f"config.mixup.p must be >= 0, got {p}")
  uses_mixup = (config.get("teaching", "function_matching") == "function_matching"
                if mode == "distill" else p > 0)
  if not uses_mixup or p == 0:
    return None
  return {"p": p, "per_example": bool(mixup.get("per_example", False))}


def validate_top_level(config: ml_collections.ConfigDict, mode: str) -> None:
  if mode not in MODES:
    raise ValueError(mode)
  _require_keys(config, ("seed", "input", "student", "objective", "lr"))
  objective = config.objective
  if mode == "train" and objective != "supervised":
    raise UserError(f"funmatch-train trains on labels and needs config.objective="
                    f"'supervised' (got '{objective}'); use funmatch-distill for this config")
  if mode == "distill" and objective == "supervised":
    raise UserError("config.objective='supervised' is label training; use funmatch-train "
                    "for this config, or set config.objective='function_matching'")
  teaching = config.get("teaching", "function_matching")
  if teaching not in TEACHING_MODES:
    raise UserError(f"unknown config.teaching '{teaching}'; choose one of: "
                    f"{', '.join(TEACHING_MODES)}")


def teacher_names(config) -> tuple[str, ...]:
  names = tuple(config.get("teachers", ()) or ())
  if len(set(names)) != len(names):
    raise UserError(f"config.teachers={names} names a teacher twice")
  reserved = {"student", "input", "evals"} & set(names)
  if reserved:
    raise UserError(f"config.teachers may not use the name(s) {sorted(reserved)}")
  return names


def describe_data(config: ml_collections.ConfigDict, mesh):
  """The training source's description, after checking every eval set against it."""
  from funmatch.data import sources  # pylint: disable=import-outside-toplevel
  train_info = sources.source_info(config.input, where="input")
  num_classes = int(config.get("num_classes", 0) or train_info.num_classes)
  for eval_name, eval_config in config.get("evals", {}).items():
    info = sources.source_info(eval_config, where=f"evals.{eval_name}")
    if info.num_classes != num_classes:
      raise UserError(f"config.evals.{eval_name} has {info.num_classes} classes but the "
                      f"run has {num_classes}; evaluate on a dataset with the same classes")
    parallel.check_batch_size(int(eval_config.get("batch_size", config.input.batch_size)),
                              mesh, f"evals.{eval_name}.batch_size")
  return train_info


def build(config: ml_collections.ConfigDict, mode: str, restore_only: bool = False,
          synthetic_data: SyntheticData | None = None) -> Run:
  """Validates the config and builds the run (no workdir writes).

  restore_only: for eval/export, the student's own init is not loaded (the
  checkpoint replaces it).
  synthetic_data: describes the data instead of config.input and config.evals
  (which are then neither checked nor read).
  """
  validate_top_level(config, mode)
  objective = objectives.make_objective(config)
  names = teacher_names(config)
  if objective.needs_teachers and not names:
    raise UserError(f"config.objective='{config.objective}' needs teachers; set "
                    "config.teachers=('teacher',) and config.teacher")
  if not objective.needs_teachers and names and mode == "train":
    raise UserError("funmatch-train does not use teachers; remove config.teachers")

  mesh = parallel.make_mesh(config)
  parallel.check_batch_size(int(config.input.batch_size), mesh)
  train_info = synthetic_data or describe_data(config, mesh)
  num_classes = int(config.get("num_classes", 0) or train_info.num_classes)
  total_steps, steps_per_epoch = total_steps_of(config, train_info.num_examples)

  student, student_params = build_model(config.student, num_classes, "student")
  if not restore_only and config.student.get("init"):
    student_params = params_io.resolve_init(
        config.student.init, config.student.model, student_params, what="config.student",
        dont_load=tuple(config.student.get("dont_load", ())),
        model_signature=None, strict_head=False)
  teachers, teacher_params = {}, {}
  if mode == "distill":
    for name in names:
      teachers[name], teacher_params[name] = _load_teacher(config, name, num_classes)
  for group in ("student", "aux"):
    parallel.strategy(config, group, mesh)  # a bad value fails before any write
  parallel.fsdp_min_size(config)
  teacher_params = {name: jax.device_put(params, parallel.group_shardings(
                        config, name, params, mesh))
                    for name, params in teacher_params.items()}

  views = {"student": int(config.student.res)}
  views.update({name: int(config[name].res) for name in teachers})
  output_shapes = abstract_outputs(student, student_params, teachers, teacher_params, views)
  if hasattr(objective, "check_models"):
    objective.check_models(*output_shapes)
  if synthetic_data is None:
    from funmatch.data import pipeline  # pylint: disable=import-outside-toplevel
    pipeline.check_teaching(config.get("teaching", "function_matching"), views)
  optimizer, schedule = make_optimizer(config, total_steps)
  logging.info("run: %d classes, %d train examples, %d steps (%.1f per epoch), views %s",
               num_classes, train_info.num_examples, total_steps, steps_per_epoch, views)
  return Run(config=config, mode=mode, mesh=mesh, num_classes=num_classes,
             train_examples=train_info.num_examples, steps_per_epoch=steps_per_epoch,
             total_steps=total_steps, views=views, student=student,
             student_params=student_params, teachers=teachers,
             teacher_params=teacher_params, objective=objective,
             output_shapes=output_shapes, optimizer=optimizer,
             schedule=schedule, mixup=_mixup(config, mode))
