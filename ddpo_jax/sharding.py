"""The device mesh, shardings of batches and params, and host<->global arrays.

The mesh has two axes: "data" (replicas) and "fsdp" (params sharded); a batch
is split over both. One code path serves 1 device, 8 CPU devices and a pod.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
  """Resolves a -1 entry; raises ValueError naming the setting if it cannot."""
  if data == -1 and fsdp == -1:
    raise ValueError("config.mesh.data and config.mesh.fsdp are both -1; set at most one to -1.")
  if data == -1:
    data = num_devices // fsdp if fsdp > 0 and num_devices % fsdp == 0 else 0
  if fsdp == -1:
    fsdp = num_devices // data if data > 0 and num_devices % data == 0 else 0
  if data <= 0 or fsdp <= 0 or data * fsdp != num_devices:
    raise ValueError(
      f"config.mesh.data x config.mesh.fsdp must equal the {num_devices} devices; "
      "set one of them to -1 to take the rest."
    )
  return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(data, fsdp, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch(mesh: Mesh) -> NamedSharding:
  """Leading axis split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_axis(mesh: Mesh, axis: int) -> NamedSharding:
  """Axis `axis` split over every device, the others replicated."""
  return NamedSharding(mesh, P(*([None] * axis), BATCH_AXES))


def num_batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def host_to_global(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """This process's rows of a batch -> one global array sharded by `sharding`."""
  return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def local_rows(array: jax.Array) -> np.ndarray:
  """The rows of a batch-sharded global array that this process holds, in order."""
  if array.is_fully_addressable:
    return np.asarray(array)
  shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
  rows, seen = [], set()
  for shard in shards:
    start = shard.index[0].start or 0
    if start not in seen:
      seen.add(start)
      rows.append(np.asarray(shard.data))
  return np.concatenate(rows)
