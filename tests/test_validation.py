"""Every invalid setting is refused by name, before anything compiles."""

import math
import os
import subprocess
import sys
import time

import ml_collections
import pytest

from ddpo_jax import config_utils
from ddpo_jax import validation


def tiny():
  return config_utils.get_config("configs/compress.py:tiny")


CASES = [
  ("sample.batch_size", 30, "config.sample.batch_size=30 must be a positive multiple of the 8 devices"),
  ("train.batch_size", 12, "config.train.batch_size=12 must be a positive multiple of the 8 devices"),
  ("train.gradient_accumulation_steps", 3, "do not divide into optimiser steps"),
  ("train.num_inner_epochs", 0, "config.train.num_inner_epochs=0 must be >= 1"),
  ("train.timestep_fraction", 0.0, "config.train.timestep_fraction=0.0 must be in (0, 1]"),
  ("train.timestep_fraction", 1.5, "config.train.timestep_fraction=1.5 must be in (0, 1]"),
  ("sample.eta", 0.0, "config.sample.eta=0.0: a policy gradient needs a stochastic sampler"),
  ("train.method", "ppo", "config.train.method='ppo' is unknown"),
  ("reward.name", "jpeg_size", "config.reward.name='jpeg_size' is not a registered reward"),
  ("reward.name", "no_such_module:make", "config.reward.name='no_such_module:make': cannot import"),
  ("prompt.name", "animals", "config.prompt.name='animals' is not a registered prompt function"),
  ("model.name", "/nonexistent/sd", "config.model.name='/nonexistent/sd': '/nonexistent/sd' is not a folder"),
  ("model.dtype", "float16", "config.model.dtype='float16'"),
  ("mesh.data", 3, "config.mesh.data x config.mesh.fsdp must equal the 8 devices"),
  ("train.learning_rate", 0.0, "config.train.learning_rate=0.0 must be > 0"),
  ("eval.num_samples", 48, "config.eval.num_samples=48 must be a positive multiple of config.sample.batch_size=32"),
  ("eval.samples_per_prompt", 3, "config.eval.samples_per_prompt=3 must be an integer >= 1 that divides"),
  ("eval.prompt.name", "pets", "config.eval.prompt.name='pets' is not a registered prompt function"),
  ("eval.rewards", ("jpeg_size",), "config.eval.rewards='jpeg_size' is not a registered reward"),
  ("eval.eta", -1.0, "config.eval.eta=-1.0 must be >= 0"),
  ("eval.every_epochs", -2, "config.eval.every_epochs=-2 must be an integer >= 0"),
]


@pytest.mark.parametrize("setting,value,message", CASES)
def test_invalid_setting_is_named(setting, value, message, tmp_path):
  config = config_utils.override(tiny(), {setting: value})
  with pytest.raises(validation.ConfigError) as error:
    validation.validate(config, str(tmp_path), num_devices=8)
  assert message in str(error.value)


