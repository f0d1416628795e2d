"""NKD on digits: the digits BiT teacher into configs/digits.py's student, with labels.

  funmatch-distill --config configs/digits_nkd.py:teacher=/tmp/digits_teacher --workdir /tmp/nkd
  funmatch-train --config configs/digits_nkd.py:baseline=True --workdir /tmp/nkd_labels
`teacher` is a funmatch-train workdir of configs/digits_teacher.py (or its export).
Loss: CE on the labels + NKD (T = 1, gamma = 1, as for DeiT). Teacher and student see
the same crop; `mixup=P` (> 0) mixes the images as in function matching, and NKD's
target class is then the argmax of the mixed label. `baseline=True` is the same
student, data, optimizer and steps trained on labels alone (funmatch-train).
"""
from funmatch import config_util as common

digits = common.load_recipe(__file__, "digits")


def get_config(arg=None):
  args = common.parse_arg(arg, teacher="", steps=1000, batch_size=128, res=16,
                          teacher_res=16, mixup=0.0, baseline=False)
  teaching = "function_matching" if args.mixup > 0 else "consistent"
  teacher_res = args.res if args.baseline else args.teacher_res
  c = digits.get_config(f"teacher={args.teacher},steps={args.steps},"
                        f"batch_size={args.batch_size},res={args.res},"
                        f"teacher_res={teacher_res},teaching={teaching}")
  c.mixup.p = args.mixup
  if args.baseline:
    common.set_objective(c, "supervised")
    c.teachers = ()
    return c
  common.set_objective(c, "nkd")
  return c
