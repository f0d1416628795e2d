"""Orbax checkpoints in gs:// (emulator): what funmatch/checkpoint.py needs to work there.

Orbax writes metadata through etils.epath (gcsfs, see funmatch.fileio) and array
data through tensorstore's own GCS driver: both must reach the emulator.
"""
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from funmatch import checkpoint, fileio


def _manager(directory: str, keep: int = 2) -> ocp.CheckpointManager:
  # The options of funmatch.checkpoint.Checkpointer (async saves included).
  options = ocp.CheckpointManagerOptions(save_interval_steps=1, max_to_keep=keep,
                                         keep_period=None,
                                         enable_async_checkpointing=True, create=True)
  return ocp.CheckpointManager(directory, options=options)


def _state(seed: int):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {"step": jnp.asarray(seed, jnp.int32),
          "params": {"dense": {"kernel": jax.random.normal(keys[0], (64, 32)),
                               "bias": jnp.zeros((32,), jnp.bfloat16)},
                     "head": jax.random.normal(keys[1], (32, 10))},
          "opt_state": [jax.random.uniform(keys[2], (64, 32)), jnp.ones((3,))]}


def _assert_same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
  assert jax.tree.map(lambda x: x.dtype, a) == jax.tree.map(lambda x: x.dtype, b)


def test_orbax_save_restore_keep_and_move_aside_on_gcs(gcs):
  directory = f"{gcs.root}/{uuid.uuid4().hex[:12]}/run/checkpoints"
  with _manager(directory) as manager:
    for step in (10, 20, 30):
      manager.save(step, args=ocp.args.StandardSave(_state(step)))
    manager.wait_until_finished()
    assert manager.all_steps() == [20, 30]  # max_to_keep deleted step 10 in the bucket
  assert fileio.listdir(directory) == ["20", "30"]

  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state(0))
  with _manager(directory) as reopened:  # a resumed run: listing sees both steps
    assert reopened.latest_step() == 30
    _assert_same(reopened.restore(30, args=ocp.args.StandardRestore(abstract)), _state(30))

  # eval/export read only the params subtree, from gs:// too.
  step, params = checkpoint.restore_params(directory.rsplit("/checkpoints", 1)[0], 20)
  assert step == 20
  _assert_same(params, _state(20)["params"])

  # A damaged newest checkpoint is moved aside (copy + delete on object storage).
  fileio.move(f"{directory}/30", f"{directory}/corrupt-30-20250101T000000")
  with _manager(directory) as after:
    assert after.all_steps() == [20]
    after.save(30, args=ocp.args.StandardSave(_state(31)))  # the step number is free again
    after.wait_until_finished()
    _assert_same(after.restore(30, args=ocp.args.StandardRestore(abstract)), _state(31))
  assert fileio.listdir(directory) == ["20", "30", "corrupt-30-20250101T000000"]
