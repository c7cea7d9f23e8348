"""The tiny presets end to end: the shipped toy model learns its reward.

These are the slowest tests (a few minutes each on 2 cores): each runs the
whole program, `train_and_evaluate`, as `python -m ddpo_jax.main` would.
"""

import os

import numpy as np
import pytest

from ddpo_jax import config_utils
from ddpo_jax import metrics
from ddpo_jax import train


def run(spec, workdir, **overrides):
  config = config_utils.get_config(spec)
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
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
