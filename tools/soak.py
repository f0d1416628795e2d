"""Soak test: a tiny digits distillation run for --minutes, watched for slow leaks.

Patient distillation runs for thousands of epochs; a leak of a few kilobytes a
step ends such a run. This tool starts `funmatch-distill` on configs/digits.py
(checkpoints every --checkpoint_every steps, keep_checkpoints=--keep,
keep_every_steps=--keep_every, an eval every --eval_every steps) in a
subprocess and samples it every --sample_seconds:

  rss_mb         resident memory (/proc/PID/status VmRSS)
  fds, threads   open file handles (/proc/PID/fd) and threads
  ckpt_bytes     size of WORKDIR/checkpoints, and which steps it holds
  metrics_bytes  size of WORKDIR/metrics.jsonl
  step           the last logged step (its step time comes from metrics.jsonl)
and reads from metrics.jsonl each eval call's seconds (`<eval>/seconds`).

--minutes of training after its first logged step (compilation comes before),
it sends SIGTERM (the run saves and exits 0) and compares, after a warm-up
(--warmup_minutes from the first step: first saves and evals, allocator and
thread-pool growth), the median of the first fifth of the samples with the
last fifth:

  RSS growth            <= 2 %         (and the fitted slope in MB/hour)
  open handles          flat (the two medians within 2, no rising trend)
  checkpoint directory  bounded: at most keep + one per keep_every steps (+1 save
                        in flight), and no bigger than that many checkpoints
  step-time drift       <= 5 %         (median step time, first vs last fifth;
                                        also CPU seconds per step, which a
                                        shared machine's load disturbs less)
  metrics.jsonl         grows by the same bytes per logged step (reported)
  eval seconds          per call and eval set, first vs last calls (reported)

It prints a table and writes --output JSON (settings, every sample, results).
Without --teacher it first trains a tiny teacher (configs/digits_teacher.py:
steps=50). Numbers depend on the machine's load: run the 20-minute check on a
quiet machine.

  python tools/soak.py --minutes 20 --output /tmp/soak.json
  python tools/soak.py --minutes 3 --teacher /tmp/digits_teacher --checkpoint_every 25 \
      --config.evals.test.max_examples=200
Any `--config.KEY=VALUE` is passed on to funmatch-distill.
"""
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from funmatch import checkpoint, console, fileio
from funmatch.train import metrics_io, workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {"rss_growth_pct": 2.0, "handle_drift": 2, "step_time_drift_pct": 5.0}
WINDOW = 0.2  # the first and last fifth of the samples after warm-up
_START_LIMIT_MINUTES = 15  # compilation must end (a step logged) within this
_CLI = "import sys; from funmatch.train import cli; sys.exit(cli.{}_main(sys.argv))"


def parse_args(argv):
  p = console.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--minutes", type=float, default=20.0,
                 help="training wall time, from the first logged step (compilation "
                      "and data setup come before and are not counted)")
  p.add_argument("--warmup_minutes", type=float, default=-1.0,
                 help="ignored start of the training (default: a quarter of --minutes)")
  p.add_argument("--sample_seconds", type=float, default=5.0)
  p.add_argument("--teacher", default="",
                 help="a digits teacher (funmatch-train workdir or .npz); default: "
                      "train a tiny one in WORKDIR/teacher")
  p.add_argument("--workdir", default="",
                 help="where the runs go (default: a new temporary directory)")
  p.add_argument("--checkpoint_every", type=int, default=50)
  p.add_argument("--keep", type=int, default=3)
  p.add_argument("--keep_every", type=int, default=1000)
  p.add_argument("--eval_every", type=int, default=200)
  p.add_argument("--log_every", type=int, default=10)
  p.add_argument("--recipe_arg", default="",
                 help="extra configs/digits.py arguments, e.g. batch_size=64,res=16")
  p.add_argument("--output", default="", help="write settings, samples and results here")
  # Any --config.KEY=VALUE goes to funmatch-distill as it is (the CLI checks it).
  args, overrides = p.parse_known_args(argv)
  unknown = [a for a in overrides if not a.startswith("--config.")]
  if unknown:
    p.error(f"unrecognized arguments: {' '.join(unknown)}")
  args.overrides = overrides
  if args.minutes <= 0 or args.sample_seconds <= 0:
    p.error("--minutes and --sample_seconds must be positive")
  if args.warmup_minutes < 0:
    args.warmup_minutes = args.minutes / 4
  if args.warmup_minutes >= args.minutes:
    p.error("--warmup_minutes must be shorter than --minutes")
  for key in ("checkpoint_every", "keep", "keep_every", "log_every"):
    if getattr(args, key) <= 0:
      p.error(f"--{key} must be positive")
  return args


