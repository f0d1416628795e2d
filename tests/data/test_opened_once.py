"""A run opens each configured split once: build, training steps and every eval
read through the same DataSource, and TFDS shards are checked once per run."""
import collections

import tfds_testdata as testdata
from conftest import TEACHER_OVERRIDES, repo_path, run_cli
from funmatch.data import source as source_lib
from funmatch.data import tfds_source
from funmatch.train import cli


def _train(workdir, capsys, *extra):
  """A tiny funmatch-train run: 6 steps, an eval every 2 steps, a checkpoint at 3."""
  code, _, err = run_cli(cli.train_main, [
      "--config", repo_path("configs", "digits_teacher.py") + ":steps=6,batch_size=8,res=16",
      "--workdir", str(workdir), *TEACHER_OVERRIDES, "--config.log_every_steps=2",
      "--config.eval_every_steps=2", "--config.checkpoint_every_steps=3",
      "--config.evals.test.batch_size=8", "--config.evals.test.max_examples=16", *extra],
                         capsys)
  assert code == 0, err


def _count_openings(monkeypatch) -> collections.Counter:
  opened = collections.Counter()
  original = source_lib.DataSource.__init__

  def counting(self, **description):
    opened[description["where"]] += 1
    original(self, **description)

  monkeypatch.setattr(source_lib.DataSource, "__init__", counting)
  return opened


def test_a_digits_run_opens_each_split_once(monkeypatch, tmp_path, capsys):
  opened = _count_openings(monkeypatch)
  _train(tmp_path / "run", capsys)
  assert opened == {"input": 1, "evals.test": 1}


def test_a_tfds_run_checks_each_shard_once(monkeypatch, jpeg_tfds, tmp_path, capsys):
  data_dir = jpeg_tfds["array_record"]
  opened = _count_openings(monkeypatch)
  checked = collections.Counter()
  original = tfds_source._shard_problem  # pylint: disable=protected-access

  def counting(shard, file_format):
    checked[shard.path] += 1
    return original(shard, file_format)

  monkeypatch.setattr(tfds_source, "_shard_problem", counting)
  tfds_fields = [f"--config.{where}.{key}={value}" for where in ("input", "evals.test")
                 for key, value in (("source", "tfds"), ("name", testdata.NAME),
                                    ("data_dir", data_dir))]
  _train(tmp_path / "run", capsys, *tfds_fields, "--config.evals.test.split=test")
  assert opened == {"input": 1, "evals.test": 1}
  shards = {testdata.shard_path(data_dir, "array_record", i, split)
            for i in range(testdata.NUM_SHARDS) for split in ("train", "test")}
  assert set(checked) == shards and set(checked.values()) == {1}
