"""The host loop: data in, jitted steps, periodic logs, evals and checkpoints.

    build the run (validated) -> read the first batch -> hold the workdir
      -> restore or init the state
      -> for each step: train step; at log steps read metrics; due evals; checkpoint
      -> on SIGTERM/SIGINT (agreed by all processes, preemption.py): save, exit 0

The loop reads device values only at logging, eval and checkpoint steps, so the
host keeps dispatching steps ahead of the device. The workdir may be a path or a
gs:// URL: every file goes through funmatch.fileio, checkpoints through Orbax.
"""
import itertools
import logging
import time
from typing import Any, Iterator

import jax
import ml_collections
from clu import periodic_actions

from funmatch import checkpoint, fileio, parallel
from funmatch.errors import UserError
from funmatch.train import build as build_lib
from funmatch.train import evaluate as evaluate_lib
from funmatch.train import metrics_io, preemption, startup, state as state_lib
from funmatch.train import step as step_lib
from funmatch.train import workdir as workdir_lib

log = logging.getLogger("funmatch")


class TrainingDiverged(UserError):
  """The loss became non-finite; the last good checkpoint is kept."""
  exit_code = 3


class Progress(periodic_actions.ReportProgress):
  """clu's progress report (steps/s and uptime to the writer, time per part).

  Two changes to clu's steps/s, hence this subclass: it excludes the time spent in
  `timed()` parts (eval, checkpoints) since the last report, and it keeps the rates
  for the console line the loop prints at log steps. clu's first call only starts
  the clock, so the first step's compile time is never counted. The loop times its
  parts by wall clock (wait_jax_async_dispatch=False): eval ends by reading its
  results, and clu's other mode runs extra computations from a helper thread,
  which a multi-process run must not do on one process only.
  """

  def __init__(self, run: build_lib.Run, writer, every_steps: int):
    super().__init__(num_train_steps=run.total_steps, writer=writer,
                     every_steps=every_steps or None, every_secs=None)
    self._run = run
    self._timed_at_last_report = 0.0
    self.rates: dict[str, float] = {}

  def _apply(self, step: int, t: float):
    timed = sum(self._time_per_part.values())
    seconds = t - self._previous_time - (timed - self._timed_at_last_report)
    self._timed_at_last_report = timed
    steps_per_sec = (step - self._previous_step) / max(seconds, 1e-9)
    self.rates = {"steps_per_sec": steps_per_sec,
                  "img_per_sec": steps_per_sec * self._run.config.input.batch_size,
                  "uptime": time.monotonic() - self._t0}
    self._eta = (self._run.total_steps - step) / steps_per_sec

  def line(self, step: int, loss: float) -> str:
    epoch = step / self._run.data.steps_per_epoch
    text = f"step {step}/{self._run.total_steps} | epoch {epoch:.1f} | loss {loss:.4f}"
    if self.rates:
      text += f" | {self.rates['img_per_sec']:.0f} img/s | ETA {_duration(self._eta)}"
    return text


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _every(step: int, every: int, total: int) -> bool:
  return step == total or (every > 0 and step % every == 0)


def _check_finite(state, step_hint: int, ckpt: checkpoint.Checkpointer) -> None:
  bad_step = int(jax.device_get(state.nonfinite_step))
  if bad_step >= 0:
    ckpt.wait()
    raise TrainingDiverged(
        f"the loss became non-finite at step {bad_step + 1}; the run stopped at step "
        f"{step_hint} and the last good checkpoint is step {ckpt.latest_step()}; lower "
        "config.lr, enable config.grad_clip_norm or check the data for NaN/Inf")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mode: str = "distill") -> dict[str, Any]:
  """Trains (distills) until the configured number of steps; returns final evals."""
  clock = startup.Clock()
  clock.mark("imports")
  # Cheap reads first: the weight-dependent options (file headers, a teacher
  # workdir's config.json) are decided and compared with the run the workdir holds
  # before any data is read.
  run = build_lib.build(
      config, mode, workdir=workdir, on_stage=clock.mark,
      check_config=lambda resolved: workdir_lib.check_resumable(workdir, resolved, mode))
  # The first batches are read before anything is written, so a data file that
  # fails to read (a garbled shard) leaves the workdir as it was.
  start_step = max(checkpoint.saved_steps(workdir), default=0)
  batches = _train_batches(run, start_step)
  clock.mark("input pipeline")
  # ---- from here on the workdir is written, by one run at a time ----
  with workdir_lib.hold(workdir) as hold:
    return _train(run, workdir, hold, clock, start_step, batches)


