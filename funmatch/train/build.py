"""Builds a run from its config, in one order of stages, validating before anything is written.

    validate (no I/O) -> check storage (gs:// reachable; lists, never writes)
      -> the stored student (eval, export: a workdir's checkpoint) -> the models'
      'auto' options from their weights (file headers, a workdir's config.json)
      -> open the data -> build the models (random init) -> load the weights
      -> the teaching plan and the optimizer

`build(config, mode, workdir=..., needs=Needs(...))` is the one way to build a run:
the loop, funmatch-eval, the benchmark and the memory estimate say what they need
(`Needs`: teachers or not, their weights or random ones, the student from a
checkpoint, the data, abstract shapes only, an optimizer) and none spells out the
stages. The run's config is a copy with every weight-dependent model option
decided: that copy is what the workdir records. Nothing here writes anywhere, so
a user mistake found here leaves the workdir (and any bucket) untouched: a
malformed URL is refused by validation, an unreachable gs:// location (no
credentials, no bucket, no permission) by the storage check, before any weights
are read.
"""
import copy
import dataclasses
import logging
import math
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from funmatch import config_util, fileio, models, parallel, teaching
from funmatch.distill import objectives
from funmatch.errors import UserError
from funmatch.models import conv
from funmatch.optim import make_optimizer
from funmatch.train import evaluate
from funmatch.weights import init as weights_init
from funmatch.weights import layouts
from funmatch.weights.stored import StoredModel

MODES = ("distill", "train")
DTYPES = ("float32", "bfloat16", "float16")
RESERVED_NAMES = ("student", "input", "evals")


@dataclasses.dataclass(frozen=True)
class Spec:
  """What validation makes of a config (stage 1)."""
  objective: objectives.Objective
  teacher_names: tuple[str, ...]   # the teachers this run runs (none for 'train')
  mesh: Any


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """The training data as the schedule sees it, and the run's opened splits
  (stage 2). Each split is opened once per run (funmatch.data.DataSource);
  the loop, the evaluator and the tools read through these objects."""
  num_classes: int
  train_examples: int
  steps_per_epoch: float
  total_steps: int
  class_names: tuple[str, ...] | None = None  # when the data names its classes
  train_source: Any = None  # config.input (None: an evaluation, synthetic data)
  eval_sources: dict[str, Any] = dataclasses.field(default_factory=dict)  # by eval name

  def record(self) -> dict[str, Any]:
    """What config.json keeps of the data (eval and predict read it back)."""
    names = list(self.class_names) if self.class_names else None
    return {"num_classes": self.num_classes, "class_names": names}


@dataclasses.dataclass
class Models:
  """Modules and params (stages 3 and 4); teachers' params frozen and placed."""
  student: nn.Module
  student_params: Any
  teachers: dict[str, nn.Module]
  teacher_params: dict[str, Any]


@dataclasses.dataclass
class Run:
  """Everything the loop, the evaluation and the tools need about a run."""
  config: ml_collections.ConfigDict
  mode: str
  mesh: Any
  data: DataInfo
  plan: teaching.TeachingPlan
  models: Models
  objective: objectives.Objective
  output_shapes: Any               # (student_out, {teacher: out}) as shapes
  optimizer: Any
  schedule: Any
  checkpoint_step: int | None = None  # the restored student's step (Needs.checkpoint_of)

  # Short names for what every caller reads.
  num_classes = property(lambda self: self.data.num_classes)
  total_steps = property(lambda self: self.data.total_steps)
  student = property(lambda self: self.models.student)
  teachers = property(lambda self: self.models.teachers)
  teacher_params = property(lambda self: self.models.teacher_params)


@dataclasses.dataclass(frozen=True)
class Needs:
  """What a caller needs of a run; `build` runs the stages these imply, in its one order.

  Attributes:
    teachers: False builds the student alone (funmatch-eval --student_only).
    teacher_weights: 'init' loads each teacher's init; 'random' keeps random weights
      (tools that time the step; random weights imply nothing about 'auto' options).
    checkpoint_of: a workdir whose checkpoint (`step`, default the latest) is the
      student (eval, export); '' starts the student from its init.
    step: that checkpoint's step.
    data: 'train' opens the training split and the eval sets; 'eval' the eval sets
      only (the training data may be gone); a tool with its own (synthetic) data
      passes a DataInfo to `build` instead.
    abstract: models as shapes only (jax.eval_shape): no params computed, no
      weights read (the memory estimate).
    optimizer: False builds no optimizer (an evaluation).
  """
  teachers: bool = True
  teacher_weights: str = "init"
  checkpoint_of: str = ""
  step: int | None = None
  data: str = "train"
  abstract: bool = False
  optimizer: bool = True


