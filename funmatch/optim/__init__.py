"""The one optimizer factory: gradient clipping, optimizer, schedule, weight decay.

Config fields (all top-level in the recipe):
  optax_name      'adam' | 'sgd' | 'shampoo'
  optax           kwargs of the optimizer (adam: b1, b2, eps, mu_dtype;
                  sgd: momentum, nesterov; shampoo: see funmatch/optim/shampoo.py)
  lr              peak learning rate
  wd              decoupled weight decay, applied to kernels (params with ndim > 1)
                  as `param -= wd * schedule(step) / lr * param`, i.e. it follows
                  the schedule's shape but not its scale (big_vision's convention:
                  wd=3e-4 with lr=0.03 is AdamW's weight_decay=0.01).
  grad_clip_norm  global-norm clipping threshold (0 or None disables it)
  schedule        warmup_steps, decay_type ('cosine' | 'linear' | 'constant')
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from funmatch.errors import UserError

OPTIMIZERS = ("adam", "sgd", "shampoo")
DECAY_TYPES = ("cosine", "linear", "constant")

_ADAM_KEYS = {"b1", "b2", "eps", "mu_dtype"}
_SGD_KEYS = {"momentum", "nesterov"}


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to config.lr, then cosine/linear decay to 0 (or constant)."""
  schedule = config.get("schedule", ml_collections.ConfigDict())
  warmup = int(schedule.get("warmup_steps", 0))
  decay_type = schedule.get("decay_type", "cosine")
  if decay_type not in DECAY_TYPES:
    raise UserError(f"unknown config.schedule.decay_type '{decay_type}'; "
                    f"choose one of: {', '.join(DECAY_TYPES)}")
  if warmup < 0:
    raise UserError(f"config.schedule.warmup_steps must be >= 0, got {warmup}")
  lr = float(config.lr)
  if not lr > 0:
    raise UserError(f"config.lr must be > 0, got {config.lr}")
  decay_steps = max(total_steps - warmup, 1)
  if decay_type == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps)
  elif decay_type == "linear":
    decay = optax.linear_schedule(lr, 0.0, decay_steps)
  else:
    decay = optax.constant_schedule(lr)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


class DecoupledWeightDecayState(NamedTuple):
  count: jax.Array


def decoupled_weight_decay(weight_decay: float,
                           multiplier: Callable[[jax.Array], jax.Array]
                           ) -> optax.GradientTransformation:
  """Adds `-weight_decay * multiplier(step) * param` to the update of kernels.

  Applied after the learning rate so the decay is not scaled by the base lr.
  Only params with ndim > 1 (conv and dense kernels) decay; biases and norms don't.
  """

  def init_fn(params):
    del params
    return DecoupledWeightDecayState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("decoupled_weight_decay needs params")
    scale = weight_decay * multiplier(state.count)
    updates = jax.tree.map(
        lambda u, p: u - scale * p if p.ndim > 1 else u, updates, params)
    return updates, DecoupledWeightDecayState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def _check_kwargs(name: str, kwargs: dict[str, Any], allowed: set[str]) -> None:
  unknown = sorted(set(kwargs) - allowed)
  if unknown:
    raise UserError(f"unknown config.optax key(s) {unknown} for optax_name='{name}'; "
                    f"allowed: {sorted(allowed)}")


def _direction(name: str, kwargs: dict[str, Any],
               schedule: optax.Schedule) -> optax.GradientTransformation:
  """The optimizer's update including the (negative) learning rate."""
  if name == "adam":
    _check_kwargs(name, kwargs, _ADAM_KEYS)
    mu_dtype = kwargs.pop("mu_dtype", None)
    try:
      mu_dtype = jnp.dtype(mu_dtype) if mu_dtype else None
    except TypeError:
      raise UserError(f"config.optax.mu_dtype '{mu_dtype}' is not a dtype; "
                      "use e.g. 'bfloat16' or 'float32'") from None
    return optax.chain(optax.scale_by_adam(mu_dtype=mu_dtype, **kwargs),
                       optax.scale_by_learning_rate(schedule))
  if name == "sgd":
    _check_kwargs(name, kwargs, _SGD_KEYS)
    momentum = kwargs.get("momentum", 0.9)
    parts = [optax.trace(decay=momentum, nesterov=kwargs.get("nesterov", False))] \
        if momentum else []
    return optax.chain(*parts, optax.scale_by_learning_rate(schedule))
  from funmatch.optim import shampoo  # pylint: disable=import-outside-toplevel
  try:
    return shampoo.shampoo(learning_rate=schedule, weight_decay=0.0, **kwargs)
  except TypeError as e:
    raise UserError(f"bad config.optax for optax_name='shampoo': {e}") from None


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optimizer from the config. Returns (transformation, lr schedule)."""
  name = config.get("optax_name", "adam")
  if name not in OPTIMIZERS:
    raise UserError(f"unknown config.optax_name '{name}'; choose one of: "
                    f"{', '.join(OPTIMIZERS)}")
  schedule = make_schedule(config, total_steps)
  kwargs = dict(config.get("optax", ml_collections.ConfigDict()).to_dict())
  parts = []
  clip = config.get("grad_clip_norm", None)
  if clip:
    parts.append(optax.clip_by_global_norm(float(clip)))
  parts.append(_direction(name, kwargs, schedule))
  wd = float(config.get("wd", 0.0) or 0.0)
  if wd < 0:
    raise UserError(f"config.wd must be >= 0, got {wd}")
  if wd:
    lr = float(config.lr)
    parts.append(decoupled_weight_decay(wd, lambda step: schedule(step) / lr))
  return optax.chain(*parts), schedule
