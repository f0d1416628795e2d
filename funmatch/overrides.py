"""`--config.a.b=value` overrides over a locked recipe config.

A key is found by walking the ConfigDict, so a mistyped one is named with the
closest known keys; a value is converted by the type of the field it replaces
(the same rules ml_collections' config_flags used, which recipes were written
for): bool true/false, int, float, str as given, tuples and untyped fields as
Python literals.
"""
import ast
import dataclasses
import difflib
from typing import Any, Mapping, Sequence

import ml_collections

from funmatch.errors import UserError

PREFIX = "--config."
HINT = "check the spelling against the recipe file (the config is locked)"


@dataclasses.dataclass(frozen=True)
class Override:
  """One `--config.<path>[=text]`; text None: the key alone (`--config.input.flip`)."""
  path: str
  text: str | None

  @property
  def flag(self) -> str:
    return PREFIX + self.path + ("" if self.text is None else f"={self.text}")


def split_argv(args: Sequence[str]) -> tuple[list[Override], list[str]]:
  """Separates the `--config.a.b[=| ]value` overrides from the other arguments.

  `--config.a.b value` takes the next argument as its value unless that is a flag.
  """
  overrides, rest = [], []
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith(PREFIX):
      path, sep, text = arg[len(PREFIX):].partition("=")
      if not sep:
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
          i += 1
          text = args[i]
        else:
          text = None
      overrides.append(Override(path, text))
    else:
      rest.append(arg)
    i += 1
  return overrides, rest


def apply(config: ml_collections.ConfigDict, overrides: Sequence[Override],
          moved: Mapping[str, str] = ()) -> None:
  """Sets every override on `config` in order; a mistake raises UserError naming it.

  moved: old key path -> new one, for keys that moved between releases.
  """
  for override in overrides:
    holder, key = _holder(config, override, moved)
    value = _convert(override, holder.get_type(key), f"config.{override.path}")
    try:
      holder[key] = value
    except (TypeError, ValueError) as e:
      raise UserError(f"{override.flag}: config.{override.path} cannot take "
                      f"{value!r} ({e})") from None


def _holder(config, override: Override, moved: Mapping[str, str]):
  """The ConfigDict that holds the override's last key, and that key."""
  parts = override.path.split(".")
  node = config
  for depth, part in enumerate(parts):
    where = ".".join(["config", *parts[:depth]])
    if not isinstance(node, ml_collections.ConfigDict):
      raise UserError(f"{override.flag}: {where} is a {type(node).__name__}, "
                      "not a group of keys")
    if part not in node:
      known = ".".join(parts[:depth + 1])
      if known in moved:
        hint = f" (it moved to config.{moved[known]})"
      else:
        close = difflib.get_close_matches(part, list(node.keys()), n=3)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
      raise UserError(f"unknown config key '{part}' in {PREFIX}{override.path}{hint}; {HINT}")
    if depth < len(parts) - 1:
      node = node[part]
  return node, parts[-1]


def _convert(override: Override, field_type: type, name: str) -> Any:
  text = override.text
  if field_type is bool:
    if text is None:
      return True
    lowered = text.strip().lower()
    if lowered in ("true", "t", "1"):
      return True
    if lowered in ("false", "f", "0"):
      return False
    raise UserError(f"{override.flag}: {name} takes true or false")
  if text is None:
    if field_type in (int, float, str, tuple, ml_collections.ConfigDict):
      raise UserError(f"{PREFIX}{override.path} needs a value: "
                      f"{PREFIX}{override.path}=VALUE")
    return True  # an untyped field given alone, like a boolean flag
  if field_type is int:
    try:
      return int(text, 0)
    except ValueError:
      try:
        return int(text)  # '010'
      except ValueError:
        raise UserError(f"{override.flag}: {name} takes an integer") from None
  if field_type is float:
    try:
      return float(text)
    except ValueError:
      raise UserError(f"{override.flag}: {name} takes a number") from None
  if field_type is str:
    return text
  if field_type is tuple:
    return _tuple(text, override, name)
  if isinstance(field_type, type) and issubclass(field_type, ml_collections.ConfigDict):
    value = _literal(text)
    if not isinstance(value, dict):
      raise UserError(f"{override.flag}: {name} is a group of keys; set them one "
                      f"by one ({PREFIX}{override.path}.KEY=VALUE) or give a dict")
    return ml_collections.ConfigDict(value)
  return _literal(text)  # untyped (object) fields and None placeholders


def _literal(text: str) -> Any:
  """A Python literal, or the text itself: `--config.student.depth=(1,1,2,2)`, `=50`."""
  if text in ("true", "false"):
    text = text.capitalize()
  try:
    return ast.literal_eval(text)
  except (SyntaxError, ValueError):
    return text


def _tuple(text: str, override: Override, name: str) -> tuple:
  try:
    value = ast.literal_eval(text)
  except ValueError:
    value = text  # a single bare word: ('word',)
  except SyntaxError:
    if "," in text or " " in text:
      raise UserError(f"{override.flag}: {name} is a tuple; quote each element, "
                      f"e.g. {PREFIX}{override.path}=\"('a', 'b')\"") from None
    value = text  # a single path or pattern
  if isinstance(value, (list, tuple)):
    return tuple(value)
  return (value,)
