"""The host loop: data in, jitted steps, periodic logs, evals and checkpoints.

The loop reads device values only at logging, eval and checkpoint steps, so the
host keeps dispatching steps ahead of the device.
"""
import contextlib
import logging
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from funmatch import checkpoint, parallel
from funmatch.errors import UserError
from funmatch.train import build as build_lib
from funmatch.train import evaluate as evaluate_lib
from funmatch.train import metrics_io, state as state_lib, step as step_lib
from funmatch.train import workdir as workdir_lib

log = logging.getLogger("funmatch")


class TrainingDiverged(UserError):
  """The loss became non-finite; the last good checkpoint is kept."""
  exit_code = 3


class StopSignal:
  """Remembers SIGTERM/SIGINT so the loop can save and exit between steps."""

  def __init__(self):
    self.received = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not in the main thread (e.g. tests): no handler
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def init_state(run: build_lib.Run) -> state_lib.TrainState:
  """The initial train state, placed on the mesh as config.sharding says."""
  config = run.config
  rng = jax.random.PRNGKey(int(config.seed))
  init_rng, state_rng = jax.random.split(rng)
  student_out, teacher_outs = run.output_shapes

  def create():
    aux_params = run.objective.init_aux(init_rng, student_out, teacher_outs)
    objective_state = (run.objective.init_state(student_out, teacher_outs)
                       if hasattr(run.objective, "init_state") else {})
    return state_lib.create(run.student_params, aux_params, objective_state,
                            run.optimizer, state_rng)

  abstract_state = jax.eval_shape(create)
  return jax.jit(create, out_shardings=state_lib.shardings(
      run.config, abstract_state, run.mesh))()


def jit_train_step(run: build_lib.Run, state: state_lib.TrainState):
  """The jitted `train_step(state, batch, teacher_params) -> (state, metrics)`.

  The state is donated (updated in place) and keeps its shardings; metrics are
  replicated. Benchmarks use this same function, so they time what runs.
  """
  return jax.jit(
      step_lib.make_train_step(run.student, run.teachers, run.objective, run.optimizer,
                               run.schedule, run.num_classes, run.mixup),
      donate_argnums=(0,),
      out_shardings=(jax.tree.map(lambda x: x.sharding, state),
                     parallel.replicated(run.mesh)))


def _every(step: int, every: int, total: int) -> bool:
  return step == total or (every > 0 and step % every == 0)


class Progress:
  """The console line: step, epoch, loss, images/s, ETA (process 0 only)."""

  def __init__(self, run: build_lib.Run, start_step: int):
    self.run = run
    self.last_step, self.last_time = start_step, time.perf_counter()

  def update(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
    now = time.perf_counter()
    steps = max(step - self.last_step, 1)
    seconds_per_step = (now - self.last_time) / steps
    self.last_step, self.last_time = step, now
    images_per_second = self.run.config.input.batch_size / max(seconds_per_step, 1e-9)
    eta = seconds_per_step * (self.run.total_steps - step)
    epoch = step / self.run.steps_per_epoch
    if jax.process_index() == 0:
      print(f"step {step}/{self.run.total_steps} | epoch {epoch:.1f} | "
            f"loss {metrics['train/loss']:.4f} | {images_per_second:.0f} img/s | "
            f"ETA {_duration(eta)}", flush=True)
    return {"epoch": epoch, "img_per_sec": images_per_second}


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _check_finite(state, step_hint: int, ckpt: checkpoint.Checkpointer) -> None:
  bad_step = int(jax.device_get(state.nonfinite_step))
  if bad_step >= 0:
    ckpt.wait()
    last = ckpt.latest_step()
    raise TrainingDiverged(
        f"the loss became non-finite at step {bad_step + 1}; the run stopped at step "
        f"{step_hint} and the last good checkpoint is step {last}; lower config.lr, "
        "enable config.grad_clip_norm or check the data for NaN/Inf")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mode: str = "distill") -> dict[str, Any]:
  """Trains (distills) until the configured number of steps; returns final evals."""
  run = build_lib.build(config, mode)
  workdir_lib.check_resumable(workdir, config, mode)
  # ---- from here on the workdir is written, by one run at a time ----
  writer_lock = (workdir_lib.lock(workdir) if jax.process_index() == 0
                 else contextlib.nullcontext())
  with writer_lock:
    return _train(run, config, workdir, mode)


def _train(run: build_lib.Run, config: ml_collections.ConfigDict, workdir: str,
           mode: str) -> dict[str, Any]:
  """The loop itself, once the workdir is locked."""
  checkpoint_every = int(config.get("checkpoint_every_steps", 1000))
  ckpt = checkpoint.Checkpointer(
      workdir, save_every=checkpoint_every,
      keep=int(config.get("keep_checkpoints", 3)),
      keep_every=config.get("keep_every_steps", None))
  state = init_state(run)
  start_step, restored = ckpt.restore_latest(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
  if start_step:
    state = restored
    log.info("resumed from the checkpoint at step %d", start_step)
  if jax.process_index() == 0:
    workdir_lib.write_config(workdir, config, mode)

  from funmatch.data import pipeline  # pylint: disable=import-outside-toplevel
  train_batches = pipeline.make_train_iterator(
      config.input, run.views, seed=int(config.seed), start_step=start_step,
      sharding=parallel.batch_sharding(run.mesh),
      teaching=config.get("teaching", "function_matching") if mode == "distill"
      else "consistent")
  eval_sets = evaluate_lib.make_eval_sets(run)
  eval_fn = evaluate_lib.make_eval_fn(run)
  train_step = jit_train_step(run, state)

  writer = metrics_io.MetricsWriter(workdir)
  progress = Progress(run, start_step)
  log_every = int(config.get("log_every_steps", 100))
  eval_every = int(config.get("eval_every_steps", 0) or 0)
  results: dict[str, Any] = {}
  step = start_step
  try:
    with StopSignal() as stop:
      for step in range(start_step + 1, run.total_steps + 1):
        state, metrics = train_step(state, next(train_batches), run.teacher_params)
        if _every(step, log_every, run.total_steps):
          _check_finite(state, step, ckpt)
          scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
          scalars.update(progress.update(step, scalars))
          writer.write(step, scalars)
        if _every(step, eval_every, run.total_steps) and eval_sets:
          results = evaluate_lib.evaluate(eval_fn, state.params, run.teacher_params,
                                          eval_sets)
          writer.write(step, results)
          log.info("eval at step %d: %s", step, _summary(results))
        if _every(step, checkpoint_every, run.total_steps) or stop.received:
          _check_finite(state, step, ckpt)
          ckpt.save(step, state, force=True)
        if stop.received:
          ckpt.wait()
          print(f"funmatch: {stop.received} received: saved a checkpoint at step {step}; "
                "run the same command to resume", flush=True)
          return results
      if start_step >= run.total_steps and eval_sets:
        results = evaluate_lib.evaluate(eval_fn, state.params, run.teacher_params, eval_sets)
  finally:
    ckpt.close()
    writer.close()
  return results


def _summary(results: dict[str, float]) -> str:
  keys = [k for k in results if k.endswith(("student_top1", "teacher_top1", "agreement_top1"))]
  return ", ".join(f"{k}={results[k]:.4f}" for k in sorted(keys))
