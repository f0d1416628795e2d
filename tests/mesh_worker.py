"""Runs tiny digits distillations on the simulated devices of this process.

Started by tests/test_sharding.py with XLA_FLAGS giving N CPU devices:
  python tests/mesh_worker.py TEACHER_WORKDIR OUT_DIR VARIANT...
where VARIANT is NAME=MESH_AXES/STRATEGY, e.g. `fsdp=data:2,fsdp:4/fsdp`. Each
variant distils 5 steps into OUT_DIR/NAME; OUT_DIR/NAME.json gets the
shardings of the initial train state's arrays (as the run placed them: the run is
built once) and OUT_DIR/NAME_params.npz the params of the final checkpoint as
restored onto this variant's mesh.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import TINY_STUDENT_ARG, repo_path  # pylint: disable=wrong-import-position


def config_args(teacher: str, workdir: str, mesh: str, strategy: str) -> list[str]:
  axes = tuple((name, int(size)) for name, size in
               (axis.split(":") for axis in mesh.split(",")))
  arg = TINY_STUDENT_ARG.replace("steps=30", "steps=5") + f",teacher={teacher}"
  return ["--config", repo_path("configs", "digits.py") + ":" + arg, "--workdir", workdir,
          "--config.teacher.width=0.5", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=5", "--config.eval_every_steps=0",
          # The final eval only has to run on the mesh; its numbers are not compared.
          "--config.evals.test.max_examples=64",
          f"--config.mesh={axes!r}", f"--config.sharding.student={strategy}",
          f"--config.sharding.teachers={strategy}", "--config.sharding.fsdp_min_size=64"]


class Recorder:
  """Wraps the loop's init_state: the variant's one build is the run's own, and
  what it placed on the mesh is written down as the run starts."""

  def __init__(self):
    from funmatch.train import loop  # pylint: disable=import-outside-toplevel
    self._loop, self._init_state = loop, loop.state_lib.init_state
    self.shardings, self.abstract_state = None, None

  def __enter__(self):
    self._loop.state_lib.init_state = self._record
    return self

  def __exit__(self, *exc):
    self._loop.state_lib.init_state = self._init_state

  def _record(self, run):
    import jax  # pylint: disable=import-outside-toplevel
    state = self._init_state(run)
    self.shardings = shardings_of(state, run.teacher_params["teacher"])
    self.abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    return state


def shardings_of(state, teacher_params) -> dict:
  """'path': [spec...] of every array of the initial state and the teacher params."""
  import jax  # pylint: disable=import-outside-toplevel
  tree = {"params": state.params, "opt_state": state.opt_state, "step": state.step,
          "teacher": teacher_params}
  return {jax.tree_util.keystr(path): dict(shape=list(x.shape),
                                           spec=[str(a) for a in x.sharding.spec])
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def save_restored_params(abstract_state, workdir: str, path: str) -> None:
  """Restores the run's latest checkpoint onto this mesh and saves its params."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from funmatch import checkpoint  # pylint: disable=import-outside-toplevel
  from funmatch.weights import layouts  # pylint: disable=import-outside-toplevel
  ckpt = checkpoint.Checkpointer(workdir, save_every=1)
  _, restored = ckpt.restore_latest(abstract_state)
  ckpt.close()
  np.savez(path, **layouts.flat_params(jax.device_get(restored.params)))


def main(teacher: str, out_dir: str, *variants: str) -> int:
  from funmatch.train import cli  # pylint: disable=import-outside-toplevel
  for variant in variants:
    name, spec = variant.split("=", 1)
    mesh, strategy = spec.split("/")
    args = config_args(teacher, os.path.join(out_dir, name), mesh, strategy)
    with Recorder() as recorder:
      code = cli.distill_main(["funmatch-distill", *args])
    if code:
      return code
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
      json.dump(recorder.shardings, f)
    save_restored_params(recorder.abstract_state, os.path.join(out_dir, name),
                         os.path.join(out_dir, f"{name}_params.npz"))
  return 0


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:]))
