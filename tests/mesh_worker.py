"""Runs tiny digits distillations on the simulated devices of this process.

Started by tests/test_sharding.py with XLA_FLAGS giving N CPU devices:
  python tests/mesh_worker.py TEACHER_WORKDIR OUT_DIR VARIANT...
where VARIANT is NAME=MESH_AXES/STRATEGY, e.g. `fsdp=data:2,fsdp:4/fsdp`. Each
variant distils 5 steps into OUT_DIR/NAME; OUT_DIR/NAME.json gets the
shardings of the initial train state's arrays and OUT_DIR/NAME_params.npz the
params of the final checkpoint as restored onto this variant's mesh.
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
          f"--config.mesh={axes!r}", f"--config.sharding.student={strategy}",
          f"--config.sharding.teachers={strategy}", "--config.sharding.fsdp_min_size=64"]


def shardings_of(args: list[str]) -> dict:
  """'path': [spec...] of every array of the initial state and the teacher params."""
  import jax  # pylint: disable=import-outside-toplevel
  from funmatch.train import build, cli, state as state_lib  # pylint: disable=import-outside-toplevel
  config, _, _ = cli.parse(["prog", *args], "mesh_worker", {})
  run = build.build(config, "distill")
  state = state_lib.init_state(run)
  tree = {"params": state.params, "opt_state": state.opt_state, "step": state.step,
          "teacher": run.teacher_params["teacher"]}
  return {jax.tree_util.keystr(path): dict(shape=list(x.shape),
                                           spec=[str(a) for a in x.sharding.spec])
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def save_restored_params(args: list[str], workdir: str, path: str) -> None:
  """Restores the run's latest checkpoint onto this mesh and saves its params."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from funmatch import checkpoint  # pylint: disable=import-outside-toplevel
  from funmatch.weights import layouts  # pylint: disable=import-outside-toplevel
  from funmatch.train import build, cli, state as state_lib  # pylint: disable=import-outside-toplevel
  config, _, _ = cli.parse(["prog", *args], "mesh_worker", {})
  state = state_lib.init_state(build.build(config, "distill"))
  ckpt = checkpoint.Checkpointer(workdir, save_every=1)
  _, restored = ckpt.restore_latest(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
  ckpt.close()
  np.savez(path, **layouts.flat_params(jax.device_get(restored.params)))


def main(teacher: str, out_dir: str, *variants: str) -> int:
  from funmatch.train import cli  # pylint: disable=import-outside-toplevel
  for variant in variants:
    name, spec = variant.split("=", 1)
    mesh, strategy = spec.split("/")
    args = config_args(teacher, os.path.join(out_dir, name), mesh, strategy)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
      json.dump(shardings_of(args), f)
    code = cli.distill_main(["funmatch-distill", *args])
    if code:
      return code
    save_restored_params(args, os.path.join(out_dir, name),
                         os.path.join(out_dir, f"{name}_params.npz"))
  return 0


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:]))
