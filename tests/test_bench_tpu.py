"""`python -m ddpo_jax.bench memory --topology=...`: chips, rooflines and the TPU compiler's plan of the tiny config.

The pure parts run anywhere; the compiled ones need libtpu (the TPU compiler, which runs on this CPU-only
machine for a slice's compile-only devices) and are skipped without it.
"""

import dataclasses
import importlib.util
import json
import os

from absl import app
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpo_jax import config_utils
from ddpo_jax import steps
from ddpo_jax.bench import memory
from ddpo_jax.bench import tpu
from tests.conftest import TESTS_TRAINING

GiB = tpu.GiB
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None, reason="needs libtpu (compiles for a TPU topology)"
)


def small_config(**overrides):
  """configs/compress.py:tiny cut down for 4 chips: 2 sampling calls of 8 samples of 2 steps (32 transitions),
  optimiser steps of 2 minibatches of 8 transitions (2 per inner epoch)."""
  config = config_utils.get_config(os.path.join(REPO, "configs/compress.py:tiny"))
  values = {
    **TESTS_TRAINING,
    "sample.num_steps": 2,
    "sample.batch_size": 8,
    "sample.num_batches_per_epoch": 2,
    "train.batch_size": 8,
    "train.gradient_accumulation_steps": 2,
  }
  return memory.with_overrides(config, dict(values, **overrides))


# ----------------------------------------------------------------------------
# Pure functions: no compiler.
# ----------------------------------------------------------------------------


def test_roofline_is_the_larger_of_compute_and_memory_time():
  chip = tpu.Chip("test", 16 * GiB, peak_flops=100e12, hbm_bandwidth=1e12)
  compute_bound = tpu.roofline(tpu.Cost(flops=50e12, bytes_accessed=0.2e12), chip)
  assert (compute_bound.compute_seconds, compute_bound.memory_seconds) == pytest.approx((0.5, 0.2))
  assert compute_bound.seconds == pytest.approx(0.5) and compute_bound.bound == "compute"
  memory_bound = tpu.roofline(tpu.Cost(flops=1e12, bytes_accessed=3e12), chip)
  assert memory_bound.seconds == pytest.approx(3.0) and memory_bound.bound == "memory"
  # One second of a v5e's peak either way: 197 TFLOP, 819 GB.
  v5e = tpu.roofline(tpu.Cost(197e12, 819e9), tpu.CHIPS["v5e"])
  assert v5e.compute_seconds == pytest.approx(1.0) and v5e.memory_seconds == pytest.approx(1.0)


def test_loop_cost_counts_the_body_per_trip():
  whole, body = tpu.Cost(10.0, 100.0), tpu.Cost(3.0, 20.0)
  assert tpu.loop_cost(whole, body, 5) == tpu.Cost(10 + 4 * 3, 100 + 4 * 20)
  assert tpu.loop_cost(whole, body, 1) == whole
  with pytest.raises(ValueError, match="at least once"):
    tpu.loop_cost(whole, body, 0)
  assert tpu.cost_of({"flops": 7.0, "bytes accessed": 9.0, "utilization": 1.0}) == tpu.Cost(7.0, 9.0)
  assert tpu.cost_of([{"flops": 7.0}]) == tpu.Cost(7.0, 0.0) and tpu.cost_of(None) == tpu.Cost(0.0, 0.0)


