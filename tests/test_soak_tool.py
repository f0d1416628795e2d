"""tools/soak.py: its analysis on synthetic samples, and one short real run."""
import json
import os
import re
import sys

import pytest

from conftest import repo_path

sys.path.insert(0, repo_path("tools"))
import soak  # pylint: disable=wrong-import-position


def _samples(count=40, rss=lambda t: 500.0, fds=lambda t: 60, keep=3, every=50,
             keep_every=1000, bytes_per_ckpt=1e6, steps_per_s=2.0):
  """One sample every 5 s of a run saving every `every` steps."""
  out = []
  for i in range(count):
    t = 5.0 * (i + 1)
    step = int(steps_per_s * t)
    saved = [s for s in range(every, step + 1, every)]
    held = sorted(set(saved[-keep:]) | {s for s in saved if s % keep_every == 0})
    out.append({"t": t, "rss_mb": rss(t), "fds": fds(t), "threads": 40, "cpu_s": 0.3 * t,
                "ckpt_steps": held, "ckpt_bytes": bytes_per_ckpt * len(held),
                "metrics_bytes": 100 * step, "step": step})
  return out


def _rows(count=400, batch_size=128, step_time=lambda step: 0.1):
  return [{"step": 10 * (i + 1), "img_per_sec": batch_size / step_time(10 * (i + 1))}
          for i in range(count)]


def _analyse(samples, rows=None, **kwargs):
  settings = dict(warmup_s=30.0, keep=3, keep_every=1000, batch_size=128)
  settings.update(kwargs)
  return soak.analyse(samples, _rows() if rows is None else rows, **settings)


def test_a_steady_run_passes_every_check():
  results = _analyse(_samples())
  assert results["ok"]
  assert results["rss"]["growth_pct"] == 0 and results["fds"]["drift"] == 0
  assert results["step_time"]["drift_pct"] == 0
  assert results["metrics_jsonl"]["bytes_per_step"] == 100
  assert results["cpu_per_step"]["first_s"] == pytest.approx(0.15)
  assert "FAIL" not in soak.table(results)


def test_warmup_growth_is_ignored_and_later_growth_is_caught():
  warming = _samples(rss=lambda t: 300.0 if t < 30 else 500.0,
                     fds=lambda t: 20 if t < 30 else 60)
  assert _analyse(warming)["ok"]
  leaking = _analyse(_samples(rss=lambda t: 500.0 + 0.2 * t))  # +8 % over the run
  assert not leaking["ok"] and not leaking["rss"]["ok"]
  assert leaking["rss"]["slope_mb_per_hour"] == pytest.approx(720, rel=1e-6)
  assert "FAIL" in soak.table(leaking)


