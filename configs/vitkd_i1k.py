"""ViTKD + NKD on ImageNet-1k: a DeiT student learns from the next larger ViT.

The published setting (yzd-v/cls_KD): DeiT-Ti <- ViT-S, DeiT-S <- ViT-B, DeiT-B <- ViT-L
teachers (DeiT III weights there); DeiT's recipe for the student: 300 epochs, batch
1024, AdamW lr 5e-4 x batch / 512, weight decay 0.05, 5 warmup epochs then cosine,
drop-path 0.1, mixup 0.8, no gradient clipping; loss CE + ViTKD (alpha 3e-5, beta 3e-6,
lambda 0.5, blocks 0 and 1 mimicked, final tokens generated) + NKD (T = 1, gamma = 1).
Published top-1: DeiT-T 74.42 -> 76.06 (ViTKD) -> 77.78 (+NKD); DeiT-S 80.55 -> 81.95 -> 83.59.

  funmatch-distill --config configs/vitkd_i1k.py:student=Ti,teacher_init=/models/vit_s.npz \
      --workdir gs://bucket/vitkd_ti --config.input.data_dir=/data/tfds
`student` is Ti, S or B; `teacher` (default: the next size up) its ViT variant and
`teacher_init` its weights (a funmatch export / official-name ViT .npz with a 1000-class
head, or a funmatch-train workdir); `nkd=False` is ViTKD alone. Not reproduced here: DeiT's
cutmix, RandAugment, random erasing, repeated augmentation and label smoothing, and the
DeiT III teachers' LayerScale (funmatch's ViT is the plain one).
"""
from funmatch import config_util as cu

tinymim_i1k = cu.load_recipe(__file__, "tinymim_i1k")

NEXT_SIZE = {"Ti": "S", "S": "B", "B": "L"}


def get_config(arg=None):
  args = cu.parse_arg(arg, student="Ti", teacher="", teacher_init="", nkd=True,
                      epochs=300.0, batch_size=1024, res=224, data_dir="")
  c = cu.base_config()
  cu.set_imagenet_data(c, args.batch_size, args.data_dir, crop_area_min=0.08)
  teacher = args.teacher or NEXT_SIZE.get(args.student, "L")
  c.student = cu.model_config("vit", res=args.res, variant=args.student, patch_size=16,
                              drop_path=0.1)
  c.teacher = cu.model_config("vit", res=args.res, init=args.teacher_init, variant=teacher,
                              patch_size=16)
  c.teaching = "function_matching"  # same crop for both, mixed as DeiT's mixup
  c.mixup.p = 0.8
  c.total_epochs = args.epochs
  tinymim_i1k.adamw(c, 5e-4 * args.batch_size / 512, 0.05)
  c.schedule.warmup_steps = tinymim_i1k.warmup_steps(5, args.batch_size)
  c.schedule.decay_type = "cosine"
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2000
  c.keep_every_steps = 50_000
  cu.set_objective(c, "vitkd", nkd_weight=1.0 if args.nkd else 0.0)
  return c
