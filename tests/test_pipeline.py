"""A Stable Diffusion folder written by diffusers' PyTorch pipeline samples the same images with our code."""

import jax
import numpy as np
import pytest

from ddpo_jax import models
from ddpo_jax import sampling
from tests import tiny_model

PROMPTS = ["a red circle on a plain blue background", "a green square"]


@pytest.fixture(scope="module")
def pytorch_pipeline(tiny_model_dir, tmp_path_factory):
  """(diffusers' StableDiffusionPipeline with a DDIM scheduler, the folder its save_pretrained wrote)."""
  from diffusers import DDIMScheduler
  from diffusers import StableDiffusionPipeline

  components = str(tmp_path_factory.mktemp("components"))
  tiny_model.save_with_pytorch(tiny_model_dir, components + "/model", seed=1)
  pipeline = StableDiffusionPipeline.from_pretrained(
    components + "/model", safety_checker=None, requires_safety_checker=False
  )
  pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
  folder = str(tmp_path_factory.mktemp("pipeline"))
  pipeline.save_pretrained(folder, safe_serialization=True)
  return pipeline, folder


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_ddim_images_equal_diffusers_pipeline(pytorch_pipeline, guidance_scale):
  """eta 0, the same initial noise: uint8 images within 1 level (the test fails on any weight, schedule,
  tokenizer, guidance or decoding difference: shifting the UNet's output bias by 1e-2 fails it)."""
  import torch

  pipeline, folder = pytorch_pipeline
  model, params = models.load(folder)
  settings = sampling.SamplerSettings(num_steps=4, eta=0.0, guidance_scale=guidance_scale)
  token_ids = models.tokenize(model, PROMPTS)
  negative = models.tokenize(model, [""])[0]
  trajectory, _, ours = sampling.make_sampler(model, settings)(params, token_ids, negative, jax.random.key(0))
  initial = np.asarray(trajectory.latents[:, 0])
  with torch.no_grad():
    theirs = pipeline(
      PROMPTS,
      num_inference_steps=4,
      guidance_scale=guidance_scale,
      eta=0.0,
      latents=torch.from_numpy(initial),
      output_type="np",
    ).images
  theirs = np.round(theirs * 255).astype(np.int32)
  ours = np.asarray(ours).astype(np.int32)
  assert ours.shape == theirs.shape == (2, model.image_size, model.image_size, 3)
  assert np.abs(ours - theirs).max() <= 1, np.abs(ours - theirs).max()
  assert ours.std() > 5  # not a flat image, which would hide differences
