"""Several rewards at once, and rewards that fail: NaN, inf, a wrong shape or
an exception, either stopping the run or dropped and counted."""

import numpy as np
import pytest

from ddpo_jax import advantages
from ddpo_jax import config_utils
from ddpo_jax import metrics
from ddpo_jax import rewards
from ddpo_jax import train
from ddpo_jax import validation
from ddpo_jax.methods import ddpo

IMAGES = np.zeros((4, 8, 8, 3), np.uint8)
PROMPTS = ["a cat", "a dog", "a fox", "an owl"]


@rewards.register("test_prompt_length")
def prompt_length():
  return lambda images, prompts: np.array([len(p) for p in prompts], np.float32)


@rewards.register("test_nan_for_dogs")
def nan_for_dogs():
  return lambda images, prompts: np.array([np.nan if "dog" in p else 1.0 for p in prompts], np.float32)


@rewards.register("test_broken")
def broken(kind: str = "raise"):
  def fn(images, prompts):
    if kind == "raise":
      raise RuntimeError("the scorer crashed")
    if kind == "shape":
      return np.zeros((len(images), 2))
    return np.array([np.inf] * len(images))

  return fn


def test_plain_rewards_pass_through():
  scored = rewards.score_batch("test_prompt_length", rewards.make("test_prompt_length"), IMAGES, PROMPTS)
  np.testing.assert_array_equal(scored.rewards, [5, 5, 5, 6])
  assert scored.valid.all() and scored.parts == {} and scored.problem == ""


def test_a_reward_cannot_write_into_the_images_it_scores():
  """Training (on several hosts, a concatenation of shards) and evaluation hand rewards writable arrays."""
  images = IMAGES.copy()

  def blanking(images, prompts):
    images[...] = 255
    return np.zeros(len(images), np.float32)

  with pytest.raises(rewards.RewardError, match="read-only"):
    rewards.score_batch("blanking", blanking, images, PROMPTS)
  np.testing.assert_array_equal(images, IMAGES)
  assert images.flags.writeable  # the caller's array is left as it was


def test_weighted_sum_and_its_parts():
  fn = rewards.make(
    "weighted",
    weights={"test_prompt_length": 0.5, "jpeg_compressibility": 2.0},
    component_kwargs={"jpeg_compressibility": {"quality": 90}},
  )
  scored = rewards.score_batch("weighted", fn, IMAGES, PROMPTS)
  jpeg = rewards.make("jpeg_compressibility", quality=90)(IMAGES, PROMPTS)
  np.testing.assert_allclose(scored.rewards, 0.5 * np.array([5, 5, 5, 6]) + 2.0 * jpeg, rtol=1e-6)
  np.testing.assert_array_equal(scored.parts["test_prompt_length"], [5, 5, 5, 6])
  np.testing.assert_allclose(scored.parts["jpeg_compressibility"], jpeg)


@pytest.mark.parametrize(
  "kwargs, message",
  [({"weights": {}}, "empty"), ({"weights": {"jpeg_compressibility": 1.0}, "component_kwargs": {"x": {}}}, "'x'")],
)
def test_weighted_bad_settings(kwargs, message):
  with pytest.raises(ValueError, match=message):
    rewards.make("weighted", **kwargs)


@pytest.mark.parametrize(
  "name, kwargs, message",
  [
    ("test_nan_for_dogs", {}, "returned nan for prompt 'a dog' \\(image 1\\); 1 of 4"),
    ("test_broken", {"kind": "inf"}, "returned inf for prompt 'a cat'"),
    ("test_broken", {"kind": "shape"}, "returned shape \\(4, 2\\).*'a cat'"),
    ("test_broken", {"kind": "raise"}, "'test_broken' failed .* prompt 'a cat': RuntimeError: the scorer crashed"),
  ],
)
def test_invalid_rewards_raise_with_name_and_prompt(name, kwargs, message):
  with pytest.raises(rewards.RewardError, match=message):
    rewards.score_batch(name, rewards.make(name, **kwargs), IMAGES, PROMPTS, on_invalid="raise")