def test_epoch_time_from_the_config():
  config = small_config(**{"train.num_inner_epochs": 3})
  # 16 samples x 2 kept steps = 32 transitions per inner epoch, 8 x 2 per optimiser step: 2 steps, 3 times.
  assert memory.epoch_composition(config) == (2, 6)

  class Costs:  # a Setting's cost methods on 4 devices, by hand: a program's cost, its loop body's, the loop's trips
    num_devices = 4

    def sample(self, per_device):
      return memory.Memory(0, 0, 0, 0, refused="RESOURCE_EXHAUSTED" if per_device > 2 else ""), {}

    def train(self, per_device):
      return memory.Memory(0, 0, 0, 0), 0

    def sampling_call_cost(self, per_device):
      return tpu.LoopCost(tpu.Cost(1e12 * per_device, 0.5e9), tpu.Cost(0.5e12 * per_device, 0.25e9), 3)

    def optimizer_step_cost(self, per_device):
      return tpu.LoopCost(tpu.Cost(1e12, 8.19e9 * per_device), tpu.Cost(0.0, 0.0), 1)

  chip = tpu.CHIPS["v5e"]
  record = memory.time_record(config, chip, Costs(), sample_per_device=2, train_per_device=2)
  call, step = 4e12 / 197e12, 2 * 8.19e9 / 819e9  # compute-bound call, memory-bound step
  assert record["sampling_call"]["seconds"] == pytest.approx(call) and record["sampling_call"]["bound"] == "compute"
  assert record["optimizer_step"]["seconds"] == pytest.approx(step) and record["optimizer_step"]["bound"] == "memory"
  assert record["epoch_seconds"] == pytest.approx(2 * call + 6 * step)
  assert record["samples_per_second"] == pytest.approx(16 / (2 * call + 6 * step))
  assert record["sampling_call"]["loop_trips"] == 3 and record["sampling_call"]["loop_body"]["flops"] == 1e12
  assert "(compute)" in memory._time_columns({"time": record}) and memory._duration(0.0203) == "20.3 ms"

  # A setting that does not fit as configured is timed at the largest batches that fit: sampling calls of 1 per
  # device, 4 of them per epoch (16 samples); none when a phase fits at no batch or its program was refused.
  phases = {"sample": {"batch_per_device": 4}, "train": {"batch_per_device": 2}}
  fit = {"sample_batch_per_device": 1, "train_batch_per_device": 2}
  timed = memory.timed_batches_record(config, chip, Costs(), dict(phases, fits=False, largest_fitting=fit))
  assert (timed["sample_batch_per_device"], timed["sampling_calls_per_epoch"]) == (1, 4)
  assert timed["sampling_call"]["seconds"] == pytest.approx(2e12 / 197e12)
  assert timed["epoch_seconds"] == pytest.approx(4 * 2e12 / 197e12 + 6 * step)
  no_fit = dict(fit, sample_batch_per_device=None)
  assert memory.timed_batches_record(config, chip, Costs(), dict(phases, fits=False, largest_fitting=no_fit)) is None
  assert memory.timed_batches_record(config, chip, Costs(), dict(phases, fits=True, largest_fitting=None)) is None


def test_topologies_and_chips():
  assert tpu.parse_topologies(" v5e:2x4, v4:2x2x1 ,") == ["v5e:2x4", "v4:2x2x1"]
  for bad in ("", "v5e-8", "v5e:", "v5e:2xfour"):
    with pytest.raises(ValueError, match="--topology"):
      tpu.parse_topologies(bad)
  assert tpu.chip_for("TPU v5 lite") is tpu.CHIPS["v5e"] and tpu.chip_for("TPU v4") is tpu.CHIPS["v4"]
  assert tpu.chip_for("", "v6e:2x4") is tpu.CHIPS["v6e"] and tpu.chip_for("TPU v5", "v5p:2x2x1") is tpu.CHIPS["v5p"]
  assert tpu.chip_for("cpu", "gpu:1") is None


def test_topology_flags_name_the_fix_before_anything_compiles(monkeypatch):
  monkeypatch.setattr(tpu, "tpu_compiler_installed", lambda: False)
  with pytest.raises(app.UsageError, match=r"pip install 'jax\[tpu\]==0\.10\.2'.*pip install -e '\.\[tpu\]'"):
    memory.check_topology_flags("v5e:2x4", target_given=False, num_devices=0, platform="cpu")
  with pytest.raises(app.UsageError, match="drop --target"):
    memory.check_topology_flags("v5e:2x4", target_given=True, num_devices=0, platform="cpu")
  monkeypatch.setattr(tpu, "tpu_compiler_installed", lambda: True)
  with pytest.raises(app.UsageError, match="not a slice name"):
    memory.check_topology_flags("v5e-8", target_given=False, num_devices=0, platform="cpu")
  assert memory.check_topology_flags("v5e:2x2", False, 0, "cpu") == ["v5e:2x2"]


