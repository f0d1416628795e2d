"""Where a run's start-up time goes, reported in one log line at its first step."""
import logging
import time

import funmatch


class Clock:
  """Phase durations (`mark` ends the current phase).

  The first clock of a process starts when funmatch was imported, so its first
  phase holds the imports; a later one (the demo's student, after its teacher
  trained in the same process) starts when it is made.
  """
  _made_one = False

  def __init__(self):
    first = not Clock._made_one
    Clock._made_one = True
    self._last = funmatch.IMPORTED_AT if first else time.perf_counter()
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
