"""configs/digits.py with the 'fixed' teaching mode (paper section 3.2).

  funmatch-distill --config configs/digits_fixed.py:teacher=/tmp/digits_teacher --workdir /tmp/d
Takes the same arguments as configs/digits.py.
"""
from funmatch import config_util

digits = config_util.load_recipe(__file__, "digits")


def get_config(arg=None):
  return digits.get_config(",".join(a for a in ("teaching=fixed", arg) if a))
