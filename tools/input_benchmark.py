"""Images/s of one host's input pipeline: ArrayRecord by index vs TFRecord streaming.

Builds once, offline, a local TFDS dataset of --images JPEGs (160-256 px, smooth
pictures with grain, ~18 KB each) prepared in BOTH formats from the same
pictures (DIR/tfrecord, DIR/array_record, --shards files each), then feeds
funmatch's own `pipeline.train_dataset` with the views and crops of two recipes
(128px: configs/flowers_pet.py, 224px: configs/bit_i1k.py) and measures host 0's
images/s (local batch = --batch_size / --process_count) in three modes:

  streaming     TFRecord files, shuffled stream: what ImageNet runs used (no exact resume)
  array_record  ArrayRecord files read by index: exact resume
  memory        the encoded split held in memory (cache_raw): decode + crop + resize
                and nothing else, the single-host ceiling for those views

Each round runs every mode once, in turn, and the median over --rounds is
reported, so a change of load on a shared machine hits all modes alike. Also
reported: CPU milliseconds per image (process CPU time / images), which load
disturbs less than wall-clock rates, the images/s the host's cores could feed
at that cost (cores / CPU ms), and the load average before and after.
Target: array_record >= 0.90 x streaming. The dataset sits in the page cache,
so this measures the pipeline, not the disk.

  python tools/input_benchmark.py --output /tmp/input_bench.json
  python tools/input_benchmark.py --images 20000 --rounds 5 --data_dir /data/bench
  python tools/input_benchmark.py --read_chunk 16,64,256 --recipes 224  # chunk study
"""
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile

from funmatch import console, timing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "funmatch_input_bench"
MODES = ("streaming", "array_record", "memory")
RECIPES = {"128": ("flowers_pet", ""), "224": ("bit_i1k", "")}
TARGET = 0.90


def parse_args(argv):
  p = console.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), NAME),
                 help="where the dataset is prepared (reused when it matches)")
  p.add_argument("--images", type=int, default=2000, help="JPEGs in the dataset")
  p.add_argument("--shards", type=int, default=16, help="files per format")
  p.add_argument("--batch_size", type=int, default=128, help="GLOBAL batch size")
  p.add_argument("--process_count", type=int, default=1,
                 help="measure host 0 of this many (its rows of every global batch)")
  p.add_argument("--batches", type=int, default=20, help="timed batches per mode")
  p.add_argument("--warmup", type=int, default=4, help="untimed batches first")
  p.add_argument("--rounds", type=int, default=3, help="rounds (median reported)")
  p.add_argument("--recipes", default="128,224", help="comma-separated: 128, 224")
  p.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
  p.add_argument("--read_chunk", default="",
                 help="records per ArrayRecord read call to compare, e.g. 16,64,256 "
                      "(default: the pipeline's own)")
  p.add_argument("--output", default="", help="write the results as JSON here")
  args = p.parse_args(argv)
  for key in ("images", "shards", "batch_size", "process_count", "batches", "rounds"):
    if getattr(args, key) <= 0:
      p.error(f"--{key} must be positive")
  if args.batch_size % args.process_count:
    p.error("--batch_size must be divisible by --process_count")
  if not set(args.recipes.split(",")) <= set(RECIPES):
    p.error(f"--recipes takes {', '.join(RECIPES)}")
  if not set(args.modes.split(",")) <= set(MODES):
    p.error(f"--modes takes {', '.join(MODES)}")
  return args


# ---------------------------------------------------------------------------
# The dataset.


