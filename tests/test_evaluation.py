"""The held-out evaluation (ddpo_jax/evaluation.py) on stand-in samples: no model, nothing compiled."""

import jax.numpy as jnp
import numpy as np

from ddpo_jax import config_utils
from ddpo_jax import evaluation


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
