"""The device mesh and the shardings of batches and parameters.

The batch is split over every device (all mesh axes). `config.mesh` lists
`(axis_name, size)` pairs; one size may be -1 (the rest). `config.sharding`
picks, per group (`student`: params + optimizer state, `aux`: the objective's
params and state, `teachers` or a teacher's own name), `replicate` or `fsdp`:
each array's largest axis divisible by the `fsdp` mesh axis is split over it,
arrays under `sharding.fsdp_min_size` elements stay replicated. XLA gathers the
shards where the step needs whole arrays.
"""
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from funmatch.errors import UserError

STRATEGIES = ("replicate", "fsdp")
FSDP_AXIS = "fsdp"


def make_mesh(config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the mesh named by config.mesh over `devices` (default: all)."""
  devices = list(devices if devices is not None else jax.devices())
  axes = tuple(tuple(axis) for axis in config.mesh)
  names = [name for name, _ in axes]
  sizes = [int(size) for _, size in axes]
  if sizes.count(-1) > 1:
    raise UserError(f"config.mesh={axes}: at most one axis may have size -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if known <= 0 or len(devices) % known:
      raise UserError(f"config.mesh={axes} does not divide the {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise UserError(f"config.mesh={axes} has {int(np.prod(sizes))} devices but "
                    f"{len(devices)} are available; make the sizes multiply to "
                    f"{len(devices)} or use -1 for one axis")
  try:
    # Orders devices so each process's devices are contiguous (hosts then fill
    # the rows of the global batch in order) and follow the physical topology.
    grid = mesh_utils.create_device_mesh(sizes, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every mesh axis, the rest replicated."""
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, key: str = "input.batch_size") -> None:
  """The global batch must split evenly over devices and hosts."""
  devices = mesh.devices.size
  if batch_size <= 0:
    raise UserError(f"config.{key}={batch_size} must be a positive multiple of the "
                    f"{devices} devices")
  if batch_size % devices:
    raise UserError(f"config.{key}={batch_size} is not divisible by the {devices} "
                    f"devices; use a multiple of {devices}")
  if batch_size % jax.process_count():
    raise UserError(f"config.{key}={batch_size} is not divisible by the "
                    f"{jax.process_count()} processes")


def strategy(config: ml_collections.ConfigDict, group: str, mesh: Mesh) -> str:
  """The sharding strategy of `group`; a teacher without its own key uses `teachers`."""
  # A teacher may have its own key (config.sharding.<teacher name>); else 'teachers'.
  key = group if group in config.sharding or group in ("student", "aux") else "teachers"
  name = config.sharding[key]
  if name not in STRATEGIES:
    raise UserError(f"unknown config.sharding.{key}='{name}'; choose one of: "
                    f"{', '.join(STRATEGIES)}")
  if name == "fsdp" and FSDP_AXIS not in mesh.axis_names:
    raise UserError(f"config.sharding.{key}='fsdp' needs an '{FSDP_AXIS}' axis in "
                    f"config.mesh (it has {mesh.axis_names}); e.g. "
                    f"config.mesh=(('data', -1), ('{FSDP_AXIS}', 8))")
  return name


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
  """Splits the largest axis divisible by `fsdp_size` over the fsdp mesh axis."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp_size == 0]
  if not candidates:
    return P()
  _, axis = max(candidates, key=lambda c: (c[0], -c[1]))  # ties: the first axis
  return P(*([None] * axis + [FSDP_AXIS]))


def tree_shardings(tree: Any, mesh: Mesh, name: str, min_size: int) -> Any:
  """NamedShardings for every array of `tree` under strategy `name`."""
  if name == "replicate":
    return jax.tree.map(lambda _: replicated(mesh), tree)
  fsdp_size = mesh.shape[FSDP_AXIS]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp_size, min_size)), tree)


def fsdp_min_size(config: ml_collections.ConfigDict) -> int:
  size = int(config.sharding.fsdp_min_size)
  if size < 0:
    raise UserError(f"config.sharding.fsdp_min_size must be >= 0, got {size}")
  return size


def group_shardings(config: ml_collections.ConfigDict, group: str, tree: Any,
                    mesh: Mesh) -> Any:
  """The shardings of `tree` (arrays or shapes) belonging to `group`."""
  return tree_shardings(tree, mesh, strategy(config, group, mesh), fsdp_min_size(config))
