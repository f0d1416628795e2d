"""funmatch-distill with the example ids of every training batch written down.

  python tests/recording_worker.py IDS_PREFIX DELAY_S [funmatch-distill args...]

Started by tests/test_tfds_resume.py. Wraps the pipeline's `train_dataset` so that
each local batch, as it leaves tf.data, appends {"step", "process_count", "ids"}
(its examples' indices) to IDS_PREFIX.<process index>.jsonl, after DELAY_S seconds
(> 0 slows the run so a test can kill it between two given steps). Batches are
read ahead of the step that uses them, so a killed run may have written a few
steps it never trained. The trainer itself is untouched.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def record_ids(prefix: str, delay_s: float) -> None:
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from funmatch.data import pipeline  # pylint: disable=import-outside-toplevel
  original = pipeline.train_dataset

  def train_dataset(source, views, *, seed, start_step=0, process_index=0,
                    process_count=1, **kwargs):
    ds = original(source, views, seed=seed, start_step=start_step,
                  process_index=process_index, process_count=process_count, **kwargs)
    path = f"{prefix}.{process_index}.jsonl"

    def write(step, ids):
      time.sleep(delay_s)
      with open(path, "a") as f:
        f.write(json.dumps({"step": int(step), "process_count": process_count,
                            "ids": ids.tolist()}) + "\n")
      return step

    def tap(step, batch):
      written = tf.numpy_function(write, [step, batch["index"]], tf.int64)
      with tf.control_dependencies([written]):
        return {**batch, "index": tf.identity(batch["index"])}

    return ds.enumerate(start_step + 1).map(tap)  # in order, one batch at a time

  pipeline.train_dataset = train_dataset


def read_ids(prefix: str) -> dict[int, list[int]]:
  """{step: the global batch's example ids} of the run that wrote IDS_PREFIX.*.jsonl.

  Host p holds rows [p*B/P, (p+1)*B/P) of every global batch, so the global batch is
  the hosts' batches in process order. A torn last line (kill -9) is skipped.
  """
  local: dict[int, dict[int, list[int]]] = {}
  process_counts = set()
  process = 0
  while os.path.exists(f"{prefix}.{process}.jsonl"):
    with open(f"{prefix}.{process}.jsonl") as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue
        assert row["step"] not in local.get(process, {}), f"step {row['step']} twice"
        local.setdefault(process, {})[row["step"]] = row["ids"]
        process_counts.add(row["process_count"])
    process += 1
  assert process_counts <= {process}, (process_counts, process)
  steps = set.intersection(*(set(rows) for rows in local.values())) if local else set()
  return {step: sum((local[p][step] for p in range(process)), []) for step in steps}


if __name__ == "__main__":
  record_ids(sys.argv[1], float(sys.argv[2]))
  from funmatch.train import cli  # pylint: disable=wrong-import-position
  sys.exit(cli.distill_main(["funmatch-distill", *sys.argv[3:]]))
