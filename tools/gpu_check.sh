#!/usr/bin/env bash
# The GPU numbers docs/benchmarks.md owes, in one run of at most 10 minutes on one
# H100/H200: the paper's step, BiT-R152x2 (224px) -> BiT-R50x1, batch 256, with
#   1. a float32 teacher and Adam (+ the bf16 teacher's forward speed-up and top-1
#      agreement with float32, + teacher forward and student step alone, for the
#      full step / (teacher fwd + student step) ratio),
#   2. a bfloat16 teacher and Adam (full step only),
#   3. a float32 teacher and Shampoo (student step and full step),
#   4. a ConvNeXt-T and 5. a Swin-T teacher (timm_teacher_i1k.py, 224px) -> BiT-R50x1,
#      Adam (full step only),
# each by tools/benchmark.py in its own process (so each peak memory is its own),
# merged into docs/benchmarks/gpu-<date>.json. Teachers have random weights and the
# batches are synthetic (no dataset there; the JSON says so), so the bf16 agreement
# compares two random networks' argmax, not accuracy on images.
#
#   tools/gpu_check.sh [--dry-run] [--output FILE.json]
#
# --dry-run (or GPU_CHECK_DRY_RUN=1): the same runs with BiT [1,1,1,1] models at
# 16-32px (the ConvNeXt / Swin runs: digits_family.py's tiny teachers at 32px), batch 8,
# one step, on whatever backend is there (CI runs it on CPU in a few minutes: five
# builds and compiles); it writes to $TMPDIR unless --output says otherwise.
# Needs jax, flax, optax, orbax-checkpoint and ml-collections; not TensorFlow (the
# runs are built without funmatch.data). PYTHON picks the interpreter (python3).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
OUTPUT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --output) OUTPUT="$2"; shift 2 ;;
    --output=*) OUTPUT="${1#--output=}"; shift ;;
    *) echo "gpu_check: unknown argument $1 (use --dry-run, --output FILE.json)" >&2; exit 2 ;;
  esac
done
[[ "$DRY_RUN" == "1" || "$DRY_RUN" == "true" ]] && DRY_RUN=1 || DRY_RUN=0
DATE="$(date +%Y-%m-%d)"
if [[ -z "$OUTPUT" ]]; then
  if [[ $DRY_RUN == 1 ]]; then OUTPUT="${TMPDIR:-/tmp}/gpu-$DATE-dry-run.json"
  else OUTPUT="$REPO/docs/benchmarks/gpu-$DATE.json"; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # funmatch from this checkout
export PYTHONUNBUFFERED=1

missing="$("$PYTHON" - <<'EOF'
import importlib.util
names = ("jax", "flax", "optax", "orbax.checkpoint", "ml_collections", "numpy")
print(" ".join(n for n in names if importlib.util.find_spec(n.split(".")[0]) is None))
EOF
)"
if [[ -n "$missing" ]]; then
  echo "gpu_check: $PYTHON lacks $missing; install them (or carry their wheels) first" >&2
  exit 2
fi

if [[ $DRY_RUN == 1 ]]; then
  RECIPE="configs/bit_i1k.py:batch_size=8"
  SIZE=("--config.teacher.depth=(1,1,1,1)" --config.teacher.width=0.5 --config.teacher.res=32
        "--config.student.depth=(1,1,1,1)" --config.student.width=0.5 --config.student.res=16
        --num_classes 10)
  TIMING=(--steps 1 --repeats 1)
  BUDGETS=(400 400 400 400 400)  # a safety net only: CI machines differ
  FAMILY_RECIPE="configs/digits_family.py:batch_size=8,student=bit,family="
  FAMILY_SIZE=(--num_classes 10)
else
  RECIPE="configs/bit_i1k.py:batch_size=256"  # R152x2 224px -> R50x1 224px
  SIZE=()
  TIMING=(--steps 5 --repeats 3)
  BUDGETS=(180 100 130 80 80)  # together under 10 minutes, start-up included
  FAMILY_RECIPE="configs/timm_teacher_i1k.py:batch_size=256,family="  # -> R50x1 224px
  FAMILY_SIZE=()
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
COMMON=(--random_teachers --skip real_data,host "${TIMING[@]}")
START=$SECONDS

# run NAME BUDGET RECIPE ARGS...: one benchmark, its JSON in $WORK/NAME.json, its exit
# status and wall time in $WORK/NAME.status; a run over its budget is stopped.
run() {
  local name="$1" budget="$2" recipe="$3"; shift 3
  local begin=$SECONDS status=0
  echo "== $name (at most ${budget}s)"
  timeout --signal=TERM --kill-after=10 "$budget" \
    "$PYTHON" "$REPO/tools/benchmark.py" --config "$REPO/$recipe" "${COMMON[@]}" "$@" \
    --output "$WORK/$name.json" || status=$?
  echo "$status $((SECONDS - begin)) $budget" > "$WORK/$name.status"
}

cd "$REPO"
run f32_teacher_adam "${BUDGETS[0]}" "$RECIPE" "${SIZE[@]}" --bf16_teacher
run bf16_teacher_adam "${BUDGETS[1]}" "$RECIPE" "${SIZE[@]}" --config.teacher.dtype=bfloat16 \
  --skip real_data,host,teacher_forward,student_step
run f32_teacher_shampoo "${BUDGETS[2]}" "$RECIPE,optimizer=shampoo" "${SIZE[@]}" \
  --skip real_data,host,teacher_forward
