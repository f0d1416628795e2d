"""Function matching on ImageNet from a timm teacher: ConvNeXt or Swin -> BiT-R50x1.

bit_i1k.py's recipe (batch 4096, Adam lr 0.03, wd 3e-4, warmup 5000 steps then cosine,
clipping at 1.0, T = 1, 1200 epochs) with the teacher swapped for a timm checkpoint,
each model at its own resolution (the teacher at teacher_res, the student at res):
  family=convnext  ConvNeXt-`variant` (default tiny: convnext_tiny.fb_in22k_ft_in1k,
                   82.9% top-1 in timm)
  family=swin      Swin-`variant` (default tiny: swin_tiny_patch4_window7_224.ms_in1k,
                   81.4%); Swin runs at 224px (window 7), so teacher_res stays 224.
The teacher defaults to that hub name (`funmatch-fetch --source hub NAME` once, then
it is read from the cache); `teacher=` takes a timm .safetensors / .pth file, a
funmatch export or a workdir instead.

  funmatch-fetch --source hub convnext_tiny.fb_in22k_ft_in1k
  funmatch-distill --config configs/timm_teacher_i1k.py:family=convnext \
      --workdir gs://bucket/fm_cnxt_r50 --config.input.data_dir=/data/tfds
Arguments: family, variant, teacher, and bit_i1k.py's (epochs, batch_size, res,
teacher_res, data_dir, optimizer).
"""
from funmatch import config_util as cu
from funmatch.errors import UserError

bit_i1k = cu.load_recipe(__file__, "bit_i1k")

HUB_TAGS = {"convnext": ("convnext_{variant}", "fb_in22k_ft_in1k"),
            "swin": ("swin_{variant}_patch4_window7_224", "ms_in1k")}


def get_config(arg=None):
  args = cu.parse_arg(arg, family="convnext", variant="tiny", teacher="", epochs=1200.0,
                      batch_size=4096, res=224, teacher_res=224, data_dir="",
                      optimizer="adam")
  if args.family not in HUB_TAGS:
    raise UserError(f"timm_teacher_i1k family={args.family!r} is unknown; use one of "
                    f"{', '.join(HUB_TAGS)}")
  name, tag = HUB_TAGS[args.family]
  teacher = args.teacher or f"{name.format(variant=args.variant)}.{tag}"
  c = bit_i1k.get_config(f"teacher={teacher},epochs={args.epochs},"
                         f"batch_size={args.batch_size},res={args.res},"
                         f"teacher_res={args.teacher_res},data_dir={args.data_dir},"
                         f"optimizer={args.optimizer}")
  options = {"variant": args.variant}
  if args.family == "swin":
    options["img_size"] = args.teacher_res
  c.teacher = cu.model_config(args.family, res=args.teacher_res, init=teacher, **options)
  return c
