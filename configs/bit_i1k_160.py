"""configs/bit_i1k.py with the student at 160px (the teacher stays at 224px).

Both views are resizes of the same crop; evaluation feeds each model its own
resolution. The paper's 160px R50 student reaches 80.49% top-1 at about half
the student cost of 224px.

  funmatch-distill --config configs/bit_i1k_160.py \
      --workdir gs://bucket/fm_i1k_160 --config.input.data_dir=/data/tfds
Takes configs/bit_i1k.py's arguments (res defaults to 160 here; the teacher defaults to
FunMatch-teacher-224px-i1k; stem padding as in bit_i1k.py).
Data: imagenet2012 in ArrayRecord files, prepared as configs/bit_i1k.py says.
"""
from funmatch import config_util

bit_i1k = config_util.load_recipe(__file__, "bit_i1k")


def get_config(arg=None):
  return bit_i1k.get_config(",".join(a for a in ("res=160", arg) if a))
