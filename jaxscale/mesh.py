"""The device mesh: a 1-D data axis, or a 2-D (hosts x local devices) layout.

The global batch is split over all mesh axes together, so `DATA_AXES` for the mesh is what every
gradient and metric reduction runs over. The 2-D layout puts the devices of one process on one
row: a reduction over the second axis stays inside a host, one over the first crosses hosts.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxscale.errors import ConfigError


def create_mesh(layout: str = "data", devices: list | None = None) -> Mesh:
  """Builds the mesh named by `config.mesh`.

  Args:
    layout: "data" for a 1-D mesh with axis "data"; "hosts" for a (process_count x
      local_device_count) mesh with axes ("hosts", "local"); or "RxC" (e.g. "2x4") for an
      explicit 2-D shape with the same axis names, useful to test hierarchy on one process.
    devices: the devices to use; defaults to all global devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  # Group devices by process so that each process owns contiguous rows of the global batch.
  devices.sort(key=lambda d: (d.process_index, d.id))
  if layout == "data":
    return Mesh(np.array(devices), ("data",), axis_types=(AxisType.Auto,))
  if layout == "hosts":
    rows = jax.process_count()
    shape = (rows, len(devices) // rows)
  else:
    try:
      shape = tuple(int(n) for n in layout.split("x"))
    except ValueError:
      shape = ()
    if len(shape) != 2 or min(shape) < 1:
      raise ConfigError(f"config key 'mesh': {layout!r} is not 'data', 'hosts' or 'RxC'")
  if shape[0] * shape[1] != len(devices):
    raise ConfigError(f"config key 'mesh': {layout!r} needs {shape[0] * shape[1]} devices, "
                      f"there are {len(devices)}")
  grid = np.array(devices).reshape(shape)
  if layout == "hosts" and any(len({d.process_index for d in row}) > 1 for row in grid):
    raise ConfigError("config key 'mesh': 'hosts' needs the same number of devices per process")
  return Mesh(grid, ("hosts", "local"), axis_types=(AxisType.Auto, AxisType.Auto))


def data_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch is split over (all of them, for data parallelism)."""
  return tuple(mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every mesh axis."""
  return NamedSharding(mesh, P(data_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
