"""Configs by name, the dotted override and the "auto" settings (ddpo_jax/config_utils.py)."""

import ml_collections
import pytest

from ddpo_jax import config_utils


def test_override_sets_nested_fields_and_refuses_misspelt_ones():
  config = config_utils.get_config("configs/compress.py:tiny")
  config_utils.override(config, {"train.learning_rate": 1e-3, "eval.prompt.name": "constant", "num_epochs": 2})
  assert config.train.learning_rate == 1e-3 and config.eval.prompt.name == "constant" and config.num_epochs == 2
  with pytest.raises((AttributeError, KeyError)):
    config_utils.override(config, {"train.learning_rat": 1e-3})


@pytest.mark.parametrize(
  "backend,accumulation,block", [("cpu", "unrolled", "4"), ("tpu", "scan", "0"), ("gpu", "scan", "0")]
)
def test_auto_settings_resolve_per_backend(backend, accumulation, block):
  config = config_utils.get_config("configs/compress.py:tiny")
  assert config.train.accumulation == "auto" and config.model.attention_block_mb == "auto"
  resolved = config_utils.resolve_auto(config, backend)
  assert (resolved.train.accumulation, resolved.model.attention_block_mb) == (accumulation, block)
  assert config.train.accumulation == "auto"  # a copy: the caller's config is unchanged
  assert config_utils.resolve_auto(resolved, backend).to_dict() == resolved.to_dict()  # idempotent
  # Explicit values stay as they are.
  config_utils.override(config, {"train.accumulation": "scan", "model.attention_block_mb": "0.5"})
  resolved = config_utils.resolve_auto(config, "cpu")
  assert (resolved.train.accumulation, resolved.model.attention_block_mb) == ("scan", "0.5")


def test_resolve_keeps_the_lock():
  config = config_utils.get_config("configs/compress.py:tiny")
  config.lock()
  resolved = config_utils.resolve_auto(config, "cpu")
  assert resolved.is_locked
  with pytest.raises(AttributeError):
    resolved.train.no_such_field = 1
  assert isinstance(resolved, ml_collections.ConfigDict)


def test_bad_accumulation_is_named():
  with pytest.raises(ValueError, match="config.train.accumulation='fast'"):
    config_utils.resolve_accumulation("fast", "cpu")
