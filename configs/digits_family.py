"""Cross-family distillation on digits: a ConvNeXt or Swin teacher, any student.

  funmatch-distill --config configs/digits_family.py:teacher=/tmp/swin,family=swin \
      --workdir /tmp/swin_to_bit
`teacher` is a funmatch-train workdir of configs/digits_family_teacher.py:model=<family>
(or its export); it runs at its own resolution (teacher_res, 32px), the student at
`res` (16px; a ConvNeXt or Swin student at 32px). `student`: bit (digits.py's BiT
[1,1,1,1]x0.5), mobilenet_v3 (width 0.25), vit (width 48, 4 blocks, 4x4 patches),
convnext or swin (digits_family_teacher's sizes). `objective`: function_matching
(digits.py's recipe), ofakd (digits_ofakd.py's: consistent teaching, branch heads on
the student's stages / blocks, gamma 1) or any other objective with its defaults. `baseline=True`: the same student, data and
steps on labels alone (funmatch-train).
Arguments: teacher, family, student, objective, steps, batch_size, res, teacher_res,
gamma, baseline.
"""
from funmatch import config_util as common
from funmatch.errors import UserError

digits = common.load_recipe(__file__, "digits")
family_teacher = common.load_recipe(__file__, "digits_family_teacher")

STUDENTS = ("bit", "mobilenet_v3", "vit", "convnext", "swin")


def student(name: str, res: int):
  if name in family_teacher.MODELS:
    return family_teacher.model(name, res)
  options = {"bit": dict(depth=(1, 1, 1, 1), width=0.5),
             "mobilenet_v3": dict(width=0.25),
             "vit": dict(variant="Ti", width=48, depth=4, num_heads=3, mlp_dim=96,
                         patch_size=4)}
  if name not in options:
    raise UserError(f"student={name!r}: use one of {', '.join(STUDENTS)}")
  return common.model_config(name, res=res, **options[name])


def get_config(arg=None):
  args = common.parse_arg(arg, teacher="", family="swin", student="bit",
                          objective="function_matching", steps=1000, batch_size=128,
                          res=0, teacher_res=32, gamma=1.0, baseline=False)
  res = args.res or (32 if args.student in family_teacher.MODELS else 16)
  c = digits.get_config(f"teacher={args.teacher},steps={args.steps},"
                        f"batch_size={args.batch_size},res={res},"
                        f"teacher_res={args.teacher_res}")
  c.teacher = family_teacher.model(args.family, args.teacher_res, init=args.teacher)
  c.student = student(args.student, res)
  if args.baseline:
    common.set_objective(c, "supervised")
    c.teachers = ()
    c.mixup.p = 0.0
    c.teaching = "consistent"
  elif args.objective == "ofakd":
    c.teaching = "consistent"
    c.mixup.p = 0.0
    common.set_objective(c, "ofakd", gamma=args.gamma, temperature=1.0, stages="auto")
  elif args.objective != "function_matching":
    # Any other objective with its defaults (ViTKD / TinyMIM refuse these teachers).
    c.teaching = "consistent"
    c.mixup.p = 0.0
    common.set_objective(c, args.objective)
  return c