def _train_batches(run: build_lib.Run, start_step: int) -> Iterator[Any] | None:
  """Global batches from `start_step + 1` on, the first already read (None: the
  run is finished)."""
  if start_step >= run.total_steps:
    return None
  from funmatch.data import pipeline  # pylint: disable=import-outside-toplevel
  batches = pipeline.make_train_iterator(
      run.data.train_source, run.plan.views, seed=int(run.config.seed),
      start_step=start_step, sharding=parallel.batch_sharding(run.mesh),
      crops=run.plan.crops)
  return itertools.chain([next(batches)], batches)


def _restore_or_init(run, ckpt) -> tuple[state_lib.TrainState, int]:
  state = state_lib.init_state(run)
  start_step, restored = ckpt.restore_latest(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
  if start_step:
    log.info("resumed from the checkpoint at step %d", start_step)
    return restored, start_step
  return state, 0


def _train(run: build_lib.Run, workdir: str, hold, clock: startup.Clock,
           planned_step: int, train_batches: Iterator[Any] | None) -> dict[str, Any]:
  """The loop itself, once the workdir is held (`hold`: funmatch.lease) and its
  batches are flowing."""
  config = run.config
  ckpt = checkpoint.Checkpointer(workdir, save_every=config.checkpoint_every_steps,
                                 keep=config.keep_checkpoints,
                                 keep_every=config.keep_every_steps)
  state, start_step = _restore_or_init(run, ckpt)
  if start_step != planned_step:  # the latest checkpoint did not restore
    train_batches = _train_batches(run, start_step)
  if jax.process_index() == 0:
    workdir_lib.write_config(workdir, config, run.mode, run.data.record())
  clock.mark("state")

  evaluator = evaluate_lib.Evaluator(run)
  train_step = step_lib.jit_train_step(run, state)
  writer = metrics_io.make_writer(workdir, hold)
  progress = Progress(run, writer, config.log_every_steps)
  clock.mark("eval pipelines")
  total = run.total_steps
  results: dict[str, Any] = {}
  failed = False
  try:
    with preemption.Stops(hold, config.preemption_check_every_steps) as stops:
      for step in range(start_step + 1, total + 1):
        state, metrics = train_step(state, next(train_batches), run.teacher_params)
        if step == start_step + 1:
          clock.mark("first step (compile)")
          clock.report()
        progress(step)
        if _every(step, config.log_every_steps, total):
          _check_finite(state, step, ckpt)
          scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
          if jax.process_index() == 0:
            print(progress.line(step, scalars["train/loss"]), flush=True)
          with _metrics_failures(workdir):
            writer.write_scalars(step, {**scalars, **progress.rates,
                                        "epoch": step / run.data.steps_per_epoch})
            writer.flush()  # on gs:// this publishes metrics.jsonl and the events
        due = evaluator.due(step, total)
        if due:
          with progress.timed("eval", wait_jax_async_dispatch=False):
            results = evaluator(state.params, due)
          with _metrics_failures(workdir):
            writer.write_scalars(step, results)
            writer.flush()
          log.info("eval at step %d: %s", step, evaluate_lib.summary(results))
        checkpoint_due = _every(step, config.checkpoint_every_steps, total)
        stop = stops.at(step, checkpoint_due)
        if checkpoint_due or stop:
          with progress.timed("checkpoint", wait_jax_async_dispatch=False):
            _check_finite(state, step, ckpt)
            ckpt.save(step, state, force=True)
        if stop:
          ckpt.wait()
          print(f"funmatch: {stop}: saved a checkpoint at step {step}; run the same "
                "command to resume", flush=True)
          return results
      if start_step >= total and evaluator.sets:  # a finished run, started again
        results = evaluator(state.params)
  except Exception as e:  # pylint: disable=broad-except
    # A disk or bucket that fails mid-run ends in one line (fileio.StorageError),
    # which says what is kept once a save still in flight has finished (or failed).
    failed = True
    error = fileio.storage_error(e, f"writing to {workdir}", path=workdir)
    if error is not None:
      ckpt.settle()
      raise error.keeping(ckpt.kept()) from None
    raise
  finally:
    ckpt.close()
    try:
      with _metrics_failures(workdir, ckpt.kept):
        writer.close()
    except Exception:  # pylint: disable=broad-except
      if not failed:
        raise
      # The run has failed already: its first line is the one to report.
      log.debug("closing the metric writers after the failure failed too", exc_info=True)
  return results


def _metrics_failures(workdir: str, kept=lambda: ""):
  """A failed write of metrics.jsonl or TensorBoard's events as one line."""
  return fileio.storage_failures(f"writing metrics to {workdir}", kept, path=workdir)
