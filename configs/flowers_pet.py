"""The paper's Flowers102 and Pets recipes (128px, batch 512, warmup 1500 steps).

  funmatch-distill --config configs/flowers_pet.py:data=flowers,variant=fast \
      --workdir /tmp/fm_flowers --config.input.data_dir=/data/tfds

variant   Flowers102 epochs / T / lr / wd       Pets epochs / T / lr / wd
fast      10k  / 10 / 3e-3 / 3e-4                1k  / 5  / 1e-2 / 1e-3
medium    100k / 1  / 1e-3 / 1e-4                3k  / 10 / 3e-3 / 3e-4
long      1M   / 1  / 3e-4 / 1e-5                30k / 2  / 3e-3 / 1e-5
`teacher` is a BiT-M-R152x2 fine-tuned on the dataset: by default the paper's, by name
(FunMatch-teacher-128px-flowers / -pet, docs/weights.md), or an .npz or funmatch-train
workdir; the student is a BiT-R50x1. Stem padding: the student pads with -inf (big_vision's
bit_paper, as the paper); the teacher's follows its weights.

As the paper's code (big_vision's bigsweep_flowers_pet.py): Pets trains on train[:90%]
and keeps train[90%:] as `minival` (Flowers: its `validation` split); every eval resizes
the shorter side to 160 and takes the central 128 (resize_small(160)|central_crop(128),
ratio 1.25); Adam keeps its first moment in bfloat16.

Data, once: `tfds build oxford_flowers102 --file_format=array_record --data_dir /data/tfds`
(Pets: oxford_iiit_pet). The splits are held in memory (cache_raw=True), which resumes
exactly from ArrayRecord or TFRecord files; --config.input.cache_raw=False reads the
ArrayRecord files by index instead (less host memory, still exact).
"""
from funmatch import config_util as cu
from funmatch.errors import UserError

# data -> (TFDS name, train split, minival split, test split,
#          {variant: (epochs, T, lr, wd)})
RECIPES = {
    "flowers": ("oxford_flowers102", "train", "validation", "test", {
        "fast": (10_000, 10.0, 3e-3, 3e-4),
        "medium": (100_000, 1.0, 1e-3, 1e-4),
        "long": (1_000_000, 1.0, 3e-4, 1e-5)}),
    "pet": ("oxford_iiit_pet", "train[:90%]", "train[90%:]", "test", {
        "fast": (1_000, 5.0, 1e-2, 1e-3),
        "medium": (3_000, 10.0, 3e-3, 3e-4),
        "long": (30_000, 2.0, 3e-3, 1e-5)}),
}


def get_config(arg=None):
  args = cu.parse_arg(arg, data="flowers", variant="fast", teacher="", res=128,
                      data_dir="")
  if args.data not in RECIPES:
    raise UserError(f"flowers_pet.py: data='{args.data}' must be one of {sorted(RECIPES)}")
  name, train_split, minival_split, test_split, variants = RECIPES[args.data]
  if args.variant not in variants:
    raise UserError(f"flowers_pet.py: variant='{args.variant}' must be one of "
                    f"{sorted(variants)}")
  epochs, temperature, lr, wd = variants[args.variant]
  c = cu.base_config()
  c.input = cu.data_config("tfds", name=name, split=train_split, data_dir=args.data_dir,
                           batch_size=512, cache_raw=True, crop="inception",
                           crop_area_min=0.05, flip=True)
  for eval_name, split in (("minival", minival_split), ("test", test_split)):
    c.evals[eval_name] = cu.eval_config("tfds", split, 512, name=name,
                                        data_dir=args.data_dir, cache_raw=True,
                                        eval_resize_ratio=160 / 128)
  teacher = args.teacher or f"FunMatch-teacher-128px-{args.data}"
  c.teacher = cu.model_config("bit", res=args.res, init=teacher, depth=152, width=2.0,
                              stem_pool_padding="auto")
  c.student = cu.model_config("bit", res=args.res, depth=50, width=1.0,
                              stem_pool_padding="neg_inf")
  cu.set_optimizer(c, "adam")
  c.optax.mu_dtype = "bfloat16"
  c.total_epochs = float(epochs)
  c.objective_args.temperature = temperature
  c.lr = lr
  c.wd = wd
  c.grad_clip_norm = 1.0
  c.schedule.warmup_steps = 1500
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2000
  return c
