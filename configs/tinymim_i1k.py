"""TinyMIM on ImageNet-1k: relation-distillation pre-training of a ViT, then fine-tuning.

The published recipe (TinyMIM's code, built on MAE's pre-training): 300 epochs, batch
2048, AdamW lr 1.5e-4 x batch / 256 (1.2e-3), betas (0.9, 0.95), weight decay 0.05, 15
warmup epochs then cosine, no gradient clipping; one random-resized crop (area 0.2-1) +
flip seen by both models, no masking, no mixup; student drop-path 0.1, teacher none.
The Q-K and V-V relations of the student's last block (split into the teacher's heads:
16 for a ViT-L teacher, 12 for ViT-B) match those of teacher block 18 of 24 (ViT-L) or
of the last block (ViT-B/S). No label loss: the pre-trained student is then fine-tuned.

  funmatch-distill --config configs/tinymim_i1k.py:student=B,teacher=L,teacher_init=/m/vit_l.npz \
      --workdir gs://bucket/tinymim_b --config.input.data_dir=/data/tfds
  funmatch-train --config configs/tinymim_i1k.py:student=B,finetune=gs://bucket/tinymim_b \
      --workdir gs://bucket/tinymim_b_ft --config.input.data_dir=/data/tfds
Sequential distillation (the paper's best, B -> S -> T): the finished student teaches
the next one, e.g. `student=S,teacher=B,teacher_init=gs://bucket/tinymim_b_ft` (a
workdir or a funmatch-export .npz; the teacher needs a 1000-class head, so use the
fine-tuned one). `finetune=WORKDIR` is MAE's fine-tuning: 100 epochs, batch 1024, lr
5e-4 x 1024 / 256, weight decay 0.05, drop-path 0.1, mixup 0.8 (the layer-wise lr decay
0.6, cutmix, RandAugment and random erasing are not part of funmatch's pipeline).
Published fine-tuned top-1: ViT-T 75.8, ViT-S 83.0, ViT-B 85.0.
"""
from funmatch import config_util as cu
from funmatch.models import vit

IMAGENET_TRAIN_EXAMPLES = 1_281_167


def adamw(c, lr: float, weight_decay: float, b2: float = 0.999) -> None:
  """AdamW(lr, weight_decay): funmatch's decoupled decay is not scaled by lr, so wd = lr x wd."""
  cu.set_optimizer(c, "adam")
  c.optax.b2 = b2
  c.lr = lr
  c.wd = lr * weight_decay
  c.grad_clip_norm = 0.0


def warmup_steps(epochs: float, batch_size: int) -> int:
  return int(round(epochs * IMAGENET_TRAIN_EXAMPLES / batch_size))


def get_config(arg=None):
  args = cu.parse_arg(arg, student="B", teacher="L", teacher_init="", finetune="",
                      epochs=300.0, batch_size=2048, res=224, data_dir="")
  c = cu.base_config()
  cu.set_imagenet_data(c, args.batch_size, args.data_dir, crop_area_min=0.2)
  teacher_heads = vit.VARIANTS[args.teacher].num_heads if args.teacher in vit.VARIANTS else 0
  c.student = cu.model_config("vit", res=args.res, variant=args.student, patch_size=16,
                              drop_path=0.1, relation_heads=teacher_heads)
  c.log_every_steps = 100
  c.eval_every_steps = 10_000
  c.checkpoint_every_steps = 2000
  c.keep_every_steps = 50_000
  if args.finetune:
    c.student.init = args.finetune
    c.input.batch_size = 1024
    c.input.crop_area_min = 0.08
    c.total_epochs = 100.0
    adamw(c, 5e-4 * 1024 / 256, 0.05)
    c.schedule.warmup_steps = warmup_steps(5, 1024)
    c.mixup.p = 0.8
    cu.set_objective(c, "supervised")
    c.teachers = ()
    return c
  # ViT-L teachers give block 18 of 24 (index 17); smaller ones their last block.
  c.teacher = cu.model_config("vit", res=args.res, init=args.teacher_init,
                              variant=args.teacher, patch_size=16,
                              qkv_block=17 if args.teacher == "L" else -1)
  c.teaching = "consistent"
  c.mixup.p = 0.0
  c.total_epochs = args.epochs
  adamw(c, 1.5e-4 * args.batch_size / 256, 0.05, b2=0.95)
  c.schedule.warmup_steps = warmup_steps(15, args.batch_size)
  c.schedule.decay_type = "cosine"
  cu.set_objective(c, "tinymim")
  return c
