"""The paper's experiments: RWR baselines, held-out evaluation, the study script.

One short study run (RWR on the compress tiny preset, two epochs, one seed) is
shared by the module: it is the RWR round, the source of the held-out
evaluation records, and the study's input.
"""

import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from ddpo_jax import evaluation
from ddpo_jax import methods
from ddpo_jax import metrics
from ddpo_jax import models
from ddpo_jax import objectives
from ddpo_jax import prompts
from ddpo_jax import rewards
from ddpo_jax import sharding
from ddpo_jax import steps
from ddpo_jax import update
from ddpo_jax.toy import shapes
from experiments import study

EPOCHS = 2


# ---------------------------------------------------------------------------
# The toy world's held-out colour × shape pairs.
# ---------------------------------------------------------------------------


def test_toy_splits_partition_the_scenes():
  train_split, heldout = shapes.scenes("train"), shapes.scenes("heldout")
  assert len(train_split) == 450 and len(heldout) == 150
  assert set(train_split) | set(heldout) == set(shapes.all_scenes())
  assert not set(train_split) & set(heldout)
  # Every colour misses exactly one shape; every shape is held out with some colour.
  for colour in shapes.COLOUR_NAMES:
    assert sum((colour, s) in shapes.HELDOUT_PAIRS for s in shapes.SHAPES) == 1
  assert {s for _, s in shapes.HELDOUT_PAIRS} == set(shapes.SHAPES)
  drawn = prompts.get("toy_scenes", split="heldout")(np.random.default_rng(0), 400)
  pairs = {(shapes.Scene.from_caption(p).colour, shapes.Scene.from_caption(p).shape) for p in drawn}
  assert pairs == set(shapes.HELDOUT_PAIRS)
  with pytest.raises(ValueError, match="split 'test' is unknown"):
    prompts.get("toy_scenes", split="test")


# ---------------------------------------------------------------------------
# RWR's weights and loss by hand.
# ---------------------------------------------------------------------------


def test_rwr_dense_weights_by_hand():
  weights = objectives.rwr_dense_weights(np.array([0.0, 1.0, 2.0, np.nan]), temperature=0.5)
  e = np.exp([0.0, 2.0, 4.0])
  np.testing.assert_allclose(weights, [*(3 * e / e.sum()), 0.0], rtol=1e-6)
  # Large rewards at a small temperature do not overflow.
  weights = objectives.rwr_dense_weights(np.array([1000.0, 1000.0, 999.0]), temperature=0.01)
  np.testing.assert_allclose(weights, [1.5, 1.5, 0.0], atol=1e-6)


def test_rwr_sparse_weights_by_hand():
  rewards = np.array([3.0, 1.0, np.nan, 10.0, 2.0, 9.0, 4.0, 5.0, 6.0, 7.0, 8.0])
  # The 80th percentile of 1..10 (linear interpolation) is 8.2: keep 9 and 10, each weighing 10 / 2.
  weights = objectives.rwr_sparse_weights(rewards, percentile=80.0)
  np.testing.assert_allclose(weights, [0, 0, 0, 5, 0, 5, 0, 0, 0, 0, 0])
  # Ties at the threshold are all kept.
  np.testing.assert_allclose(
    objectives.rwr_sparse_weights(np.array([1.0, 2.0, 2.0, 2.0]), 50.0), [0, 4 / 3, 4 / 3, 4 / 3]
  )


def test_weighted_denoising_loss_matches_numpy():
  rng = np.random.default_rng(0)
  prediction, target = rng.standard_normal((2, 5, 4, 3, 3)).astype(np.float32)
  weights = rng.uniform(0, 2, 5).astype(np.float32)
  loss, metrics = objectives.weighted_denoising_loss(jnp.asarray(prediction), jnp.asarray(target), jnp.asarray(weights))
  per_example = ((prediction - target) ** 2).reshape(5, -1).mean(1)
  np.testing.assert_allclose(float(loss), np.mean(weights * per_example), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["denoising_mse"]), per_example.mean(), rtol=1e-5)


