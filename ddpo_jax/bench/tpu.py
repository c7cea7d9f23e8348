"""TPU slices for `python -m ddpo_jax.bench memory --topology=...`: chips, the TPU compiler, rooflines.

With libtpu installed, jax compiles for a TPU slice it does not have
(`jax.experimental.topologies.get_topology_desc`): the slice's devices are
compile-only, so the memory planner gets the TPU compiler's own buffer
assignment (`memory_analysis`) and operation counts (`cost_analysis`) on
this CPU-only machine. Nothing runs, so nothing is timed: a call's time is a
roofline, max(FLOPs / peak FLOP/s, bytes accessed / HBM bandwidth) per chip.

Everything here but `topology_devices` is a pure function of its arguments.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Any
from typing import Sequence

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation's figures per chip.

  Attributes:
    name: the generation as topology names spell it ("v5e").
    hbm_bytes: HBM per chip, bytes.
    peak_flops: peak bfloat16 FLOP/s per chip.
    hbm_bandwidth: HBM bytes/s per chip.
    cores: TensorCores per chip; with 2 (v4, v5p) a jax device is one chip in the "megacore"
      configuration, as on Cloud TPU VMs (`topology_devices` asks for it).
  """

  name: str
  hbm_bytes: int
  peak_flops: float
  hbm_bandwidth: float
  cores: int = 1

  def per_device(self, device_cores: int) -> Chip:
    """The share of one chip that a device of `device_cores` TensorCores has (itself for a whole chip)."""
    share = device_cores / self.cores
    if share == 1:
      return self
    return Chip(self.name, int(self.hbm_bytes * share), self.peak_flops * share, self.hbm_bandwidth * share, 1)


# Google's Cloud TPU documentation, "Key chip specifications" of each version:
#   v4  https://cloud.google.com/tpu/docs/v4   275 TFLOP/s (bf16), 32 GiB HBM2, 1200 GB/s
#   v5e https://cloud.google.com/tpu/docs/v5e  197 TFLOP/s (bf16), 16 GB HBM2,  819 GB/s
#   v5p https://cloud.google.com/tpu/docs/v5p  459 TFLOP/s (bf16), 95 GB HBM2e, 2765 GB/s
#   v6e https://cloud.google.com/tpu/docs/v6e  918 TFLOP/s (bf16), 32 GB HBM,   1640 GB/s (1638 in its latest revision)
# The pages write GB for the capacities of v5e, v5p and v6e (GiB for v4); taken as GiB, as the chips
# report them (e.g. a v5e's 16 GiB). Used only where the device does not report its own HBM.
CHIPS = {
  "v4": Chip("v4", 32 * GiB, 275e12, 1200e9, cores=2),
  "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9),
  "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, cores=2),
  "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9),
}
# jax's device_kind of each generation's devices -> its CHIPS key.
DEVICE_KINDS = {
  "tpu v4": "v4",
  "tpu v5 lite": "v5e",
  "tpu v5e": "v5e",
  "tpu v5": "v5p",
  "tpu v5p": "v5p",
  "tpu v6 lite": "v6e",
  "tpu v6e": "v6e",
}
# A topology name's generation ("v5e:2x4" -> "v5e"; "v5litepod" is v5e's product name) -> its CHIPS key.
TOPOLOGY_GENERATIONS = {"v4": "v4", "v5e": "v5e", "v5litepod": "v5e", "v5p": "v5p", "v6e": "v6e"}

MISSING_COMPILER = (
  "--topology compiles with the TPU compiler (libtpu), which is not installed here: "
  "pip install 'jax[tpu]==0.10.2' (or this project's extra: pip install -e '.[tpu]'); "
  "without it, --target compiles with XLA:CPU on fake devices."
)


# What libtpu takes as a topology name (its own error message quotes this regex): GENERATION, one of "=_:", SHAPE.
TOPOLOGY_NAME = re.compile(r"^([a-zA-Z0-9_ ]+)[=_:]([0-9x]+)(_twisted|_untwisted)?$")


