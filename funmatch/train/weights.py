"""A model's initial weights: random, a weights file, or a funmatch workdir.

`config.<model>.init` is '' (the random init), a weights file (read by the model's
own module, funmatch/models: an official BiT .npz, a funmatch export, ...) or a
funmatch-train/distill workdir (its latest checkpoint's student); either may be
a path or a gs:// URL (funmatch.fileio).
"""
import logging
from typing import Any, Sequence

import ml_collections

from funmatch import config_util, fileio, models
from funmatch.errors import UserError
from funmatch.models import npz

# Model options that change neither the param names nor their shapes (ViT's
# stochastic depth and tapped block/heads): a TinyMIM student trained with
# drop-path and relation heads may serve as the next run's teacher without them.
_PARAM_FREE_OPTIONS = ("drop_path", "qkv_block", "relation_heads")


def check_shapes(source: str, loaded: Any, init_params: Any, what: str) -> None:
  """`loaded` must have exactly the structure and shapes of `init_params`."""
  loaded_flat, init_flat = npz.flatten(loaded), npz.flatten(init_params)
  missing = [k for k in init_flat if k not in loaded_flat]
  unexpected = [k for k in loaded_flat if k not in init_flat]
  clashes = [f"{k} {loaded_flat[k].shape} vs {init_flat[k].shape}" for k in init_flat
             if k in loaded_flat and loaded_flat[k].shape != init_flat[k].shape]
  if missing or unexpected or clashes:
    raise UserError(npz.mismatch_message(f"{what} from {source}", missing, unexpected,
                                         clashes))


def _architecture(model_config: dict) -> dict:
  """What fixes a model's params: its name and constructor options that shape them."""
  options = {k: (list(v) if isinstance(v, (list, tuple)) else v)
             for k, v in model_config.items()
             if k not in config_util.MODEL_META_KEYS and k not in _PARAM_FREE_OPTIONS}
  return {"model": model_config["model"], **options}


def _from_workdir(workdir: str, model_config, init_params, what: str, check_model: bool):
  from funmatch import checkpoint  # pylint: disable=import-outside-toplevel
  from funmatch.train import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  stored = workdir_lib.read_config(workdir)
  if stored is None:
    raise UserError(f"{what}.init={workdir} is a directory without "
                    f"{workdir_lib.CONFIG_FILE}; point it to a funmatch-train/distill "
                    "workdir or a weights file")
  if check_model:
    stored_model = _architecture(stored["config"].get("student", {"model": ""}))
    configured = _architecture(model_config.to_dict())
    if stored_model != configured:
      raise UserError(f"{what}.init={workdir} holds a {stored_model} model but {what} "
                      f"is configured as {configured}; make them match")
  step, params = checkpoint.restore_params(workdir)
  check_shapes(f"{workdir} (step {step})", params, init_params, what)
  logging.info("%s: loaded step %d of %s", what, step, workdir)
  return params


def initial_params(model_config: ml_collections.ConfigDict, init_params: Any, *,
                   what: str, teacher: bool) -> Any:
  """The params a model starts from, per its `init` (init_params when it is empty).

  A teacher must match exactly (architecture and head); a student's head of another
  class count is replaced by its fresh one (paper section 3.5), and its `dont_load`
  regexes keep those params at their random init.
  """
  init = model_config.init
  if not init:
    return init_params
  if fileio.isdir(init):
    return _from_workdir(init, model_config, init_params, what, check_model=teacher)
  if not fileio.exists(init):
    raise UserError(f"{what}.init file not found: {init}; check the path")
  dont_load: Sequence[str] = () if teacher else tuple(model_config.dont_load)
  params = models.load_params(model_config.model, init, init_params, dont_load,
                              strict_head=teacher)
  check_shapes(init, params, init_params, what)
  logging.info("%s: loaded %s", what, init)
  return params
