"""tools/benchmark.py: runs on the digits recipe, writes every key; bad input exits 2.

Timings are never asserted (they depend on the machine and its load).
"""
import importlib.util
import json

import pytest

from conftest import repo_path

# Tiny models and batches: the test checks the tool's behaviour, not speed.
TINY = ["--config.teacher.depth=(1, 1, 1, 1)", "--config.teacher.width=0.5",
        "--random_teachers", "--steps", "1", "--repeats", "1"]


@pytest.fixture(scope="module")
def tool():
  spec = importlib.util.spec_from_file_location("funmatch_benchmark_tool",
                                                repo_path("tools", "benchmark.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_tool(tool, args, capsys):
  try:
    code = tool.main(args)
  except SystemExit as e:
    code = e.code
  captured = capsys.readouterr()
  return code or 0, captured.out, captured.err


def test_digits_benchmark_writes_every_key(tool, tmp_path, capsys):
  output = tmp_path / "bench.json"
  code, out, err = run_tool(tool, [
      "--config", repo_path("configs", "digits.py") + ":batch_size=8",
      *TINY, "--host_steps", "2", "--host_res", "0", "--host_batch", "0",
      "--bf16_teacher", "--agreement_batches", "1", "--output", str(output)], capsys)
  assert code == 0, err
  results = json.loads(output.read_text())
  assert results["data_available"] and results["random_teachers"]
  assert results["batch_size"] == 8
  assert results["views"] == {"student": 16, "teacher": 16}
  timings = results["timings"]
  for key in ("teacher_forward", "student_step", "full_step", "full_step_real_data"):
    assert timings[key]["median_ms"] > 0, key
    assert timings[key]["steps"] == 1 and len(timings[key]["all_ms"]) == 1
  host = timings["host"]
  assert set(host) >= {"dispatch_ms", "wall_per_step_ms", "device_per_step_ms",
                       "overhead_ms", "steps", "batch_size"}
  assert host["steps"] == 2 and host["batch_size"] == 8
  flops = results["flops"]
  for key in ("teacher_forward", "student_step", "full_step"):
    assert flops[key] > 0, key
    assert flops["achieved_flops_per_s"][key] > 0
  # The step is the teacher forward plus the student step, FLOP for FLOP.
  assert flops["full_step"] == pytest.approx(
      flops["teacher_forward"] + flops["student_step"], rel=0.05)
  memory = results["memory"]
  assert memory["rss_peak_bytes"] > 0 and "device_peak_bytes" in memory
  assert memory["full_step_xla"]["temp_size_in_bytes"] >= 0
  ratios = results["ratios"]
  assert set(ratios) >= {"full_over_parts", "real_over_synthetic_throughput",
                         "host_overhead_ms", "bf16_speedup", "bf16_top1_agreement"}
  bf16 = results["bf16_teacher"]
  assert bf16["float32"]["median_ms"] > 0 and bf16["bfloat16"]["median_ms"] > 0
  assert bf16["agreement_data"] == "eval set 'test'"
  assert bf16["examples"] == 256  # one eval batch of the recipe's 256
  assert 0.0 <= bf16["top1_agreement"] <= 1.0
  assert results["machine"]["device_count"] >= 1 and results["machine"]["cpus"] >= 1
  assert "full_step" in out and "ratios" in out


def test_unprepared_data_builds_a_synthetic_run(tool):
  """A recipe whose dataset is not prepared still builds, for synthetic data only."""
  args, config = tool.parse_args([
      "--config", repo_path("configs", "flowers_pet.py") + ":res=32,data_dir=/nonexistent/tfds",
      "--config.student.depth=(1, 1, 1, 1)", "--config.student.width=0.5",
      "--config.teacher.depth=(1, 1, 1, 1)", "--config.teacher.width=0.5",
      "--config.input.batch_size=8", "--random_teachers", "--num_classes", "102"])
  notes = []
  run, built, data_available = tool.make_run(config, args, notes)
  assert not data_available
  assert run.num_classes == 102 and run.plan.views == {"student": 32, "teacher": 32}
  assert int(built.input.batch_size) == 8
  assert "test" not in built.evals
  assert any("training data not available" in n for n in notes)
  assert any("random weights" in n for n in notes)


@pytest.mark.parametrize("args, culprit", [
    (["--config", "/nonexistent/recipe.py"], "config file not found: /nonexistent/recipe.py"),
    (["--config", repo_path("configs", "digits.py"), "--config.input.batch_sise=8"],
     "batch_sise"),
    (["--config", repo_path("configs", "digits.py"), "--config.nosuch.key=1"], "nosuch"),
    (["--config", repo_path("configs", "digits.py"), "--config.input.batch_size=many"],
     "batch_size"),
    (["--config", repo_path("configs", "digits.py"), "--set", "lr=1"], "--set"),
    (["--config", repo_path("configs", "digits.py"), "--steps", "0"], "--steps=0"),
    (["--config", repo_path("configs", "digits.py") + ":nosuch=1"], "nosuch"),
])
def test_bad_input_exits_2_with_one_line(tool, args, culprit, capsys):
  code, out, err = run_tool(tool, args, capsys)
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 2, err
  assert len(lines) == 1, err
  assert lines[0].startswith("funmatch: error:") and culprit in lines[0]
  assert not out


@pytest.mark.parametrize("family", ["convnext", "swin"])
def test_convnext_and_swin_teachers_build_runs(tool, family):
  """The registry's families reach the tool: a digits-sized timm-family teacher
  (32px) -> BiT student (16px) run builds, each model at its own resolution."""
  args, config = tool.parse_args([
      "--config", repo_path("configs", "digits_family.py") + f":family={family},batch_size=8",
      "--random_teachers", "--num_classes", "10"])
  run, _, _ = tool.make_run(config, args, [])
  assert run.plan.views == {"student": 16, "teacher": 32}


@pytest.mark.parametrize("family,teacher_params", [("convnext", 28.6), ("swin", 28.3)])
def test_memory_estimate_counts_timm_family_teachers(family, teacher_params, capsys):
  """tools/memory_estimate.py on the ImageNet recipe with a ConvNeXt-T / Swin-T
  teacher (parameters and optimizer state only: nothing compiled)."""
  spec = importlib.util.spec_from_file_location(
      "funmatch_memory_estimate_tool", repo_path("tools", "memory_estimate.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  recipe = repo_path("configs", "timm_teacher_i1k.py") + f":family={family}"
  assert module.main(["--recipe", recipe, "--no_measure", "--devices", "8"]) in (0, None)
  out = capsys.readouterr().out
  assert f"teacher {family} tiny at 224px" in out
  assert f"params: teacher {teacher_params}M, student 25.5M" in out
