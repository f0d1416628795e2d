"""Where a run's start-up time goes, reported in one log line at its first step."""
import logging
import time

import funmatch


class Clock:
  """Phase durations since funmatch was imported (`mark` ends the current phase)."""

  def __init__(self):
    self._last = funmatch.IMPORTED_AT
    self.phases: dict[str, float] = {}

  def mark(self, phase: str) -> None:
    now = time.perf_counter()
    self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
    self._last = now

  def report(self) -> str:
    total = sum(self.phases.values())
    parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items())
    line = f"start-up {total:.1f} s: {parts}"
    logging.getLogger("funmatch").info(line)
    return line
