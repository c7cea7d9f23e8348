"""Model loading: the tests' tiny model goes through the same code path as SD."""

import jax
import numpy as np

from ddpo_jax import models
from ddpo_jax.toy import shapes


def test_tiny_model_loads(tiny_loaded):
  model, params = tiny_loaded
  assert set(params) == {"unet", "vae", "text_encoder"}
  assert model.latent_size == 8 and model.vae_scale_factor == 2 and model.image_size == 16
  assert model.schedule.steps_offset == 1 and model.schedule.prediction_type == "epsilon"
  np.testing.assert_allclose(model.schedule.final_alpha_cumprod, model.schedule.alphas_cumprod[0], rtol=1e-6)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))


def test_layout_is_diffusers_standard(tiny_model_dir):
  """The folder also loads with diffusers' own pipeline class."""
  from diffusers import FlaxStableDiffusionPipeline

  pipeline, params = FlaxStableDiffusionPipeline.from_pretrained(
    tiny_model_dir, safety_checker=None, feature_extractor=None
  )
  assert set(params) >= {"unet", "vae", "text_encoder", "scheduler"}
  assert pipeline.tokenizer.model_max_length == 12


def test_save_load_round_trip(tiny_loaded, tmp_path):
  model, params = tiny_loaded
  models.save(model, params, str(tmp_path))
  _, loaded = models.load(str(tmp_path))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_compute_keeps_float32_params(tiny_model_dir):
  model, params = models.load(tiny_model_dir, dtype="bfloat16")
  assert model.unet.dtype == np.dtype("bfloat16")
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))


def test_vocabulary_words_are_spelt_by_few_tokens(tiny_loaded):
  model, _ = tiny_loaded
  for word in shapes.vocabulary():
    pieces = model.tokenizer.tokenize(word)
    assert len(pieces) <= 3 and "".join(pieces) == word + "</w>", (word, pieces)
  assert sum(len(model.tokenizer.tokenize(w)) == 1 for w in shapes.vocabulary()) >= 15
  ids = models.tokenize(model, ["a red circle on a plain blue background", ""])
  assert ids.shape == (2, 12)
  bos, eos = model.tokenizer.bos_token_id, model.tokenizer.eos_token_id
  assert ids[0, 0] == bos and ids[0, 9] == eos and ids[1, 1] == eos


def test_local_or_hub_names(tmp_path):
  assert models.is_local(str(tmp_path)) and models.is_local("./x") and models.is_local(models.TOY_MODEL)
  assert not models.is_local("CompVis/stable-diffusion-v1-4")
  assert models.check_model_folder("/nonexistent") is not None


def test_pytorch_weights_are_converted(tiny_model_dir, tmp_path):
  """A folder of PyTorch weights loads with from_pt and computes what torch does."""
  from diffusers import UNet2DConditionModel
  import torch

  from tests import tiny_model

  torch_dir = str(tmp_path / "pt")
  tiny_model.save_as_pytorch(tiny_model_dir, torch_dir)
  model, params = models.load(torch_dir, from_pt=True)
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
  context = rng.standard_normal((2, 12, 16)).astype(np.float32)
  timesteps = np.array([10, 500])
  ours = np.asarray(models.predict_noise(model, params["unet"], latents, timesteps, context))
  with torch.no_grad():
    reference = UNet2DConditionModel.from_pretrained(torch_dir, subfolder="unet")(
      torch.from_numpy(latents), torch.from_numpy(timesteps), torch.from_numpy(context)
    ).sample.numpy()
  np.testing.assert_allclose(ours, reference, atol=2e-4 * np.abs(reference).max())


def test_chunked_attention_matches_numpy():
  rng = np.random.default_rng(0)
  q = rng.standard_normal((2, 64, 3, 4)).astype(np.float32)
  k, v = rng.standard_normal((2, 2, 10, 3, 4)).astype(np.float32)
  scores = np.einsum("bqhd,bshd->bhqs", q, k) * 0.5
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  expected = np.einsum("bhqs,bshd->bqhd", probs / probs.sum(-1, keepdims=True), v)
  for chunk in (0, 16, 64, 48):  # 48 does not divide 64: one chunk
    np.testing.assert_allclose(models.chunked_attention(q, k, v, 0.5, chunk), expected, rtol=1e-5, atol=1e-6)


def test_unet_with_chunked_attention_equals_diffusers(tiny_loaded, monkeypatch):
  """The UNet's output with the chunked attention layers equals diffusers' own (same params)."""
  model, params = tiny_loaded
  rng = np.random.default_rng(0)
  size = (4, model.latent_channels, model.latent_size, model.latent_size)
  latents = rng.standard_normal(size).astype(np.float32)
  context = rng.standard_normal((4, model.max_prompt_tokens, model.text_hidden_size)).astype(np.float32)
  calls = []
  original = models.chunked_attention
  monkeypatch.setattr(models, "chunked_attention", lambda *args: calls.append(args[-1]) or original(*args))
  outputs = {}
  for chunk in (0, 4):
    monkeypatch.setattr(models, "QUERY_CHUNK", chunk)
    outputs[chunk] = np.asarray(models.predict_noise(model, params["unet"], latents, np.full(4, 500), context))
  np.testing.assert_allclose(outputs[4], outputs[0], rtol=1e-5, atol=1e-5)
  assert calls and set(calls) == {4}  # chunk 0 used diffusers' layers, chunk 4 ours
  assert model.latent_size**2 > 4  # more queries than a chunk: the chunked path
