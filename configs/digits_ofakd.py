"""OFA-KD on digits, heterogeneous: the digits ViT teacher into digits.py's BiT student.

  funmatch-distill --config configs/digits_ofakd.py:teacher=/tmp/vit_teacher --workdir /tmp/o
`teacher` is a funmatch-train workdir of configs/digits_vit_teacher.py (ViT width 96,
4 blocks, 3 heads, 4x4 patches at 16px) or its export. The student (BiT [1,1,1,1]x0.5)
gets branch heads on stage1-stage3 (training-only); loss = CE on labels +
L_OFA(logits) + sum of L_OFA(branch logits), gamma 1 (CIFAR-scale), T = 1. Both models
see the same crop, no mixup (teaching='consistent').
`baseline=True` gives the same student, data, optimizer and steps on labels alone
(objective 'supervised', no teacher) for funmatch-train.
Arguments: teacher, steps, batch_size, res, gamma, baseline.
"""
from funmatch import config_util as common

digits = common.load_recipe(__file__, "digits")


def get_config(arg=None):
  args = common.parse_arg(arg, teacher="", steps=1000, batch_size=128, res=16,
                          gamma=1.0, baseline=False)
  c = digits.get_config(f"teacher={args.teacher},steps={args.steps},"
                        f"batch_size={args.batch_size},res={args.res},teacher_res={args.res}")
  c.teaching = "consistent"
  c.mixup.p = 0.0
  c.teacher = common.model_config("vit", res=args.res, init=args.teacher, variant="Ti",
                                  width=96, depth=4, num_heads=3, mlp_dim=384, patch_size=4)
  if args.baseline:
    common.set_objective(c, "supervised")
    c.teachers = ()
    return c
  common.set_objective(c, "ofakd", gamma=args.gamma, temperature=1.0, stages="auto")
  return c
