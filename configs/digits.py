"""Function matching on digits: the digits BiT teacher into a 5x smaller student.

  funmatch-distill --config configs/digits.py:teacher=/tmp/digits_teacher --workdir /tmp/d
`teacher` is a funmatch-train workdir (or a funmatch-export / BiT .npz file);
`optimizer=shampoo` switches to Shampoo (its keys then appear under config.optax);
`teaching=fixed|independent|consistent|function_matching` picks the paper's teaching mode.
"""
from funmatch import config_util as common


def get_config(arg=None):
  args = common.parse_arg(arg, teacher="", steps=1000, batch_size=128, res=16,
                          teacher_res=16, optimizer="adam",
                          teaching="function_matching")
  c = common.base_config()
  c.teaching = args.teaching
  c.input = common.data_config("digits", split="train", image_size=args.teacher_res,
                               batch_size=args.batch_size, crop="inception",
                               crop_area_min=0.5, flip=False)
  c.evals.test = common.eval_config("digits", "test", 256, image_size=args.teacher_res,
                                    eval_crop="resize")
  c.teacher = common.model_config("bit", res=args.teacher_res, init=args.teacher,
                                  depth=[1, 1, 2, 2], width=1.0)
  c.student = common.model_config("bit", res=args.res, depth=[1, 1, 1, 1], width=0.5)
  c.total_steps = args.steps
  common.set_optimizer(c, args.optimizer)
  c.lr = 3e-3
  c.wd = 1e-4
  c.objective_args.temperature = 1.0
  c.schedule.warmup_steps = 100
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  return c
