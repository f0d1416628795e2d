"""A model's initial weights: random, a weights file, a published name or a workdir.

`config.<model>.init` is '' (the random init), a weights file (any layout the
model's spec knows: an official BiT .npz, big_vision, timm or funmatch files), a
published name (funmatch/weights/catalog.py, read from the local cache) or a
funmatch-train/distill workdir (its latest checkpoint's student); files and
workdirs may be paths or gs:// URLs (funmatch.fileio). An `init_sha256` must
match the file; it is checked when the weights are loaded, once per build.

This is the one place that decides the options whose 'auto' depends on the
weights (BiT's stem padding, ViT's GELU): from a file's metadata or layout, a
name's catalog entry, a workdir's recorded config, else the model's default.
The build writes them into the run's config, so config.json records them, and a
resumed run or a run that takes this workdir as its teacher rebuilds the very
same function.
"""
import dataclasses
import logging
from typing import Any, Dict, Mapping, Optional

import ml_collections

from funmatch import fileio, models
from funmatch.errors import UserError
from funmatch.weights import catalog, layouts
from funmatch.weights.stored import StoredModel

# Model options that change neither the param names nor their shapes (ViT's
# stochastic depth and tapped block/heads, how convs run): a TinyMIM student
# trained with drop-path and relation heads may serve as the next run's teacher
# without them.
_PARAM_FREE_OPTIONS = ("drop_path", "qkv_block", "relation_heads", "conv_impl")


@dataclasses.dataclass(frozen=True)
class Init:
  """Where a model's initial weights come from."""
  kind: str                       # 'random' | 'file' | 'workdir'
  path: str = ""
  known: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # options


def locate(model_config: ml_collections.ConfigDict, what: str,
           verify: bool = True) -> Init:
  """Resolves `init` without reading any weights; `verify`: checks `init_sha256`.

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
  if expected and verify:
    catalog.check_sha256(source.path, expected, f"{what}.init_sha256")
  return source


# ---------------------------------------------------------------------------
# The 'auto' options.


def decide_options(model: str, options: Mapping[str, Any], weights_path: str = "",
                   implied: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """`options` with every 'auto' (or unset) weights-dependent option decided.

  Left 'auto', an option takes the value `implied` gives (what the caller
  knows of the weights: a named file's catalog entry, a workdir's config),
  else what the file at `weights_path` says (`layouts.implied_options`), else
  the model's default. An explicit value that disagrees is kept, with a
  warning. Build the model with the result and record it: it is what an
  export writes and what a resumed run must rebuild.
  """
  spec = models.weights_spec(model)
  known = {}
  if spec.auto_options and weights_path:
    known.update(layouts.implied_options(model, weights_path))
  known.update({k: v for k, v in (implied or {}).items() if k in spec.auto_options})
  resolved = dict(options)
  for option in spec.auto_options:
    value = resolved.get(option, "auto")
    if value == "auto" and option in known:
      resolved[option] = known[option]
    elif value != "auto" and option in known and known[option] != value:
      logging.warning("%s %s=%r, but its weights (%s) imply %r; keeping %r.",
                      model, option, value, weights_path or "init",
                      known[option], value)
  return spec.with_defaults(resolved)


def workdir_options(workdir: str, model: str) -> Dict[str, Any]:
  """The weight-dependent options the student of a workdir was built with.

  Read from its config.json; a workdir written before an option existed ran its
  default.
  """
  stored = StoredModel.from_workdir(workdir, restore=False, what="the workdir")
  return {k: stored.options[k] for k in models.weights_spec(model).auto_options}


def resolve_options(model_config: ml_collections.ConfigDict, what: str) -> Dict[str, Any]:
  """The model's 'auto' options decided from its init (see the module docstring)."""
  auto = models.weights_spec(model_config.model).auto_options
  configured = {k: model_config.get(k, "auto") for k in auto}
  if not auto or "auto" not in configured.values():
    return configured
  # The digest is checked when the weights are loaded; here only a header is read.
  source = locate(model_config, what, verify=False)
  if source.kind == "workdir":
    known = workdir_options(source.path, model_config.model)
    return decide_options(model_config.model, configured, implied=known)
  return decide_options(model_config.model, configured, source.path,
                        implied=source.known)


# ---------------------------------------------------------------------------
# The initial params.


def _architecture(model: str, options: Mapping[str, Any]) -> dict:
  """What fixes a model's function: its name and options (weight-dependent ones
  resolved; a config from before such an option existed ran its default)."""
  options = {k: (list(v) if isinstance(v, (list, tuple)) else v)
             for k, v in models.weights_spec(model).with_defaults(options).items()
             if k not in models.MODEL_META_KEYS and k not in _PARAM_FREE_OPTIONS}
  return {"model": model, **options}


def _from_workdir(workdir: str, model_config, init_params, what: str, check_model: bool):
  if check_model:  # before restoring anything
    stored = StoredModel.from_workdir(workdir, restore=False, what=f"{what}.init")
    stored_model = _architecture(stored.model, stored.options)
    configured = _architecture(model_config.model, model_config.to_dict())
    if stored_model != configured:
      raise UserError(f"{what}.init={workdir} holds a {stored_model} model but {what} "
                      f"is configured as {configured}; make them match")
  stored = StoredModel.from_workdir(workdir, what=f"{what}.init")
  layouts.check_same_shapes(f"the student of {workdir} (step {stored.step})", stored.params,
                            init_params, what, f"configure {what} as that workdir's student")
  logging.info("%s: loaded step %d of %s", what, stored.step, workdir)
  return stored.params


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
  params = layouts.load(model_config.model, source.path, init_params, dont_load,
                        strict_head=teacher)
  logging.info("%s: loaded %s", what, source.path)
  return params
