"""Shared fixtures. Eight fake CPU devices are set before jax is imported, so
that sharding is real; tests that need one device build a 1-device mesh."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from tests import tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
  """A tiny random SD-shaped model saved in diffusers' layout (loads via models.load)."""
  path = tmp_path_factory.mktemp("tiny_model")
  tiny_model.save_tiny_model(str(path))
  return str(path)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
  from ddpo_jax import models

  return models.load(tiny_model_dir)
