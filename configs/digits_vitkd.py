"""ViTKD (+ NKD) on digits: the digits ViT teacher into a half-width ViT student.

  funmatch-train --config configs/digits_vit_teacher.py --workdir /tmp/vit_teacher
  funmatch-distill --config configs/digits_vitkd.py:teacher=/tmp/vit_teacher --workdir /tmp/vitkd
  funmatch-train --config configs/digits_vitkd.py:baseline=True --workdir /tmp/vitkd_labels
`teacher` is a workdir (or export) of configs/digits_vit_teacher.py: width 96, 4 blocks,
3 heads, 4x4 patches at 16px. The student is the same ViT at `width` 48 (`depth`,
`heads`, `drop_path` configurable). Loss: CE on the labels + mimicking of blocks 0, 1 +
generation of the final tokens (alpha 3e-5, beta 3e-6, lambda 0.5, as published) +
`nkd_weight` * NKD (1.0, the paper's best; 0 for ViTKD alone). Teacher and student see
the same crop; `mixup=P` (> 0) mixes the images. `baseline=True` trains the same
student, data, optimizer and steps on labels alone (funmatch-train). The adapters, mask
token and generator are never exported (funmatch-export writes the student only).
"""
import ml_collections

from funmatch import config_util as common

vit_teacher = common.load_recipe(__file__, "digits_vit_teacher")


def vit(res: int, width: int, depth: int, heads: int, **kwargs) -> ml_collections.ConfigDict:
  """A digits ViT: 4x4 patches, MLP 4x the width."""
  return common.model_config("vit", res=res, variant="Ti", width=width, depth=depth,
                             num_heads=heads, mlp_dim=4 * width, patch_size=4, **kwargs)


def get_config(arg=None):
  args = common.parse_arg(arg, teacher="", steps=1000, batch_size=128, res=16, width=48,
                          depth=4, heads=3, drop_path=0.0, nkd_weight=1.0, mixup=0.0,
                          baseline=False)
  c = vit_teacher.get_config(f"steps={args.steps},batch_size={args.batch_size},res={args.res}")
  c.student = vit(args.res, args.width, args.depth, args.heads, drop_path=args.drop_path)
  c.mixup.p = args.mixup
  c.log_every_steps = 50
  c.eval_every_steps = 500
  if args.baseline:
    common.set_objective(c, "supervised")
    return c
  teacher = vit_teacher.get_config(f"res={args.res}").student  # its architecture
  teacher.init = args.teacher
  c.teacher = teacher
  c.teachers = ("teacher",)
  c.teaching = "function_matching" if args.mixup > 0 else "consistent"
  common.set_objective(c, "vitkd", nkd_weight=args.nkd_weight)
  return c
