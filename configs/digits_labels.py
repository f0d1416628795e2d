"""The digits student of configs/digits.py trained on labels alone (the baseline).

Same student, data, crops, optimizer, schedule and steps as configs/digits.py, but
cross-entropy on the labels instead of matching a teacher (no mixup):

  funmatch-train --config configs/digits_labels.py --workdir /tmp/digits_labels
Takes digits.py's arguments except `teacher` and `teaching`.
"""
from funmatch import config_util as common

digits = common.load_recipe(__file__, "digits")


def get_config(arg=None):
  args = common.parse_arg(arg, steps=1000, batch_size=128, res=16, optimizer="adam")
  c = digits.get_config(f"steps={args.steps},batch_size={args.batch_size},res={args.res},"
                        f"teacher_res={args.res},optimizer={args.optimizer}")
  common.set_objective(c, "supervised")
  c.teachers = ()
  c.mixup.p = 0.0
  return c
