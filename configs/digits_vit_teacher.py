"""A small ViT teacher trained on labels on scikit-learn's digits (minutes on CPU).

  funmatch-train --config configs/digits_vit_teacher.py --workdir /tmp/digits_vit_teacher

The ViT teacher for the ViT-to-ViT methods (TinyMIM relations, ViTKD features):
width 96, 4 blocks, 3 heads, MLP 384, 4x4 patches at 16px (16 patches + CLS).
Arguments: steps, batch_size, res (a multiple of 4).
"""
from funmatch import config_util as common


def get_config(arg=None):
  args = common.parse_arg(arg, steps=1000, batch_size=128, res=16)
  c = common.base_config()
  c.objective = "supervised"
  c.teachers = ()
  c.input = common.data_config("digits", split="train", image_size=args.res,
                               batch_size=args.batch_size, crop="inception",
                               crop_area_min=0.5, flip=False)
  c.evals.test = common.eval_config("digits", "test", 256, image_size=args.res,
                                    eval_crop="resize")
  c.student = common.model_config("vit", res=args.res, variant="Ti", width=96,
                                  depth=4, num_heads=3, mlp_dim=384, patch_size=4)
  c.mixup.p = 0.0
  c.total_steps = args.steps
  c.lr = 1e-3
  c.wd = 1e-4
  c.label_smoothing = 0.0
  c.schedule.warmup_steps = 100
  c.log_every_steps = 100
  c.eval_every_steps = 250
  c.checkpoint_every_steps = 500
  return c
