"""Model loading: the tests' tiny model goes through the same code path as SD."""

import jax
import numpy as np
import pytest

from ddpo_jax import config_utils
from ddpo_jax import models
from ddpo_jax.models import attention
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


def _numpy_attention(q, k, v, scale):
  scores = np.einsum("bqhd,bshd->bhqs", q, k) * scale
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhqs,bshd->bqhd", probs, v), probs


def _numpy_attention_grads(q, k, v, d_out, scale):
  """dq, dk, dv of sum(out * d_out) by the chain rule through softmax, in NumPy."""
  _, probs = _numpy_attention(q, k, v, scale)
  dv = np.einsum("bhqs,bqhd->bshd", probs, d_out)
  d_probs = np.einsum("bqhd,bshd->bhqs", d_out, v)
  d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdims=True)) * scale
  return np.einsum("bhqs,bshd->bqhd", d_scores, k), np.einsum("bhqs,bqhd->bshd", d_scores, q), dv


@pytest.mark.parametrize("shape", [(2, 64, 10, 3, 4), (6, 64, 64, 2, 4)])
def test_blocked_attention_and_gradients_match_numpy(shape):
  batch, length, num_keys, heads, depth = shape
  rng = np.random.default_rng(0)
  q, d_out = rng.standard_normal((2, batch, length, heads, depth))
  k, v = rng.standard_normal((2, batch, num_keys, heads, depth))
  expected = _numpy_attention(q, k, v, 0.5)[0]
  expected_grads = _numpy_attention_grads(q, k, v, d_out, 0.5)
  one_query, one_example = heads * num_keys * 4, heads * num_keys * length * 4
  blocks = {0: (1, 1), one_query: (1, 1), 8 * one_query: (1, 8), 2 * one_example: (2, length), 1 << 30: None}
  f32 = lambda *xs: [x.astype(np.float32) for x in xs]
  for block_bytes, layout in blocks.items():
    if layout:  # one query, chunks of queries, whole examples; 1 GB: everything in one block
      assert attention.attention_blocks((batch, length, heads), num_keys, block_bytes) == layout
    out = jax.jit(attention.blocked_attention, static_argnums=(3, 4))(*f32(q, k, v), 0.5, block_bytes)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    loss = lambda q, k, v, b=block_bytes: (
      attention.blocked_attention(q, k, v, 0.5, b) * d_out.astype(np.float32)
    ).sum()
    for got, want in zip(jax.grad(loss, (0, 1, 2))(*f32(q, k, v)), expected_grads):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_unet_with_blocked_attention_equals_diffusers(tiny_loaded, monkeypatch):
  """The UNet's output and gradient with our attention layers equal diffusers' own (same params)."""
  model, params = tiny_loaded
  rng = np.random.default_rng(0)
  size = (4, model.latent_channels, model.latent_size, model.latent_size)
  latents = rng.standard_normal(size).astype(np.float32)
  context = rng.standard_normal((4, model.max_prompt_tokens, model.text_hidden_size)).astype(np.float32)
  calls = []
  original = attention.blocked_attention
  monkeypatch.setattr(attention, "blocked_attention", lambda *args: calls.append(args[-1]) or original(*args))
  outputs, grads = {}, {}
  for setting in ("0", "0.001"):  # 0: diffusers' layers; 1 kB: blocks of a few queries
    blocked = models.with_attention_block(model, float(setting))
    predict = lambda p, m=blocked: models.predict_noise(m, p, latents, np.full(4, 500), context)
    outputs[setting] = np.asarray(predict(params["unet"]))
    grads[setting] = jax.grad(lambda p, f=predict: (f(p) ** 2).mean())(params["unet"])
  np.testing.assert_allclose(outputs["0.001"], outputs["0"], rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(grads["0.001"]), jax.tree.leaves(grads["0"])):
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * np.abs(want).max() + 1e-7)
  assert calls and set(calls) == {int(0.001 * 2**20)}  # "0" used diffusers' layers, "0.001" ours


def test_attention_block_setting_is_resolved_per_backend():
  assert config_utils.resolve_attention_block_mb("auto", "cpu") == 4.0
  assert config_utils.resolve_attention_block_mb("auto", "tpu") == 0.0
  assert config_utils.resolve_attention_block_mb("0.5", "cpu") == 0.5
  for bad in ("big", "-1", "inf"):
    with pytest.raises(ValueError, match="config.model.attention_block_mb"):
      config_utils.resolve_attention_block_mb(bad, "cpu")