def test_handle_drift_fails_but_a_transient_spike_does_not():
  spike = _analyse(_samples(fds=lambda t: 90 if 100 <= t < 110 else 60))
  assert spike["fds"]["ok"] and spike["fds"]["max"] == 90
  drifting = _analyse(_samples(fds=lambda t: 60 + int(t // 20)))
  assert not drifting["fds"]["ok"]


def test_checkpoints_beyond_keep_and_keep_every_fail():
  assert _analyse(_samples(keep_every=100), keep_every=100)["checkpoints"]["ok"]
  kept_all = _samples(keep=10_000)  # the manager never deletes
  result = _analyse(kept_all)["checkpoints"]
  assert not result["ok"] and result["final_count"] > result["final_bound"]
  assert result["samples_over_bound"] > 0
  assert soak.checkpoint_bound(2000, keep=3, keep_every=1000) == 6


def test_step_time_drift_is_measured_on_logged_steps_after_warmup():
  slower = _rows(step_time=lambda step: 0.1 if step < 2000 else 0.12)
  result = _analyse(_samples(), rows=slower)["step_time"]
  assert not result["ok"] and result["drift_pct"] == pytest.approx(20)
  assert _analyse(_samples(), rows=[])["step_time"]["ok"] is False
  with pytest.raises(ValueError, match="no samples after the warm-up"):
    _analyse(_samples(count=3), warmup_s=1e6)


def test_eval_seconds_per_call_are_reported_per_eval_set():
  evals = [{"step": step, "test/seconds": 2.0 if step <= 2000 else 3.0,
            "minival/seconds": 0.5, "test/kl": 0.1} for step in range(100, 4001, 100)]
  rows = sorted(_rows() + evals, key=lambda r: r["step"])
  results = _analyse(_samples(), rows=rows)
  test = results["eval_seconds"]["test"]
  assert test["calls"] == 40 and (test["first_s"], test["last_s"]) == (2.0, 3.0)
  assert test["drift_pct"] == pytest.approx(50)
  assert results["eval_seconds"]["minival"]["drift_pct"] == 0
  assert results["step_time"]["drift_pct"] == 0  # eval rows have no step time
  assert "eval test" in soak.table(results) and results["ok"]  # reported, not judged


def test_config_overrides_pass_through_and_other_flags_fail(capsys):
  args = soak.parse_args(["--minutes", "1", "--config.teacher.width=0.5"])
  assert args.overrides == ["--config.teacher.width=0.5"]
  assert "--config.teacher.width=0.5" in soak.distill_command(args, "/t", "/run")
  with pytest.raises(SystemExit) as exit_info:
    soak.parse_args(["--minutes", "1", "--bogus=3"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.count("funmatch: error:") == 1


def test_windows_and_slope_helpers():
  assert soak.windows([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]) == (2, 9)
  assert soak.windows([5, 7]) == (6, 6)
  assert soak.slope_per_hour([0, 1800, 3600], [1, 2, 3]) == pytest.approx(2)
  assert soak.percent_change(200, 204) == pytest.approx(2)


def test_a_short_real_run(teacher_workdir, tmp_path):
  """About 25 s: the tool samples a live run (6 s of training, a sample a second),
  stops it with SIGTERM (which saves a checkpoint) and writes its report; the
  verdicts need a longer run."""
  output = tmp_path / "soak.json"
  code = soak.main([
      "--minutes", "0.1", "--warmup_minutes", "0.05", "--sample_seconds", "1",
      "--teacher", teacher_workdir, "--workdir", str(tmp_path / "runs"),
      "--checkpoint_every", "5", "--keep", "2", "--keep_every", "20",
      "--eval_every", "10", "--log_every", "2",
      "--recipe_arg", "batch_size=32,res=16,teacher_res=16",
      "--config.teacher.width=0.5", "--config.evals.test.max_examples=64",
      "--output", str(output)])
  assert code in (0, 1)  # verdicts depend on the machine's load
  report = json.loads(output.read_text())
  assert report["exit_code"] == 0 and report["saved_on_sigterm"]
  assert len(report["samples"]) >= 5
  last = report["samples"][-1]
  assert last["rss_mb"] > 0 and last["fds"] > 0 and last["step"] > 0
  assert 0 < len(report["final_checkpoints"]) <= soak.checkpoint_bound(
      max(report["final_checkpoints"]), 2, 20)
  assert set(report["results"]) >= {"rss", "fds", "checkpoints", "step_time", "ok"}
  assert "--config.evals.test.max_examples=64" in report["command"]
  if "eval_seconds" in report["results"]:  # an eval after the warm-up (load-dependent)
    assert report["results"]["eval_seconds"]["test"]["last_s"] > 0
  assert os.path.exists(report["log"])
  # No library noise: the run's console (stdout and stderr) opens with funmatch's lines.
  with open(report["log"]) as f:
    log = f.read()
  assert re.match(r"\d\d:\d\d:\d\d \w", log), log[:300]  # funmatch's "HH:MM:SS ..." lines
  assert "absl::InitializeLog" not in log and "oneDNN" not in log


def test_how_a_run_ended_comes_from_its_exit_status_and_checkpoints(tmp_path, monkeypatch):
  monkeypatch.setattr(soak.checkpoint, "saved_steps", lambda workdir: [10, 20, 27])
  assert soak.ended_with_a_saved_checkpoint(0, str(tmp_path), last_logged_step=26)
  assert not soak.ended_with_a_saved_checkpoint(-9, str(tmp_path), last_logged_step=26)
  assert not soak.ended_with_a_saved_checkpoint(0, str(tmp_path), last_logged_step=30)
  monkeypatch.setattr(soak.checkpoint, "saved_steps", lambda workdir: [])
  assert not soak.ended_with_a_saved_checkpoint(0, str(tmp_path), last_logged_step=0)
