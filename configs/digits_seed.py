"""SEED on digits: self-supervised distillation of the digits BiT teacher, no labels.

  funmatch-distill --config configs/digits_seed.py:teacher=/tmp/digits_teacher --workdir /tmp/s
`teacher` is a funmatch-train workdir of configs/digits_teacher.py (or its export).
Student and teacher see the same crop (teaching='consistent', no mixup); the student's
projection head and the queue are training-only. The final eval reports
`test/linear_probe_top1` (a linear probe on the frozen student's pre_logits); the
comparison is the probe of the same student at random init:

  python tools/linear_probe.py --config configs/digits_seed.py --random_init
`baseline=True` gives the same student, data, optimizer and steps trained on labels
(objective 'supervised', no teacher) for funmatch-train.
Arguments: teacher, steps, batch_size, res, queue_size (a multiple of batch_size), dim,
baseline.
"""
from funmatch import config_util as common

digits = common.load_recipe(__file__, "digits")


def get_config(arg=None):
  args = common.parse_arg(arg, teacher="", steps=1000, batch_size=128, res=16,
                          queue_size=1280, dim=128, baseline=False)
  c = digits.get_config(f"teacher={args.teacher},steps={args.steps},"
                        f"batch_size={args.batch_size},res={args.res},teacher_res={args.res}")
  c.teaching = "consistent"   # the same crop for both models, no mixup
  c.mixup.p = 0.0
  c.eval_every_steps = 0      # the linear probe reads the whole train split: at the end
  if args.baseline:
    common.set_objective(c, "supervised")
    c.teachers = ()
    return c
  # Digits' train split has 1352 images: a 1280-entry queue holds about one epoch.
  common.set_objective(c, "seed", queue_size=args.queue_size, dim=args.dim)
  return c