@pytest.mark.parametrize(
  "overrides,message",
  [
    ({"train.method": "rwr", "train.rwr_temperature": 0.0}, "config.train.rwr_temperature=0.0 must be > 0"),
    (
      {"train.method": "rwr_sparse", "train.kl_coef": 0.0, "train.rwr_percentile": 100.0},
      "config.train.rwr_percentile=100.0 must be in",
    ),
    ({"train.method": "rwr"}, "config.train.kl_coef=0.1: the KL regulariser acts on DDPO's transitions; RWR"),
    (
      {"train.method": "rwr", "train.kl_coef": 0.0, "train.advantages": "group", "sample.group_size": 4},
      "config.train.advantages='group': RWR",
    ),
  ],
)
def test_rwr_settings_are_named(overrides, message, tmp_path):
  with pytest.raises(validation.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    validation.validate(config_utils.override(tiny(), overrides), str(tmp_path), num_devices=8)


def test_score_function_needs_one_step_per_batch(tmp_path):
  config = tiny()
  config.train.method = "ddpo_sf"
  config.train.num_inner_epochs = 1
  config.train.gradient_accumulation_steps = 2
  with pytest.raises(validation.ConfigError, match="gradient_accumulation_steps=10"):
    validation.validate(config, str(tmp_path), num_devices=8)
  config.train.gradient_accumulation_steps = 10
  validation.validate(config, str(tmp_path), num_devices=8)
  config.train.num_inner_epochs = 2  # a second pass would reuse the samples
  with pytest.raises(validation.ConfigError, match="num_inner_epochs=1"):
    validation.validate(config, str(tmp_path), num_devices=8)


def test_model_folder_without_components(tmp_path):
  config = tiny()
  config.model.name = str(tmp_path)
  with pytest.raises(validation.ConfigError, match="lacks the sub-folders"):
    validation.validate(config, str(tmp_path), num_devices=8)


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(validation.ConfigError, match="--workdir=.* cannot be written"):
    validation.validate(tiny(), str(blocker / "run"), num_devices=8)


@pytest.mark.parametrize(
  "spec",
  [
    "configs/compress.py",
    "configs/incompress.py",
    "configs/compress.py:tiny",
    "configs/incompress.py:tiny",
    "configs/toy_alignment.py:tiny",
    "configs/clip_score.py:tiny",
    "configs/pickscore.py:tiny",
    "configs/hpsv2.py",
    "configs/hpsv2.py:tiny",
  ],
)
def test_shipped_configs_are_valid(spec, tmp_path):
  config = config_utils.get_config(spec)
  devices = 8 if spec.endswith("tiny") else 32  # the paper's TPU v4-64 has 32 chips
  if not spec.endswith("tiny"):
    config.model.name = "CompVis/stable-diffusion-v1-4"  # a Hub id: not checked offline
  validation.validate(config, str(tmp_path), num_devices=devices)


def test_unknown_preset():
  with pytest.raises(ValueError, match="Unknown preset 'huge'"):
    config_utils.get_config("configs/compress.py:huge")


@pytest.mark.parametrize(
  "override,message",
  [
    ("--config.train.timestep_fraction=2.0", "config.train.timestep_fraction=2.0 must be in (0, 1]"),
    ("--config.seed=-1", "config.seed=-1 must be an integer in [0, 2**32)"),
  ],
)
def test_main_refuses_before_loading(override, message, tmp_path):
  """The command line reports a bad setting alone (no traceback), with exit status 2, without compiling or
  downloading: nothing is written into the workdir."""
  workdir = tmp_path / "run"
  start = time.time()
  result = subprocess.run(
    [sys.executable, "-m", "ddpo_jax.main", "--config=configs/compress.py:tiny", f"--workdir={workdir}", override],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=os.path.dirname(os.path.dirname(__file__)),
  )
  seconds = time.time() - start
  assert result.returncode == 2, result.stderr
  assert message in result.stderr
  assert "Traceback" not in result.stderr
  assert not os.path.exists(workdir / "config.json")
  assert seconds < 60  # the imports only: the model is neither loaded nor compiled


INVALID = [
  ({"train.kl_coef": -1.0}, "config.train.kl_coef=-1.0 must be >= 0"),
  ({"train.ema_decay": 1.0}, "config.train.ema_decay=1.0 must be in [0, 1)"),
  ({"train.advantages": "grpo"}, "config.train.advantages='grpo' is unknown"),
  ({"train.advantages": "group"}, "set config.sample.group_size >= 2"),
  ({"train.group_std": "prompt"}, "config.train.group_std='prompt'"),
  ({"sample.group_size": 0}, "config.sample.group_size=0 must be an integer >= 1"),
  ({"sample.group_size": 3}, "config.sample.group_size=3 must divide the 32 samples per process"),
  ({"lora.rank": -1}, "config.lora.rank=-1 must be an integer >= 0"),
  ({"lora.rank": 4, "lora.alpha": 0.0}, "config.lora.alpha=0.0 must be > 0"),
  ({"lora.rank": 4, "lora.targets": ("to_q(",)}, "config.lora.targets: 'to_q(' is not a valid regex"),
  ({"logging.sample_with_ema": True}, "config.logging.sample_with_ema=True needs EMA params"),
  ({"preflight.headroom": 0.0}, "config.preflight.headroom=0.0 must be in (0, 1]"),
  ({"preflight.headroom": 1.5}, "config.preflight.headroom=1.5 must be in (0, 1]"),
  ({"preflight.device_memory_bytes": -1}, "config.preflight.device_memory_bytes=-1 must be an integer >= 0"),
  ({"preflight.max_compilations": -2}, "config.preflight.max_compilations=-2 must be an integer >= 0"),
  ({"seed": -1}, "config.seed=-1 must be an integer in [0, 2**32)"),
  ({"seed": 2**32}, "config.seed=4294967296 must be an integer in [0, 2**32)"),
  ({"eval.seed": -1}, "config.eval.seed=-1 must be an integer in [0, 2**32)"),
  ({"logging.num_images": 0}, "config.logging.num_images=0 must be an integer >= 1"),
  ({"logging.num_images": -1}, "config.logging.num_images=-1 must be an integer >= 1"),
  ({"reward.num_threads": 0}, "config.reward.num_threads=0 must be an integer >= 1"),
  ({"train.adam_beta1": 1.5}, "config.train.adam_beta1=1.5 must be in [0, 1)"),
  ({"train.adam_beta2": 1.0}, "config.train.adam_beta2=1.0 must be in [0, 1)"),
  ({"train.adam_beta1": -0.1}, "config.train.adam_beta1=-0.1 must be in [0, 1)"),
  ({"train.adam_eps": 0.0}, "config.train.adam_eps=0.0 must be > 0"),
  ({"train.weight_decay": -1.0}, "config.train.weight_decay=-1.0 must be >= 0"),
]


@pytest.mark.parametrize("values,message", INVALID)
def test_invalid_settings_are_named(values, message):
  config = config_utils.override(config_utils.get_config("configs/compress.py:tiny"), values)
  with pytest.raises(validation.ConfigError) as error:
    validation.validate(config, None, num_devices=8)
  assert message in str(error.value)


def test_groups_must_not_straddle_processes():
  config = config_utils.override(config_utils.get_config("configs/compress.py:tiny"), {"sample.group_size": 8})
  validation.validate(config, None, num_devices=8, num_processes=4)  # 8 samples per process
  with pytest.raises(validation.ConfigError, match="no group straddles two processes"):
    validation.validate(config, None, num_devices=8, num_processes=8)


def float_settings(node: ml_collections.ConfigDict, prefix: str = "config") -> list[str]:
  """The dotted names of every float setting under `node`."""
  names = []
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      names += float_settings(value, f"{prefix}.{key}")
    elif isinstance(value, float):
      names.append(f"{prefix}.{key}")
  return names


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_float_setting_must_be_finite(bad):
  """NaN or ±inf in any float setting is refused by name, before any other check can let it through."""
  names = float_settings(tiny())
  assert {"config.sample.eta", "config.sample.guidance_scale", "config.train.learning_rate"} <= set(names)
  for name in names:
    config = config_utils.override(tiny(), {name.removeprefix("config."): bad})
    with pytest.raises(validation.ConfigError) as error:
      validation.validate(config, None, num_devices=8)
    assert str(error.value) == f"{name}={bad}: must be a finite number.", name


def test_floats_in_kwargs_and_sequences_must_be_finite():
  config = config_utils.override(tiny(), {"reward.kwargs.scale": math.nan})
  with pytest.raises(validation.ConfigError, match=r"config.reward.kwargs.scale=nan: must be a finite number"):
    validation.validate(config, None, num_devices=8)
  config = config_utils.override(tiny(), {"prompt.kwargs.weights": (1.0, math.inf)})
  with pytest.raises(validation.ConfigError, match=r"config.prompt.kwargs.weights\[1\]=inf: must be a finite number"):
    validation.validate(config, None, num_devices=8)


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_seed_bounds_are_valid(seed):
  validation.validate(config_utils.override(tiny(), {"seed": seed, "eval.seed": seed}), None, num_devices=8)
