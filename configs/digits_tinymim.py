"""TinyMIM on digits: relation distillation from the digits ViT teacher, then fine-tuning.

  funmatch-train --config configs/digits_vit_teacher.py --workdir /tmp/vit_teacher
  funmatch-distill --config configs/digits_tinymim.py:teacher=/tmp/vit_teacher --workdir /tmp/tm
  funmatch-train --config configs/digits_tinymim.py:finetune=/tmp/tm --workdir /tmp/tm_ft
  funmatch-train --config configs/digits_tinymim.py:baseline=True --workdir /tmp/tm_labels
The distillation run matches the Q-K and V-V relations of the student's last block
(split into the teacher's `teacher_heads`) to the teacher's last block, with no labels
(`ce_weight=0`, as the paper's pre-training; its test accuracy is chance level until
fine-tuned). `finetune=WORKDIR` trains that student on the labels (funmatch-train);
`baseline=True` trains the same student from scratch, same data, optimizer and steps.
Teacher and student see the same crop, no mixup; the student has drop-path 0.1.

Sequential distillation (the paper's B -> S -> T): a finished student is the next
teacher. Point `teacher` at its workdir (or funmatch-export .npz) and describe it:
  funmatch-distill --config configs/digits_tinymim.py:teacher=/tmp/tm,teacher_width=48,width=24 \
      --workdir /tmp/tm2
`teacher_width/depth/heads` describe the teacher (defaults: configs/digits_vit_teacher.py),
`width/depth/heads` the student; the student's relations use `teacher_heads` heads.
"""
from funmatch import config_util as common

digits_vitkd = common.load_recipe(__file__, "digits_vitkd")
vit_teacher = common.load_recipe(__file__, "digits_vit_teacher")


def get_config(arg=None):
  args = common.parse_arg(arg, teacher="", steps=1000, batch_size=128, res=16, width=48,
                          depth=4, heads=3, drop_path=0.1, teacher_width=96,
                          teacher_depth=4, teacher_heads=3, ce_weight=0.0, baseline=False,
                          finetune="")
  c = vit_teacher.get_config(f"steps={args.steps},batch_size={args.batch_size},res={args.res}")
  c.student = digits_vitkd.vit(args.res, args.width, args.depth, args.heads,
                               drop_path=args.drop_path, relation_heads=args.teacher_heads)
  c.log_every_steps = 50
  c.eval_every_steps = 500
  if args.baseline or args.finetune:
    c.student.init = args.finetune
    common.set_objective(c, "supervised")
    return c
  c.teacher = digits_vitkd.vit(args.res, args.teacher_width, args.teacher_depth,
                               args.teacher_heads, init=args.teacher)
  c.teachers = ("teacher",)
  c.teaching = "consistent"  # same crop, no mixup (masking and mixing hurt TinyMIM)
  common.set_objective(c, "tinymim", ce_weight=args.ce_weight)
  return c
