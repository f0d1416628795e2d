"""The paper's best ImageNet student: R50x1 from a 224px + 384px R152x2 ensemble.

Both teachers see resizes of the same crop as the student (224px student); the
distillation target is the average of their logits; 9600 epochs (82.8% top-1 in
the paper). Evaluation reports each teacher, the ensemble and the agreement.

  funmatch-fetch FunMatch-teacher-224px-i1k FunMatch-teacher-384px-i1k
  funmatch-distill --config configs/bit_i1k_ensemble.py \
      --workdir gs://bucket/fm_i1k_ens --config.input.data_dir=/data/tfds
The teachers default to the paper's, by name (`teacher=`, `teacher384=` take other
names, files or workdirs); their stem padding follows their weights (-inf for these).
`ensemble=sum_kl` sums the per-teacher KLs instead of averaging logits.
Data: imagenet2012 in ArrayRecord files, prepared as configs/bit_i1k.py says.
"""
from funmatch import config_util as cu

bit_i1k = cu.load_recipe(__file__, "bit_i1k")


def get_config(arg=None):
  args = cu.parse_arg(arg, teacher=bit_i1k.TEACHER, teacher384="FunMatch-teacher-384px-i1k",
                      epochs=9600.0, batch_size=4096,
                      res=224, data_dir="", optimizer="adam", ensemble="mean_logits")
  c = bit_i1k.get_config(f"teacher={args.teacher},epochs={args.epochs},"
                         f"batch_size={args.batch_size},res={args.res},teacher_res=224,"
                         f"data_dir={args.data_dir},optimizer={args.optimizer}")
  c.teachers = ("teacher", "teacher384")
  c.teacher384 = cu.model_config("bit", res=384, init=args.teacher384, depth=152, width=2.0,
                                 stem_pool_padding="auto")
  c.objective_args.ensemble = args.ensemble
  return c
