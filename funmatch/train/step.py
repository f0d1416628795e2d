"""The pure train and eval step functions (jitted over the mesh by the loop)."""
from typing import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from funmatch import parallel
from funmatch.distill import mixup as mixup_lib
from funmatch.teaching import Mixup
from funmatch.train.state import TrainState


def apply_model(model: nn.Module, params, images, train: bool, rng=None):
  """`(logits, taps)` of `model` on `images`."""
  rngs = {"dropout": rng} if rng is not None else None
  return model.apply({"params": params}, images, train=train, rngs=rngs)


def teacher_outputs(teachers: Mapping[str, nn.Module], teacher_params, images):
  """Every teacher's `(logits, taps)` on its own view; frozen, no gradient."""
  return {name: jax.lax.stop_gradient(
              apply_model(model, teacher_params[name], images[name], train=False))
          for name, model in teachers.items()}


def make_train_step(student: nn.Module, teachers: Mapping[str, nn.Module], objective,
                    optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    num_classes: int, mixup: Mixup | None) -> Callable:
  """Returns `train_step(state, batch, teacher_params) -> (state, metrics)`.

  `batch` = {'images': {view: [B,H,W,3]}, 'label': [B]}; the student's view is
  'student' and each teacher's view carries the teacher's name. `mixup` is the
  teaching plan's (None: no mixup).
  """

  def train_step(state: TrainState, batch, teacher_params):
    step_rng = jax.random.fold_in(state.rng, state.step)
    mixup_rng, objective_rng, dropout_rng = jax.random.split(step_rng, 3)
    images = batch["images"]
    label_probs = jax.nn.one_hot(batch["label"], num_classes)
    metrics = {}
    if mixup is not None:
      images, coefficients = mixup_lib.mixup_views(
          mixup_rng, images, mixup.p, mixup.per_example)
      label_probs = mixup_lib.mix(label_probs, coefficients)
      metrics["mixup_coefficient"] = jnp.mean(coefficients)
    teacher_outs = teacher_outputs(teachers, teacher_params, images)
    objective_batch = {**batch, "images": images, "label_probs": label_probs,
                       "objective_state": state.objective_state}

    def loss_fn(trainable):
      params, aux_params = trainable["student"], trainable["aux"]
      student_out = apply_model(student, params, images["student"], True, dropout_rng)
      return objective(aux_params, student_out, teacher_outs, objective_batch,
                       objective_rng)

    # The optimizer sees parameter names 'student/...' and 'aux/...' (config.wd_mask).
    trainable = {"student": state.params, "aux": state.aux_params}
    (loss, objective_metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    new_params, new_aux = new_trainable["student"], new_trainable["aux"]

    # A non-finite step is not applied, and its step number is remembered so the
    # loop can stop at its next host check with the last good params intact.
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    objective_state = objective.next_state(state.objective_state, teacher_outs)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        aux_params=keep(new_aux, state.aux_params),
        opt_state=keep(opt_state, state.opt_state),
        objective_state=keep(objective_state, state.objective_state),
        nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~finite,
                                 state.step, state.nonfinite_step))
    metrics.update({f"train/{k}": v for k, v in objective_metrics.items()})
    metrics.update({
        "train/loss": loss,
        "train/grad_norm": grad_norm,
        "train/param_norm": optax.global_norm(state.params),
        "train/update_norm": optax.global_norm(updates),
        "train/lr": schedule(state.step),
    })
    return new_state, metrics

  return train_step


def _topk_hits(logits, targets, k):
  """1.0 where `targets` is among the top-k classes of `logits`."""
  k = min(k, logits.shape[-1])
  top = jax.lax.top_k(logits, k)[1]
  return jnp.any(top == targets[:, None], axis=-1).astype(jnp.float32)


def _kl_per_example(student_logits, teacher_log_probs):
  log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32))
  return jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - log_p_s), -1)


def make_eval_step(student: nn.Module, teachers: Mapping[str, nn.Module],
                   teacher_log_probs: Callable[[dict], jax.Array]) -> Callable:
  """Returns `eval_step(params, teacher_params, batch) -> sums` (masked sums).

  Sums (divide by 'count'): student/teacher top-1/top-5 accuracy; agreement_top1
  (student and teacher argmax equal), agreement_top5 (teacher's argmax within the
  student's top 5), kl = KL(teacher || student) at T=1. The teacher side is
  `teacher_log_probs(logits by teacher)` (the objective's: for several teachers
  the ensemble training matches); each of several teachers also gets its own
  `teacher_<name>_top1/5`.
  """

  def eval_step(params, teacher_params, batch):
    mask = batch["mask"].astype(jnp.float32)
    label = batch["label"]
    student_logits, _ = apply_model(student, params, batch["images"]["student"], False)
    sums = {"count": jnp.sum(mask),
            "student_top1": jnp.sum(mask * _topk_hits(student_logits, label, 1)),
            "student_top5": jnp.sum(mask * _topk_hits(student_logits, label, 5))}
    if not teachers:
      return sums
    outs = teacher_outputs(teachers, teacher_params, batch["images"])
    teacher_logits = {name: out[0].astype(jnp.float32) for name, out in outs.items()}
    if len(teacher_logits) > 1:
      for name, logits in teacher_logits.items():
        sums[f"teacher_{name}_top1"] = jnp.sum(mask * _topk_hits(logits, label, 1))
        sums[f"teacher_{name}_top5"] = jnp.sum(mask * _topk_hits(logits, label, 5))
    reference = teacher_log_probs(teacher_logits)
    teacher_argmax = jnp.argmax(reference, -1)
    sums.update({
        "teacher_top1": jnp.sum(mask * _topk_hits(reference, label, 1)),
        "teacher_top5": jnp.sum(mask * _topk_hits(reference, label, 5)),
        "agreement_top1": jnp.sum(mask * _topk_hits(student_logits, teacher_argmax, 1)),
        "agreement_top5": jnp.sum(mask * _topk_hits(student_logits, teacher_argmax, 5)),
        "kl": jnp.sum(mask * _kl_per_example(student_logits, reference)),
    })
    return sums

  return eval_step


def jit_train_step(run, state: TrainState):
  """The jitted `train_step(state, batch, teacher_params) -> (state, metrics)` of
  `run` (funmatch.train.build.Run).

  The state is donated (updated in place) and keeps its shardings; metrics are
  replicated. Benchmarks use this same function, so they time what runs.
  """
  return jax.jit(
      make_train_step(run.student, run.teachers, run.objective, run.optimizer,
                               run.schedule, run.num_classes, run.plan.mixup),
      donate_argnums=(0,),
      out_shardings=(jax.tree.map(lambda x: x.sharding, state),
                     parallel.replicated(run.mesh)))
