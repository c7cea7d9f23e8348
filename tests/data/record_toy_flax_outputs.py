"""Records what diffusers' and transformers' (removed) Flax classes compute for the shipped toy model.

    pip install diffusers==0.39.0 transformers==4.57.6 && python tests/data/record_toy_flax_outputs.py

writes tests/data/toy_flax_outputs.npz: the inputs and outputs of FlaxUNet2DConditionModel,
FlaxAutoencoderKL (encode's mean and logvar, decode) and FlaxCLIPTextModel on the toy model's
msgpack weights. tests/test_toy_flax_outputs.py checks our modules against it, so the shipped
model keeps computing what it was trained to compute after those classes are gone. Run once
(2026-12-01, diffusers 0.39.0, transformers 4.57.6, jax 0.10.2, CPU).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

TOY = os.path.join(os.path.dirname(__file__), "..", "..", "ddpo_jax", "toy", "model")
OUT = os.path.join(os.path.dirname(__file__), "toy_flax_outputs.npz")


def main():
  from diffusers import FlaxAutoencoderKL
  from diffusers import FlaxUNet2DConditionModel
  from transformers import FlaxCLIPTextModel

  rng = np.random.default_rng(0)
  arrays = {
    "unet_sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
    "unet_timesteps": np.array([10, 900], np.int32),
    "unet_context": rng.standard_normal((2, 16, 32)).astype(np.float32),
    "vae_images": rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32),
    "vae_latents": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
  }
  ids = rng.integers(0, 595, (2, 16)).astype(np.int32)
  ids[0, 5:], ids[1, 9:] = 595, 595
  arrays["text_ids"] = ids

  unet, unet_params = FlaxUNet2DConditionModel.from_pretrained(TOY, subfolder="unet")
  arrays["unet_out"] = np.asarray(
    unet.apply(
      {"params": unet_params}, arrays["unet_sample"], jnp.asarray(arrays["unet_timesteps"]), arrays["unet_context"]
    ).sample
  )
  vae, vae_params = FlaxAutoencoderKL.from_pretrained(TOY, subfolder="vae")
  posterior = vae.apply({"params": vae_params}, arrays["vae_images"], method=vae.encode).latent_dist
  arrays["vae_mean"] = np.asarray(jnp.transpose(posterior.mean, (0, 3, 1, 2)))
  arrays["vae_logvar"] = np.asarray(jnp.transpose(posterior.logvar, (0, 3, 1, 2)))
  arrays["vae_decoded"] = np.asarray(vae.apply({"params": vae_params}, arrays["vae_latents"], method=vae.decode).sample)
  text = FlaxCLIPTextModel.from_pretrained(TOY, subfolder="text_encoder")
  outputs = text(ids)
  arrays["text_last_hidden_state"] = np.asarray(outputs.last_hidden_state)
  arrays["text_pooled"] = np.asarray(outputs.pooler_output)
  np.savez_compressed(OUT, **arrays)
  print(f"wrote {OUT}: " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()), jax.__version__)


if __name__ == "__main__":
  main()
