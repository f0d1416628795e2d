"""A workdir's config.json, read: the one reader (StoredModel and the trainer's
resume check both call it). Light on purpose: the CLI imports it for --help."""
import json
from typing import Optional

from funmatch import fileio
from funmatch.errors import UserError

CONFIG_FILE = "config.json"


def read_config(workdir: str) -> Optional[dict]:
  """A workdir's config.json ({'mode', 'config', 'data', ...}), None if absent."""
  path = fileio.join(workdir, CONFIG_FILE)
  if not fileio.exists(path):
    return None
  try:
    return json.loads(fileio.read_text(path))
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {path} ({e}); it is not a funmatch workdir or it is "
                    "damaged: use another --workdir") from None
