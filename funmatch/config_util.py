"""Helpers for recipe files: `get_config(arg)` arguments and model sub-configs.

Recipes are big_vision-style `get_config(arg)` files; `arg` is the text after the
colon in `--config configs/digits.py:teacher=/path,variant=fast`.
"""
import ast
import dataclasses
import importlib.util
import os
import types
from typing import Any

import ml_collections
from ml_collections import config_dict

from funmatch.errors import UserError
from funmatch.models import MODEL_META_KEYS  # pylint: disable=unused-import


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


def model_kwargs(model_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The constructor arguments of a model sub-config (all but the meta keys)."""
  return {k: v for k, v in model_config.items() if k not in MODEL_META_KEYS}


def model_config(model: str, res: int, init: str = "", dtype: str = "float32",
                 init_sha256: str = "", conv_impl: str = "auto",
                 **kwargs: Any) -> ml_collections.ConfigDict:
  """A model sub-config: registry name, input resolution, init source, kwargs.

  The model's own options are untyped fields (the model validates them), so the
  command line may give BiT's depth as 50 or as "(1, 1, 2, 2)". Options whose
  value follows the weights (BiT's stem_pool_padding, ViT's gelu) are present as
  'auto' unless given; the build decides them from `init` (funmatch/weights/init.py).
  `init` is a path, a workdir or a published name (docs/weights.md);
  `init_sha256` (hex) makes the build check the file's digest. conv_impl (every
  model's option, funmatch.models.conv) is written out so the locked command line
  can override it: --config.student.conv_impl=xla.
  """
  from funmatch import models  # pylint: disable=import-outside-toplevel
  kwargs = {**{k: "auto" for k in models.weights_spec(model).auto_options}, **kwargs}
  options = {k: config_dict.FieldReference(tuple(v) if isinstance(v, list) else v,
                                           field_type=object)
             for k, v in kwargs.items()}
  return ml_collections.ConfigDict(
      dict(model=model, res=res, init=init, init_sha256=init_sha256, dont_load=(), dtype=dtype,
           conv_impl=conv_impl, **options))



def base_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, with its default; recipes override values."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  set_objective(c, "function_matching")  # config.objective and its objective_args
  c.teaching = "function_matching"   # fixed | independent | consistent | function_matching
  c.num_classes = 0                  # 0: take it from the training data
  c.total_epochs = 0.0
  c.total_steps = 0                  # > 0 wins over total_epochs
  c.log_every_steps = 100
  c.eval_every_steps = 0             # 0: only at the end
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3             # keep the last N ...
  c.keep_every_steps = 0             # ... plus every K-th step (0: none)
  # Multi-host runs: how often the processes agree whether one got SIGTERM/SIGINT
  # (then all save the same step and exit 0); one process checks every step.
  c.preemption_check_every_steps = 10
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

  c.mixup = ml_collections.ConfigDict(dict(p=1.0, per_example=False))

  c.optax_name = "adam"              # adam | sgd | shampoo (see funmatch/optim)
  c.optax = ml_collections.ConfigDict()
  c.lr = 0.03
  c.wd = 3e-4
  c.wd_mode = "decoupled"            # decoupled (big_vision, AdamW) | coupled (PyTorch)
  c.wd_mask = "(.*/)?kernel"         # regex (fullmatch) over 'student/...', 'aux/...'
  c.grad_clip_norm = 1.0
  c.schedule = ml_collections.ConfigDict(dict(warmup_steps=5000, decay_type="cosine"))
  return c


def data_config(source: str = "digits", **kwargs) -> ml_collections.ConfigDict:
  """A data config with every key the pipeline reads."""
  d = ml_collections.ConfigDict(dict(
      source=source, name="", split="train", data_dir="", root="", image_size=32,
      batch_size=512, cache_raw=False, shuffle_buffer=50_000, crop="inception",
      # TFDS: unset (None) reads ArrayRecord files by index when they are prepared
      # (exact resume), else streams TFRecords; True / False force one. A typed
      # placeholder, so --config.input.random_access=True|False parses.
      random_access=ml_collections.config_dict.placeholder(bool),
      crop_area_min=0.05, crop_area_max=1.0, random_crop_pad=0, flip=True,
      eval_crop="resize_small_central", eval_resize_ratio=1.143))
  d.update(kwargs)
  return d


def eval_config(source: str, split: str, batch_size: int, **kwargs):
  """An eval set: the training data's keys (crops unused), plus its cost on long runs.

  every_steps: evaluate this set every N steps (0: config.eval_every_steps);
  max_examples: only the split's first N examples (0: all of it). A quick minival
  often and the full test set rarely keep periodic evals from stalling training.
  """
  return data_config(source, split=split, batch_size=batch_size,
                     **{"every_steps": 0, "max_examples": 0, **kwargs})


def set_imagenet_data(c: ml_collections.ConfigDict, batch_size: int, data_dir: str,
                      crop_area_min: float) -> None:
  """ImageNet-1k from TFDS: inception crops + flips for training, the validation split
  for evaluation. Recipes differ only in the smallest crop area."""
  c.input = data_config("tfds", name="imagenet2012", split="train", data_dir=data_dir,
                        batch_size=batch_size, crop="inception",
                        crop_area_min=crop_area_min, flip=True, shuffle_buffer=250_000)
  c.evals.val = eval_config("tfds", "validation", 1024, name="imagenet2012",
                            data_dir=data_dir)


def set_optimizer(c: ml_collections.ConfigDict, name: str) -> None:
  """Sets config.optax_name and fills config.optax with that optimizer's keys.

  Filling every key (with its default) lets users override any of them from the
  command line (`--config.optax.block_size=256`) although the config is locked.
  """
  from funmatch import optim  # pylint: disable=import-outside-toplevel
  c.optax = ml_collections.ConfigDict(optim.optimizer_defaults(name))
  c.optax_name = name


def set_objective(c: ml_collections.ConfigDict, name: str, **overrides: Any) -> None:
  """Sets config.objective and fills config.objective_args with its settings.

  As with set_optimizer, every setting is written out so the command line can
  override it (`--config.objective_args.alpha=1e-4`) although the config is locked.
  """
  from funmatch.distill import objectives  # pylint: disable=import-outside-toplevel
  fields = {f.name: f for f in dataclasses.fields(objectives.objective_class(name))}
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise UserError(f"objective '{name}' has no setting(s) {', '.join(unknown)}")
  args = {}
  for key, field in fields.items():
    value = overrides.get(key, field.default)
    # A setting that takes several types (OFA's gamma: a number or a tuple) must
    # accept any of them from the command line: an untyped field.
    if isinstance(field.type, types.UnionType):
      value = config_dict.FieldReference(value, field_type=object)
    args[key] = value
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