TRAIN = Needs()
EVAL = Needs(data="eval", optimizer=False)


# ---------------------------------------------------------------------------
# Stage 1: validate (no I/O).


def _teacher_names(config) -> tuple[str, ...]:
  names = tuple(config.teachers or ())
  if len(set(names)) != len(names):
    raise UserError(f"config.teachers={names} names a teacher twice")
  reserved = set(RESERVED_NAMES) & set(names)
  if reserved:
    raise UserError(f"config.teachers may not use the name(s) {sorted(reserved)}")
  for name in names:
    if name not in config:
      raise UserError(f"config.teachers names '{name}' but there is no config.{name}; "
                      f"add config.{name} = a model config or remove it from "
                      "config.teachers")
  return names


def model_dtype(model_config, what: str):
  if model_config.dtype not in DTYPES:
    raise UserError(f"config.{what}.dtype='{model_config.dtype}' is not one of "
                    f"{', '.join(DTYPES)}")
  return jnp.dtype(model_config.dtype)


def validate(config: ml_collections.ConfigDict, mode: str) -> Spec:
  """Checks everything that needs no files; returns the objective, teachers, mesh."""
  if mode not in MODES:
    raise ValueError(mode)
  if mode == "train" and config.objective != "supervised":
    raise UserError(f"funmatch-train trains on labels and needs config.objective="
                    f"'supervised' (got '{config.objective}'); use funmatch-distill for "
                    "this config")
  if mode == "distill" and config.objective == "supervised":
    raise UserError("config.objective='supervised' is label training; use funmatch-train "
                    "for this config, or set config.objective='function_matching'")
  objective = objectives.make_objective(config)
  names = _teacher_names(config)
  if objective.needs_teachers and not names:
    raise UserError(f"config.objective='{config.objective}' needs teachers; set "
                    "config.teachers=('teacher',) and config.teacher")
  if not objective.needs_teachers and names:
    raise UserError("funmatch-train does not use teachers; remove config.teachers")
  for what in ("student", *names):
    model_dtype(config[what], what)
  teaching.plan(config, mode, {name: int(config[name].res) for name in names})
  mesh = parallel.make_mesh(config)
  parallel.check_batch_size(int(config.input.batch_size), mesh)
  for name, eval_config in config.evals.items():
    parallel.check_batch_size(int(eval_config.batch_size), mesh, f"evals.{name}.batch_size")
  evaluate.check_settings(config)
  for group in ("student", "aux", *names):
    parallel.strategy(config, group, mesh)
  parallel.fsdp_min_size(config)
  every = config.preemption_check_every_steps
  if not isinstance(every, int) or isinstance(every, bool) or every < 1:
    raise UserError(f"config.preemption_check_every_steps={every!r} must be an integer "
                    ">= 1 (how often the processes of a multi-host run agree to stop)")
  for what, location in storage_locations(config, names):
    fileio.check_path(location, what)
  return Spec(objective=objective, teacher_names=names, mesh=mesh)


def storage_locations(config: ml_collections.ConfigDict,
                      teacher_names: tuple[str, ...]) -> list[tuple[str, str]]:
  """(config key, location) of every file or directory the config points at."""
  found = [("config.student.init", config.student.init)]
  found += [(f"config.{name}.init", config[name].init) for name in teacher_names]
  for where, data in [("input", config.input), *((f"evals.{name}", eval_config)
                                                 for name, eval_config in
                                                 config.evals.items())]:
    source = data.get("source", None)
    key = {"tfds": "data_dir", "folder": "root"}.get(source)
    if key and data.get(key, None):
      found.append((f"config.{where}.{key}", data[key]))
  return [(what, str(location)) for what, location in found if location]


# ---------------------------------------------------------------------------
# Stage 2a: storage (lists, never writes).


def check_storage(config: ml_collections.ConfigDict, spec: Spec,
                  workdir: str | None = None) -> None:
  """Every gs:// location of the run (workdir, inits, data) can be reached with
  this process's credentials: one line naming the first that cannot, and how
  to authenticate. Local paths are checked where they are read."""
  checked = set()
  locations = [("--workdir", workdir)] if workdir else []
  for what, location in locations + storage_locations(config, spec.teacher_names):
    if fileio.is_remote(location) and location not in checked:
      fileio.check_reachable(location, what)
      checked.add(location)


