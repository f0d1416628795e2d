"""Out-of-domain distillation: a Pets or Flowers teacher distilled on Food101 or SUN397.

The distillation images come from `source` (their labels are unused); the student
is evaluated on the target dataset's test split. The schedule is the target's
recipe from configs/flowers_pet.py, counted in steps over the target's train set
size, so in-domain and out-of-domain runs take the same number of steps.

  funmatch-distill --config configs/food_sun.py:target=pet,source=food \
      --workdir /tmp/fm_pet_food --config.input.data_dir=/data/tfds
The teacher defaults to the target's published one (FunMatch-teacher-128px-pet /
-flowers, docs/weights.md); `teacher=` takes another name, file or workdir.

Data, once: the target's dataset (configs/flowers_pet.py) and the source's,
  tfds build food101 --file_format=array_record --data_dir /data/tfds   # or sun397
Food101 and SUN397 are too big for memory: their ArrayRecord files are read by index,
so the run resumes exactly (TFRecords alone stream, with a fresh order on resume).
"""
import math

from funmatch import config_util as cu
from funmatch.errors import UserError

flowers_pet = cu.load_recipe(__file__, "flowers_pet")

SOURCES = {"food": ("food101", "train"), "sun": ("sun397", "train")}
# The target recipes' training splits: Flowers' train, Pets' train[:90%] (3680 * 0.9).
TARGET_TRAIN_EXAMPLES = {"flowers": 1020, "pet": 3312}
TARGET_CLASSES = {"flowers": 102, "pet": 37}


def get_config(arg=None):
  args = cu.parse_arg(arg, target="pet", source="food", variant="fast", teacher="",
                      res=128, data_dir="")
  if args.source not in SOURCES:
    raise UserError(f"food_sun.py: source='{args.source}' must be one of {sorted(SOURCES)}")
  c = flowers_pet.get_config(f"data={args.target},variant={args.variant},"
                             f"teacher={args.teacher},res={args.res},data_dir={args.data_dir}")
  name, split = SOURCES[args.source]
  c.input.name = name
  c.input.split = split
  c.input.cache_raw = False  # Food101 / SUN397 are too big to hold encoded in memory
  c.num_classes = TARGET_CLASSES[args.target]
  c.total_steps = math.ceil(c.total_epochs * TARGET_TRAIN_EXAMPLES[args.target]
                            / c.input.batch_size)
  return c
