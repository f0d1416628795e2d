"""funmatch/train/preemption.py: when the processes of a run agree to stop, and on what.

The real two-process case (gloo, SIGTERM to one process) is in test_multihost.py;
here the exchange itself is replaced, to count how often it happens.
"""
import os
import signal

import numpy as np
import pytest

from funmatch import fileio, lease
from funmatch.errors import UserError
from funmatch.train import preemption


class LostHold:
  lost = "taken over by host h pid 1"

  def check(self):
    raise UserError("--workdir gs://b/run: this run lost its lease")


def test_one_process_stops_at_the_next_step_and_checks_the_lease():
  with preemption.Stops(lease.LocalHold(), every_steps=10) as stops:
    assert stops.at(1, checkpoint_due=False) is None
    os.kill(os.getpid(), signal.SIGTERM)
    assert stops.at(2, checkpoint_due=False) == "SIGTERM received"
  with preemption.Stops(LostHold(), every_steps=10) as stops:
    assert stops.at(3, checkpoint_due=False) is None  # no save: nothing to check
    with pytest.raises(UserError, match="lost its lease"):
      stops.at(4, checkpoint_due=True)


@pytest.fixture
def two_processes(monkeypatch):
  """This process as process 0 of 2; `other` is what process 1 contributes."""
  exchanges, other = [], {"flags": [0, 0]}

  def allgather(mine):
    exchanges.append(mine.tolist())
    return np.stack([mine, np.asarray(other["flags"], np.int32)])

  monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
  monkeypatch.setattr(preemption.jax, "process_index", lambda: 0)
  monkeypatch.setattr(preemption.multihost_utils, "process_allgather", allgather)
  return exchanges, other


def test_processes_agree_only_every_n_steps_and_at_checkpoints(two_processes):
  exchanges, other = two_processes
  with preemption.Stops(lease.LocalHold(), every_steps=4) as stops:
    agreed = [step for step in range(1, 13)
              if stops.at(step, checkpoint_due=step == 10) is None]
    assert agreed == list(range(1, 13))  # nobody was signalled
    assert len(exchanges) == 4  # steps 4, 8, 10 (a checkpoint) and 12
    other["flags"] = [2, 0]  # process 1 got SIGTERM
    assert stops.at(13, checkpoint_due=False) is None  # not an agreement step
    assert stops.at(16, checkpoint_due=False) == "SIGTERM received by process 1"


def test_own_signal_and_a_lost_lease_reach_every_process(two_processes):
  exchanges, other = two_processes
  with preemption.Stops(lease.LocalHold(), every_steps=2) as stops:
    os.kill(os.getpid(), signal.SIGINT)
    assert stops.at(2, checkpoint_due=False) == "SIGINT received"
    assert exchanges[-1] == [1, 0]
  other["flags"] = [0, 1]  # as if process 1 held the lease and lost it
  with preemption.Stops(lease.LocalHold(), every_steps=2) as stops:
    with pytest.raises(UserError, match="lost the workdir's lease"):
      stops.at(2, checkpoint_due=False)
  # Process 0's heartbeat kept failing (storage): the others say so, not "lost to
  # another run", and exit as a storage failure does (4).
  other["flags"] = [0, 2]
  with preemption.Stops(lease.LocalHold(), every_steps=2) as stops:
    with pytest.raises(fileio.StorageError, match="process 0's lease heartbeat kept fail"):
      stops.at(2, checkpoint_due=False)
