"""Reading and writing model params as .npz files, and resolving a model's init.

BiT models use the official BiT naming (funmatch.models.bit), so exports load in
other BiT tooling; other models use their flax param paths joined by '/'.
An init (`config.<model>.init`) is one of: '' (random), an `.npz` file (official
BiT or a funmatch export), or a funmatch workdir (its latest checkpoint).
"""
import logging
import os
import re
import zipfile
from typing import Any, Sequence

import flax
import jax
import numpy as np

from funmatch.errors import UserError


def flatten(params: Any) -> dict[str, np.ndarray]:
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def read_npz(path: str) -> dict[str, np.ndarray]:
  """All arrays of an .npz file; a missing or damaged file is a UserError."""
  if not os.path.isfile(path):
    raise UserError(f"params file not found: {path}")
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise UserError(f"cannot read {path} as an .npz file ({type(e).__name__}); "
                    "it is truncated or not an .npz: re-download or re-export it") from None


def load_flat_npz(path: str, init_params: Any, dont_load: Sequence[str] = ()) -> Any:
  """Params with the structure of `init_params` from a '/'-joined .npz."""
  arrays = read_npz(path)
  init_flat = flatten(init_params)
  skip = [re.compile(p) for p in dont_load]
  missing = [k for k in init_flat if k not in arrays and not any(r.fullmatch(k) for r in skip)]
  unexpected = [k for k in arrays if k not in init_flat]
  clashes = [f"{k} {arrays[k].shape} vs {init_flat[k].shape}" for k in init_flat
             if k in arrays and arrays[k].shape != init_flat[k].shape
             and not any(r.fullmatch(k) for r in skip)]
  if missing or unexpected or clashes:
    raise UserError(_mismatch_message(path, missing, unexpected, clashes))
  loaded = {k: (init_flat[k] if any(r.fullmatch(k) for r in skip) else arrays[k])
            for k in init_flat}
  return flax.traverse_util.unflatten_dict(
      {tuple(k.split("/")): v for k, v in loaded.items()})


def _mismatch_message(path, missing, unexpected, clashes) -> str:
  parts = []
  for label, names in (("missing", missing), ("unexpected", unexpected),
                       ("shape clashes", clashes)):
    if names:
      more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
      parts.append(f"{label} {len(names)}: {', '.join(names[:3])}{more}")
  return f"{path} does not fit the configured model: {'; '.join(parts)}; " \
         "check the model's depth/width/num_classes in the config"


def save_params(path: str, model_name: str, params: Any) -> None:
  """Writes params to `path` (.npz), BiT in the official naming."""
  if model_name == "bit":
    from funmatch.models import bit  # pylint: disable=import-outside-toplevel
    arrays = bit.to_npz_dict(params)
  else:
    arrays = flatten(params)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_params_file(path: str, model_name: str, init_params: Any,
                     dont_load: Sequence[str] = ()) -> Any:
  if model_name == "bit":
    from funmatch.models import bit  # pylint: disable=import-outside-toplevel
    return bit.load_npz(path, init_params, dont_load=tuple(dont_load))
  return load_flat_npz(path, init_params, dont_load)


def check_shapes(source: str, loaded: Any, init_params: Any, what: str) -> None:
  """`loaded` must have exactly the structure and shapes of `init_params`."""
  loaded_flat, init_flat = flatten(loaded), flatten(init_params)
  missing = [k for k in init_flat if k not in loaded_flat]
  unexpected = [k for k in loaded_flat if k not in init_flat]
  clashes = [f"{k} {loaded_flat[k].shape} vs {init_flat[k].shape}" for k in init_flat
             if k in loaded_flat and loaded_flat[k].shape != init_flat[k].shape]
  if missing or unexpected or clashes:
    raise UserError(_mismatch_message(f"{what} from {source}", missing, unexpected, clashes))


def head_classes_in_file(path: str, model_name: str) -> int | None:
  """The class count of the head stored in an .npz, if it can be told."""
  if model_name != "bit":
    return None
  arrays = read_npz(path)
  bias = arrays.get("resnet/head/conv2d/bias")
  return None if bias is None else int(bias.shape[-1])


def resolve_init(init: str, model_name: str, init_params: Any, *, what: str,
                 dont_load: Sequence[str] = (), model_signature: dict | None = None,
                 strict_head: bool = False) -> Any:
  """The params a model starts from, per its `init` setting.

  strict_head (teachers): the stored head must have the configured class count;
  otherwise (students) a head of another class count is replaced by a fresh one.
  """
  from funmatch import checkpoint  # pylint: disable=import-outside-toplevel
  from funmatch.train import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  if not init:
    return init_params
  if os.path.isdir(init):
    stored = workdir_lib.read_config(init)
    if stored is None:
      raise UserError(f"{what}.init={init} is a directory without {workdir_lib.CONFIG_FILE}; "
                      "point it to a funmatch-train/distill workdir or an .npz file")
    if model_signature is not None:
      stored_model = stored["config"].get("student", {})
      stored_signature = {k: v for k, v in stored_model.items()
                          if k not in ("res", "init", "dont_load", "dtype")}
      if _normalise(stored_signature) != _normalise(model_signature):
        raise UserError(f"{what}.init={init} holds a {stored_signature} model but "
                        f"{what} is configured as {model_signature}; make them match")
    step, params = checkpoint.restore_params(init)
    check_shapes(f"{init} (step {step})", params, init_params, what)
    logging.info("%s: loaded step %d of %s", what, step, init)
    return params
  if not os.path.exists(init):
    raise UserError(f"{what}.init file not found: {init}")
  if strict_head:
    expected = int(jax.tree.leaves(_head_leaf(init_params, model_name))[0].shape[-1]) \
        if _head_leaf(init_params, model_name) is not None else None
    stored = head_classes_in_file(init, model_name)
    if stored is not None and expected is not None and stored != expected:
      raise UserError(f"{what}.init={init} has a head with {stored} classes but the "
                      f"dataset has {expected}; use a teacher trained on this dataset "
                      "(funmatch-train) or a dataset with the same classes")
  params = load_params_file(init, model_name, init_params, dont_load)
  logging.info("%s: loaded %s", what, init)
  return params


def _head_leaf(params: Any, model_name: str):
  if model_name == "bit":
    return params.get("head")
  return None


# Model options that change neither the param names nor their shapes (ViT's
# stochastic depth and tapped block/heads, how convs run): a TinyMIM student
# trained with drop-path and relation heads may serve as the next run's teacher
# without them.
_PARAM_FREE_OPTIONS = ("drop_path", "qkv_block", "relation_heads", "conv_impl")


def _normalise(d: dict) -> dict:
  return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in d.items()
          if k not in _PARAM_FREE_OPTIONS}
