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

A save that the storage refuses (a full disk, a read-only remount, Cloud
Storage failing past fileio's retry bound) ends as one fileio.StorageError line
naming the step and the directory; `kept()` says which checkpoint survived. The
half-written step stays where a resume skips it (Orbax's temporary directory,
or on gs:// a step without commit_success.txt). Orbax's background threads log
the same error once per thread with a traceback; the main thread reports it,
so those log records are dropped (`_DropBackgroundErrors`).
"""
import contextlib
import gc
import inspect
import logging
import threading
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


class _DropBackgroundErrors(logging.Filter):
  """Drops the tracebacks Orbax logs for an error that its main-thread call
  (save, wait) raises again: that one is reported once. Which of its threads
  logs it (the workers, the finalize thread, the manager) depends on timing, so
  every Orbax record that carries a traceback goes."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and "/orbax/" in record.pathname.replace("\\", "/"))


def _use_retry_policy() -> None:
  """Points tensorstore's gcs driver (Orbax's array writes) at fileio's retry
  policy. Orbax builds each tensorstore context from these module defaults."""
  # pylint: disable-next=import-outside-toplevel
  from orbax.checkpoint._src.serialization import tensorstore_utils
  resources = fileio.retry_policy().tensorstore_context()
  for name in ("_BASE_TS_CONTEXT", "_DEFAULT_OCDBT_TS_CONTEXT"):
    getattr(tensorstore_utils, name).update(resources)


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for the train state."""

  def __init__(self, workdir: str, *, save_every: int, keep: int = 3,
               keep_every: int | None = None, asynchronous: bool = True):
    _use_retry_policy()
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropBackgroundErrors) for f in absl_logger.filters):
      absl_logger.addFilter(_DropBackgroundErrors())
    self._in_flight: int | None = None  # the step an asynchronous save is writing
    self._failed = False
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
    if self._in_flight is not None:
      self.wait()  # as Orbax would, but a failure here names the step in flight
    with self._failures(step):
      started = self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
    if started:
      self._in_flight = step
    return started

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
    with self._failures(None):
      self._manager.wait_until_finished()
    self._in_flight = None

  def settle(self) -> None:
    """Waits for a save still in flight, never raising (the run failed elsewhere,
    e.g. writing metrics): kept() then counts it if it completed."""
    if self._failed or self._in_flight is None:
      return
    with contextlib.suppress(Exception):  # then kept() leaves that step out
      self.wait()

  def close(self) -> None:
    """Waits for the last save and closes; quiet after a failure (reported once)."""
    if self._failed:
      return  # closed when the failure was reported
    self.wait()
    self._manager.close()

  def kept(self) -> str:
    """What survives a failed save: 'the last complete checkpoint is step N'."""
    failed = self._in_flight
    try:
      steps = [s for s in self._manager.all_steps() if failed is None or s < failed]
    except Exception:  # pylint: disable=broad-except  (the storage is failing)
      steps = []
    if not steps:
      return "no checkpoint is complete yet"
    return f"the last complete checkpoint is step {max(steps)}"

  @contextlib.contextmanager
  def _failures(self, step: int | None):
    """A failed save of `step` (None: the one in flight) as one StorageError line."""
    error = None
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      failed = step if step is not None else self._in_flight
      self._failed, self._in_flight = True, failed
      self._finalize_writes()  # for any failure: a bug, too, must not hang the exit
      error = fileio.storage_error(
          e, f"saving checkpoint {failed} to {self._manager.directory}",
          path=self._manager.directory)
      if error is None:
        raise
    if error is not None:
      raise error.keeping(self.kept())

  def _finalize_writes(self) -> None:
    """Stops what Orbax left of the failed save, so the process exits at once
    and quietly: worker threads still waiting for a step that will never come
    (for up to its 300 s coordination timeout; the interpreter would wait for
    them), and write coroutines that would be finalized at interpreter exit
    (each printing 'sys.meta_path is None' or 'never awaited')."""
    with contextlib.suppress(Exception):
      self._manager.close()
    _stop_waiting_threads()
    _close_orbax_coroutines()
    # The failed writes' gathering futures are collected later, and asyncio logs
    # each as "exception was never retrieved" with a traceback: the same failure
    # this process reports once, in its one line.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def _stop_waiting_threads(join_s: float = 10.0) -> None:
  """Cancels Orbax's worker threads of a failed save and wakes those waiting
  for the signal of a step that failed (they return once cancelled)."""
  # pylint: disable-next=import-outside-toplevel
  from orbax.checkpoint._src.futures import future as ocp_future
  waiting = [t for t in threading.enumerate()
             if isinstance(t, ocp_future._SignalingThread)  # pylint: disable=protected-access
             and t.is_alive()]
  for thread in waiting:
    thread.cancel()
    with contextlib.suppress(Exception):
      ocp_future.set_signals(thread._receive_signals,  # pylint: disable=protected-access
                             operation_id=thread._operation_id)  # pylint: disable=protected-access
  for thread in waiting:
    with contextlib.suppress(Exception):  # a cancelled one raises CancelledError
      thread.join(join_s)


def _close_orbax_coroutines() -> None:
  """Closes Orbax's coroutines that a failed save left unstarted or suspended:
  now their cleanup runs while the interpreter is whole, instead of at exit."""
  gc.collect()
  for obj in gc.get_objects():
    if (inspect.iscoroutine(obj) and "/orbax/" in obj.cr_code.co_filename
        and inspect.getcoroutinestate(obj) != inspect.CORO_CLOSED):
      with contextlib.suppress(Exception):
        obj.close()
  gc.collect()


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
  _use_retry_policy()
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
