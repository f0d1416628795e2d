"""The one optimizer factory: an optax chain of small transforms.

    clip -> [coupled decay] -> direction (adam | sgd | shampoo) -> [decoupled decay] -> -lr

Config fields (all top-level in the recipe):
  optax_name      'adam' | 'sgd' | 'shampoo' (OPTIMIZERS lists each one's keys)
  optax           that optimizer's keys (adam: b1, b2, eps, mu_dtype; sgd: momentum,
                  nesterov; shampoo: see funmatch/optim/shampoo.py)
  lr              peak learning rate
  wd              weight decay of the parameters `wd_mask` selects
  wd_mode         'decoupled' (default, big_vision / AdamW): `wd / lr * param` is added to
                  the direction, then scaled by the schedule, so the decay per step is
                  `wd * schedule(t) / lr * param`: it follows the schedule's shape but not
                  its scale (wd=3e-4 with lr=0.03 is AdamW's weight_decay=0.01).
                  'coupled' (PyTorch's `weight_decay` argument, L2): `wd * param` is added
                  to the gradient before the optimizer, so with SGD it goes through the
                  momentum (10x stronger than decoupled at momentum 0.9) and with Adam
                  through its normalisation.
  wd_mask         regex over parameter names (re.fullmatch); default '(.*/)?kernel': conv
                  and dense kernels only, as big_vision; never biases, norms, position
                  embeddings, CLS or mask tokens. Names are the flax paths joined by '/',
                  under 'student/' for the student and 'aux/' for the objective's params
                  (e.g. 'student/block1/unit01/a/standardized_conv2d/kernel').
  grad_clip_norm  global-norm clipping threshold (0 disables it)
  schedule        warmup_steps, decay_type ('cosine' | 'linear' | 'constant')
"""
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from funmatch.errors import UserError

# Optimizer name -> its config.optax keys and their defaults (the one table of them;
# config_util.set_optimizer writes these out so the command line can override them).
OPTIMIZERS = {
    "adam": dict(b1=0.9, b2=0.999, eps=1e-8, mu_dtype=""),
    "sgd": dict(momentum=0.9, nesterov=False),
    "shampoo": None,  # the keyword arguments of shampoo.scale_by_shampoo
}
DECAY_TYPES = ("cosine", "linear", "constant")
WD_MODES = ("decoupled", "coupled")
DEFAULT_WD_MASK = "(.*/)?kernel"


def optimizer_defaults(name: str) -> dict[str, Any]:
  """The config.optax keys of optimizer `name` with their defaults."""
  if name not in OPTIMIZERS:
    raise UserError(f"unknown config.optax_name '{name}'; choose one of: "
                    f"{', '.join(OPTIMIZERS)}")
  if name == "shampoo":
    from funmatch.optim import shampoo  # pylint: disable=import-outside-toplevel
    return shampoo.config_defaults()
  return dict(OPTIMIZERS[name])


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to config.lr, then cosine/linear decay to 0 (or constant)."""
  warmup = int(config.schedule.warmup_steps)
  decay_type = config.schedule.decay_type
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


def param_name(path) -> str:
  """'/'-joined names of a pytree path (dict keys, attribute names, indices)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


def name_mask(pattern: str) -> Callable[[Any], Any]:
  """A mask function for optax: True for the leaves whose name fullmatches `pattern`."""
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise UserError(f"config.wd_mask={pattern!r} is not a valid regex ({e})") from None
  return lambda tree: jax.tree_util.tree_map_with_path(
      lambda path, _: regex.fullmatch(param_name(path)) is not None, tree)


def _check_kwargs(name: str, kwargs: dict[str, Any]) -> None:
  allowed = set(optimizer_defaults(name))
  unknown = sorted(set(kwargs) - allowed)
  if unknown:
    raise UserError(f"unknown config.optax key(s) {unknown} for optax_name='{name}'; "
                    f"allowed: {sorted(allowed)}")


def _direction(name: str, kwargs: dict[str, Any]) -> optax.GradientTransformation:
  """The optimizer's update direction, before weight decay and the learning rate."""
  _check_kwargs(name, kwargs)
  if name == "adam":
    mu_dtype = kwargs.pop("mu_dtype", None)
    try:
      mu_dtype = jnp.dtype(mu_dtype) if mu_dtype else None
    except TypeError:
      raise UserError(f"config.optax.mu_dtype '{mu_dtype}' is not a dtype; "
                      "use e.g. 'bfloat16' or 'float32'") from None
    return optax.scale_by_adam(mu_dtype=mu_dtype, **kwargs)
  if name == "sgd":
    momentum = float(kwargs.get("momentum", 0.9))
    if momentum:
      return optax.trace(decay=momentum, nesterov=bool(kwargs.get("nesterov", False)))
    return optax.identity()
  from funmatch.optim import shampoo  # pylint: disable=import-outside-toplevel
  return shampoo.direction(**kwargs)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optimizer from the config. Returns (transformation, lr schedule)."""
  name = config.optax_name
  optimizer_defaults(name)  # a bad name fails here
  schedule = make_schedule(config, total_steps)
  wd = float(config.wd or 0.0)
  if wd < 0:
    raise UserError(f"config.wd must be >= 0, got {wd}")
  if config.wd_mode not in WD_MODES:
    raise UserError(f"unknown config.wd_mode '{config.wd_mode}'; choose one of: "
                    f"{', '.join(WD_MODES)}")
  mask = name_mask(config.wd_mask)
  coupled = wd and config.wd_mode == "coupled"
  decoupled = wd and config.wd_mode == "decoupled"
  clip = float(config.grad_clip_norm or 0.0)
  parts = [
      optax.clip_by_global_norm(clip) if clip else None,
      optax.add_decayed_weights(wd, mask) if coupled else None,
      _direction(name, dict(config.optax.to_dict())),
      optax.add_decayed_weights(wd / float(config.lr), mask) if decoupled else None,
      optax.scale_by_learning_rate(schedule),
  ]
  return optax.chain(*(p for p in parts if p is not None)), schedule
