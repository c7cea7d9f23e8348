"""The shipped toy model through our modules computes what diffusers' and transformers' Flax classes
computed with its weights (recorded by tests/data/record_toy_flax_outputs.py before they were removed)."""

import os

import numpy as np
import pytest

from ddpo_jax import models

RECORDED = os.path.join(os.path.dirname(__file__), "data", "toy_flax_outputs.npz")


def relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def toy():
  model, params = models.load(models.TOY_MODEL)
  return model, params, dict(np.load(RECORDED))


def test_unet(toy):
  model, params, recorded = toy
  out = models.predict_noise(
    model, params["unet"], recorded["unet_sample"], recorded["unet_timesteps"], recorded["unet_context"]
  )
  assert relative_error(out, recorded["unet_out"]) < 1e-5


def test_vae(toy):
  model, params, recorded = toy
  posterior = model.vae.apply({"params": params["vae"]}, recorded["vae_images"], method="encode")
  assert relative_error(posterior.mean, recorded["vae_mean"]) < 1e-5
  assert relative_error(posterior.logvar, recorded["vae_logvar"]) < 1e-5
  decoded = model.vae.apply({"params": params["vae"]}, recorded["vae_latents"], method="decode")
  assert relative_error(decoded, recorded["vae_decoded"]) < 1e-5


def test_text_encoder(toy):
  model, params, recorded = toy
  outputs = model.text_encoder.apply({"params": params["text_encoder"]}, recorded["text_ids"])
  assert relative_error(outputs.last_hidden_state, recorded["text_last_hidden_state"]) < 1e-5
  assert relative_error(outputs.pooled, recorded["text_pooled"]) < 1e-5
  # models.encode_prompts is the last hidden state.
  np.testing.assert_array_equal(
    models.encode_prompts(model, params["text_encoder"], recorded["text_ids"]), outputs.last_hidden_state
  )
