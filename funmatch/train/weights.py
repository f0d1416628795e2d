"""A model's initial weights: random, a weights file, a published name or a workdir.

`config.<model>.init` is '' (the random init), a weights file (read by the model's
own module, funmatch/models: an official BiT .npz, big_vision, timm or funmatch
files), a published name (funmatch/models/catalog.py, read from the local cache)
or a funmatch-train/distill workdir (its latest checkpoint's student); files and
workdirs may be paths or gs:// URLs (funmatch.fileio). An `init_sha256` must match
the file.

Options whose 'auto' depends on the weights (BiT's stem padding, ViT's GELU) come
from the same place (`resolve_options`): a file's metadata or layout, a name's
catalog entry, a workdir's recorded config. The build writes them into the run's
config, so config.json records them, and a resumed run or a run that takes this
workdir as its teacher rebuilds the very same function.
"""
import dataclasses
import logging
from typing import Any, Mapping

import ml_collections

from funmatch import config_util, fileio, models
from funmatch.errors import UserError
from funmatch.models import catalog, layouts

# Model options that change neither the param names nor their shapes (ViT's
# stochastic depth and tapped block/heads, how convs run): a TinyMIM student
# trained with drop-path and relation heads may serve as the next run's teacher
# without them.
_PARAM_FREE_OPTIONS = ("drop_path", "qkv_block", "relation_heads", "conv_impl")
# Files whose digest was checked, keyed by (path, size, version): hashing a 1 GB
# teacher once per process is enough.
_VERIFIED: set[tuple[str, int, str, str]] = set()


@dataclasses.dataclass(frozen=True)
class Init:
  """Where a model's initial weights come from."""
  kind: str                       # 'random' | 'file' | 'workdir'
  path: str = ""
  known: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # options


def locate(model_config: ml_collections.ConfigDict, what: str) -> Init:
  """Resolves `init` (checking `init_sha256`) without reading any weights.

  `what` names the model config in messages (e.g. 'config.teacher').
  """
  init = model_config.init
  expected = model_config.get("init_sha256", "")
  if not init:
    if expected:
      raise UserError(f"{what}.init_sha256 is set but {what}.init is empty; set "
                      "both or neither")
    return Init("random")
  if fileio.isdir(init):
    if expected:
      raise UserError(f"{what}.init={init} is a workdir: init_sha256 checks weights "
                      f"files only; clear {what}.init_sha256")
    return Init("workdir", init)
  if fileio.isfile(init):
    source = Init("file", init)
  elif catalog.is_name(init):
    if not catalog.known(init):
      raise UserError(f"{what}.init={init} is neither a file or workdir nor a known weights "
                      f"name; known names: {', '.join(catalog.names())}")
    found = catalog.entry(init)
    if found.model != model_config.model:
      raise UserError(f"{what}.init={init} holds a {found.model} model but {what}.model "
                      f"is {model_config.model}; set {what}.model={found.model}")
    source = Init("file", catalog.resolve(init, what), found.options)
  else:
    raise UserError(f"{what}.init file not found: {init}; check the path (or give a "
                    "published name, see docs/weights.md)")
  if expected:
    _check_digest(source.path, expected, f"{what}.init_sha256")
  return source


def _check_digest(path: str, expected: str, what: str) -> None:
  key = (fileio.abspath(path), *fileio.version(path), expected.lower())
  if key not in _VERIFIED:
    catalog.check_sha256(path, expected, what)
    _VERIFIED.add(key)


def workdir_options(workdir: str, model: str) -> dict[str, Any]:
  """The weight-dependent options the student of a workdir was built with.

  Read from its config.json; a workdir written before an option existed ran its
  default.
  """
  stored = _stored_student(workdir, "the workdir")
  auto = models.auto_options(model)
  return {k: (stored[k] if stored.get(k, "auto") != "auto" else default)
          for k, default in auto.items()}


def resolve_options(model_config: ml_collections.ConfigDict, what: str) -> dict[str, Any]:
  """The model's 'auto' options decided from its init (see the module docstring)."""
  auto = models.auto_options(model_config.model)
  configured = {k: model_config.get(k, "auto") for k in auto}
  if not auto or "auto" not in configured.values():
    return configured
  source = locate(model_config, what)
  if source.kind == "workdir":
    known = workdir_options(source.path, model_config.model)
    return models.resolve_options(model_config.model, configured, implied=known)
  return models.resolve_options(model_config.model, configured, source.path,
                                implied=source.known)


def _stored_student(workdir: str, what: str) -> dict[str, Any]:
  from funmatch.train import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  stored = workdir_lib.read_config(workdir)
  if stored is None:
    raise UserError(f"{what}={workdir} is a directory without {workdir_lib.CONFIG_FILE}; "
                    "point it to a funmatch-train/distill workdir or a weights file")
  return dict(stored["config"].get("student", {"model": ""}))


def _architecture(model_config: Mapping[str, Any]) -> dict:
  """What fixes a model's function: its name and options (weight-dependent ones
  resolved; a config from before such an option existed ran its default)."""
  options = {k: (list(v) if isinstance(v, (list, tuple)) else v)
             for k, v in model_config.items()
             if k not in config_util.MODEL_META_KEYS and k not in _PARAM_FREE_OPTIONS}
  for option, default in models.auto_options(model_config["model"]).items():
    if options.get(option, "auto") == "auto":
      options[option] = default
  return {"model": model_config["model"], **options}


def _from_workdir(workdir: str, model_config, init_params, what: str, check_model: bool):
  from funmatch import checkpoint  # pylint: disable=import-outside-toplevel
  stored = _stored_student(workdir, f"{what}.init")
  if check_model:
    stored_model = _architecture(stored)
    configured = _architecture(model_config.to_dict())
    if stored_model != configured:
      raise UserError(f"{what}.init={workdir} holds a {stored_model} model but {what} "
                      f"is configured as {configured}; make them match")
  step, params = checkpoint.restore_params(workdir)
  layouts.check_same_shapes(f"the student of {workdir} (step {step})", params, init_params,
                            what, f"configure {what} as that workdir's student")
  logging.info("%s: loaded step %d of %s", what, step, workdir)
  return params


def initial_params(model_config: ml_collections.ConfigDict, init_params: Any, *,
                   what: str, teacher: bool) -> Any:
  """The params a model starts from, per its `init` (init_params when it is empty).

  A teacher must match exactly (architecture and head); a student's head of another
  class count is replaced by its fresh one (paper section 3.5), and its `dont_load`
  regexes keep those params at their random init.
  """
  source = locate(model_config, what)
  if source.kind == "random":
    return init_params
  if source.kind == "workdir":
    return _from_workdir(source.path, model_config, init_params, what, check_model=teacher)
  dont_load = () if teacher else tuple(model_config.dont_load)
  params = models.load_params(model_config.model, source.path, init_params, dont_load,
                              strict_head=teacher)
  logging.info("%s: loaded %s", what, source.path)
  return params
