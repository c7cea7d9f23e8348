"""A reward's or prompt function's keyword arguments from the command line, new names included."""

import os
import subprocess
import sys

import pytest

from ddpo_jax import config_utils
from ddpo_jax import validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/compress.py:tiny"


def test_new_kwargs_are_split_off_and_the_rest_left_to_ml_collections():
  argv = [
    "main",
    TINY,
    "--config.prompt.kwargs.split=train",
    "--config.prompt.kwargs.prompt=a cat",  # exists: ml_collections types it
    "--config.reward.kwargs.quality",
    "80",
    "--config.eval.prompt.kwargs={'split': 'all'}",
    "--config.seed=3",
  ]
  kept, new = config_utils.split_new_kwargs(argv)
  assert kept == ["main", TINY, "--config.prompt.kwargs.prompt=a cat", "--config.seed=3"]
  assert new == {"prompt.kwargs.split": "train", "reward.kwargs.quality": 80, "eval.prompt.kwargs": {"split": "all"}}
  assert config_utils.split_new_kwargs(["main", "--config.x.kwargs.y=1"]) == (["main", "--config.x.kwargs.y=1"], {})


def test_new_kwargs_are_added_to_a_locked_config():
  config = config_utils.get_config("configs/compress.py:tiny")
  config.lock()
  config_utils.add_new_kwargs(config, {"eval.prompt.kwargs": {"split": "all"}, "prompt.kwargs.split": "train"})
  assert config.eval.prompt.kwargs.to_dict() == {"split": "all"}
  assert config.prompt.kwargs.to_dict() == {"prompt": "", "split": "train"}
  assert config.is_locked


def test_kwargs_the_prompt_function_does_not_take_are_named(tmp_path):
  config = config_utils.override(
    config_utils.get_config("configs/compress.py:tiny"), {"prompt.name": "toy_scenes", "prompt.kwargs.split": "train"}
  )
  with pytest.raises(validation.ConfigError, match=r"config.prompt.kwargs=.*'prompt'.* do not fit 'toy_scenes'"):
    validation.validate(config, str(tmp_path), num_devices=8)
  config.prompt.kwargs = {"split": "train"}
  validation.validate(config, str(tmp_path), num_devices=8)


def test_kwargs_the_reward_does_not_take_are_named(tmp_path):
  config = config_utils.override(config_utils.get_config("configs/compress.py:tiny"), {"reward.kwargs.weight": 2.0})
  message = r"config.reward.kwargs=\{'weight': 2.0\} do not fit 'jpeg_compressibility', which takes \['quality'\]"
  with pytest.raises(validation.ConfigError, match=message):
    validation.validate(config, str(tmp_path), num_devices=8)


def run_main(tmp_path, *overrides):
  return subprocess.run(
    [sys.executable, "-m", "ddpo_jax.main", TINY, f"--workdir={tmp_path / 'run'}", *overrides],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=ROOT,
  )


def test_main_takes_a_new_prompt_kwarg_and_names_the_fix_for_a_stale_one(tmp_path):
  """Before: ml_collections' parser died with AttributeError: "'split'" (a traceback, exit status 1)."""
  result = run_main(tmp_path, "--config.prompt.name=toy_scenes", "--config.prompt.kwargs.split=train")
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  assert "config.prompt.kwargs={'prompt': '', 'split': 'train'} do not fit 'toy_scenes'" in result.stderr
  assert "--config.prompt.kwargs=\"{'split': 'train'}\"" in result.stderr
  # The fix it names passes the prompt check: the run stops at the next bad setting instead.
  result = run_main(
    tmp_path, "--config.prompt.name=toy_scenes", "--config.prompt.kwargs={'split': 'train'}", "--config.eval.eta=-1.0"
  )
  assert result.returncode == 2, result.stderr
  assert "config.eval.eta=-1.0 must be >= 0" in result.stderr
  assert not (tmp_path / "run" / "config.json").exists()


def test_a_required_kwarg_that_is_not_set_is_named_with_its_flag(tmp_path):
  """Before: "config.prompt.kwargs={} do not fit 'from_file' ... missing a required argument: 'path'"."""
  config = config_utils.override(
    config_utils.get_config("configs/compress.py:tiny"), {"prompt.name": "from_file", "prompt.kwargs": {}}
  )
  with pytest.raises(
    validation.ConfigError,
    match=r"config.prompt.kwargs.path is required by 'from_file'.*"
    r"--config.prompt.kwargs.path=VALUE",
  ):
    validation.validate(config, str(tmp_path), num_devices=8)
