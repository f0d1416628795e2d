"""The device mesh and the shardings of batches and parameters.

The batch is split over every device (all mesh axes); parameters are replicated.
`config.mesh` lists `(axis_name, size)` pairs; one size may be -1 (the rest).
"""
from typing import Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from funmatch.errors import UserError

DEFAULT_MESH = (("data", -1),)


def make_mesh(config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the mesh named by config.mesh over `devices` (default: all)."""
  devices = list(devices if devices is not None else jax.devices())
  axes = tuple(tuple(axis) for axis in config.get("mesh", DEFAULT_MESH))
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
