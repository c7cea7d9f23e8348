"""The tiny presets end to end: the shipped toy model learns its reward.

These are the slowest tests (a few minutes each on 2 cores): each runs the
whole program, `train_and_evaluate`, as `python -m ddpo_jax.main` would.
"""

import os

import jax
import numpy as np
import pytest

from ddpo_jax import checkpoints
from ddpo_jax import config_utils
from ddpo_jax import metrics
from ddpo_jax import sharding
from ddpo_jax import train
from tests.test_lora import options_config


def run(spec, workdir, **overrides):
  config = config_utils.override(config_utils.get_config(spec), overrides)
  train.train_and_evaluate(config, str(workdir))
  return metrics.read_metrics(str(workdir))


# compress: reward = -kB rises (images get more compressible); incompress:
# reward = +kB rises (less compressible).
@pytest.mark.parametrize("spec", ["configs/compress.py:tiny", "configs/incompress.py:tiny"])
def test_tiny_preset_improves_its_reward(spec, tmp_path):
  all_records = run(spec, tmp_path)
  records = [r for r in all_records if r["split"] == "train"]
  assert [r["epoch"] for r in records] == list(range(len(records)))
  for key in ("samples", "reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "seconds"):
    assert all(np.isfinite(r[key]) for r in records), key
  first = np.mean([r["reward_mean"] for r in records[:2]])
  last = np.mean([r["reward_mean"] for r in records[-2:]])
  assert last - first > 0.5 * records[0]["reward_std"], (first, last)
  # The first minibatch of each epoch is on-policy: its ratio is 1.
  assert max(r["onpolicy_ratio_deviation"] for r in records) < 1e-5
  assert os.path.exists(tmp_path / "config.json")
  assert any(name.endswith(".png") for name in os.listdir(tmp_path / "images"))
  assert os.listdir(tmp_path / "tensorboard")
  # Held-out evaluations (toy captions of unseen colour × shape pairs): before training, every 4 epochs, at the end.
  evals = [r for r in all_records if r["split"] == "eval"]
  assert [r["epoch"] for r in evals] == [-1, 3, 7, 11]
  assert all(np.isfinite(r["reward_toy_alignment_mean"]) and np.isfinite(r["diversity"]) for r in evals)


def flat(tree):
  return {sharding.path_string(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_a_run_with_every_option(tiny_model_dir, tmp_path):
  config = options_config(tiny_model_dir)
  config_utils.override(
    config,
    {
      "num_epochs": 2,
      "prompt.name": "toy_scenes",
      "train.kl_coef": 0.1,
      "train.ema_decay": 0.9,
      "mesh.data": -1,
      "mesh.fsdp": 1,
      "checkpoint.every_epochs": 1,
      "logging.images_every_epochs": 0,
      "logging.sample_with_ema": True,
    },
  )
  config.prompt.kwargs = {}  # the tiny preset's are the constant prompt's
  summary, state = train.train(config, str(tmp_path))
  records = metrics.read_metrics(str(tmp_path), "train")
  assert [r["epoch"] for r in records] == [0, 1]
  assert all(0 <= r["group_tied_fraction"] <= 1 and np.isfinite(r["kl_to_reference"]) for r in records)
  # The first minibatch's policy is the reference: its KL is float32 rounding (~1e-9), far below a trained one.
  assert records[0]["kl_to_reference"] < 1e-3 * records[1]["kl_to_reference"]
  assert np.isfinite(summary["ema_reward_mean"])
  assert (tmp_path / "images" / "samples_ema_00001.png").exists()
  assert all(p.endswith(("lora_a", "lora_b")) for p in flat(state.params))
  assert jax.tree.structure(state.ema_params) == jax.tree.structure(state.params)
  assert checkpoints.Checkpointer(checkpoints.checkpoint_dir(str(tmp_path))).steps()[-1] == 2
