"""A BiT teacher trained on labels on scikit-learn's digits (runs in minutes on CPU).

  funmatch-train --config configs/digits_teacher.py --workdir /tmp/digits_teacher
"""
from funmatch import config_util as common


def get_config(arg=None):
  args = common.parse_arg(arg, steps=300, batch_size=128, res=16)
  c = common.base_config()
  common.set_objective(c, "supervised")
  c.teachers = ()
  c.input = common.data_config("digits", split="train", image_size=args.res,
                               batch_size=args.batch_size, crop="inception",
                               crop_area_min=0.5, flip=False)
  c.evals.test = common.eval_config("digits", "test", 256, image_size=args.res,
                                    eval_crop="resize")
  c.student = common.model_config("bit", res=args.res, depth=[1, 1, 2, 2], width=1.0)
  c.mixup.p = 0.0
  c.total_steps = args.steps
  c.lr = 1e-3
  c.wd = 1e-4
  c.schedule.warmup_steps = 50
  c.log_every_steps = 50
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 200
  return c
