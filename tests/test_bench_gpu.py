"""`python -m ddpo_jax.bench memory --gpu=...`: GPU descriptions, and XLA:GPU's plan of the tiny config.

The pure parts run anywhere; the compiled one needs jax's CUDA plugin (`pip install "jax[cuda12]"`: XLA:GPU
compiles for compile-only GPUs without a GPU or a driver) and is skipped without it.
"""

import importlib.util
import os

import pytest

from ddpo_jax import config_utils
from ddpo_jax.bench import gpu
from ddpo_jax.bench import memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuda_plugin_installed() -> bool:
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:  # no jax_plugins package at all
    return False


needs_cuda_plugin = pytest.mark.skipif(not cuda_plugin_installed(), reason="needs jax's CUDA plugin (jax[cuda12])")


def test_gpus_are_parsed_with_their_counts_and_bad_names_named():
  assert gpu.parse_gpus("h100-80gb:8, a100-80gb") == [(gpu.GPUS["h100-80gb"], 8), (gpu.GPUS["a100-80gb"], 1)]
  with pytest.raises(ValueError, match=r"--gpu: 'v100' is not NAME\[:COUNT\] of a known GPU \(a100-80gb, h100"):
    gpu.parse_gpus("v100")
  with pytest.raises(ValueError, match="asks for 32 GPUs; one host's 1 to 16"):
    gpu.parse_gpus("h200:32")


def test_target_config_describes_the_gpu():
  text = gpu.target_config(gpu.GPUS["h100-80gb"])
  assert "cuda_compute_capability { major: 9 minor: 0 }" in text and "core_count: 132\n" in text
  assert f"device_memory_size: {81559 * 2**20}\n" in text and 'device_description_str: "NVIDIA H100 80GB HBM3"' in text
  assert text.count("{") == text.count("}") == 3


@needs_cuda_plugin
def test_tiny_config_compiles_for_gpus_without_a_gpu():
  """XLA:GPU's memory analysis of the tiny config's sampler and step on two compile-only H100s, cuDNN attention."""
  config = config_utils.get_config(os.path.join(REPO, "configs/compress.py:tiny"))
  devices = gpu.gpu_devices(gpu.GPUS["h100-80gb"], 2)
  assert [d.platform for d in devices] == ["gpu", "gpu"] and devices[0].device_kind == "NVIDIA H100 80GB HBM3"
  target = memory.gpu_target(gpu.GPUS["h100-80gb"], devices)
  (record,) = memory.run_grid(config, target, devices, grid="config", search=False)
  assert record["estimate"] == "XLA:GPU compiled" and record["attention"] == "cudnn"
  assert record["verdict"] == "fits" and record["time"] is None and record["hbm_bytes"] == 81559 * 2**20
  for phase in (record["sample"], record["train"]):
    assert phase["temp"] > 0 and phase["output"] > 0 and phase["compile_seconds"] > 0 and not phase["refused"]
  assert "| h100-80gb:2 | 2×1 | full | float32 | off |" in memory.format_table([record])


@pytest.mark.skipif(cuda_plugin_installed(), reason="checks the message given without jax's CUDA plugin")
def test_without_the_cuda_plugin_the_gpu_flag_names_the_install():
  with pytest.raises(ValueError, match=r"--gpu=h100-80gb:2: jax cannot compile for CUDA here .*pip install -e"):
    gpu.gpu_devices(gpu.GPUS["h100-80gb"], 2)
