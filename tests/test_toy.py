"""The toy world: generator, ground truth, and the shipped pretrained model."""

import jax
import numpy as np
import pytest

from ddpo_jax import models
from ddpo_jax import sampling
from ddpo_jax.rewards import jpeg
from ddpo_jax.toy import pretrain
from ddpo_jax.toy import samples as toy_samples
from ddpo_jax.toy import shapes


def test_generator_is_deterministic():
  a_images, a_captions = shapes.sample_batch(np.random.default_rng(3), 16)
  b_images, b_captions = shapes.sample_batch(np.random.default_rng(3), 16)
  np.testing.assert_array_equal(a_images, b_images)
  assert a_captions == b_captions
  c_images, _ = shapes.sample_batch(np.random.default_rng(4), 16)
  assert not np.array_equal(a_images, c_images)


def test_captions_match_the_drawn_attributes():
  rng = np.random.default_rng(0)
  for scene in shapes.all_scenes()[::3]:
    image = shapes.render(scene, rng)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert shapes.analyse(image) == scene, scene.caption
    assert shapes.Scene.from_caption(scene.caption) == scene


def test_backgrounds_span_compressibility():
  rng = np.random.default_rng(0)
  sizes = {}
  for pattern in shapes.PATTERNS:
    images = [shapes.render(shapes.Scene("red", "circle", pattern, "blue"), rng) for _ in range(8)]
    sizes[pattern] = float(np.mean(jpeg.jpeg_sizes_kb(np.stack(images))))
  assert sizes["plain"] < sizes["gradient"] < sizes["noisy"]
  assert sizes["plain"] < sizes["striped"] < sizes["noisy"]


def test_unknown_caption_is_refused():
  with pytest.raises(ValueError, match="not a toy-world caption"):
    shapes.Scene.from_caption("a photo of a cat")
  with pytest.raises(ValueError, match="'pink'"):
    shapes.Scene.from_caption("a pink circle on a plain blue background")


@pytest.fixture(scope="module")
def toy_samples_and_random(tmp_path_factory):
  """Samples of the shipped model and of a random model of the same shape,
  from the same prompts, noise and (compiled) sampler."""
  model, params = models.load(models.TOY_MODEL)
  _, random_params = pretrain.build_random(seed=1, tokenizer_dir=str(tmp_path_factory.mktemp("tok")))
  prompts = toy_samples.evaluation_prompts(32, seed=0)
  settings = sampling.SamplerSettings(num_steps=20, eta=1.0, guidance_scale=5.0)
  sampler = sampling.make_sampler(model, settings)
  token_ids = models.tokenize(model, prompts)
  negative = models.tokenize(model, [""])[0]
  key = jax.random.PRNGKey(0)
  shipped = np.asarray(sampler(params, token_ids, negative, key)[2])
  random = np.asarray(sampler(random_params, token_ids, negative, key)[2])
  return prompts, shipped, random


def test_shipped_model_draws_what_the_prompt_says(toy_samples_and_random):
  prompts, shipped, random = toy_samples_and_random
  shipped_score = np.mean([shapes.alignment(im, p) for im, p in zip(shipped, prompts)])
  random_score = np.mean([shapes.alignment(im, p) for im, p in zip(random, prompts)])
  assert shipped_score > 0.6 and shipped_score > random_score + 0.3, (shipped_score, random_score)


def test_jpeg_sizes_vary_across_prompts(toy_samples_and_random):
  _, shipped, random = toy_samples_and_random
  shipped_std = jpeg.jpeg_sizes_kb(shipped).std()
  random_std = jpeg.jpeg_sizes_kb(random).std()
  assert shipped_std > 5 * random_std and shipped_std > 0.05, (shipped_std, random_std)


def test_pretraining_is_reproducible_from_its_seed(tmp_path):
  """Two runs of the pretraining script with one seed write identical weights
  (a few steps of both stages; the shipped weights are 2000 + 8000 steps)."""
  runs = []
  for name in ("a", "b"):
    out = str(tmp_path / name)
    pretrain.pretrain(out, seed=3, vae_steps=2, vae_batch_size=4, unet_steps=2, unet_batch_size=4, caption_dropout=0.5)
    runs.append(models.load(out)[1])
  for x, y in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
