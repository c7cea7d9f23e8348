"""GPUs for `python -m ddpo_jax.bench memory --gpu=h100-80gb:8`: the GPU compiler, without a GPU.

With jax's CUDA plugin installed (`pip install "jax[cuda12]"`, several GB of NVIDIA libraries),
XLA compiles for a GPU that the machine does not have when it is given the GPU's description
(a stream_executor GpuTargetConfigProto, in text: `target_config`) and a device count
(`jax.experimental.topologies.get_topology_desc(platform="cuda", topology="1x1xN",
target_config=...)`): the devices are compile-only, so the memory planner gets XLA:GPU's own
buffer assignment (`memory_analysis`) for that many GPUs of one host, cuDNN attention included.

What it cannot give: times. Without a device XLA:GPU returns no cost analysis, and nothing
runs; on the GPU itself, `--platform=native` compiles for the real device and
`python -m benchmarks` measures. Multi-host GPU meshes are not planned here.

Everything here but `gpu_devices` is a pure function of its arguments.
"""

from __future__ import annotations

import dataclasses
import os
import re

MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Gpu:
  """What XLA:GPU needs to know of a GPU to compile for it (the GpuDeviceInfoProto's fields).

  Attributes:
    name: as --gpu spells it.
    description: the device name that CUDA reports.
    memory_bytes: device memory that CUDA reports (total, as nvidia-smi shows it).
    compute_capability: (major, minor).
    cores: streaming multiprocessors.
    clock_ghz: boost clock.
    memory_bandwidth: bytes/s.
    l2_cache_bytes, shared_memory_per_core, shared_memory_per_block_optin: bytes.
  """

  name: str
  description: str
  memory_bytes: int
  compute_capability: tuple[int, int]
  cores: int
  clock_ghz: float
  memory_bandwidth: float
  l2_cache_bytes: int
  shared_memory_per_core: int
  shared_memory_per_block_optin: int


# NVIDIA's data sheets and CUDA programming guide (compute capability tables):
#   A100 SXM4 80GB: sm_80, 108 SMs, 1.41 GHz, 2039 GB/s, 40 MB L2, 164 KB shared memory per SM (163 per block)
#   H100 SXM5 80GB: sm_90, 132 SMs, 1.98 GHz, 3.35 TB/s, 50 MB L2, 228 KB shared memory per SM (227 per block)
#   H200 SXM 141GB: sm_90, 132 SMs, 1.98 GHz, 4.8 TB/s, 50 MB L2, as the H100 but its memory
# Memory sizes as CUDA reports them (nvidia-smi's MiB): 81920, 81559 and 143771.
GPUS = {
  gpu.name: gpu
  for gpu in (
    Gpu("a100-80gb", "NVIDIA A100-SXM4-80GB", 81920 * MiB, (8, 0), 108, 1.41, 2039e9, 40 * MiB, 167936, 166912),
    Gpu("h100-80gb", "NVIDIA H100 80GB HBM3", 81559 * MiB, (9, 0), 132, 1.98, 3350e9, 50 * MiB, 233472, 232448),
    Gpu("h200", "NVIDIA H200", 143771 * MiB, (9, 0), 132, 1.98, 4800e9, 50 * MiB, 233472, 232448),
  )
}
# The cuDNN version XLA:GPU assumes when it decides which attention fusions cuDNN can run.
CUDNN_VERSION = (9, 8, 0)


def target_config(gpu: Gpu) -> str:
  """The GpuTargetConfigProto of `gpu`, in protobuf text format."""
  major, minor = gpu.compute_capability
  info = {
    "threads_per_block_limit": 1024,
    "threads_per_warp": 32,
    "shared_memory_per_block": 48 * 1024,
    "shared_memory_per_core": gpu.shared_memory_per_core,
    "threads_per_core_limit": 2048,
    "core_count": gpu.cores,
    "fpus_per_core": 64 if major == 8 else 128,
    "block_dim_limit_x": 2**31 - 1,
    "block_dim_limit_y": 65535,
    "block_dim_limit_z": 65535,
    "memory_bandwidth": int(gpu.memory_bandwidth),
    "l2_cache_size": gpu.l2_cache_bytes,
    "clock_rate_ghz": gpu.clock_ghz,
    "device_memory_size": gpu.memory_bytes,
    "shared_memory_per_block_optin": gpu.shared_memory_per_block_optin,
    "registers_per_core_limit": 65536,
    "registers_per_block_limit": 65536,
  }
  lines = ["gpu_device_info {"]
  lines += [f"  {key}: {value}" for key, value in info.items()]
  lines += [f"  cuda_compute_capability {{ major: {major} minor: {minor} }}", "}"]
  cudnn = dict(zip(("major", "minor", "patch"), CUDNN_VERSION))
  lines += [
    'platform_name: "CUDA"',
    "dnn_version_info { " + " ".join(f"{k}: {v}" for k, v in cudnn.items()) + " }",
    f'device_description_str: "{gpu.description}"',
  ]
  return "\n".join(lines) + "\n"


def parse_gpus(value: str) -> list[tuple[Gpu, int]]:
  """The (Gpu, count) of each comma-separated NAME[:COUNT] of --gpu (count 1 by default); ValueError naming the
  flag and the fix."""
  entries = [v.strip() for v in value.split(",") if v.strip()]
  if not entries:
    raise ValueError("--gpu: give NAME[:COUNT], e.g. --gpu=h100-80gb:8.")
  parsed = []
  for entry in entries:
    match = re.fullmatch(r"([a-z0-9-]+)(?::(\d+))?", entry)
    if not match or match.group(1) not in GPUS:
      raise ValueError(f"--gpu: {entry!r} is not NAME[:COUNT] of a known GPU ({', '.join(GPUS)}).")
    count = int(match.group(2) or 1)
    if not 1 <= count <= 16:
      raise ValueError(f"--gpu: {entry!r} asks for {count} GPUs; one host's 1 to 16.")
    parsed.append((GPUS[match.group(1)], count))
  return parsed


def gpu_devices(gpu: Gpu, count: int) -> list:
  """`count` compile-only devices of `gpu` on one host (ValueError naming --gpu without jax's CUDA plugin)."""
  from jax.experimental import topologies

  # The plugin checks the CUDA libraries against a driver when the CUDA backend is asked for;
  # compiling for compile-only devices needs no driver.
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  try:
    topology = topologies.get_topology_desc(
      topology_name="", platform="cuda", topology=f"1x1x{count}", target_config=target_config(gpu)
    )
  except (NotImplementedError, RuntimeError) as error:  # no CUDA plugin; XLA's JaxRuntimeError (a RuntimeError)
    raise ValueError(
      f"--gpu={gpu.name}:{count}: jax cannot compile for CUDA here ({error}); "
      'install its CUDA plugin: pip install -e ".[cuda]" (jax[cuda12]; no GPU needed).'
    ) from error
  return list(topology.devices)
