"""SEED at the paper's scale: ImageNet, a BiT-R152x2 teacher into MobileNetV3-Large.

SEED's recipe (Fang et al. 2021, after MoCo-v2): no labels, batch 256, SGD momentum 0.9,
lr 0.03, weight decay 1e-4, 200 epochs with cosine decay, embedding dim 128, queue
K = 65536, tau_S = 0.2, tau_T = 1e-4, student head Linear(d,d)-ReLU-Linear(d,128).
Published (ImageNet linear probe): MobileNetV3-L 36.3 (self-supervised alone) -> 68.2,
EfficientNet-B0 42.2 -> 67.6. The final eval reports val/linear_probe_top1; it holds
the whole train split's features in host memory (1.28M x 1280 floats, 6.5 GB).

  funmatch-distill --config configs/seed_i1k.py \
      --workdir gs://bucket/seed_mnv3 --config.input.data_dir=/data/tfds
The teacher defaults to FunMatch-teacher-224px-i1k (by name, docs/weights.md; its stem
padding follows its weights). `student=bit` distils into BiT-R50x1 instead; `queue_size` must be a multiple of
`batch_size`.
"""
from funmatch import config_util as cu


def get_config(arg=None):
  args = cu.parse_arg(arg, teacher="FunMatch-teacher-224px-i1k", epochs=200.0, batch_size=256, res=224,
                      teacher_res=224, data_dir="", student="mobilenet_v3",
                      queue_size=65536, dim=128)
  c = cu.base_config()
  c.teaching = "consistent"  # the same crop for both models; SEED uses no mixup
  c.mixup.p = 0.0
  cu.set_imagenet_data(c, args.batch_size, args.data_dir, crop_area_min=0.2)
  c.teacher = cu.model_config("bit", res=args.teacher_res, init=args.teacher,
                              depth=152, width=2.0)
  if args.student == "bit":
    c.student = cu.model_config("bit", res=args.res, depth=50, width=1.0)
  else:
    c.student = cu.model_config(args.student, res=args.res)
  cu.set_objective(c, "seed", queue_size=args.queue_size, dim=args.dim,
                   student_temperature=0.2, teacher_temperature=1e-4)
  c.total_epochs = args.epochs
  cu.set_optimizer(c, "sgd")
  c.lr = 0.03 * args.batch_size / 256
  # PyTorch's SGD(momentum=0.9, weight_decay=1e-4): the decay joins the gradient before
  # the momentum (funmatch's decoupled decay would be 10x weaker at momentum 0.9).
  c.wd = 1e-4
  c.wd_mode = "coupled"
  c.grad_clip_norm = 0.0
  c.schedule.warmup_steps = 0
  c.schedule.decay_type = "cosine"
  c.log_every_steps = 100
  c.eval_every_steps = 0      # the linear probe runs once, at the end
  c.checkpoint_every_steps = 1000
  c.keep_every_steps = 50_000
  return c