def picture(example_id: int) -> bytes:
  """A JPEG of 160-256 px per side: smooth colour fields plus grain."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(example_id)
  height, width = (int(v) for v in rng.integers(160, 257, 2))
  coarse = rng.integers(0, 256, (rng.integers(4, 12), rng.integers(4, 12), 3))
  base = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize(
      (width, height), Image.BICUBIC), np.float32)
  base += rng.normal(0, 12, base.shape)
  out = io.BytesIO()
  Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
  return out.getvalue()


def prepare(data_dir: str, images: int, shards: int) -> dict[str, str]:
  """{format: data_dir} of the same JPEGs, prepared unless already there."""
  import shutil  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  with tfds.core.registered.skip_registration():

    class FunmatchInputBench(tfds.core.GeneratorBasedBuilder):
      """Synthetic JPEGs, 10 classes."""

      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=10)}))

      def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

      def _generate_examples(self):
        for i in range(images):
          yield i, {"image": io.BytesIO(picture(i)), "label": i % 10}

  dirs = {}
  for file_format in ("tfrecord", "array_record"):
    path = os.path.join(data_dir, file_format)
    if _prepared_examples(path) != (images, shards):
      shutil.rmtree(path, ignore_errors=True)
      print(f"preparing {images} JPEGs as {file_format} in {path} ...", flush=True)
      config = tfds.download.DownloadConfig(num_shards=shards, try_download_gcs=False)
      tfds.disable_progress_bar()
      FunmatchInputBench(data_dir=path, file_format=file_format).download_and_prepare(
          download_config=config)
    dirs[file_format] = path
  return dirs


def _prepared_examples(path: str):
  """(examples, shards) of the prepared train split, or None."""
  info_path = os.path.join(path, NAME, "1.0.0", "dataset_info.json")
  if not os.path.exists(info_path):
    return None
  with open(info_path) as f:
    splits = json.load(f).get("splits", [])
  train = [s for s in splits if s.get("name") == "train"]
  if not train:
    return None
  lengths = [int(n) for n in train[0].get("shardLengths", [])]
  return sum(lengths), len(lengths)


# ---------------------------------------------------------------------------
# Measuring.


def recipe_input(recipe: str):
  """(views, input config) of a recipe: its resolutions and crop settings."""
  from funmatch import config_util  # pylint: disable=import-outside-toplevel
  name, arg = RECIPES[recipe]
  config = config_util.load_recipe(os.path.join(REPO, "configs", "x.py"),
                                   name).get_config(arg or None)
  views = {"student": int(config.student.res)}
  views.update({t: int(config[t].res) for t in config.teachers})
  return views, config.input


def mode_config(recipe_cfg, mode: str, dirs: dict[str, str], args):
  cfg = recipe_cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.source, cfg.name, cfg.split = "tfds", NAME, "train"
    cfg.batch_size = args.batch_size
    cfg.data_dir = dirs["tfrecord" if mode == "streaming" else "array_record"]
    cfg.cache_raw = mode == "memory"
    cfg.random_access = None
    cfg.shuffle_buffer = min(int(cfg.get("shuffle_buffer", 50_000)), args.images)
  return cfg


def measure(source, views, args) -> dict[str, float]:
  """Host 0's images/s and CPU ms per image over --batches after --warmup."""
  from funmatch.data import pipeline  # pylint: disable=import-outside-toplevel
  local_batch = args.batch_size // args.process_count
  ds = pipeline.train_dataset(source, views, seed=0, process_index=0,
                              process_count=args.process_count)
  batches = ds.as_numpy_iterator()
  # Numpy batches: each call is done when it returns, nothing to block on.
  measured = timing.time_calls(lambda: next(batches), args.batches, warmup=args.warmup,
                               block=None)
  return {"images_per_s": local_batch / measured.seconds,
          "cpu_ms_per_image": 1000 * measured.cpu_seconds / local_batch}


