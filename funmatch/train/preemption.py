"""When to stop early: SIGTERM/SIGINT and a lost workdir lease, the same on every process.

A preempted TPU pod sends SIGTERM to its hosts, not necessarily to all at once nor
to all at all. Each process remembering its own signal is not enough: a host that
saves at step 120 while another steps on to 121 hangs both in Orbax's save
barrier. So the processes agree:

- every `config.preemption_check_every_steps` steps (N, default 10), and at every
  checkpoint step, each process contributes (signal received, lease lost) and
  all take the maximum (`multihost_utils.process_allgather`, one tiny collective):
  if any process got a signal, every process saves that same step and exits 0;
- in between, nothing is exchanged: the loop keeps dispatching steps ahead of the
  devices. The agreement waits for the steps in flight, so its cost is about one
  step's dispatch latency every N steps; a signal is acted on at most N steps
  later (N * step time + the save must fit the scheduler's grace period, 30 s on
  GCE spot/preemptible VMs).
- a single process needs no agreement and checks its signal after every step.

Only process 0 holds the workdir's lease (funmatch/lease.py); if it has lost it
(another run took the workdir over), the agreement tells every process, and all
stop with an error before writing another checkpoint.

Why not JAX's preemption sync point (`multihost_utils.reached_preemption_sync_
point`)? It reacts to SIGTERM through a C++ handler that a Python handler
replaces (and SIGINT not at all), and it could not also carry the lease: one
agreement of our own covers both, with a cost that is easy to state. The JAX
service is switched off at start-up (distributed.py), so that until the loop
installs its handler SIGTERM still ends a process instead of being swallowed.
"""
import signal
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np

from funmatch import fileio
from funmatch.errors import UserError

# A signal's number, encoded as the value the processes agree on (max wins).
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Why process 0 no longer holds the lease, agreed on the same way: another run
# took it over (a user error), or its heartbeat kept failing (storage, exit 4).
_TAKEN_OVER, _HEARTBEAT_FAILED = 1, 2


class StopSignal:
  """Remembers SIGTERM/SIGINT so the loop can save and exit between steps."""

  def __init__(self):
    self.received: str | None = None
    self._previous = {}

  def __enter__(self):
    for sig in _SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not in the main thread (e.g. tests): no handler
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class Stops:
  """`stops.at(step, checkpoint_due)`: None to go on, or why every process stops
  ("SIGTERM received", "SIGTERM received by process 1").

  Raises UserError on every process if process 0 has lost the workdir's lease.
  """

  def __init__(self, hold: Any, every_steps: int):
    self._hold = hold
    self._every = max(int(every_steps), 1)
    self._signal = StopSignal()

  def __enter__(self):
    self._signal.__enter__()
    return self

  def __exit__(self, *exc):
    self._signal.__exit__(*exc)

  def at(self, step: int, checkpoint_due: bool) -> str | None:
    if jax.process_count() == 1:
      if checkpoint_due or self._signal.received:
        self._hold.check()  # never save into a workdir another run took over
      return f"{self._signal.received} received" if self._signal.received else None
    if step % self._every and not checkpoint_due:
      return None
    return self._agree()

  def _agree(self) -> str | None:
    """Every process's (signal, lease lost), gathered; identical on all of them."""
    received = self._signal.received
    code = _SIGNALS.index(signal.Signals[received]) + 1 if received else 0
    lost = (_HEARTBEAT_FAILED if getattr(self._hold, "failure", None)
            else _TAKEN_OVER if getattr(self._hold, "lost", None) else 0)
    flags = np.asarray(multihost_utils.process_allgather(
        np.asarray([code, lost], np.int32)))
    if flags[:, 1].any():
      self._hold.check()  # process 0: its own message
      if flags[:, 1].max() == _HEARTBEAT_FAILED:
        raise fileio.StorageError(
            "process 0's lease heartbeat kept failing", "training",
            "every process stops without saving; see process 0's line for the "
            "storage's answer, fix that")
      raise UserError("process 0 lost the workdir's lease to another run; every process "
                      "stops without saving (see process 0's log)")
    if not flags[:, 0].any():
      return None
    process = int(np.argmax(flags[:, 0]))
    name = _SIGNALS[int(flags[process, 0]) - 1].name
    return f"{name} received" + (f" by process {process}" if process != jax.process_index()
                                 else "")