def test_denoising_examples_are_noised_final_latents():
  """Each example is its own trajectory's x_0 noised to its t: x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε, target ε."""
  alphas_cumprod = np.cumprod(1 - np.linspace(1e-4, 0.02, 100))
  schedule = models.NoiseSchedule(alphas_cumprod, alphas_cumprod[0], 1, "epsilon")
  model = types.SimpleNamespace(schedule=schedule)
  n, steps, kept = 8, 5, 3
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((n, steps + 1, 2, 3, 3)).astype(np.float32)
  rollouts = update.Rollouts(
    latents=jnp.asarray(latents),
    log_probs=jnp.zeros((n, steps)),
    timesteps=jnp.arange(steps)[::-1],
    context=jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[:, None, None], (n, 2, 4)),
    weights=jnp.arange(n, dtype=jnp.float32) * 10,
  )
  settings = types.SimpleNamespace(num_timesteps_kept=kept, gradient_accumulation_steps=2, batch_size=4)
  examples = methods.get("rwr").make_examples(model, rollouts, jax.random.PRNGKey(0), settings)
  assert examples.noisy_latents.shape == (n * kept // 8, 2, 4, 2, 3, 3)
  flat = jax.tree.map(lambda x: np.asarray(x).reshape((n * kept,) + x.shape[3:]), examples)
  owner = flat.context[:, 0, 0].astype(int)  # each example's trajectory
  np.testing.assert_array_equal(flat.weights, owner * 10.0)
  assert sorted(np.bincount(owner)) == [kept] * n
  ab = alphas_cumprod[flat.timesteps][:, None, None, None]
  expected = np.sqrt(ab) * latents[owner, -1] + np.sqrt(1 - ab) * flat.targets
  np.testing.assert_allclose(flat.noisy_latents, expected, rtol=1e-5, atol=1e-5)
  assert flat.timesteps.min() >= 0 and flat.timesteps.max() < 100 and len(set(flat.timesteps)) > 5
  np.testing.assert_allclose(flat.targets.std(), 1.0, atol=0.1)


# ---------------------------------------------------------------------------
# One short study run: RWR on the compress tiny preset.
# ---------------------------------------------------------------------------


LR = 3e-4


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
  """(workdir, records, out): the run trained through the study's resumable path, its summary in out."""
  workdir, out = str(tmp_path_factory.mktemp("study")), str(tmp_path_factory.mktemp("study_out"))
  study.obtain("compress", "rwr", LR, 0, workdir, out, EPOCHS)
  return workdir, metrics.read_metrics(os.path.join(workdir, "compress", "rwr", study.run_name(LR, 0))), out


def test_rwr_round_on_the_tiny_preset(study_run):
  _, records, _ = study_run
  train_records = [r for r in records if r["split"] == "train"]
  assert [r["epoch"] for r in train_records] == list(range(EPOCHS))
  for r in train_records:
    assert np.isfinite(r["loss"]) and 0 < r["denoising_mse"] < 1
    assert 0 < r["rwr_effective_fraction"] <= 1
    assert "onpolicy_ratio_deviation" not in r  # no policy ratio in RWR
    assert r["grad_norm"] > 0


def test_held_out_evaluation_is_reported(study_run):
  """The toy model is evaluated on colour × shape pairs never trained on, before and after training."""
  workdir, records, _ = study_run
  evals = [r for r in records if r["split"] == "eval"]
  assert [r["epoch"] for r in evals] == [-1, EPOCHS - 1]
  assert [r["samples"] for r in evals] == [0, EPOCHS * 64]
  for r in evals:
    for name in ("jpeg_compressibility", "jpeg_incompressibility", "toy_alignment"):
      assert np.isfinite(r[f"reward_{name}_mean"]) and r[f"reward_{name}_invalid"] == 0, name
    assert r["reward_mean"] == r["reward_jpeg_compressibility_mean"]
    assert 0 < r["diversity"] < 1 and 0 < r["diversity_all"] < 1
  images = os.listdir(os.path.join(workdir, "compress", "rwr", study.run_name(LR, 0), "images"))
  assert {"eval_samples_start_00000.png", f"eval_samples_{EPOCHS - 1:05d}.png"} <= set(images)


def test_evaluation_is_deterministic(study_run):
  """Steps built anew, evaluating the pretrained params twice, reproduce the run's own first evaluation exactly."""
  _, records, _ = study_run
  config = study.run_config("compress", "rwr", LR, 0, EPOCHS)
  model, params = models.load(config.model.name)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  run = steps.prepare(config, model, params, mesh, names=("eval_sample",))
  evaluator = evaluation.Evaluator(config, run, rewards.make(config.reward.name))
  heldout = {s.caption for s in shapes.scenes("heldout")}
  assert set(evaluator.prompts) <= heldout and len(evaluator.prompts) == config.eval.num_samples
  frozen = run.place_frozen(params)
  unet = run.place_unet(params["unet"])
  first, images, labels = evaluator.evaluate(dict(frozen, unet=unet))
  second, images_again, _ = evaluator.evaluate(dict(frozen, unet=unet))
  np.testing.assert_array_equal(images, images_again)
  recorded = next(r for r in records if r["split"] == "eval" and r["epoch"] == -1)
  for key, value in first.items():
    if key == "seconds":
      continue
    assert second[key] == value, key
    if key.startswith(("reward_jpeg", "reward_toy", "diversity")):
      assert recorded[key] == pytest.approx(value, rel=1e-6), key
  assert len(labels) == len(images) == config.eval.num_samples


def test_pairwise_rms_distance_by_hand():
  a = np.zeros((2, 2, 1), np.uint8)
  b = np.full((2, 2, 1), 255, np.uint8)
  c = np.array([[[255], [0]], [[0], [0]]], np.uint8)
  # Distances: a-b 1, a-c sqrt(1/4), b-c sqrt(3/4).
  assert evaluation.pairwise_rms_distance(np.stack([a, b, c])) == pytest.approx((1 + 0.5 + 0.75**0.5) / 3)
  np.testing.assert_allclose(evaluation.group_diversity(np.stack([a, b, a, a]), 2), [1.0, 0.0])
  assert np.isnan(evaluation.pairwise_rms_distance(a[None]))


# ---------------------------------------------------------------------------
# The study's outputs.
# ---------------------------------------------------------------------------


def test_study_writes_its_plot_and_table(study_run, tmp_path):
  _, records, out = study_run
  results = study.assemble(study.load_summaries(out), sweep_seed=0)
  assert list(results) == ["compress"] and list(results["compress"]) == ["rwr"]
  assert results["compress"]["rwr"]["learning_rate"] == LR
  assert results["compress"]["rwr"]["runs"][0]["reward"] == study.summarise(records, EPOCHS)["reward"]
  paths = study.write_outputs(results, str(tmp_path))
  assert sorted(os.path.basename(p) for p in paths) == ["study.json", "study.md", "study_compress.png"]
  with Image.open(tmp_path / "study_compress.png") as image:
    assert image.size[0] > 400 and image.size[1] > 300
  table = (tmp_path / "study.md").read_text()
  assert f"| compress | RWR | {LR:g} | 1 |" in table
  summary = json.loads((tmp_path / "study.json").read_text())
  assert len(summary["compress"]["rwr"]["runs"][0]["reward"]) == EPOCHS


def test_study_resume_skips_finished_runs(study_run, monkeypatch):
  """A run with a summary is not trained again, nor one complete in its workdir; a changed setting reruns it."""
  workdir, _, out = study_run
  with open(study.summary_path(out, "compress", "rwr", LR, 0)) as f:
    summary = json.load(f)

  def no_training(*args, **kwargs):
    raise AssertionError("trained again")

  monkeypatch.setattr(study.subprocess, "run", no_training)
  assert study.obtain("compress", "rwr", LR, 0, str(workdir) + "-gone", out, EPOCHS) == summary
  # Without the summary, the complete workdir is summarised again, to the same figures.
  moved = str(out) + "-moved"
  shutil.copytree(out, moved)
  os.remove(study.summary_path(moved, "compress", "rwr", LR, 0))
  assert study.obtain("compress", "rwr", LR, 0, workdir, moved, EPOCHS) == summary
  # A setting the summary recorded changes: the summary is stale, the run is trained again.
  monkeypatch.setitem(study.TASKS, "compress", study.TASKS["compress"][:2] + (0.2,))
  with pytest.raises(AssertionError, match="trained again"):
    study.obtain("compress", "rwr", LR, 0, str(workdir) + "-gone", out, EPOCHS)


def summary(task, method, lr, seed, end):
  return dict(task=task, method=method, learning_rate=lr, seed=seed, end=end, start=0.0, reward=[0.0, end])


def test_study_takes_each_methods_best_learning_rate_of_the_sweep_seed():
  summaries = [
    summary("compress", "rwr", 1e-4, 0, 0.5),
    summary("compress", "rwr", 3e-4, 0, 0.7),
    summary("compress", "rwr", 1e-3, 0, 0.7),  # a tie: the smaller rate
    summary("compress", "rwr", 1e-3, 1, 0.9),  # not the sweep seed
    summary("compress", "rwr", 3e-4, 2, 0.6),
    summary("compress", "rwr", 3e-4, 1, 0.4),
    summary("toy_alignment", "ddpo_is", 1e-3, 0, 0.1),
    summary("compress", "ddpo_is", 1e-3, 1, 0.1),  # no sweep-seed run: left out
  ]
  results = study.assemble(summaries, sweep_seed=0)
  assert list(results) == ["compress", "toy_alignment"]
  assert list(results["compress"]) == ["rwr"]
  entry = results["compress"]["rwr"]
  assert entry["learning_rate"] == 3e-4 and entry["sweep"] == {1e-4: 0.5, 3e-4: 0.7, 1e-3: 0.7}
  assert [r["seed"] for r in entry["runs"]] == [0, 1, 2]
  assert results["toy_alignment"]["ddpo_is"]["learning_rate"] == 1e-3


def test_the_committed_study_table_comes_from_the_committed_summaries():
  """docs/study/study.md is what the committed run summaries give (python -m experiments.study --summaries_only)."""
  folder = os.path.join(os.path.dirname(__file__), "..", "docs", "study")
  summaries = study.load_summaries(folder)
  assert summaries, "no run summaries under docs/study/runs"
  for s in summaries:
    assert s["settings"]["seed"] == s["seed"] and s["settings"]["train.learning_rate"] == s["learning_rate"]
    assert s["settings"]["train.method"] == s["method"] and len(s["reward"]) == s["num_epochs"]
  with open(os.path.join(folder, "study.md"), encoding="utf-8") as f:
    assert f.read() == study.table(study.assemble(summaries, sweep_seed=0)) + "\n"


def test_study_ordering_check():
  def runs(end):
    return {"runs": [{"start": 0.0, "end": end}]}

  assert study.ordering({"ddpo_is": runs(3), "ddpo_sf": runs(2), "rwr": runs(1), "rwr_sparse": runs(0)}) == "yes"
  assert study.ordering({"ddpo_is": runs(3), "ddpo_sf": runs(2), "rwr": runs(2.5)}) == "no"
  assert study.ordering({"ddpo_is": runs(1), "ddpo_sf": runs(2)}) == "no"
  assert study.ordering({"rwr": runs(1)}) == "–"
