"""OFA-KD at the paper's scale: ImageNet, a ViT-B/16 teacher into BiT-R50x1 (heterogeneous).

OFA-KD's ImageNet setting (Hao et al. 2023): gamma = 1.5, T = 1, CE + L_OFA on the
final logits + L_OFA on branch heads after the student's stages 1-3; CNN students
train 100 epochs with SGD (momentum 0.9, lr 0.1 per 256 images, cosine, weight decay
1e-4 as in the torchvision ResNet recipe). `teacher` must be a ViT-B/16 with an
ImageNet-1k head (an official-name .npz export or a funmatch-train workdir).

  funmatch-distill --config configs/ofakd_i1k.py:teacher=/models/vit_b16_i1k.npz \
      --workdir gs://bucket/ofa_vitb_r50 --config.input.data_dir=/data/tfds
`baseline=True`: the same student and recipe on labels alone (funmatch-train).
"""
from funmatch import config_util as cu


def get_config(arg=None):
  args = cu.parse_arg(arg, teacher="", epochs=100.0, batch_size=1024, res=224,
                      teacher_res=224, data_dir="", gamma=1.5, baseline=False)
  c = cu.base_config()
  c.teaching = "consistent"
  c.mixup.p = 0.0
  cu.set_imagenet_data(c, args.batch_size, args.data_dir, crop_area_min=0.08)
  c.teacher = cu.model_config("vit", res=args.teacher_res, init=args.teacher,
                              variant="B", patch_size=16)
  c.student = cu.model_config("bit", res=args.res, depth=50, width=1.0)
  c.total_epochs = args.epochs
  cu.set_optimizer(c, "sgd")
  c.lr = 0.1 * args.batch_size / 256
  # PyTorch's SGD(momentum=0.9, weight_decay=1e-4): the decay joins the gradient before
  # the momentum (funmatch's decoupled decay would be 10x weaker at momentum 0.9).
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
  cu.set_objective(c, "ofakd", gamma=args.gamma, temperature=1.0,
                   stages=("stage1", "stage2", "stage3"))
  return c
