"""The tiny presets end to end: the shipped toy model learns its reward.

These are the slowest tests (a few minutes each on 2 cores): each runs the
whole program, `train_and_evaluate`, as `python -m ddpo_jax.main` would.
"""

import os

import jax
import numpy as np
from PIL import Image
import pytest

from ddpo_jax import checkpoints
from ddpo_jax import config_utils
from ddpo_jax import evaluation
from ddpo_jax import metrics
from ddpo_jax import models
from ddpo_jax import rewards
from ddpo_jax import sharding
from ddpo_jax import steps
from ddpo_jax import train
from tests.test_lora import options_config


def run(spec, workdir, **overrides):
  config = config_utils.override(config_utils.get_config(spec), overrides)
  train.train_and_evaluate(config, str(workdir))
  return metrics.read_metrics(str(workdir))


# compress: reward = -kB rises (images get more compressible); incompress:
# reward = +kB rises (less compressible). Either way the held-out samples keep
# their shapes (the preset's KL to the pretrained model).
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
  if spec == "configs/compress.py:tiny":
    assert last - first >= 0.2, (first, last)  # kB: the paper's effect, visible in the first minutes
  # The first minibatch of each epoch is on-policy: its ratio is 1.
  assert max(r["onpolicy_ratio_deviation"] for r in records) < 1e-5
  assert os.path.exists(tmp_path / "config.json")
  assert any(name.endswith(".png") for name in os.listdir(tmp_path / "images"))
  assert os.listdir(tmp_path / "tensorboard")
  # Held-out evaluations (toy captions of unseen colour × shape pairs): before training, every 4 epochs, at the end.
  evals = [r for r in all_records if r["split"] == "eval"]
  assert [r["epoch"] for r in evals] == [-1, 3, 7, 11]
  assert all(np.isfinite(r["reward_toy_alignment_mean"]) and np.isfinite(r["diversity"]) for r in evals)
  # The samples stay recognisable: the held-out prompts' shapes and colours are still drawn.
  alignment = [r["reward_toy_alignment_mean"] for r in evals]
  assert alignment[-1] >= alignment[0] - 0.05, alignment
  if spec == "configs/compress.py:tiny":
    check_before_after(spec, tmp_path, evals[-1]["epoch"])


def pretrained_evaluation_samples(spec):
  """The held-out evaluation's images sampled afresh with the pretrained params: uint8 [n, H, W, 3]."""
  config = config_utils.resolve_auto(config_utils.get_config(spec), jax.default_backend())
  model, params = models.load(config.model.name, dtype=config.model.dtype)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  config, model, layout = steps.configure(config, model, params["unet"], mesh)
  frozen = {"vae": params["vae"], "text_encoder": params["text_encoder"]}
  run = steps.build(config, model, mesh, layout, frozen, names=("eval_sample",))
  unet = run.place_unet(params["unet"])
  evaluator = evaluation.Evaluator(config, run, rewards.make(config.reward.name))
  images, _ = evaluator.sample(dict(run.place_frozen(frozen), unet=unet), run.base(unet))
  return images


def check_before_after(spec, workdir, last_epoch):
  """images/before_after.png: on the left the pretrained model's samples of the held-out prompts and noise
  (equal to a fresh sample of it), on the right the last evaluation's samples of the same prompts and noise."""
  start = np.load(workdir / "images" / "eval_start.npz")
  before, shape = start["images"], start["images"].shape[1:3]
  np.testing.assert_array_equal(before, pretrained_evaluation_samples(spec)[: len(before)])
  picture = np.asarray(Image.open(workdir / "images" / "before_after.png"))
  left = metrics.make_grid(before, list(start["labels"]), columns=4)
  top = picture.shape[0] - left.shape[0]
  np.testing.assert_array_equal(picture[top:, : left.shape[1]], left)
  right = picture[top:, picture.shape[1] - left.shape[1] :]
  final = np.asarray(Image.open(workdir / "images" / f"eval_samples_{last_epoch:05d}.png"))
  after = np.stack([metrics.grid_cell(final, i, shape) for i in range(len(before))])
  right_cells = [metrics.grid_cell(right, i, shape, columns=4) for i in range(len(before))]
  np.testing.assert_array_equal(np.stack(right_cells), after)
  assert np.abs(after.astype(int) - before).mean() > 1  # trained: the samples changed


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
