"""The held-out evaluation (ddpo_jax/evaluation.py) on stand-in samples: no model, nothing compiled."""

import jax.numpy as jnp
import numpy as np
from PIL import Image

from ddpo_jax import config_utils
from ddpo_jax import evaluation
from ddpo_jax import metrics


class FakeSteps:
  """What `Evaluator` uses of `steps.build`'s result: `eval_sample` returns fixed random images per batch."""

  negative_tokens = None

  def __init__(self, num_batches: int, batch_size: int):
    rng = np.random.default_rng(0)
    self.images = [rng.integers(0, 256, (batch_size, 8, 8, 3), dtype=np.uint8) for _ in range(num_batches)]
    self.calls = 0

  def token_ids(self, prompts):
    return prompts

  def eval_sample(self, params, base, token_ids, negative_tokens, key):
    images = jnp.asarray(self.images[self.calls % len(self.images)])
    self.calls += 1
    return None, None, images


def test_a_reward_that_writes_into_its_images_cannot_change_the_others():
  """The trained reward scores first; if it could write into the images, the other rewards, the diversity and
  the grid would see its writes."""
  config = config_utils.override(
    config_utils.get_config("configs/compress.py:tiny"),
    {"eval.num_samples": 64, "eval.rewards": ("jpeg_incompressibility",)},
  )
  steps = FakeSteps(config.eval.num_samples // config.sample.batch_size, config.sample.batch_size)

  def harmless(images, prompts):
    return np.zeros(len(images), np.float32)

  def blanking(images, prompts):
    images[...] = 0
    return np.zeros(len(images), np.float32)

  clean, clean_images, _ = evaluation.Evaluator(config, steps, harmless).evaluate(params=None)
  metrics, images, _ = evaluation.Evaluator(config, steps, blanking).evaluate(params=None)
  np.testing.assert_array_equal(images, np.concatenate(steps.images))
  np.testing.assert_array_equal(images, clean_images)
  for name in ("reward_jpeg_incompressibility_mean", "diversity", "diversity_all"):
    assert metrics[name] == clean[name], name
  assert clean["reward_jpeg_compressibility_invalid"] == 0
  assert metrics["reward_jpeg_compressibility_invalid"] == config.eval.num_samples  # its writes raised: dropped


def test_the_last_evaluation_writes_the_first_ones_images_beside_its_own_after_a_resume(tmp_path):
  config = config_utils.get_config("configs/compress.py:tiny")
  steps = FakeSteps(config.eval.num_samples // config.sample.batch_size, config.sample.batch_size)
  evaluator = evaluation.Evaluator(config, steps, lambda images, prompts: np.zeros(len(images), np.float32))
  n = config.logging.num_images
  with metrics.MetricWriter(str(tmp_path)) as writer:
    start_metrics, before, before_labels = evaluator.evaluate(params=None)
    evaluator.write(writer, -1, 0, start_metrics, before, before_labels)
  assert not (tmp_path / "images" / "before_after.png").exists()
  steps.images = [np.flip(images, axis=1) for images in steps.images]  # "trained": other samples
  with metrics.MetricWriter(str(tmp_path)) as writer:  # a new writer, as in a resumed run
    final_metrics, after, after_labels = evaluator.evaluate(params=None)
    evaluator.write(writer, 5, 64, final_metrics, after, after_labels, final=True)
  picture = np.asarray(Image.open(tmp_path / "images" / "before_after.png"))
  expected = metrics.before_after_grid(
    before[:n], before_labels[:n], after[:n], after_labels[:n], evaluation.before_after_titles(5)
  )
  np.testing.assert_array_equal(picture, expected)
  left = metrics.make_grid(before[:n], before_labels[:n], columns=4)
  np.testing.assert_array_equal(picture[picture.shape[0] - left.shape[0] :, : left.shape[1]], left)
