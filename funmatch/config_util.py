"""Helpers for recipe files: `get_config(arg)` arguments and model sub-configs.

Recipes are big_vision-style `get_config(arg)` files; `arg` is the text after the
colon in `--config configs/digits.py:teacher=/path,variant=fast`.
"""
import ast
import importlib.util
import os
from typing import Any

import ml_collections

from funmatch.errors import UserError


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'key=value,key2=value2' into a ConfigDict over `defaults`.

  Values are typed like their default (an int default makes '3' an int). Unknown
  keys are refused so a typo never silently falls back to a default.
  """
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  for item in arg.split(","):
    if not item:
      continue
    key, sep, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise UserError(
          f"unknown config argument '{key}' in ':{arg}'; "
          f"valid arguments: {', '.join(sorted(defaults)) or 'none'}")
    if not sep:  # a bare key is a boolean flag
      text = "True"
    result[key] = _convert(key, text, defaults[key])
  return result


def _convert(key: str, text: str, default: Any) -> Any:
  if isinstance(default, bool):
    lowered = text.strip().lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
      raise UserError(f"config argument '{key}={text}' must be true or false")
    return lowered in ("true", "1", "yes")
  if isinstance(default, (int, float)):
    try:
      return type(default)(ast.literal_eval(text.strip()))
    except (ValueError, SyntaxError):
      raise UserError(f"config argument '{key}={text}' must be a "
                      f"{type(default).__name__}") from None
  return text


# Keys of a model sub-config that the trainer reads itself; every other key is
# passed to the model constructor (e.g. depth, width).
MODEL_META_KEYS = ("model", "res", "init", "dont_load", "dtype")


def model_kwargs(model_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The constructor arguments of a model sub-config (all but the meta keys)."""
  return {k: v for k, v in model_config.items() if k not in MODEL_META_KEYS}


def model_config(model: str, res: int, init: str = "", dtype: str = "float32",
                 conv_impl: str = "auto", **kwargs: Any) -> ml_collections.ConfigDict:
  """A model sub-config: registry name, input resolution, init source, kwargs.

  conv_impl (every model's option, funmatch.models.conv) is written out so the
  locked command line can override it: --config.student.conv_impl=xla.
  """
  return ml_collections.ConfigDict(
      dict(model=model, res=res, init=init, dont_load=(), dtype=dtype,
           conv_impl=conv_impl, **kwargs))



def base_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, with its default; recipes override values."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = "function_matching"  # see funmatch.distill.objectives.OBJECTIVES
  c.objective_args = ml_collections.ConfigDict()  # set_objective() fills it
  c.teaching = "function_matching"   # fixed | independent | consistent | function_matching
  c.num_classes = 0                  # 0: take it from the training data
  c.total_epochs = 0.0
  c.total_steps = 0                  # > 0 wins over total_epochs
  c.log_every_steps = 100
  c.eval_every_steps = 0             # 0: only at the end
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3             # keep the last N ...
  c.keep_every_steps = 0             # ... plus every K-th step (0: none)
  c.mesh = (("data", -1),)            # e.g. (("data", -1), ("fsdp", 8))
  # Per group: replicate | fsdp (needs an 'fsdp' mesh axis); see funmatch/parallel.py.
  # A teacher may get its own key (config.sharding.<teacher name>) in a recipe.
  c.sharding = ml_collections.ConfigDict(dict(
      student="replicate", aux="replicate", teachers="replicate", fsdp_min_size=2 ** 14))

  c.input = data_config()
  c.evals = ml_collections.ConfigDict()

  c.student = model_config("bit", res=224, depth=50, width=1)
  c.teachers = ("teacher",)
  c.teacher = model_config("bit", res=224, depth=152, width=2)

  # Function matching: distance between student and teacher logits.
  c.distance = "kl"                  # kl | hard | l2 | euclidean | logsoftmax_euclidean
  c.temperature = 1.0
  c.ensemble = "sum_kl"              # sum_kl | mean_logits (several teachers)
  c.label_smoothing = 0.0            # for distance='hard' and supervised training
  c.mixup = ml_collections.ConfigDict(dict(p=1.0, per_example=False))

  c.optax_name = "adam"              # adam | sgd | shampoo
  c.optax = ml_collections.ConfigDict()
  c.lr = 0.03
  c.wd = 3e-4
  c.grad_clip_norm = 1.0
  c.schedule = ml_collections.ConfigDict(dict(warmup_steps=5000, decay_type="cosine"))
  return c


