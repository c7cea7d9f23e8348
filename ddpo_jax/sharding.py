"""The device mesh, shardings of batches and params, and host<->global arrays.

The mesh has two axes: "data" (replicas) and "fsdp" (params sharded); a batch
is split over both. One code path serves 1 device, 8 CPU devices and a pod.

Params are partitioned by rules over their paths (big_vision's way for modules
without sharding annotations, such as diffusers' UNet): the first rule whose
regex matches a leaf's path ("down_blocks_0/resnets_0/conv1/kernel", or for
optimizer state ".../mu/down_blocks_0/...") decides "fsdp" (shard the leaf's
largest dimension that the fsdp axis divides) or "replicate". Leaves below
`min_size` elements are replicated whatever the rules say: gathering them
costs more than their memory.
"""

from __future__ import annotations

import os
import re
from typing import Any
from typing import Sequence

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


# The default rules: shard every big weight, replicate the rest.
DEFAULT_RULES = ((r".*", "fsdp"),)


def leaf_spec(shape: Sequence[int], fsdp_size: int, action: str, min_size: int) -> P:
  """The PartitionSpec of one leaf: its largest fsdp-divisible dim over "fsdp"."""
  if action == "replicate" or fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  if action != "fsdp":
    raise ValueError(f"partition rule action {action!r} is unknown; use 'fsdp' or 'replicate'.")
  candidates = [d for d in range(len(shape)) if shape[d] % fsdp_size == 0]
  if not candidates:
    return P()
  dim = max(candidates, key=lambda d: (shape[d], -d))
  return P(*([None] * dim), "fsdp")


def path_string(path) -> str:
  """A tree path as "a/b/c" (dict keys, attribute names and indices alike)."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
  return "/".join(parts)


def tree_shardings(
  tree: Any, mesh: Mesh, rules: Sequence[tuple[str, str]] = DEFAULT_RULES, min_size: int = 2**14
) -> Any:
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs).

  Args:
    rules: (regex, "fsdp" | "replicate") pairs; the first whose regex is found
      in the leaf's path applies; no match means "replicate".
    min_size: leaves with fewer elements are replicated.
  """
  compiled = [(re.compile(pattern), action) for pattern, action in rules]
  fsdp_size = mesh.shape["fsdp"]

  def one(path, leaf):
    name = path_string(path)
    action = next((a for pattern, a in compiled if pattern.search(name)), "replicate")
    return NamedSharding(mesh, leaf_spec(np.shape(leaf), fsdp_size, action, min_size))

  return jax.tree_util.tree_map_with_path(one, tree)


def sharded_fraction(tree: Any, shardings: Any) -> float:
  """Fraction of `tree`'s bytes whose sharding splits them over some axis."""
  total = sharded = 0
  for leaf, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    size = int(np.prod(np.shape(leaf), dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    total += size
    if any(axis is not None for axis in spec.spec):
      sharded += size
  return sharded / max(total, 1)


def bytes_of(tree: Any) -> int:
  """Total bytes of `tree`'s leaves (arrays or ShapeDtypeStructs)."""
  return sum(int(np.prod(np.shape(x), dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def bytes_per_device(tree: Any, shardings: Any) -> int:
  """Bytes of `tree` that each device holds under `shardings`."""
  total = 0
  for leaf, named in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shard = named.shard_shape(tuple(np.shape(leaf)))
    total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


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


def from_global_rows(values: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from the whole of its values, known on every process."""
  values = np.asarray(values)
  return jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])


def allgather_rows(local: np.ndarray) -> np.ndarray:
  """[P, ...]: every process's `local` (same shape on all), in process order."""
  local = np.asarray(local)
  if jax.process_count() == 1:
    return local[None]
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(local, tiled=False))


def allgather_strings(local: Sequence[str]) -> list[list[str]]:
  """Every process's list of strings (same length on all), in process order."""
  if jax.process_count() == 1:
    return [list(local)]
  encoded = [s.encode("utf-8") for s in local]
  width = int(allgather_rows(np.array(max((len(e) for e in encoded), default=0), np.int32)).max())
  padded = np.zeros((len(encoded), max(width, 1)), np.uint8)
  lengths = np.array([len(e) for e in encoded], np.int32)
  for row, e in enumerate(encoded):
    padded[row, : len(e)] = np.frombuffer(e, np.uint8)
  all_padded, all_lengths = allgather_rows(padded), allgather_rows(lengths)
  return [
    [bytes(row[:n]).decode("utf-8") for row, n in zip(host_rows, host_lengths)]
    for host_rows, host_lengths in zip(all_padded, all_lengths)
  ]


def gather_rows(local: np.ndarray, num_batches: int) -> np.ndarray:
  """Every process's per-sample values [N], in the rows' global order.

  A global batch holds process 0's rows, then process 1's, ...; an epoch is
  its batches one after another. Each process passes its own [n], batch by
  batch (n = num_batches * rows per process).
  """
  rows = allgather_rows(np.asarray(local).reshape(num_batches, -1))  # [P, batches, b]
  return np.swapaxes(rows, 0, 1).reshape(-1)


def gather_prompts(local_prompts: Sequence[str], num_batches: int) -> list[str]:
  """`gather_rows` for strings."""
  per_process = allgather_strings(local_prompts)
  local = len(local_prompts) // num_batches
  return [host[b * local + i] for b in range(num_batches) for host in per_process for i in range(local)]


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on at least one."""
  return bool(allgather_rows(np.array(flag, np.int32)).max())


def sync_processes(name: str) -> None:
  """A barrier across processes (none with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def initialize_distributed(
  mode: str = "auto", coordinator_address: str = "", num_processes: int = 0, process_id: int = -1
) -> bool:
  """Starts jax.distributed when the run spans several processes.

  Args:
    mode: "off"; "on" (always; on Cloud TPU pods and SLURM jax finds the
      coordinator itself); "auto" (when a coordinator is given or the host is
      one worker of a multi-host Cloud TPU slice).
    coordinator_address, num_processes, process_id: explicit settings (GPU
      clusters, or several CPU processes on one machine for tests).

  Returns whether jax.distributed was initialised. Call before any other jax use.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"--distributed={mode!r}: choose auto, on or off.")
  tpu_workers = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if mode == "off" or (mode == "auto" and not coordinator_address and len(tpu_workers) < 2):
    return False
  kwargs = {}
  if coordinator_address:
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
  # Cross-process collectives of the CPU backend (tests, CPU clusters).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  return True
