"""The paper's ImageNet recipe: BiT-M-R152x2 (224px) -> BiT-R50x1 by function matching.

Batch 4096, Adam lr 0.03 (decoupled wd 3e-4), warmup 5000 steps then cosine, global-norm
clipping at 1.0, temperature 1, 1200 epochs (82.31% top-1 at the paper's longest Adam run;
use :epochs=9600 for the longest schedule; :optimizer=shampoo,epochs=1200 for the
paper's Shampoo run, which matched Adam's 4800-epoch student).

  funmatch-fetch FunMatch-teacher-224px-i1k     # once, on a machine with network
  funmatch-distill --config configs/bit_i1k.py \
      --workdir gs://bucket/fm_i1k --config.input.data_dir=/data/tfds
`teacher` (default: the paper's teacher, by name, see docs/weights.md) must be an
ImageNet-1k fine-tuned R152x2: a published name, an .npz with a 1000-class head, or a
funmatch-train workdir.

Stem max-pool padding: the student pads with -inf, as big_vision's bit_paper that
trained the paper's students; the teacher's follows its weights ('auto'): -inf for the
published FunMatch teachers, zeros for official BiT and timm files.

Data: TFDS imagenet2012 in ArrayRecord files, read by index, so the run resumes exactly
after every preemption. Download the ImageNet tars by hand, then once:
  tfds build imagenet2012 --file_format=array_record --manual_dir /data/imagenet_tars \
      --data_dir /data/tfds
or, beside an existing TFRecord copy (same examples, same order):
  tfds convert_format --dataset_version_dir /data/tfds/imagenet2012/5.1.0 \
      --out_file_format array_record
(TFRecords alone also work; they stream, and resume with a fresh data order.)
"""
from funmatch import config_util as cu

TEACHER = "FunMatch-teacher-224px-i1k"  # BiT-M R152x2 fine-tuned on ImageNet-1k, 224px


def get_config(arg=None):
  args = cu.parse_arg(arg, teacher=TEACHER, epochs=1200.0, batch_size=4096, res=224,
                      teacher_res=224, data_dir="", optimizer="adam")
  c = cu.base_config()
  cu.set_imagenet_data(c, args.batch_size, args.data_dir, crop_area_min=0.05)
  c.teacher = cu.model_config("bit", res=args.teacher_res, init=args.teacher,
                              depth=152, width=2.0, stem_pool_padding="auto")
  c.student = cu.model_config("bit", res=args.res, depth=50, width=1.0,
                              stem_pool_padding="neg_inf")
  c.total_epochs = args.epochs
  cu.set_optimizer(c, args.optimizer)
  c.lr = 0.03
  c.wd = 3e-4
  c.grad_clip_norm = 1.0
  c.schedule.warmup_steps = 5000
  c.schedule.decay_type = "cosine"
  c.objective_args.temperature = 1.0
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 1000
  c.keep_every_steps = 50_000
  return c