# ---------------------------------------------------------------------------
# Sampling (Linux /proc).


def process_sample(pid: int) -> dict | None:
  """{'rss_mb', 'fds', 'threads', 'cpu_s'} of a live process, None once it is gone."""
  try:
    with open(f"/proc/{pid}/status") as f:
      status = dict(line.split(":", 1) for line in f if ":" in line)
    with open(f"/proc/{pid}/stat") as f:
      # Fields after the command's closing parenthesis; utime, stime are 14, 15.
      times = f.read().rsplit(")", 1)[1].split()[11:13]
    fds = len(os.listdir(f"/proc/{pid}/fd"))
  except (FileNotFoundError, ProcessLookupError):
    return None
  return {"rss_mb": int(status["VmRSS"].split()[0]) / 1024,
          "fds": fds, "threads": int(status["Threads"]),
          "cpu_s": sum(int(t) for t in times) / os.sysconf("SC_CLK_TCK")}


def dir_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.path.getsize(os.path.join(root, name))
      except OSError:  # removed while we walked: an old checkpoint going away
        pass
  return total


def read_timed_rows(workdir: str) -> list[dict]:
  """The rows of the run's metrics (funmatch.train.metrics_io) that time something:
  train rows with a step time, eval rows with `<eval>/seconds`."""
  try:
    rows = metrics_io.read_metrics(workdir)
  except FileNotFoundError:  # nothing logged yet
    return []
  return [r for r in rows if "step" in r and (
      r.get("img_per_sec") or any(k.endswith("/seconds") for k in r))]


def workdir_sample(workdir: str) -> dict:
  metrics = fileio.join(workdir, metrics_io.METRICS_FILE)
  return {"ckpt_bytes": dir_bytes(checkpoint.checkpoint_dir(workdir)),
          "ckpt_steps": saved_steps(workdir),
          "metrics_bytes": os.path.getsize(metrics) if os.path.exists(metrics) else 0}


def saved_steps(workdir: str) -> list[int]:
  """The finished checkpoints (funmatch.checkpoint), read while the run saves and
  deletes them: a folder that goes away during the listing is read again."""
  for _ in range(3):
    try:
      return checkpoint.saved_steps(workdir)
    except FileNotFoundError:
      continue
  return checkpoint.saved_steps(workdir)


def ended_with_a_saved_checkpoint(exit_code: int, workdir: str, last_logged_step: int) -> bool:
  """Whether SIGTERM ended the run as it should: exit status 0 (a run of 10**8 steps
  ends early only when stopped) and a checkpoint at or after its last logged step."""
  steps = saved_steps(workdir)
  return exit_code == 0 and bool(steps) and steps[-1] >= last_logged_step


# ---------------------------------------------------------------------------
# Analysis: pure functions of the samples (tested on synthetic ones).


def windows(values: list[float], fraction: float = WINDOW, least: int = 3
            ) -> tuple[float, float]:
  """Medians of the first and the last `fraction` of `values` (>= `least` each)."""
  if not values:
    raise ValueError("no samples after the warm-up; run longer or sample more often")
  size = min(len(values), max(least, int(round(fraction * len(values)))))
  return statistics.median(values[:size]), statistics.median(values[-size:])


def percent_change(first: float, last: float) -> float:
  return 100.0 * (last - first) / first if first else 0.0


def slope_per_hour(times: list[float], values: list[float]) -> float:
  """Least-squares slope of values over time (seconds), per hour."""
  if len(times) < 2:
    return 0.0
  mean_t, mean_v = statistics.fmean(times), statistics.fmean(values)
  spread = sum((t - mean_t) ** 2 for t in times)
  if not spread:
    return 0.0
  return 3600 * sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values)) / spread


def checkpoint_bound(last_step: int, keep: int, keep_every: int) -> int:
  """Most checkpoints the manager may hold at `last_step`, one save in flight."""
  return keep + last_step // keep_every + 1