def run(args) -> dict:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from funmatch.data import sources, tfds_source  # pylint: disable=import-outside-toplevel
  dirs = prepare(args.data_dir, args.images, args.shards)
  sizes = [os.path.getsize(os.path.join(root, f))
           for root, _, files in os.walk(dirs["array_record"]) for f in files
           if ".array_record-" in f]
  own_chunk = tfds_source.ArrayRecordSource.read_chunk
  chunks = [int(c) for c in args.read_chunk.split(",") if c] or [own_chunk]
  modes = args.modes.split(",")
  variants = [(m, c) for m in modes for c in (chunks if m == "array_record" else [None])]
  load_before = os.getloadavg()
  samples = {}
  for recipe in args.recipes.split(","):
    views, recipe_cfg = recipe_input(recipe)
    opened = {mode: sources.open_source(mode_config(recipe_cfg, mode, dirs, args))
              for mode in modes}
    for mode, source in opened.items():
      assert source.access == mode, mode  # the mode asked for
    # The pipeline's one-line mode report (streaming warns) would repeat every round.
    logging.getLogger("funmatch").setLevel(logging.ERROR)
    for round_index in range(args.rounds):
      for mode, chunk in variants:
        if chunk:
          tfds_source.ArrayRecordSource.read_chunk = chunk
        result = measure(opened[mode], views, args)
        key = (recipe, mode if not chunk or len(chunks) == 1 else f"{mode}@{chunk}")
        samples.setdefault(key, []).append(result)
        print(f"  round {round_index + 1}: {recipe}px {key[1]:<18} "
              f"{result['images_per_s']:8.0f} images/s  "
              f"{result['cpu_ms_per_image']:.2f} CPU ms/image  "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)
  rows = []
  for (recipe, mode), results in samples.items():
    rates = [r["images_per_s"] for r in results]
    cpu_ms = statistics.median(r["cpu_ms_per_image"] for r in results)
    rows.append({"recipe": f"{recipe}px", "mode": mode,
                 "images_per_s": statistics.median(rates), "min": min(rates),
                 "max": max(rates), "cpu_ms_per_image": cpu_ms,
                 # What the host's cores could feed if the pipeline had them all.
                 "cpu_bound_images_per_s": 1000 * os.cpu_count() / cpu_ms})
  ratios = {}
  for recipe in args.recipes.split(","):
    by_mode = {r["mode"]: r for r in rows if r["recipe"] == f"{recipe}px"}
    if "streaming" in by_mode:
      for mode, row in by_mode.items():
        if mode.startswith("array_record"):
          ratios[f"{recipe}px {mode} / streaming"] = (
              row["images_per_s"] / by_mode["streaming"]["images_per_s"])
  return {
      "rows": rows, "ratios": ratios, "target": f"array_record / streaming >= {TARGET}",
      "dataset": {"images": args.images, "shards": args.shards,
                  "mean_kb_per_record": float(np.sum(sizes)) / args.images / 1024,
                  "data_dir": args.data_dir},
      "setup": {"batch_size": args.batch_size, "process_count": args.process_count,
                "local_batch": args.batch_size // args.process_count,
                "batches": args.batches, "warmup": args.warmup, "rounds": args.rounds,
                "read_chunk": chunks},
      "machine": {"cpus": os.cpu_count(), "load_before": load_before,
                  "load_after": os.getloadavg(), "python": platform.python_version(),
                  "versions": _versions()},
  }


def _versions() -> dict[str, str]:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  out = {}
  for package in ("tensorflow-cpu", "tensorflow", "tensorflow-datasets", "array-record"):
    try:
      out[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      pass
  return out


def print_table(report: dict) -> None:
  print(f"\n{'recipe':<8} {'mode':<18} {'images/s':>9} {'min':>7} {'max':>7} "
        f"{'CPU ms/img':>10} {'cores/CPU ms':>12}")
  for r in report["rows"]:
    print(f"{r['recipe']:<8} {r['mode']:<18} {r['images_per_s']:9.0f} {r['min']:7.0f} "
          f"{r['max']:7.0f} {r['cpu_ms_per_image']:10.2f} "
          f"{r['cpu_bound_images_per_s']:12.0f}")
  for name, ratio in report["ratios"].items():
    verdict = "meets" if ratio >= TARGET else "BELOW"
    print(f"{name}: {ratio:.2f} ({verdict} the target >= {TARGET})")
  m = report["machine"]
  print(f"{m['cpus']} CPUs; load average {m['load_before'][0]:.1f} before, "
        f"{m['load_after'][0]:.1f} after (indicative on a shared machine)")


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from funmatch.errors import UserError  # pylint: disable=import-outside-toplevel
  try:
    report = run(args)
  except UserError as e:
    print(f"funmatch: error: {e}", file=sys.stderr)
    return 2
  print_table(report)
  if args.output:
    with open(args.output, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
