"""OFA-KD at the paper's scale: ImageNet, heterogeneous teacher -> student pairs.

OFA-KD's ImageNet setting (Hao et al. 2023): gamma = 1.5, T = 1, CE + L_OFA on the
final logits + L_OFA on branch heads after the student's stages 1-3; CNN students
train 100 epochs with SGD (momentum 0.9, lr 0.1 per 256 images, cosine, weight decay
1e-4 as in the torchvision ResNet recipe). `pair` picks the paper's cross-family pair:
  vit_r50        ViT-B/16 -> BiT-R50x1 (default; `teacher` must be a ViT-B/16 with an
                 ImageNet-1k head: an official-name .npz export or a workdir)
  swin_r50       Swin-T (swin_tiny_patch4_window7_224.ms_in1k) -> BiT-R50x1
  convnext_deit  ConvNeXt-T (convnext_tiny.fb_in22k_ft_in1k) -> DeiT-T (ViT-Ti/16);
                 a ViT student trains with AdamW (lr 5e-4 per 512, wd 0.05, 300
                 epochs), as DeiT / OFA's transformer students
  convnext_vit   ConvNeXt-T -> ViT-S/16, the same AdamW recipe
The Swin and ConvNeXt teachers default to their timm hub names (funmatch-fetch
--source hub NAME once); `teacher=` overrides.

  funmatch-distill --config configs/ofakd_i1k.py:teacher=/models/vit_b16_i1k.npz \
      --workdir gs://bucket/ofa_vitb_r50 --config.input.data_dir=/data/tfds
`baseline=True`: the same student and recipe on labels alone (funmatch-train).
"""
from funmatch import config_util as cu
from funmatch.errors import UserError


PAIRS = {
    # pair: (teacher model, its options, default init, student model, its options)
    "vit_r50": ("vit", dict(variant="B", patch_size=16), "",
                "bit", dict(depth=50, width=1.0)),
    "swin_r50": ("swin", dict(variant="tiny"), "swin_tiny_patch4_window7_224.ms_in1k",
                 "bit", dict(depth=50, width=1.0)),
    "convnext_deit": ("convnext", dict(variant="tiny"), "convnext_tiny.fb_in22k_ft_in1k",
                      "vit", dict(variant="Ti", patch_size=16, drop_path=0.1)),
    "convnext_vit": ("convnext", dict(variant="tiny"), "convnext_tiny.fb_in22k_ft_in1k",
                     "vit", dict(variant="S", patch_size=16, drop_path=0.1)),
}


def get_config(arg=None):
  args = cu.parse_arg(arg, teacher="", pair="vit_r50", epochs=0.0, batch_size=1024,
                      res=224, teacher_res=224, data_dir="", gamma=1.5, baseline=False)
  if args.pair not in PAIRS:
    raise UserError(f"ofakd_i1k pair={args.pair!r} is unknown; use one of "
                    f"{', '.join(PAIRS)}")
  teacher, teacher_options, teacher_init, student, student_options = PAIRS[args.pair]
  c = cu.base_config()
  c.teaching = "consistent"
  c.mixup.p = 0.0
  cu.set_imagenet_data(c, args.batch_size, args.data_dir, crop_area_min=0.08)
  c.teacher = cu.model_config(teacher, res=args.teacher_res,
                              init=args.teacher or teacher_init, **teacher_options)
  c.student = cu.model_config(student, res=args.res, **student_options)
  if student == "vit":
    # DeiT's recipe for transformer students (as OFA-KD's): AdamW, 300 epochs.
    c.total_epochs = args.epochs or 300.0
    cu.set_optimizer(c, "adam")
    c.lr = 5e-4 * args.batch_size / 512
    c.wd = 0.05
    c.grad_clip_norm = 0.0
  else:
    c.total_epochs = args.epochs or 100.0
    cu.set_optimizer(c, "sgd")
    c.lr = 0.1 * args.batch_size / 256
    # PyTorch's SGD(momentum=0.9, weight_decay=1e-4): the decay joins the gradient
    # before the momentum (funmatch's decoupled decay would be 10x weaker at momentum
    # 0.9).
    c.wd = 1e-4
    c.wd_mode = "coupled"
    c.grad_clip_norm = 0.0
  c.schedule.warmup_steps = 5 * 1281167 // args.batch_size  # 5 epochs
  c.schedule.decay_type = "cosine"
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 1000
  c.keep_every_steps = 50_000
  if args.baseline:
    cu.set_objective(c, "supervised")
    c.teachers = ()
    return c
  stages = ("block2", "block5", "block8") if student == "vit" else (
      "stage1", "stage2", "stage3")
  cu.set_objective(c, "ofakd", gamma=args.gamma, temperature=1.0, stages=stages)
  return c