@pytest.mark.parametrize(
  "name, kwargs, valid",
  [
    ("test_nan_for_dogs", {}, [True, False, True, True]),
    ("test_broken", {"kind": "inf"}, [False] * 4),
    ("test_broken", {"kind": "shape"}, [False] * 4),
    ("test_broken", {"kind": "raise"}, [False] * 4),
  ],
)
def test_invalid_rewards_dropped(name, kwargs, valid):
  scored = rewards.score_batch(name, rewards.make(name, **kwargs), IMAGES, PROMPTS, on_invalid="drop")
  np.testing.assert_array_equal(scored.valid, valid)
  assert np.isnan(scored.rewards[~scored.valid]).all() and np.isfinite(scored.rewards[scored.valid]).all()
  assert name in scored.problem


def test_dropped_samples_have_zero_advantage_and_no_say_in_the_statistics():
  prompts = ["a"] * 3 + ["b"] * 3
  scored = rewards.ScoredBatch(
    rewards=np.array([1.0, np.nan, 3.0, 10.0, 20.0, 30.0], np.float32),
    valid=np.array([True, False, True, True, True, True]),
    parts={},
  )
  got = ddpo.stat_tracking_advantages(prompts, scored, None, clip=10.0, epoch=0)
  kept = np.array([1.0, 3.0, 10.0, 20.0, 30.0])
  expected = (kept - kept.mean()) / (kept.std() + advantages.EPS)
  np.testing.assert_allclose(got, np.insert(expected, 1, 0.0), rtol=1e-5)
  metrics = rewards.reward_statistics(scored)
  assert metrics["reward_invalid"] == 1 and metrics["reward_mean"] == pytest.approx(kept.mean())
  with pytest.raises(rewards.RewardError, match="every sample's reward is invalid"):
    ddpo.stat_tracking_advantages(prompts, rewards.ScoredBatch(scored.rewards, np.zeros(6, bool), {}), None, 10.0, 3)


def test_weighted_config_is_validated():
  config = config_utils.get_config("configs/compress.py:tiny")
  config.reward.name = "weighted"
  with pytest.raises(validation.ConfigError, match="kwargs.weights"):
    validation.validate(config, None, 8)
  config.reward.kwargs = {"weights": {"no_such_reward": 1.0}}
  with pytest.raises(validation.ConfigError, match="no_such_reward"):
    validation.validate(config, None, 8)
  config.reward.kwargs = {"weights": {"jpeg_compressibility": 1.0}}
  config.reward.on_invalid = "ignore"
  with pytest.raises(validation.ConfigError, match="on_invalid"):
    validation.validate(config, None, 8)


def test_a_run_with_three_rewards_one_invalid_on_some_prompts(tiny_model_dir, tmp_path):
  """Each part logged; samples whose part is NaN dropped and counted; training finite."""
  config = config_utils.get_config("configs/compress.py:tiny")
  config.model.name = tiny_model_dir
  config.num_epochs = 1
  config.prompt.name = "tests.test_resume:three_shapes"  # "a red circle", "a blue square", "a green cross"
  config.reward.name = "weighted"
  weights = {"jpeg_compressibility": 1.0, "test_prompt_length": 0.1, "test_nan_for_circles": 1.0}
  config.reward.kwargs = {"weights": weights}
  config.reward.on_invalid = "drop"
  config.sample.batch_size = 16
  config.sample.num_steps = 4
  config.train.batch_size = 16
  config.train.gradient_accumulation_steps = 2
  config.logging.images_every_epochs = 0
  summary = train.train_and_evaluate(config, str(tmp_path))
  (record,) = metrics.read_metrics(str(tmp_path), "train")
  assert summary["epoch"] == 0
  assert 0 < record["reward_invalid"] < 32  # the circles
  for key in ("reward_mean", "reward_jpeg_compressibility_mean", "reward_test_prompt_length_mean", "loss"):
    assert np.isfinite(record[key]), key
  # Over the samples kept (squares and crosses) the circles' part is 0.
  assert record["reward_test_nan_for_circles_mean"] == 0.0
  np.testing.assert_allclose(
    record["reward_mean"],
    record["reward_jpeg_compressibility_mean"] + 0.1 * record["reward_test_prompt_length_mean"],
    rtol=1e-5,
  )


@rewards.register("test_nan_for_circles")
def nan_for_circles():
  return lambda images, prompts: np.array([np.nan if "circle" in p else 0.0 for p in prompts], np.float32)
