"""Model loading: the tests' tiny model goes through the same code path as SD."""

import os
import shutil

import jax
import numpy as np
import pytest

from ddpo_jax import config_utils
from ddpo_jax import models
from ddpo_jax.models import attention
from ddpo_jax.models import pytorch_weights
from ddpo_jax.toy import shapes
from tests import tiny_model


def test_tiny_model_loads(tiny_loaded):
  model, params = tiny_loaded
  assert set(params) == {"unet", "vae", "text_encoder"}
  assert model.latent_size == 8 and model.vae_scale_factor == 2 and model.image_size == 16
  assert model.schedule.steps_offset == 1 and model.schedule.prediction_type == "epsilon"
  np.testing.assert_allclose(model.schedule.final_alpha_cumprod, model.schedule.alphas_cumprod[0], rtol=1e-6)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))


def _inputs(model, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((batch, model.latent_channels, model.latent_size, model.latent_size))
  context = rng.standard_normal((batch, model.max_prompt_tokens, model.text_hidden_size))
  return latents.astype(np.float32), np.array([10, 500][:batch]), context.astype(np.float32)


def test_saved_folder_loads_in_diffusers_pytorch(tiny_loaded, tiny_model_dir):
  """`models.save` writes PyTorch safetensors that diffusers' and transformers' PyTorch classes load
  (strictly: no missing or unexpected weights) and that compute what our modules compute."""
  from diffusers import StableDiffusionPipeline
  import torch

  model, params = tiny_loaded
  pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
  latents, timesteps, context = _inputs(model)
  with torch.no_grad():
    theirs = pipeline.unet(torch.from_numpy(latents), torch.from_numpy(timesteps), torch.from_numpy(context)).sample
    ids = models.tokenize(model, ["a red circle on a plain blue background"])
    their_text = pipeline.text_encoder(torch.from_numpy(ids.astype(np.int64)))[0]
    their_images = pipeline.vae.decode(torch.from_numpy(latents)).sample
  ours = models.predict_noise(model, params["unet"], latents, timesteps, context)
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5, atol=1e-5 * np.abs(theirs.numpy()).max())
  our_text = models.encode_prompts(model, params["text_encoder"], ids)
  np.testing.assert_allclose(our_text, their_text.numpy(), rtol=1e-5, atol=1e-5)
  our_images = model.vae.apply({"params": params["vae"]}, latents, method="decode")
  np.testing.assert_allclose(our_images, their_images.numpy(), rtol=1e-5, atol=1e-5)
  assert pipeline.tokenizer(["a red circle"]).input_ids[0] == list(models.tokenize(model, ["a red circle"])[0][:5])


def test_folder_saved_by_pytorch_loads(tiny_model_dir, tmp_path):
  """Weights saved by diffusers' and transformers' own PyTorch save_pretrained load through models.load."""
  from diffusers import UNet2DConditionModel
  import torch

  torch_dir = str(tmp_path / "pt")
  tiny_model.save_with_pytorch(tiny_model_dir, torch_dir)
  model, params = models.load(torch_dir)
  latents, timesteps, context = _inputs(model)
  ours = np.asarray(models.predict_noise(model, params["unet"], latents, timesteps, context))
  with torch.no_grad():
    reference = UNet2DConditionModel.from_pretrained(torch_dir, subfolder="unet")(
      torch.from_numpy(latents), torch.from_numpy(timesteps), torch.from_numpy(context)
    ).sample.numpy()
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def test_save_load_round_trip(tiny_loaded, tmp_path):
  model, params = tiny_loaded
  models.save(model, params, str(tmp_path))
  _, loaded = models.load(str(tmp_path))
  assert jax.tree.structure(params) == jax.tree.structure(loaded)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_old_flax_msgpack_folders_load(tiny_loaded, tmp_path):
  """A folder of diffusers'/transformers' Flax msgpack weights (the shipped toy model's format) loads as stored."""
  from flax import serialization

  model, params = tiny_loaded
  folder = str(tmp_path / "flax")
  models.save(model, params, folder)
  for component in ("unet", "vae", "text_encoder"):
    os.remove(os.path.join(folder, component, models.diffusion.PYTORCH_WEIGHTS[component]))
    with open(os.path.join(folder, component, models.diffusion.FLAX_WEIGHTS[component]), "wb") as f:
      f.write(serialization.msgpack_serialize(jax.tree.map(np.asarray, params[component])))
  _, loaded = models.load(folder)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A msgpack of another architecture is refused with the paths that differ.
  with open(os.path.join(folder, "vae", models.diffusion.FLAX_WEIGHTS["vae"]), "wb") as f:
    f.write(serialization.msgpack_serialize({"encoder": {"conv_in": {"kernel": np.zeros((3, 3, 3, 8))}}}))
  with pytest.raises(ValueError, match="vae.*missing"):
    models.load(folder)


def test_shipped_toy_model_loads_from_msgpack():
  model, params = models.load(models.TOY_MODEL)
  assert model.unet.config.flax_numerics  # trained with diffusers' Flax classes' numerics
  assert model.latent_size == 8 and model.max_prompt_tokens == 16


def test_pickled_weights_are_refused(tiny_loaded, tmp_path):
  model, params = tiny_loaded
  folder = str(tmp_path / "pickled")
  models.save(model, params, folder)
  unet = os.path.join(folder, "unet")
  os.remove(os.path.join(unet, models.diffusion.PYTORCH_WEIGHTS["unet"]))
  open(os.path.join(unet, "diffusion_pytorch_model.bin"), "wb").close()
  with pytest.raises(pytorch_weights.PickledWeightsError, match="safetensors"):
    models.load(folder)


