"""A small ConvNeXt or Swin teacher trained on labels on scikit-learn's digits (CPU minutes).

  funmatch-train --config configs/digits_family_teacher.py:model=convnext --workdir /tmp/cnx
  funmatch-train --config configs/digits_family_teacher.py:model=swin --workdir /tmp/swin

The teachers of the cross-family digits recipes (digits_family.py), at 32px:
  convnext  ConvNeXt V2 (GRN), depths [1, 1, 1, 1], dims [16, 32, 64, 128] (maps 8 .. 1)
  swin      Swin, embed_dim 16, depths [2, 2, 2, 2], heads [1, 2, 2, 4], 2x2 patches,
            2x2 windows (maps 16 .. 2: shifted windows in the first three stages)
Arguments: model, steps, batch_size, res (ConvNeXt: a multiple of 32; Swin: of 32).
"""
from funmatch import config_util as common
from funmatch.errors import UserError

digits_teacher = common.load_recipe(__file__, "digits_teacher")

MODELS = ("convnext", "swin")


def model(name: str, res: int, init: str = ""):
  """The digits-sized ConvNeXt / Swin sub-config (also the students of digits_family)."""
  if name == "convnext":
    return common.model_config("convnext", res=res, init=init, variant="atto", version=2,
                               depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))
  if name == "swin":
    return common.model_config("swin", res=res, init=init, variant="tiny", embed_dim=16,
                               depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                               patch_size=2, window_size=2, img_size=res)
  raise UserError(f"model={name!r}: use one of {', '.join(MODELS)}")


def get_config(arg=None):
  args = common.parse_arg(arg, model="convnext", steps=1000, batch_size=128, res=32)
  # The BiT teacher's data, crops, optimizer and eval, with this model in its place.
  c = digits_teacher.get_config(f"steps={args.steps},batch_size={args.batch_size},"
                                f"res={args.res}")
  c.student = model(args.model, args.res)
  c.lr = 2e-3
  c.schedule.warmup_steps = 100
  c.log_every_steps = 100
  c.eval_every_steps = 250
  c.checkpoint_every_steps = 500
  return c