for family in convnext swin; do
  run "${family}_teacher_adam" "${BUDGETS[$([[ $family == convnext ]] && echo 3 || echo 4)]}" \
    "$FAMILY_RECIPE$family" "${FAMILY_SIZE[@]}" --skip real_data,host,teacher_forward,student_step
done

"$PYTHON" - "$WORK" "$OUTPUT" "$DATE" "$DRY_RUN" "$((SECONDS - START))" <<'EOF'
"""Merges the three benchmark JSONs into the one gpu_check report."""
import json
import os
import sys

work, output, date, dry_run, wall_s = sys.argv[1:]
RUNS = ("f32_teacher_adam", "bf16_teacher_adam", "f32_teacher_shampoo",
        "convnext_teacher_adam", "swin_teacher_adam")
raw, runs = {}, {}
for name in RUNS:
  code, seconds, budget = open(os.path.join(work, f"{name}.status")).read().split()
  path = os.path.join(work, f"{name}.json")
  raw[name] = json.load(open(path)) if os.path.exists(path) else None
  runs[name] = {"exit_code": int(code), "wall_s": int(seconds), "budget_s": int(budget),
                "status": "ok" if raw[name] and code == "0" else
                          ("over its time budget" if code in ("124", "137") else "failed")}


def timing(name, key, field="median_ms"):
  return (((raw.get(name) or {}).get("timings") or {}).get(key) or {}).get(field)


def step(name):
  """img/s, ms and peak memory of a run's full step."""
  result = raw.get(name) or {}
  memory = result.get("memory") or {}
  ms = timing(name, "full_step")
  return {"full_step_ms": ms,
          "img_per_s": result["batch_size"] / (ms / 1000) if ms else None,
          "peak_memory_bytes": memory.get("device_peak_bytes") or memory.get("rss_peak_bytes"),
          "peak_memory_kind": "device" if memory.get("device_peak_bytes") else "host RSS",
          "teacher_dtype": "bfloat16" if name.startswith("bf16") else "float32"}


f32 = raw.get("f32_teacher_adam") or {}
bf16 = f32.get("bf16_teacher") or {}
adam_ms, shampoo_ms = (timing("f32_teacher_adam", "student_step"),
                       timing("f32_teacher_shampoo", "student_step"))
adam_full, shampoo_full = (timing("f32_teacher_adam", "full_step"),
                           timing("f32_teacher_shampoo", "full_step"))
ratio = lambda a, b: a / b if a and b else None
report = {
    "date": date,
    "dry_run": dry_run == "1",
    "machine": f32.get("machine") or next((r["machine"] for r in raw.values() if r), None),
    "setup": {
        "recipe": "configs/bit_i1k.py (BiT-R152x2 teacher -> BiT-R50x1 student, 224px)"
                  if dry_run != "1" else "configs/bit_i1k.py with BiT [1,1,1,1] models "
                  "(dry run: teacher 32px, student 16px)",
        "batch_size": f32.get("batch_size"),
        "views": f32.get("views"),
        "random_teachers": True,
        "data": "synthetic on-device batches (no dataset on the GPU machine)",
        "caveat": "teachers have random weights and images are noise: the bf16 top-1 "
                  "agreement compares two random networks' argmax, not accuracy",
        "conv_impl": "auto (the native convolution on GPU/TPU, matmul on CPU)"},
    "step_f32_teacher": step("f32_teacher_adam"),
    "step_bf16_teacher": step("bf16_teacher_adam"),
    # The same student from the timm families' teachers (dry run: digits-sized ones).
    "step_convnext_teacher": step("convnext_teacher_adam"),
    "step_swin_teacher": step("swin_teacher_adam"),
    "bf16_teacher_forward": {
        "float32_ms": (bf16.get("float32") or {}).get("median_ms"),
        "bfloat16_ms": (bf16.get("bfloat16") or {}).get("median_ms"),
        "speedup": bf16.get("speedup"),
        "top1_agreement": bf16.get("top1_agreement"),
        "agreement_examples": bf16.get("examples"),
        "agreement_data": bf16.get("agreement_data")},
    "optimizer": {
        "adam_student_step_ms": adam_ms, "shampoo_student_step_ms": shampoo_ms,
        "shampoo_over_adam_student_step": ratio(shampoo_ms, adam_ms),
        "adam_full_step_ms": adam_full, "shampoo_full_step_ms": shampoo_full,
        "shampoo_over_adam_full_step": ratio(shampoo_full, adam_full)},
    "full_over_parts": {
        "teacher_forward_ms": timing("f32_teacher_adam", "teacher_forward"),
        "student_step_ms": adam_ms, "full_step_ms": adam_full,
        "ratio": (f32.get("ratios") or {}).get("full_over_parts"), "target": "<= 1.05"},
    "runs": runs,
    "wall_s": int(wall_s),
    "raw": raw,
}
os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
with open(output, "w") as f:
  json.dump(report, f, indent=1, sort_keys=True)
s = report["step_f32_teacher"], report["step_bf16_teacher"]
print(f"gpu_check: f32 teacher {s[0]['img_per_s']} img/s, bf16 teacher {s[1]['img_per_s']} "
      f"img/s, bf16 agreement {report['bf16_teacher_forward']['top1_agreement']}, "
      f"shampoo/adam {report['optimizer']['shampoo_over_adam_student_step']}, "
      f"full/parts {report['full_over_parts']['ratio']}; runs "
      + ", ".join(f"{k}: {v['status']}" for k, v in runs.items()))
print(f"wrote {output}")
sys.exit(0 if all(v["status"] == "ok" for v in runs.values()) else 1)
EOF