def analyse(samples: list[dict], rows: list[dict], *, warmup_s: float, keep: int,
            keep_every: int, batch_size: int) -> dict:
  """Growth after warm-up of every sampled quantity, with verdicts."""
  settled = [s for s in samples if s["t"] >= warmup_s]
  if not settled:
    raise ValueError("no samples after the warm-up; run longer or sample more often")
  results = {}

  rss = [s["rss_mb"] for s in settled]
  first, last = windows(rss)
  results["rss"] = {"first_mb": first, "last_mb": last,
                    "growth_pct": percent_change(first, last),
                    "slope_mb_per_hour": slope_per_hour([s["t"] for s in settled], rss),
                    "target_pct": TARGETS["rss_growth_pct"]}
  results["rss"]["ok"] = results["rss"]["growth_pct"] <= TARGETS["rss_growth_pct"]

  for key in ("fds", "threads"):
    values = [s[key] for s in settled]
    first, last = windows(values)
    results[key] = {"first": first, "last": last, "drift": last - first,
                    "min": min(values), "max": max(values),
                    "target_drift": TARGETS["handle_drift"]}
    results[key]["ok"] = abs(last - first) <= TARGETS["handle_drift"]

  # One checkpoint's bytes: the smallest per-checkpoint share seen (a save in
  # flight adds bytes before it adds a finished step).
  per_checkpoint = min((s["ckpt_bytes"] / len(s["ckpt_steps"])
                        for s in settled if s["ckpt_steps"]), default=0.0)
  over = [s for s in settled
          if len(s["ckpt_steps"]) > checkpoint_bound(s["step"], keep, keep_every)
          or s["ckpt_bytes"] > 1.05 * per_checkpoint * checkpoint_bound(
              s["step"], keep, keep_every)]
  final = settled[-1]
  results["checkpoints"] = {
      "final_steps": final["ckpt_steps"], "final_count": len(final["ckpt_steps"]),
      "final_bound": checkpoint_bound(final["step"], keep, keep_every),
      "max_count": max(len(s["ckpt_steps"]) for s in settled),
      "max_bytes": max(s["ckpt_bytes"] for s in settled),
      "bytes_per_checkpoint": per_checkpoint, "samples_over_bound": len(over),
      "keep": keep, "keep_every": keep_every, "ok": not over}

  first_step = settled[0]["step"]
  times = [batch_size / r["img_per_sec"] for r in rows
           if r["step"] > first_step and r.get("img_per_sec")]
  if times:
    first, last = windows(times)
    results["step_time"] = {"first_s": first, "last_s": last,
                            "drift_pct": percent_change(first, last),
                            "logged_steps": len(times),
                            "target_pct": TARGETS["step_time_drift_pct"]}
    results["step_time"]["ok"] = (abs(results["step_time"]["drift_pct"])
                                  <= TARGETS["step_time_drift_pct"])
  else:
    results["step_time"] = {"ok": False, "why": "no logged steps after the warm-up"}

  # CPU seconds per step between samples: what load on a shared machine
  # disturbs least (it does not wait for the CPU it does not get).
  cpu_per_step = [(b["cpu_s"] - a["cpu_s"]) / (b["step"] - a["step"])
                  for a, b in zip(settled, settled[1:])
                  if "cpu_s" in a and b["step"] > a["step"]]
  if cpu_per_step:
    first, last = windows(cpu_per_step)
    results["cpu_per_step"] = {"first_s": first, "last_s": last,
                               "drift_pct": percent_change(first, last)}

  # Seconds per eval call, per eval set (the first calls compile: after warm-up).
  for key in sorted({k for r in rows for k in r if k.endswith("/seconds")}):
    calls = [r[key] for r in rows if key in r and r["step"] > first_step]
    if calls:
      first, last = windows(calls, least=1)
      results.setdefault("eval_seconds", {})[key.removesuffix("/seconds")] = {
          "calls": len(calls), "first_s": first, "last_s": last,
          "drift_pct": percent_change(first, last)}

  grown = [(s["step"], s["metrics_bytes"]) for s in settled if s["step"] > first_step]
  if len(grown) >= 2 and grown[-1][0] > grown[0][0]:
    rate = (grown[-1][1] - grown[0][1]) / (grown[-1][0] - grown[0][0])
    results["metrics_jsonl"] = {"bytes_per_step": rate, "final_bytes": grown[-1][1]}
  results["ok"] = all(v.get("ok", True) for v in results.values()
                      if isinstance(v, dict))
  return results


