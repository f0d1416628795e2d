"""The workdir: which run it holds (config.json) and whether a config may resume it.

config.json holds the run's mode, its config as built (the weight-dependent model
options resolved, see funmatch/weights/init.py) and what the data said
("data": num_classes and class_names), so eval, export, `funmatch.load_student`
and funmatch-predict need neither the teacher nor the training data.

Layout: WORKDIR/config.json (the run's config), WORKDIR/checkpoints/ (Orbax),
WORKDIR/metrics.jsonl, TensorBoard event files, eval_STEP.json files, and
WORKDIR/.lock (the writer's flock, or its lease object on gs://: funmatch/lease.py).
Every access goes through funmatch.fileio, so WORKDIR may be a path or a gs:// URL.
"""
import contextlib
import json
import logging
from typing import Any

import ml_collections

from funmatch import fileio, lease
from funmatch.errors import UserError
# Reading a workdir's config.json is funmatch.weights.stored's job; this module writes it.
from funmatch.weights.stored import CONFIG_FILE, read_config  # pylint: disable=unused-import

# Keys a user may change when resuming: schedule length, logging, evaluation,
# checkpoint cadence, data locations and how they are read (cache_raw,
# random_access: the same examples, by index or streamed), and where arrays live
# (mesh, sharding: a preempted run may resume on another slice). Anything else
# would change the run. Workdirs older than a key show it as '<absent>' -> default.
RESUMABLE_PREFIXES = (
    "total_epochs", "total_steps", "log_every_steps", "eval_every_steps",
    "checkpoint_every_steps", "keep_checkpoints", "keep_every_steps", "evals",
    "input.data_dir", "input.root", "input.cache_raw", "input.random_access",
    "input.shuffle_buffer", "input.prefetch", "progress_every_seconds", "mesh",
    "sharding", "preemption_check_every_steps",
)
# Per-model keys that may change too: how convolutions run (the same function; a
# run started on a GPU may resume on a CPU). Absent in runs from before the option.
RESUMABLE_MODEL_KEYS = ("conv_impl",)


def _resumable(key: str) -> bool:
  key = key.removeprefix("config.")
  return (any(key.startswith(p) for p in RESUMABLE_PREFIXES)
          or key.rpartition(".")[2] in RESUMABLE_MODEL_KEYS)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    flat = {}
    for key, value in tree.items():
      flat.update(_flatten(value, f"{prefix}{key}."))
    return flat
  if isinstance(tree, (list, tuple)):
    tree = [list(t) if isinstance(t, tuple) else t for t in tree]
  return {prefix[:-1]: tree}


def config_to_json(config: ml_collections.ConfigDict, mode: str) -> dict[str, Any]:
  """A JSON-able view of the config plus the mode (distill/train)."""
  return {"mode": mode, "config": json.loads(config.to_json_best_effort())}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """Flat keys whose values differ between two `config_to_json` results."""
  old_flat, new_flat = _flatten(old), _flatten(new)
  keys = sorted(set(old_flat) | set(new_flat))
  return [k for k in keys if old_flat.get(k, "<absent>") != new_flat.get(k, "<absent>")]


def check_resumable(workdir: str, config: ml_collections.ConfigDict, mode: str) -> None:
  """Refuses a workdir that holds a different run; logs harmless changes."""
  if fileio.isfile(workdir):
    raise UserError(f"--workdir {workdir} is a file, not a directory")
  old = read_config(workdir)
  if old is None:
    return
  old = {key: old[key] for key in ("mode", "config") if key in old}
  new = config_to_json(config, mode)
  differences = config_differences(old, new)
  fatal = [k for k in differences if not _resumable(k)]
  if fatal:
    shown = ", ".join(f"{k}: {_flatten(old).get(k, '<absent>')!r} -> "
                      f"{_flatten(new).get(k, '<absent>')!r}" for k in fatal[:3])
    more = f" (+{len(fatal) - 3} more)" if len(fatal) > 3 else ""
    raise UserError(f"--workdir {workdir} holds another run ({shown}{more}); use a new "
                    "--workdir, or the original config to resume it")
  old_flat, new_flat = _flatten(old), _flatten(new)
  for key in differences:
    logging.info("resuming with changed %s: %r -> %r", key.removeprefix("config."),
                 old_flat.get(key, "<absent>"), new_flat.get(key, "<absent>"))


def hold(workdir: str):
  """The workdir's single-writer hold (funmatch.lease: an flock on disks, a lease
  object on gs://), taken by process 0, the one that writes files. Other
  processes get a hold that is never lost: process 0 tells them (loop.py)."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    return lease.hold_workdir(workdir)
  return contextlib.nullcontext(lease.LocalHold())


def write_config(workdir: str, config: ml_collections.ConfigDict, mode: str,
                 data: dict[str, Any] | None = None) -> None:
  """Writes config.json: mode, config and (if given) what the data said."""
  content = config_to_json(config, mode)
  if data is not None:
    content["data"] = data
  fileio.makedirs(workdir)
  fileio.write_atomic(fileio.join(workdir, CONFIG_FILE),
                      json.dumps(content, indent=2, sort_keys=True))