# ----------------------------------------------------------------------------
# The TPU compiler (libtpu) on a v5e 2x2 slice's compile-only devices.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v5e_slice():
  devices = tpu.topology_devices("v5e:2x2")
  return memory.topology_target("v5e:2x2", devices), devices


@pytest.fixture(scope="module")
def v5e_setting(v5e_slice):
  """small_config() with one minibatch per optimiser step (its accumulation body is then not compiled: 10 s) on the
  v5e 2x2 slice, and its report, compiled (no search: it fits)."""
  target, devices = v5e_slice
  config = small_config(**{"train.gradient_accumulation_steps": 1})
  setting = memory.Setting(config, devices, compile_=True, backend="tpu")
  return setting, memory.measure(config, target, devices, compile_=True, search=False, setting=setting)


@needs_libtpu
def test_tpu_cost_analysis_counts_a_loop_body_once(v5e_slice):
  """What tpu.loop_cost assumes: a lax.scan's cost analysis is its body's, whatever its length."""
  _, devices = v5e_slice
  replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(devices), ("d",)), jax.sharding.PartitionSpec())
  x = jax.ShapeDtypeStruct((256, 512), jnp.float32, sharding=replicated)
  w = jax.ShapeDtypeStruct((512, 512), jnp.float32, sharding=replicated)

  def flops(length):
    scan = lambda x, w: jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=length)[0]
    return tpu.cost_of(jax.jit(scan).lower(x, w).compile().cost_analysis()).flops

  one_matmul = 2 * 256 * 512 * 512
  assert flops(2) == flops(10) and one_matmul <= flops(10) < 2 * one_matmul


@needs_libtpu
def test_tiny_config_compiles_for_a_v5e_slice(v5e_slice, v5e_setting):
  target, _ = v5e_slice
  assert (target.num_devices, target.chip, target.hbm_bytes) == (4, tpu.CHIPS["v5e"], 16 * GiB)
  setting, record = v5e_setting
  assert record["estimate"] == "XLA:TPU compiled" and record["attention"] == "flash"
  b, s, t = record["bytes_per_device"], record["sample"], record["train"]
  for phase in (s, t):
    assert phase["argument"] > 0 and phase["output"] > 0 and phase["temp"] > 0
    # The larger of the arguments' bytes and the compiled (tile-padded, unread params pruned) arguments.
    assert 0 < phase["compiled_argument"] <= phase["argument"]
  assert t["alias"] > 0  # the donated train state
  sampler = s["argument"] + s["output"] - s["alias"] + s["temp"]
  step = t["argument"] + t["output"] - t["alias"] + t["temp"]
  assert s["peak"] == sampler + b["opt_state"] + (s["num_batches_per_epoch"] - 1) * b["sample_outputs"]
  assert t["peak"] == step + b["frozen_params"] + b["epoch_buffers"]
  assert record["peak_bytes"] == max(s["peak"], t["peak"]) and record["verdict"] == "fits"

  time = record["time"]
  assert (time["sampling_calls_per_epoch"], time["optimizer_steps_per_epoch"]) == (2, 4)
  chip = tpu.CHIPS["v5e"]
  for phase in (time["sampling_call"], time["optimizer_step"]):
    assert phase["flops"] > 0 and phase["bytes_accessed"] > 0
    assert phase["seconds"] == max(phase["flops"] / chip.peak_flops, phase["bytes_accessed"] / chip.hbm_bandwidth)
  call, step = time["sampling_call"]["seconds"], time["optimizer_step"]["seconds"]
  assert time["epoch_seconds"] == pytest.approx(2 * call + 4 * step)
  # A sampling call: the sampler's program (text encoder, the loop counting one denoising step, VAE decoder) and
  # the loop's second step, the denoising step compiled alone.
  sampling = time["sampling_call"]
  assert sampling["program"]["flops"] == setting.sample(2)[0].cost.flops and sampling["loop_trips"] == 2
  assert 0 < sampling["loop_body"]["flops"] < sampling["program"]["flops"]
  assert sampling["flops"] == sampling["program"]["flops"] + sampling["loop_body"]["flops"]
  step_cost = time["optimizer_step"]
  assert step_cost["flops"] == step_cost["program"]["flops"] and step_cost["loop_trips"] == 1  # one minibatch
  assert json.loads(json.dumps(record)) == record
  table = memory.format_table([record])
  assert "| v5e:2x2 | 4×1 | full | float32 | off |" in table and "XLA:TPU compiled: the TPU compiler's" in table
  assert f"({time['optimizer_step']['bound']}) |" in table