def parse_topologies(text: str) -> list[str]:
  """'v5e:2x4, v4:2x2x1' -> ['v5e:2x4', 'v4:2x2x1']; ValueError naming --topology if a name is malformed.

  A name is GENERATION:SHAPE as jax.experimental.topologies takes it (TOPOLOGY_NAME);
  whether the slice exists is the TPU compiler's to say (`topology_devices`).
  """
  names = [name.strip() for name in text.split(",") if name.strip()]
  if not names:
    raise ValueError("--topology is empty: give slices such as --topology=v5e:2x4 or --topology=v5e:2x4,v4:2x2x1.")
  for name in names:
    if not TOPOLOGY_NAME.match(name):
      raise ValueError(
        f"--topology: {name!r} is not a slice name GENERATION:SHAPE such as 'v5e:2x4' (v5litepod-8), "
        "'v4:2x2x1' (v4-8), 'v5p:2x2x1' (v5p-8) or 'v6e:2x4' (v6e-8); an accelerator type such as 'v5e-8' is not one."
      )
  return names


def generation(topology: str) -> str:
  """A topology name's generation: 'v5e:2x4' -> 'v5e'."""
  match = TOPOLOGY_NAME.match(topology.strip())
  return (match.group(1) if match else topology.partition(":")[0]).strip().lower()


def tpu_compiler_installed() -> bool:
  """Whether libtpu, the TPU compiler that --topology needs, can be imported."""
  return importlib.util.find_spec("libtpu") is not None


def chip_for(device_kind: str = "", topology: str = "") -> Chip | None:
  """The Chip of a device's `device_kind` ("TPU v5 lite"), else of a topology name's generation; None if unknown."""
  name = DEVICE_KINDS.get(device_kind.strip().lower())
  if name is None and topology:
    name = TOPOLOGY_GENERATIONS.get(generation(topology))
  return CHIPS.get(name) if name else None


def device_hbm_bytes(device: Any) -> int | None:
  """The HBM a device reports (memory_stats' bytes_limit), or None: compile-only devices report none."""
  try:
    stats = device.memory_stats()
  except Exception:  # compile-only devices raise (UNIMPLEMENTED); some backends return None
    return None
  limit = (stats or {}).get("bytes_limit")
  return int(limit) if limit else None


def topology_devices(name: str) -> list:
  """The compile-only devices of the TPU slice `name` (ValueError naming --topology if jax refuses it).

  On chips of two TensorCores (v4, v5p) one device per chip ("megacore", as Cloud TPU VMs run
  them): libtpu's default for a v4 slice is one device per core.
  """
  from jax.experimental import topologies

  # libtpu takes a lockfile that keeps a second process off a machine's chips; compiling for
  # compile-only devices opens no chip, so planners may run side by side (and beside a run).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  chip = CHIPS.get(TOPOLOGY_GENERATIONS.get(generation(name), ""))
  options = {"chip_config_name": "megacore"} if chip is not None and chip.cores > 1 else {}
  try:
    return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **options).devices)
  except Exception as error:  # jax raises RuntimeError/JaxRuntimeError/ValueError for unknown slices
    if "lockfile" in str(error):
      raise ValueError(
        f"--topology={name}: another process holds libtpu ({error}); set ALLOW_MULTIPLE_LIBTPU_LOAD=1, or run "
        "one at a time."
      ) from error
    raise ValueError(
      f"--topology: the TPU compiler does not know the slice {name!r} ({error}); "
      "give GENERATION:SHAPE such as 'v5e:2x4', 'v4:2x2x1', 'v5p:2x2x1' or 'v6e:2x4'."
    ) from error


# ----------------------------------------------------------------------------
# Costs and rooflines.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cost:
  """One call's work per device: floating-point operations and HBM bytes read and written."""

  flops: float
  bytes_accessed: float

  def __add__(self, other: Cost) -> Cost:
    return Cost(self.flops + other.flops, self.bytes_accessed + other.bytes_accessed)

  def __mul__(self, factor: float) -> Cost:
    return Cost(self.flops * factor, self.bytes_accessed * factor)

  __rmul__ = __mul__


def cost_of(analysis: Any) -> Cost:
  """The Cost of `compiled.cost_analysis()` (a dict, or a list of one dict on older jax; None: zero)."""
  if isinstance(analysis, Sequence) and not isinstance(analysis, dict):
    analysis = analysis[0] if analysis else None
  analysis = analysis or {}
  return Cost(float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0)))


