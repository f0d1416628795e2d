"""A small ViT teacher trained on labels on scikit-learn's digits (minutes on CPU).

  funmatch-train --config configs/digits_vit_teacher.py --workdir /tmp/digits_vit_teacher

The ViT teacher for the ViT-to-ViT methods (TinyMIM relations, ViTKD features):
width 96, 4 blocks, 3 heads, MLP 384, 4x4 patches at 16px (16 patches + CLS).
Arguments: steps, batch_size, res (a multiple of 4).
"""
from funmatch import config_util as common

digits_teacher = common.load_recipe(__file__, "digits_teacher")


def get_config(arg=None):
  args = common.parse_arg(arg, steps=1000, batch_size=128, res=16)
  # The BiT teacher's data, crops, optimizer and eval, with a ViT in place of the BiT.
  c = digits_teacher.get_config(f"steps={args.steps},batch_size={args.batch_size},"
                                f"res={args.res}")
  c.student = common.model_config("vit", res=args.res, variant="Ti", width=96,
                                  depth=4, num_heads=3, mlp_dim=384, patch_size=4)
  c.schedule.warmup_steps = 100
  c.log_every_steps = 100
  c.eval_every_steps = 250
  c.checkpoint_every_steps = 500
  return c