@needs_libtpu
def test_accumulation_body_lowers_with_the_steps_shardings(v5e_setting):
  """The optimiser step's accumulation body (compiled alone for the roofline when accumulating) fits the step's
  arguments and shardings (lowered only: compiling it is 10 s)."""
  setting, _ = v5e_setting
  plan, args = setting._step_inputs(2)
  body_args = memory.accumulation_step_args(plan, args)
  lowered = memory.jitted_accumulation_step(plan).trace(*body_args).lower()
  grads_sum, _ = lowered.out_info
  assert jax.tree.structure(grads_sum) == jax.tree.structure(args[0].params)


@needs_libtpu
def test_a_program_too_big_for_the_hbm_is_refused_and_counted(v5e_slice):
  """The TPU compiler refuses, at compile time, a program whose temporaries exceed a chip's HBM (16 GiB on v5e);
  steps.compile_ahead and the planner report it as not fitting, with the bytes the refusal names."""
  target, devices = v5e_slice
  replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(devices), ("d",)), jax.sharding.PartitionSpec())
  x = jax.ShapeDtypeStruct((72 * 1024,), jnp.float32, sharding=replicated)
  outer_sorted = jax.jit(lambda x: jnp.sort(x[:, None] * x[None, :], axis=1)[:, ::4096])  # 20 GiB, materialised
  compiled, step_memory = steps.compile_ahead(outer_sorted, (x,))
  assert compiled is None and step_memory.out_of_memory.available <= target.hbm_bytes
  assert step_memory.temporaries == step_memory.out_of_memory.required >= 72 * 1024 * 72 * 1024 * 4
  assert step_memory.arguments == 72 * 1024 * 4
  planned = memory.compiled_memory(outer_sorted, (x,))
  assert planned.refused.startswith("RESOURCE_EXHAUSTED") and planned.temp == step_memory.temporaries
  assert memory.verdict(planned.total, target.hbm_bytes, 0.9) == "does not fit"
  assert memory._peak({"peak": planned.total, "refused": planned.refused}).startswith("≥ ")


@needs_libtpu
def test_search_on_a_slice_finds_smaller_batches_when_the_hbm_is_shrunk(v5e_slice):
  """The fit decision and the batch search on the slice's mesh, against an HBM made 1 byte too small for the
  larger phase (the shape-only estimates: compiling more sizes would take a minute)."""
  target, devices = v5e_slice
  config = small_config(**{"sample.batch_size": 16, "sample.num_batches_per_epoch": 1})
  setting = memory.Setting(config, devices, compile_=False, backend="tpu")
  fitting = memory.measure(config, target, devices, compile_=False, search=False, backend="tpu", setting=setting)
  assert fitting["fits"] and fitting["time"] is None
  assert (fitting["sample"]["batch_per_device"], fitting["train"]["batch_per_device"]) == (4, 2)
  small = dataclasses.replace(target, name="v5e:2x2 shrunk", hbm_bytes=fitting["peak_bytes"] - 1)
  record = memory.measure(config, small, devices, False, search=True, headroom=1.0, backend="tpu", setting=setting)
  assert not record["fits"] and record["verdict"] == "does not fit"
  fit = record["largest_fitting"]
  if fitting["train"]["peak"] >= fitting["sample"]["peak"]:
    # 1 transition per device; 16 per optimiser step kept: 4 minibatches of 4.
    assert (fit["train_batch_per_device"], fit["gradient_accumulation_steps"]) == (1, 4)
    assert (fit["sample_batch_per_device"], fit["num_batches_per_epoch"]) == (4, 1)
  else:
    assert fit["sample_batch_per_device"] in (1, 2) and fit["train_batch_per_device"] == 2
  for peaks in (fit["sampling_peaks"], fit["training_peaks"]):
    assert all(peak <= small.hbm_bytes for batch, peak in peaks.items() if int(batch) < max(map(int, peaks)))