@pytest.mark.parametrize(
  "scheduler",
  [
    {},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "set_alpha_to_one": True, "steps_offset": 0},
    {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"},
  ],
)
def test_noise_schedule_equals_diffusers(scheduler):
  from diffusers import DDIMScheduler

  config = dict(models.SD_V1_SCHEDULER, **scheduler)
  ours = models.diffusion.schedule_from_config(config)
  theirs = DDIMScheduler.from_config(config)
  np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=5e-6)  # float32 products
  assert ours.final_alpha_cumprod == pytest.approx(float(theirs.final_alpha_cumprod), rel=1e-6)
  assert ours.steps_offset == config["steps_offset"] and ours.prediction_type == config["prediction_type"]


def test_unsupported_scheduler_settings_are_refused():
  with pytest.raises(ValueError, match="timestep_spacing='trailing'"):
    models.diffusion.schedule_from_config(dict(models.SD_V1_SCHEDULER, timestep_spacing="trailing"))


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


def test_unet_with_blocked_attention_equals_xla(tiny_loaded, monkeypatch):
  """The UNet's output and gradient with the blocked attention equal those with the plain XLA one."""
  model, params = tiny_loaded
  rng = np.random.default_rng(0)
  size = (4, model.latent_channels, model.latent_size, model.latent_size)
  latents = rng.standard_normal(size).astype(np.float32)
  context = rng.standard_normal((4, model.max_prompt_tokens, model.text_hidden_size)).astype(np.float32)
  calls = []
  original = attention.blocked_attention
  monkeypatch.setattr(attention, "blocked_attention", lambda *args: calls.append(args[-1]) or original(*args))
  outputs, grads = {}, {}
  for setting in ("0", "0.001"):  # 0: XLA's attention; 1 kB: blocks of a few queries
    blocked = models.with_attention_block(model, float(setting))
    predict = lambda p, m=blocked: models.predict_noise(m, p, latents, np.full(4, 500), context)
    outputs[setting] = np.asarray(predict(params["unet"]))
    grads[setting] = jax.grad(lambda p, f=predict: (f(p) ** 2).mean())(params["unet"])
  np.testing.assert_allclose(outputs["0.001"], outputs["0"], rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(grads["0.001"]), jax.tree.leaves(grads["0"])):
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * np.abs(want).max() + 1e-7)
  assert calls and set(calls) == {int(0.001 * 2**20)}  # "0" used XLA's attention, "0.001" the blocked one


def test_attention_block_setting_is_resolved_per_attention():
  assert config_utils.resolve_attention_block_mb("auto", "blocked") == 4.0
  assert config_utils.resolve_attention_block_mb("auto", "flash") == 0.0
  assert config_utils.resolve_attention_block_mb("0.5", "blocked") == 0.5
  for bad in ("big", "-1", "inf"):
    with pytest.raises(ValueError, match="config.model.attention_block_mb"):
      config_utils.resolve_attention_block_mb(bad, "blocked")


def test_hub_ids_download_configs_tokenizer_and_canonical_safetensors(tiny_model_dir, tmp_path, monkeypatch):
  """Offline: snapshot_download replaced by a copy that honours allow_patterns (fnmatch, as huggingface_hub)."""
  import fnmatch

  import huggingface_hub

  calls = []

  def snapshot_download(repo_id, revision=None, allow_patterns=None):
    calls.append((repo_id, revision, tuple(allow_patterns)))
    target = tmp_path / "snapshot"
    for root, _, files in os.walk(repo):
      for name in files:
        relative = os.path.relpath(os.path.join(root, name), repo)
        if any(fnmatch.fnmatch(relative, p) for p in allow_patterns):
          os.makedirs(target / os.path.dirname(relative), exist_ok=True)
          shutil.copy(os.path.join(root, name), target / relative)
    return str(target)

  # The "repo" also holds an fp16 variant and a pickle, which are not fetched.
  repo = str(tmp_path / "repo")
  shutil.copytree(tiny_model_dir, repo)
  for extra in ("unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin"):
    shutil.copy(os.path.join(repo, "unet", "diffusion_pytorch_model.safetensors"), os.path.join(repo, extra))
  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
  model, params = models.load("someone/tiny-sd", revision="v1")
  assert calls == [("someone/tiny-sd", "v1", models.diffusion.HUB_PATTERNS)]
  assert sorted(os.listdir(tmp_path / "snapshot" / "unet")) == ["config.json", "diffusion_pytorch_model.safetensors"]
  assert model.latent_size == 8 and set(params) == {"unet", "vae", "text_encoder"}
  with pytest.raises(ValueError, match="config.model.revision"):
    models.load(tiny_model_dir, revision="v1")


def test_weight_variants_without_the_canonical_file_are_refused(tiny_loaded, tmp_path):
  model, params = tiny_loaded
  folder = str(tmp_path / "variants")
  models.save(model, params, folder)
  unet = os.path.join(folder, "unet")
  os.rename(os.path.join(unet, "diffusion_pytorch_model.safetensors"), os.path.join(unet, "a.fp16.safetensors"))
  shutil.copy(os.path.join(unet, "a.fp16.safetensors"), os.path.join(unet, "a.non_ema.safetensors"))
  with pytest.raises(ValueError, match="several weight files.*diffusion_pytorch_model.safetensors"):
    models.load(folder)
