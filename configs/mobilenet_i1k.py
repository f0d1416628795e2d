"""Cross-family student: MobileNetV3-Large with GroupNorm (8 groups) from the R152x2.

The paper's MobileNetV3 student reaches 74.60% at 300 epochs and 76.31% at 1200;
otherwise the recipe of configs/bit_i1k.py (teacher FunMatch-teacher-224px-i1k by name,
its stem padding following its weights).

  funmatch-distill --config configs/mobilenet_i1k.py:epochs=300 \
      --workdir gs://bucket/fm_mnv3 --config.input.data_dir=/data/tfds
Data: imagenet2012 in ArrayRecord files, prepared as configs/bit_i1k.py says.
"""
from funmatch import config_util as cu

bit_i1k = cu.load_recipe(__file__, "bit_i1k")


def get_config(arg=None):
  args = cu.parse_arg(arg, teacher=bit_i1k.TEACHER, epochs=1200.0, batch_size=4096, res=224,
                      teacher_res=224, data_dir="", optimizer="adam")
  c = bit_i1k.get_config(f"teacher={args.teacher},epochs={args.epochs},"
                         f"batch_size={args.batch_size},res={args.res},"
                         f"teacher_res={args.teacher_res},data_dir={args.data_dir},"
                         f"optimizer={args.optimizer}")
  c.student = cu.model_config("mobilenet_v3", res=args.res)
  return c