def data_config(source: str = "digits", **kwargs) -> ml_collections.ConfigDict:
  """A data config with every key the pipeline reads."""
  d = ml_collections.ConfigDict(dict(
      source=source, name="", split="train", data_dir="", root="", image_size=32,
      batch_size=512, cache_raw=False, shuffle_buffer=50_000, crop="inception",
      crop_area_min=0.05, crop_area_max=1.0, random_crop_pad=0, flip=True,
      eval_crop="resize_small_central", eval_resize_ratio=1.143))
  d.update(kwargs)
  return d


def eval_config(source: str, split: str, batch_size: int, **kwargs):
  """An eval set: the same keys as the training data (crops are unused)."""
  return data_config(source, split=split, batch_size=batch_size, **kwargs)


def set_imagenet_data(c: ml_collections.ConfigDict, batch_size: int, data_dir: str,
                      crop_area_min: float) -> None:
  """ImageNet-1k from TFDS: inception crops + flips for training, the validation split
  for evaluation. Recipes differ only in the smallest crop area."""
  c.input = data_config("tfds", name="imagenet2012", split="train", data_dir=data_dir,
                        batch_size=batch_size, crop="inception",
                        crop_area_min=crop_area_min, flip=True, shuffle_buffer=250_000)
  c.evals.val = eval_config("tfds", "validation", 1024, name="imagenet2012",
                            data_dir=data_dir)


OPTIMIZER_CHOICES = ("adam", "sgd", "shampoo")


def set_optimizer(c: ml_collections.ConfigDict, name: str) -> None:
  """Sets config.optax_name and fills config.optax with that optimizer's keys.

  Filling every key (with its default) lets users override any of them from the
  command line (`--config.optax.block_size=256`) although the config is locked.
  """
  if name not in OPTIMIZER_CHOICES:
    raise UserError(f"unknown optimizer '{name}'; choose one of: "
                    f"{', '.join(OPTIMIZER_CHOICES)}")
  c.optax_name = name
  if name == "shampoo":
    import inspect  # pylint: disable=import-outside-toplevel
    from funmatch.optim import shampoo  # pylint: disable=import-outside-toplevel
    # The trainer owns the learning rate and the decoupled weight decay.
    owned = {"learning_rate", "weight_decay", "weight_decay_mask"}
    defaults = {name: p.default for name, p in
                inspect.signature(shampoo.shampoo).parameters.items() if name not in owned}
    c.optax = ml_collections.ConfigDict(defaults)
  elif name == "adam":
    c.optax = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8, mu_dtype=""))
  else:
    c.optax = ml_collections.ConfigDict(dict(momentum=0.9, nesterov=False))


def set_objective(c: ml_collections.ConfigDict, name: str, **overrides: Any) -> None:
  """Sets config.objective and fills config.objective_args with its settings.

  As with set_optimizer, every setting is written out so the command line can
  override it (`--config.objective_args.alpha=1e-4`) although the config is locked.
  """
  from funmatch.distill import objectives  # pylint: disable=import-outside-toplevel
  args = objectives.default_args(name)
  unknown = sorted(set(overrides) - set(args))
  if unknown:
    raise UserError(f"objective '{name}' has no setting(s) {', '.join(unknown)}")
  args.update(overrides)
  c.objective = name
  c.objective_args = ml_collections.ConfigDict(args)


def load_recipe(beside: str, name: str):
  """The recipe module `name`.py from the folder of the file `beside` (a recipe's __file__).

  Recipes build on each other by file path, not by package import, so a recipe
  works the same from a source checkout, an installed copy or a user's folder.
  """
  path = os.path.join(os.path.dirname(os.path.abspath(beside)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"funmatch_recipe_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
