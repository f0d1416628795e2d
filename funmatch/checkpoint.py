"""Orbax checkpoints of the train state in WORKDIR/checkpoints.

Saves are asynchronous (training continues while arrays are written); the
manager keeps the last `keep` checkpoints plus every `keep_every`-th step.
Only the train state is saved: teachers are reloaded from their init each run.
A latest checkpoint that does not restore (a save cut short, damaged files) is
moved aside to `checkpoints/corrupt-<step>-<time>` (never deleted) and the run
falls back to the newest one that restores.

Workdirs on gs:// work the same: Orbax writes there natively (metadata through
etils.epath, which funmatch.fileio points at gcsfs, arrays through tensorstore);
a finished save is marked by its commit_success.txt instead of a rename, and
moving a checkpoint aside is copy-then-delete (fileio.move).
"""
import logging
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from funmatch import fileio  # before Orbax resolves a gs:// path (fsspec, not TF)
from funmatch.errors import UserError

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
  return fileio.join(fileio.abspath(workdir), CHECKPOINT_DIR)


def saved_steps(workdir: str) -> list[int]:
  """Steps with a finished checkpoint in `workdir`, without creating anything.

  Orbax's own test of "finished": a renamed (non-temporary) step directory on
  disks, one holding commit_success.txt on gs://.
  """
  directory = checkpoint_dir(workdir)
  if not fileio.isdir(directory):
    return []
  return sorted(ocp.step.checkpoint_steps(directory))


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for the train state."""

  def __init__(self, workdir: str, *, save_every: int, keep: int = 3,
               keep_every: int | None = None, asynchronous: bool = True):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(save_every), 1),
        max_to_keep=max(int(keep), 1),
        keep_period=int(keep_every) if keep_every else None,
        enable_async_checkpointing=asynchronous,
        create=True)
    self._manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, force: bool = False) -> bool:
    """Starts saving `state` at `step` if the interval says so (or `force`)."""
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores into the structure, dtypes and shardings of `abstract_state`."""
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any]:
    """(step, state) of the newest checkpoint that restores; (0, None) if none exist.

    Newer checkpoints that fail to restore are moved aside with a warning, so
    later saves at their step numbers do not collide with them.
    """
    directory = self._manager.directory
    steps = sorted(self._manager.all_steps(), reverse=True)
    skipped = []
    for step in steps:
      try:
        state = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except  (damaged files)
        skipped.append((step, f"{type(e).__name__}: {_first_line(e)}"))
        continue
      if skipped:
        moved = [_move_aside(str(directory), s) for s, _ in skipped]
        logging.warning(
            "funmatch: checkpoint(s) at step(s) %s in %s do not restore (%s); moved "
            "aside to %s; resuming from step %d", [s for s, _ in skipped], directory,
            skipped[0][1], ", ".join(moved), step)
        self._manager.reload()
      return step, state
    if skipped:
      raise UserError(f"no checkpoint in {directory} restores (steps {steps}; "
                      f"step {skipped[0][0]}: {skipped[0][1]}); move the checkpoints "
                      "directory aside to start over, or use another --workdir")
    return 0, None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:200] if text else ""


def _move_aside(directory: str, step: int) -> str:
  """Moves checkpoints/<step> to checkpoints/corrupt-<step>-<time> (process 0).

  On object storage a move is copy, check, then delete (fileio.move): an
  interrupted move leaves the checkpoint where it was. The other processes
  wait for it, so that all of them then list the same steps.
  """
  target = fileio.join(directory, f"corrupt-{step}-{time.strftime('%Y%m%dT%H%M%S')}")
  if jax.process_index() == 0:
    fileio.move(fileio.join(directory, str(step)), target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"funmatch: moved aside step {step}")
  return target


def restore_params(workdir: str, step: int | None = None) -> tuple[int, Any]:
  """The student params of a finished checkpoint in `workdir` (read-only).

  Used to take a teacher from a `funmatch-train` workdir and by eval/export.
  Returns `(step, params)` with params as host numpy arrays.
  """
  steps = saved_steps(workdir)
  if not steps:
    raise UserError(f"no checkpoint found in {checkpoint_dir(workdir)}; "
                    "train there first or point to another workdir")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise UserError(f"no checkpoint for step {step} in {checkpoint_dir(workdir)}; "
                    f"available steps: {steps}")
  item_dir = fileio.join(checkpoint_dir(workdir), str(step), "default")
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      params_meta = checkpointer.metadata(item_dir).item_metadata.tree["params"]
      abstract = {"params": jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), params_meta)}
      # Only the params subtree, as host numpy arrays: works on any device count.
      restored = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
          item=abstract,
          restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                    abstract),
          partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except  (corrupt or foreign files)
    reason = str(e).splitlines()[0] if str(e) else ""
    raise UserError(f"cannot read the checkpoint at step {step} in "
                    f"{checkpoint_dir(workdir)} ({type(e).__name__}: {reason}); "
                    "restore another --step or re-run training") from None
  logging.info("restored params of step %d from %s", step, workdir)
  return step, restored["params"]