@dataclasses.dataclass(frozen=True)
class LoopCost:
  """A call's Cost from its program's cost analysis, counting its loop's body once, and that body's own.

  Attributes:
    program: the compiled program's Cost (the loop body in it once).
    body: the loop body's Cost, compiled alone (zero when the loop runs once).
    trips: how many times the loop runs per call.
  """

  program: Cost
  body: Cost
  trips: int

  @property
  def total(self) -> Cost:
    return loop_cost(self.program, self.body, self.trips)


def loop_cost(whole: Cost, body: Cost, trips: int) -> Cost:
  """The Cost of a program whose loop runs `trips` times, from its cost analysis `whole` and the
  loop body's own `body`.

  The TPU compiler's cost analysis counts a while loop's body once, whatever its trip count
  (libtpu 0.0.42.1: a lax.scan of one [256, 512] x [512, 512] matmul has 1.34e8 FLOPs for 2, 4,
  10 and 50 steps alike; `tests/test_bench_tpu.py` checks it).
  """
  if trips < 1:
    raise ValueError(f"a loop runs at least once, not {trips} times")
  return whole + body * (trips - 1)


# Pallas kernels of jax's TPU flash attention whose pallas_call carries no cost estimate (jax 0.10.2: the two
# backward kernels; the forward one has one), which the TPU compiler's cost analysis then counts as 0 FLOPs
# (measured: the gradient of a flash attention counts the forward's FLOPs only). Their name scope -> matmul FLOPs
# per b·h·T·S·d of their operands q [b, h, T, d] and k [b, h, S, d]: dkv recomputes q kᵀ and computes pᵀ dO,
# dO vᵀ and dSᵀ q (4 matmuls of 2 T S d), dq recomputes q kᵀ and computes dO vᵀ and dS k (3).
UNCOSTED_KERNELS = {"flash_mha_bwd_dkv": 8, "flash_mha_bwd_dq": 6}


def uncosted_kernel_flops(jaxpr: Any) -> tuple[float, int]:
  """(FLOPs of the UNCOSTED_KERNELS in `jaxpr`, number of other Pallas kernels without a cost estimate).

  Walks every sub-jaxpr, each counted once as the cost analysis counts loop bodies; inside a
  shard_map the operands have one device's shapes, so the FLOPs are per device.
  """
  from jax.extend import core

  flops, unknown = 0.0, 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call" and eqn.params.get("cost_estimate") is None:
      scope = str(getattr(eqn.source_info, "name_stack", ""))
      per_element = next((n for name, n in UNCOSTED_KERNELS.items() if name in scope), None)
      if per_element is None:
        unknown += 1
        continue
      (b, h, t, d), s = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape[2]
      flops += per_element * b * h * t * s * d
  for sub in core.subjaxprs(jaxpr):
    sub_flops, sub_unknown = uncosted_kernel_flops(sub)
    flops, unknown = flops + sub_flops, unknown + sub_unknown
  return flops, unknown


@dataclasses.dataclass(frozen=True)
class Roofline:
  """A call's time on one chip if it ran at peak FLOP/s or at full HBM bandwidth, whichever takes longer.

  Attributes:
    seconds: max(compute_seconds, memory_seconds).
    bound: "compute" or "memory", whichever term is the larger.
  """

  seconds: float
  compute_seconds: float
  memory_seconds: float
  bound: str


def roofline(cost: Cost, chip: Chip) -> Roofline:
  """max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) of one device's `cost` on `chip`."""
  compute = cost.flops / chip.peak_flops
  memory = cost.bytes_accessed / chip.hbm_bandwidth
  return Roofline(max(compute, memory), compute, memory, "compute" if compute >= memory else "memory")


def epoch_seconds(sampling_call: float, sampling_calls: int, optimizer_step: float, optimizer_steps: int) -> float:
  """An epoch's device time: its sampling calls and its optimiser steps, one after another (seconds)."""
  return sampling_calls * sampling_call + optimizer_steps * optimizer_step