def table(results: dict) -> str:
  def verdict(entry):
    return "ok" if entry.get("ok") else "FAIL"
  r = results
  lines = [f"{'what':<22} {'value':<44} {'target':<16} verdict"]
  m = r["rss"]
  lines.append(f"{'RSS growth':<22} {m['first_mb']:.0f} -> {m['last_mb']:.0f} MB "
               f"({m['growth_pct']:+.2f} %, {m['slope_mb_per_hour']:+.1f} MB/h)".ljust(67)
               + f"{'<= 2 %':<16} {verdict(m)}")
  for key, name in (("fds", "open handles"), ("threads", "threads")):
    e = r[key]
    lines.append(f"{name:<22} {e['first']:.0f} -> {e['last']:.0f} (min {e['min']}, max "
                 f"{e['max']})".ljust(67) + f"{'flat (+-2)':<16} {verdict(e)}")
  c = r["checkpoints"]
  lines.append(f"{'checkpoint dir':<22} {c['final_count']} ckpts at the end (bound "
               f"{c['final_bound']}), max {c['max_bytes'] / 1e6:.1f} MB".ljust(67)
               + f"{'bounded':<16} {verdict(c)}")
  s = r["step_time"]
  if "drift_pct" in s:
    lines.append(f"{'step time':<22} {1000 * s['first_s']:.1f} -> "
                 f"{1000 * s['last_s']:.1f} ms ({s['drift_pct']:+.2f} %)".ljust(67)
                 + f"{'<= 5 %':<16} {verdict(s)}")
  else:
    lines.append(f"{'step time':<22} {s['why']}".ljust(67) + f"{'<= 5 %':<16} FAIL")
  if "cpu_per_step" in r:
    p = r["cpu_per_step"]
    lines.append(f"{'CPU time per step':<22} {1000 * p['first_s']:.1f} -> "
                 f"{1000 * p['last_s']:.1f} ms ({p['drift_pct']:+.2f} %)".ljust(67)
                 + f"{'(load-robust)':<16} info")
  for name, e in r.get("eval_seconds", {}).items():
    lines.append(f"{'eval ' + name:<22} {e['first_s']:.2f} -> {e['last_s']:.2f} s per call "
                 f"({e['calls']} calls, {e['drift_pct']:+.1f} %)".ljust(67)
                 + f"{'(cost)':<16} info")
  if "metrics_jsonl" in r:
    m = r["metrics_jsonl"]
    lines.append(f"{'metrics.jsonl':<22} {m['bytes_per_step']:.1f} bytes/step, "
                 f"{m['final_bytes'] / 1e3:.0f} kB".ljust(67) + f"{'linear':<16} info")
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# The runs.


def train_teacher(workdir: str) -> str:
  teacher = os.path.join(workdir, "teacher")
  if os.path.isdir(os.path.join(teacher, "checkpoints")):
    return teacher
  print(f"training a tiny digits teacher in {teacher} ...", flush=True)
  with open(os.path.join(workdir, "teacher.log"), "w") as log:
    code = subprocess.call(
        [sys.executable, "-c", _CLI.format("train"), "--config",
         os.path.join(REPO, "configs", "digits_teacher.py") + ":steps=50",
         "--workdir", teacher], stdout=log, stderr=subprocess.STDOUT)
  if code:
    raise SystemExit(f"funmatch: error: training the teacher failed (exit {code}); see "
                     f"{os.path.join(workdir, 'teacher.log')}")
  return teacher


def distill_command(args, teacher: str, run_dir: str) -> list[str]:
  recipe = f"teacher={teacher},steps=100000000" + (f",{args.recipe_arg}"
                                                   if args.recipe_arg else "")
  return [sys.executable, "-c", _CLI.format("distill"), "--config",
          os.path.join(REPO, "configs", "digits.py") + ":" + recipe,
          "--workdir", run_dir,
          f"--config.log_every_steps={args.log_every}",
          f"--config.checkpoint_every_steps={args.checkpoint_every}",
          f"--config.keep_checkpoints={args.keep}",
          f"--config.keep_every_steps={args.keep_every}",
          f"--config.eval_every_steps={args.eval_every}", *args.overrides]