# ---------------------------------------------------------------------------
# Stage 2: the data (opens each split once: reads descriptions, never the examples).


def total_steps_of(config, train_examples: int) -> tuple[int, float]:
  """(total_steps, steps_per_epoch) from total_steps or total_epochs."""
  steps_per_epoch = train_examples / int(config.input.batch_size)
  if config.total_steps:
    total = int(config.total_steps)
  elif config.total_epochs:
    total = int(math.ceil(float(config.total_epochs) * steps_per_epoch))
  else:
    raise UserError("set config.total_epochs or config.total_steps (> 0)")
  if total <= 0:
    raise UserError(f"the run has {total} steps; set config.total_epochs or "
                    "config.total_steps to a positive value")
  return total, steps_per_epoch


def _open_evals(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
  """Opens (and checks) every eval set: it must have the run's classes."""
  from funmatch.data import sources  # pylint: disable=import-outside-toplevel
  opened = {eval_name: sources.open_source(eval_config, where=f"evals.{eval_name}")
            for eval_name, eval_config in config.evals.items()}
  check_eval_classes(opened, num_classes)
  return opened


def check_eval_classes(evals: dict[str, Any], num_classes: int) -> None:
  """Every eval set must have the run's classes."""
  for eval_name, source in evals.items():
    if source.num_classes != num_classes:
      raise UserError(f"config.evals.{eval_name} has {source.num_classes} classes but "
                      f"the run has {num_classes}; evaluate on a dataset with the same "
                      "classes")


def _class_names(opened, num_classes: int) -> tuple[str, ...] | None:
  """The first class names that fit the run (training data, else an eval set:
  distilling on other images, the eval set names the classes)."""
  for source in opened:
    if source.class_names and len(source.class_names) == num_classes:
      return tuple(source.class_names)
  return None


def describe_data(config: ml_collections.ConfigDict) -> DataInfo:
  """Opens the training split and the eval sets; class count, example count and
  schedule length of the run."""
  from funmatch.data import sources  # pylint: disable=import-outside-toplevel
  train = sources.open_source(config.input, where="input")
  num_classes = int(config.num_classes or train.num_classes)
  return data_info(config, train, _open_evals(config, num_classes))


def data_info(config: ml_collections.ConfigDict, train: Any,
              evals: dict[str, Any]) -> DataInfo:
  """The DataInfo of already opened sources (a tool that opens them itself)."""
  num_classes = int(config.num_classes or train.num_classes)
  total_steps, steps_per_epoch = total_steps_of(config, train.num_examples)
  return DataInfo(num_classes, train.num_examples, steps_per_epoch, total_steps,
                  _class_names([train, *evals.values()], num_classes),
                  train_source=train, eval_sources=evals)


def describe_eval_data(config: ml_collections.ConfigDict, num_classes: int) -> DataInfo:
  """The data of an evaluation: the eval sets only (the training data may be gone)."""
  evals = _open_evals(config, num_classes)
  return DataInfo(num_classes, 0, 0.0, 0, _class_names(evals.values(), num_classes),
                  eval_sources=evals)


# ---------------------------------------------------------------------------
# Stage 1b, right after validation: the models' weight-dependent options (reads
# file headers and configs only; the loop decides them before checking the workdir).


def resolve_options(config: ml_collections.ConfigDict, spec: Spec,
                    student_from: str = "") -> ml_collections.ConfigDict:
  """A copy of `config` with every model's 'auto' options decided from its weights.

  `student_from` (evaluating or exporting a workdir's checkpoint): the student's
  come from that workdir's config.json instead of its init. A config with nothing
  left 'auto' reads no file.
  """
  resolved = copy.deepcopy(config)
  for what in ("student", *spec.teacher_names):
    model_config = resolved[what]
    if what == "student" and student_from:
      options = weights_init.workdir_options(student_from, model_config.model)
    else:
      options = weights_init.resolve_options(model_config, f"config.{what}")
    for key, value in options.items():
      if key not in model_config:
        with model_config.unlocked():
          model_config[key] = value
      else:
        model_config[key] = value
  return resolved


# ---------------------------------------------------------------------------
# Stage 3: the models, with random params.


def build_model(model_config: ml_collections.ConfigDict, num_classes: int,
                what: str, seed: int = 0, abstract: bool = False) -> tuple[nn.Module, Any]:
  """The flax module and its random init params (from PRNGKey(seed)) for a model
  (abstract: their shapes only)."""
  conv.check_impl(model_config.get("conv_impl"), f"config.{what}.conv_impl")
  kwargs = config_util.model_kwargs(model_config)
  kwargs["dtype"] = model_dtype(model_config, what)
  module = models.get_model(model_config.model, num_classes, **kwargs)
  res = int(model_config.res)
  if res <= 0:
    raise UserError(f"config.{what}.res must be > 0, got {res}")
  dummy = jnp.zeros((1, res, res, 3), jnp.float32)
  init = lambda rng: module.init(rng, dummy, train=False)["params"]
  try:
    rng = jax.random.PRNGKey(seed)
    params = jax.eval_shape(init, rng) if abstract else jax.jit(init)(rng)
  except (ValueError, TypeError) as e:
    raise UserError(f"config.{what} cannot be built: {str(e).splitlines()[0]}") from None
  return module, params


def build_models(config: ml_collections.ConfigDict, spec: Spec, num_classes: int,
                 abstract: bool = False, student_replaced: bool = False) -> Models:
  """The student with random params and the teachers' param shapes.

  A teacher's values always come from elsewhere (its init, or random_params), and
  so does a student a checkpoint replaces (student_replaced): their random init
  would be compiled and run for nothing, so only its shapes are traced. The
  student's init key is PRNGKey(seed) itself: seed 0 keeps the init every run had
  before the key followed the seed."""
  student, student_params = build_model(config.student, num_classes, "student",
                                        seed=int(config.seed),
                                        abstract=abstract or student_replaced)
  teachers, teacher_params = {}, {}
  for name in spec.teacher_names:
    teachers[name], teacher_params[name] = build_model(config[name], num_classes, name,
                                                       abstract=True)
  return Models(student, student_params, teachers, teacher_params)


# ---------------------------------------------------------------------------
# Stage 4: the weights.


def load_weights(config: ml_collections.ConfigDict, spec: Spec, built: Models,
                 load_student: bool = True) -> Models:
  """Loads each model's `init`, then freezes and places the teachers.

  load_student=False (eval, export) keeps the student's random params: a
  checkpoint replaces them.
  """
  student_params = built.student_params
  if load_student:
    student_params = weights_init.initial_params(config.student, student_params,
                                                 what="config.student", teacher=False)
  teacher_params = {}
  for name in spec.teacher_names:
    if not config[name].init:
      raise UserError(f"config.{name}.init is empty: a teacher needs trained weights (a "
                      "published name such as FunMatch-teacher-224px-i1k, an official "
                      "BiT .npz, a funmatch-export file or a funmatch-train workdir)")
    teacher_params[name] = weights_init.initial_params(
        config[name], built.teacher_params[name], what=f"config.{name}", teacher=True)
  return freeze_teachers(config, spec, Models(built.student, student_params, built.teachers,
                                              teacher_params))


def freeze_teachers(config: ml_collections.ConfigDict, spec: Spec, built: Models,
                    abstract: bool = False) -> Models:
  """The teachers in their frozen form (layouts.freeze), placed as config.sharding says
  (abstract: their shapes, placed nowhere)."""
  teachers, teacher_params = {}, {}
  for name in spec.teacher_names:
    model, module, params = config[name].model, built.teachers[name], built.teacher_params[name]
    if abstract:  # the frozen params' shapes; the frozen module comes out of the trace
      frozen_modules = []

      def freeze(p, model=model, module=module, frozen_modules=frozen_modules):
        frozen_module, p = layouts.freeze(model, module, p)
        frozen_modules.append(frozen_module)
        return p

      teacher_params[name] = jax.eval_shape(freeze, params)
      teachers[name] = frozen_modules[0]
      continue
    teachers[name], params = layouts.freeze(model, module, params)
    teacher_params[name] = jax.device_put(
        params, parallel.group_shardings(config, name, params, spec.mesh))
  return Models(built.student, built.student_params, teachers, teacher_params)


def output_shapes(built: Models, views: dict[str, int], batch_size: int = 2):
  """The shapes of the student's and each teacher's `(logits, taps)`; computes nothing."""
  def shapes(module, params, res):
    images = jax.ShapeDtypeStruct((batch_size, res, res, 3), jnp.float32)
    return jax.eval_shape(lambda p, x: module.apply({"params": p}, x, train=False),
                          params, images)
  return (shapes(built.student, built.student_params, views["student"]),
          {name: shapes(module, built.teacher_params[name], views[name])
           for name, module in built.teachers.items()})


# ---------------------------------------------------------------------------
# All stages.


def assemble(config: ml_collections.ConfigDict, mode: str, spec: Spec, data: DataInfo,
             built: Models, train: bool = True) -> Run:
  """The run from its stages' outputs: teaching plan, output shapes, optimizer
  (train=False: an evaluation, no optimizer)."""
  views = {name: int(config[name].res) for name in built.teachers}
  plan = teaching.plan(config, mode, views)
  shapes = output_shapes(built, plan.views)
  optimizer = schedule = None
  if train:
    spec.objective.check_models(*shapes)
    optimizer, schedule = make_optimizer(config, data.total_steps)
  logging.info("run: %d classes, %d train examples, %d steps (%.1f per epoch), views %s",
               data.num_classes, data.train_examples, data.total_steps,
               data.steps_per_epoch, plan.views)
  return Run(config=config, mode=mode, mesh=spec.mesh, data=data, plan=plan,
             models=built, objective=spec.objective, output_shapes=shapes,
             optimizer=optimizer, schedule=schedule)


def build(config: ml_collections.ConfigDict, mode: str, *, workdir: str | None = None,
          needs: Needs = TRAIN, data: DataInfo | None = None,
          check_config: Callable[[ml_collections.ConfigDict], None] | None = None,
          on_stage: Callable[[str], None] | None = None) -> Run:
  """Validates the config and builds the run `needs` asks for; writes nothing.

  Args:
    workdir: the run's workdir (its storage is checked with the config's).
    needs: what to build (`Needs`; TRAIN and EVAL are the usual two).
    data: the data of a tool that brings its own (synthetic data); else opened per
      `needs.data`.
    check_config: called with the resolved config before any data is read (the loop
      compares it with the run the workdir holds).
    on_stage: called with each finished stage's name (the start-up clock).
  """
  mark = on_stage or (lambda name: None)
  spec = validate(config, mode)
  if not needs.teachers:
    spec = dataclasses.replace(spec, teacher_names=())
  check_storage(config, spec, workdir)
  stored = None
  if needs.checkpoint_of:
    stored = StoredModel.from_workdir(needs.checkpoint_of, needs.step)
  if needs.teacher_weights == "init" and not needs.abstract:
    config = resolve_options(config, spec, student_from=needs.checkpoint_of)
  if check_config:
    check_config(config)
  mark("config")
  if data is None:
    data = (describe_data(config) if needs.data == "train" else
            describe_eval_data(config, stored.num_classes if stored else
                               int(config.num_classes)))
  mark("data")
  built = build_models(config, spec, data.num_classes, abstract=needs.abstract,
                       student_replaced=stored is not None)
  mark("models")
  built = _weights(config, spec, built, needs, stored)
  mark("weights")
  run = assemble(config, mode, spec, data, built, train=needs.optimizer)
  return dataclasses.replace(run, checkpoint_step=stored.step if stored else None)


def random_params(shapes: Any, seed: int = 0) -> Any:
  """Random params of the given shapes: fan-in scaled kernels, norm scales 1, biases 0.

  Nothing is zero-initialised (unlike a fresh head), so a random teacher's logits, and
  a tool's bf16 agreement with them, are not trivially constant.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in flax.traverse_util.flatten_dict(shapes).items():
    shape = tuple(leaf.shape)
    if len(shape) >= 2:
      fan_in = int(np.prod(shape[:-1]))
      out[path] = rng.standard_normal(shape, np.float32) * np.float32(fan_in ** -0.5)
    elif path[-1] == "scale":
      out[path] = np.ones(shape, np.float32)
    else:
      out[path] = np.zeros(shape, np.float32)
  return flax.traverse_util.unflatten_dict(out)


def _weights(config: ml_collections.ConfigDict, spec: Spec, built: Models, needs: Needs,
             stored: StoredModel | None) -> Models:
  """Stage 4 as `needs` asks: each model's init, random teachers, or the stored student."""
  if needs.abstract:
    return freeze_teachers(config, spec, built, abstract=True)
  if needs.teacher_weights == "random":
    built.teacher_params = {name: random_params(params)
                            for name, params in built.teacher_params.items()}
    return freeze_teachers(config, spec, built)
  built = load_weights(config, spec, built, load_student=stored is None)
  if stored is not None:
    stored.check_params(built.student_params, "config.student",
                        "evaluate with the config the workdir was trained with")
    built.student_params = stored.params
  return built
