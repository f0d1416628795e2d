"""The workdir: which run it holds (config.json) and whether a config may resume it.

Layout: WORKDIR/config.json (the run's config), WORKDIR/checkpoints/ (Orbax),
WORKDIR/metrics.jsonl, TensorBoard event files, eval_STEP.json files, and
WORKDIR/.lock (host and pid of the run writing there).
"""
import contextlib
import fcntl
import json
import logging
import os
import socket
from typing import Any, Iterator

import ml_collections

from funmatch.errors import UserError

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"

# Keys a user may change when resuming: schedule length, logging, evaluation,
# checkpoint cadence, data locations, and where arrays live (mesh, sharding:
# a preempted run may resume on another slice). Anything else would change the run.
RESUMABLE_PREFIXES = (
    "total_epochs", "total_steps", "log_every_steps", "eval_every_steps",
    "checkpoint_every_steps", "keep_checkpoints", "keep_every_steps", "evals",
    "input.data_dir", "input.root", "input.cache_raw", "input.shuffle_buffer",
    "input.prefetch", "progress_every_seconds", "mesh", "sharding",
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


def read_config(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {path} ({e}); it is not a funmatch workdir or it is "
                    "damaged: use another --workdir") from None


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """Flat keys whose values differ between two `config_to_json` results."""
  old_flat, new_flat = _flatten(old), _flatten(new)
  keys = sorted(set(old_flat) | set(new_flat))
  return [k for k in keys if old_flat.get(k, "<absent>") != new_flat.get(k, "<absent>")]


def check_resumable(workdir: str, config: ml_collections.ConfigDict, mode: str) -> None:
  """Refuses a workdir that holds a different run; logs harmless changes."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir} is a file, not a directory")
  old = read_config(workdir)
  if old is None:
    return
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


def _make_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create --workdir {workdir} ({e.strerror or e}); choose a "
                    "writable path") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise UserError(f"--workdir {workdir} is not writable; choose a writable path")


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds WORKDIR/.lock for one writer; the kernel frees it when the process dies.

  flock (not a pid file) so a run killed with -9 never blocks the next one.
  Remote paths (gs://...) are not locked.
  """
  if "://" in workdir:
    yield
    return
  _make_workdir(workdir)
  path = os.path.join(workdir, LOCK_FILE)
  try:
    handle = open(path, "a+")  # pylint: disable=consider-using-with
  except OSError as e:
    raise UserError(f"cannot write {path} ({e.strerror or e}); choose a writable "
                    "--workdir") from None
  try:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "another process"
      raise UserError(f"--workdir {workdir} is in use by another run ({holder}); wait "
                      "for it to finish or stop it, or use another --workdir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
    handle.flush()
    yield
  finally:
    handle.close()  # releases the flock


def write_config(workdir: str, config: ml_collections.ConfigDict, mode: str) -> None:
  _make_workdir(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(config_to_json(config, mode), f, indent=2, sort_keys=True)
  os.replace(tmp, path)
