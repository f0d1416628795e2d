"""The one exception type for mistakes a user can make and fix.

Anything raised as `UserError` reaches the console as a single line
(`funmatch: error: <message>`) with exit code 2 and no traceback. The message
must name the culprit (config key, path, file) and say what to do about it.
"""


class UserError(Exception):
  """A problem in the user's config, paths or data, with a one-line fix."""

  exit_code = 2

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split()))  # always one line
