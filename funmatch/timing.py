"""The one timing loop of the benchmark tools (tools/benchmark.py, peer_step.py,
shampoo_benchmark.py, input_benchmark.py).

`calls` calls back to back, as the trainer dispatches steps (JAX runs them
asynchronously), then one `block` on all their outputs (independent calls need
not finish in order), so the time per call includes the device work but not a
host sync per call. A public module so that tools loaded by file path share it.
"""
import dataclasses
import statistics
import time
from typing import Any, Callable, Sequence


def block_until_ready(outputs: Any) -> None:
  """Waits for JAX arrays anywhere in `outputs` (the default `block`)."""
  import jax  # pylint: disable=import-outside-toplevel  (input_benchmark times TF alone)
  jax.block_until_ready(outputs)


@dataclasses.dataclass(frozen=True)
class Timing:
  """Wall and CPU (this process's, all threads) seconds per call; warm-up wall seconds."""
  seconds: float
  cpu_seconds: float
  warmup_seconds: float = 0.0


def time_calls(call: Callable[[], Any], calls: int, warmup: int = 0,
               block: Callable[[Any], None] | None = block_until_ready) -> Timing:
  """Times `calls` back-to-back calls of `call` after `warmup` untimed ones.

  block: waits for the outputs (None: `call` is synchronous, e.g. a Python iterator).
  """
  if calls < 1:
    raise ValueError(f"calls={calls} must be >= 1")
  start = time.perf_counter()
  if warmup:
    _run(call, warmup, block)
  warmup_seconds = time.perf_counter() - start
  wall, cpu = time.perf_counter(), time.process_time()
  _run(call, calls, block)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  return Timing(wall / calls, cpu / calls, warmup_seconds)


def first_call_seconds(call: Callable[[], Any],
                       block: Callable[[Any], None] = block_until_ready) -> float:
  """One call, waited for: compilation plus the first step."""
  start = time.perf_counter()
  block(call())
  return time.perf_counter() - start


def repeated(call: Callable[[], Any], calls: int, repeats: int,
             block: Callable[[Any], None] | None = block_until_ready) -> dict[str, Any]:
  """`repeats` timings of `calls` calls: median, min and every repeat, in ms per call."""
  per_call = [time_calls(call, calls, block=block).seconds for _ in range(repeats)]
  return {**summary_ms(per_call), "steps": calls, "repeats": repeats}


def summary_ms(per_call: Sequence[float]) -> dict[str, Any]:
  """Median, min and all of per-call seconds, in milliseconds."""
  return {"median_ms": 1000 * statistics.median(per_call), "min_ms": 1000 * min(per_call),
          "all_ms": [1000 * t for t in per_call]}


def _run(call, calls: int, block) -> None:
  if block is None:  # synchronous calls: keep no outputs (input batches are large)
    for _ in range(calls):
      call()
  else:
    block([call() for _ in range(calls)])