def soak(args) -> dict:
  root = args.workdir or tempfile.mkdtemp(prefix="funmatch_soak_")
  os.makedirs(root, exist_ok=True)
  teacher = args.teacher or train_teacher(root)
  run_dir = os.path.join(root, f"run_{time.strftime('%Y%m%dT%H%M%S')}")
  command = distill_command(args, teacher, run_dir)
  log_path = os.path.join(root, os.path.basename(run_dir) + ".log")
  load_before = os.getloadavg()
  samples = []
  first_step_s = None  # when training started: compilation and data setup are done
  with open(log_path, "w") as log:
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    start = time.perf_counter()
    try:
      while True:
        elapsed = time.perf_counter() - start
        if first_step_s is None and elapsed > 60 * _START_LIMIT_MINUTES:
          break
        if first_step_s is not None and elapsed - first_step_s >= 60 * args.minutes:
          break
        time.sleep(args.sample_seconds)
        measured = process_sample(process.pid)
        if measured is None or process.poll() is not None:
          break
        rows = read_timed_rows(run_dir)
        samples.append({"t": time.perf_counter() - start, **measured,
                        **workdir_sample(run_dir),
                        "step": rows[-1]["step"] if rows else 0})
        if first_step_s is None and samples[-1]["step"] > 0:
          first_step_s = samples[-1]["t"]
        if args.sample_seconds >= 5 or len(samples) % 5 == 0:
          print(f"  t={samples[-1]['t']:6.0f}s step {samples[-1]['step']:>6} "
                f"rss {measured['rss_mb']:7.1f} MB fds {measured['fds']:4d} ckpts "
                f"{samples[-1]['ckpt_steps']}", flush=True)
    finally:
      exit_code = _stop(process)
  rows = read_timed_rows(run_dir)
  graceful = ended_with_a_saved_checkpoint(
      exit_code, run_dir, max((r["step"] for r in rows if r.get("img_per_sec")), default=0))
  batch_size = _batch_size(run_dir)
  report = {
      "settings": {k: v for k, v in vars(args).items()}, "command": command,
      "run_dir": run_dir, "log": log_path, "exit_code": exit_code,
      "saved_on_sigterm": graceful, "batch_size": batch_size,
      "load_before": load_before, "load_after": os.getloadavg(),
      "cpus": os.cpu_count(), "samples": samples,
      "final_checkpoints": saved_steps(run_dir)}
  if exit_code != 0 or first_step_s is None:
    raise SystemExit(f"funmatch: error: the distillation exited with {exit_code} "
                     "before the soak ended (or logged no step within "
                     f"{_START_LIMIT_MINUTES} minutes); see {log_path}")
  report["first_step_s"] = first_step_s
  report["results"] = analyse(samples, rows,
                              warmup_s=first_step_s + 60 * args.warmup_minutes,
                              keep=args.keep, keep_every=args.keep_every,
                              batch_size=batch_size)
  return report


def _stop(process: subprocess.Popen) -> int:
  """SIGTERM (the loop saves and exits 0); SIGKILL if it hangs. Our own child only."""
  if process.poll() is None:
    process.send_signal(signal.SIGTERM)
    try:
      return process.wait(timeout=180)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()
      return -9
  return process.returncode


def _batch_size(run_dir: str) -> int:
  return int(workdir_lib.read_config(run_dir)["config"]["input"]["batch_size"])


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if not os.path.isdir("/proc/self/fd"):
    print("funmatch: error: tools/soak.py reads /proc (Linux only)", file=sys.stderr)
    return 2
  report = soak(args)
  print()
  print(table(report["results"]))
  print(f"exit code {report['exit_code']} after SIGTERM (checkpoint saved: "
        f"{report['saved_on_sigterm']}); {len(report['samples'])} samples; load average "
        f"{report['load_before'][0]:.1f} before, {report['load_after'][0]:.1f} after on "
        f"{report['cpus']} CPUs")
  if args.output:
    with open(args.output, "w") as f:
      json.dump(report, f, indent=1)
    print(f"wrote {args.output}")
  return 0 if report["results"]["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
