"""tools/gpu_check.sh --dry-run: the GPU report's every field, on CPU and without
TensorFlow (the GPU machine has JAX but no TensorFlow, TFDS or clu)."""
import json
import os
import subprocess
import sys

from conftest import repo_path

BLOCKED = ("tensorflow", "tensorflow_datasets", "clu")


def test_dry_run_writes_every_field_without_tensorflow(tmp_path):
  blocker = tmp_path / "blocked"
  for name in BLOCKED:  # importing any of these fails, as on the GPU machine
    (blocker / name).mkdir(parents=True)
    (blocker / name / "__init__.py").write_text(
        f"raise ImportError('{name} is not installed on the GPU machine')\n")
  output = tmp_path / "gpu.json"
  env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(blocker),
         "TMPDIR": str(tmp_path)}
  result = subprocess.run(["bash", repo_path("tools", "gpu_check.sh"), "--dry-run",
                           "--output", str(output)], env=env, capture_output=True,
                          text=True, timeout=1500, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  report = json.loads(output.read_text())
  assert report["dry_run"] is True and report["setup"]["random_teachers"] is True
  assert "random" in report["setup"]["caveat"]
  assert set(report["runs"]) == {"f32_teacher_adam", "bf16_teacher_adam",
                                 "f32_teacher_shampoo", "convnext_teacher_adam",
                                 "swin_teacher_adam"}
  assert all(run["status"] == "ok" for run in report["runs"].values())
  for key in ("step_f32_teacher", "step_bf16_teacher", "step_convnext_teacher",
              "step_swin_teacher"):
    step = report[key]
    assert step["img_per_s"] > 0 and step["full_step_ms"] > 0, key
    assert step["peak_memory_bytes"] > 0 and step["peak_memory_kind"], key
  assert report["step_bf16_teacher"]["teacher_dtype"] == "bfloat16"
  bf16 = report["bf16_teacher_forward"]
  assert bf16["speedup"] > 0 and 0 <= bf16["top1_agreement"] <= 1
  assert bf16["agreement_examples"] == 8 and "synthetic" in bf16["agreement_data"]
  optimizer = report["optimizer"]
  for key in ("adam_student_step_ms", "shampoo_student_step_ms", "adam_full_step_ms",
              "shampoo_full_step_ms", "shampoo_over_adam_student_step",
              "shampoo_over_adam_full_step"):
    assert optimizer[key] > 0, key
  ratio = report["full_over_parts"]
  assert ratio["ratio"] > 0 and ratio["teacher_forward_ms"] > 0
  assert report["machine"]["backend"] and report["setup"]["batch_size"] == 8
  # The runs were built on synthetic data: funmatch.data (TensorFlow) never imported.
  notes = report["raw"]["f32_teacher_adam"]["notes"]
  assert any("funmatch.data does not import" in note for note in notes), notes
