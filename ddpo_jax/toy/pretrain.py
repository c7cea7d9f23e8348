r"""Pretrains the toy-world model that ships with ddpo_jax.

    python -m ddpo_jax.toy.pretrain --out=ddpo_jax/toy/model

Two stages, reproducible from --seed on the CPU:
1. the VAE (SD's AutoencoderKL, 32x32 RGB -> 8x8x4 latents) as an autoencoder
   (L1 + MSE reconstruction, a small KL term); its latent scaling factor is then
   set to 1 / std of the latents, as SD does;
2. the UNet (SD's UNet2DConditionModel) and the CLIP text encoder together, with
   the standard epsilon-prediction loss on SD v1's noise schedule and caption
   dropout (the empty caption) so that classifier-free guidance works.
Images and captions come on the fly from `ddpo_jax.toy.shapes`. The EMA of the
stage-2 weights is what is saved, in diffusers' save_pretrained layout.
"""

from __future__ import annotations

import functools
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddpo_jax import models
from ddpo_jax.toy import architecture
from ddpo_jax.toy import shapes

FLAGS = flags.FLAGS


def build_random(seed: int, tokenizer_dir: str):
  """The toy model with random weights (also the baseline of the tests)."""
  tokenizer = models.build_tokenizer(shapes.vocabulary(), tokenizer_dir, architecture.MAX_PROMPT_TOKENS)
  return models.build(architecture.UNET_CONFIG, architecture.VAE_CONFIG, architecture.TEXT_CONFIG, tokenizer, seed)


def to_unit_range(images: np.ndarray) -> np.ndarray:
  """uint8 [B, H, W, 3] -> float32 in [-1, 1]."""
  return images.astype(np.float32) / 127.5 - 1.0


# ----------------------------------------------------------------------------
# Stage 1: the VAE.
# ----------------------------------------------------------------------------


def vae_loss(model, vae_params, images, key, kl_weight=1e-6):
  inputs = jnp.transpose(images, (0, 3, 1, 2))
  posterior = model.vae.apply({"params": vae_params}, inputs, method="encode")
  latents = posterior.sample(key)
  recon = model.vae.apply({"params": vae_params}, latents, method="decode")
  error = recon - inputs
  kl = posterior.kl().mean()
  loss = jnp.abs(error).mean() + jnp.square(error).mean() + kl_weight * kl
  return loss, {"vae_loss": loss, "kl": kl, "mse": jnp.square(error).mean()}


def train_vae(model, params, steps, batch_size, rng, key):
  optimizer = optax.adamw(
    optax.warmup_cosine_decay_schedule(0.0, 1e-3, min(100, steps // 4), steps, 1e-5), weight_decay=1e-4
  )
  opt_state = optimizer.init(params["vae"])

  @jax.jit
  def step(vae_params, opt_state, images, key):
    grads, metrics = jax.grad(functools.partial(vae_loss, model), has_aux=True)(vae_params, images, key)
    updates, opt_state = optimizer.update(grads, opt_state, vae_params)
    return optax.apply_updates(vae_params, updates), opt_state, metrics

  vae_params = params["vae"]
  start = time.time()
  for i in range(steps):
    images, _ = shapes.sample_batch(rng, batch_size)
    vae_params, opt_state, metrics = step(vae_params, opt_state, to_unit_range(images), jax.random.fold_in(key, i))
    if i % 250 == 0 or i in (10, steps - 1):
      logging.info("vae step %d/%d %s (%.0f s)", i, steps, jax.tree.map(float, metrics), time.time() - start)
  return dict(params, vae=vae_params)


def latent_std(model, params, rng, num_images=1024):
  """Std of the VAE's unscaled latents (posterior modes) of fresh images."""
  images, _ = shapes.sample_batch(rng, num_images)
  encode = jax.jit(lambda p, x: models.encode_images(model, p, x, None))
  scaled = encode(params["vae"], to_unit_range(images))
  return float(jnp.std(scaled)) / model.vae_scaling_factor


# ----------------------------------------------------------------------------
# Stage 2: the UNet and the text encoder.
# ----------------------------------------------------------------------------


def denoising_loss(model, trainable, vae_params, images, token_ids, key):
  """Epsilon-prediction MSE of SD on scaled latents of `images`."""
  latent_key, noise_key, time_key = jax.random.split(key, 3)
  latents = models.encode_images(model, vae_params, images, latent_key)
  noise = jax.random.normal(noise_key, latents.shape)
  timesteps = jax.random.randint(time_key, (latents.shape[0],), 0, model.schedule.num_train_timesteps)
  alphas_cumprod = jnp.asarray(model.schedule.alphas_cumprod, jnp.float32)[timesteps][:, None, None, None]
  noisy = jnp.sqrt(alphas_cumprod) * latents + jnp.sqrt(1 - alphas_cumprod) * noise
  context = models.encode_prompts(model, trainable["text_encoder"], token_ids)
  predicted = models.predict_noise(model, trainable["unet"], noisy, timesteps, context)
  loss = jnp.square(predicted - noise).mean()
  return loss, {"unet_loss": loss}


def train_unet(model, params, steps, batch_size, caption_dropout, rng, key, ema_decay=0.999):
  optimizer = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, min(200, steps // 4), steps, 2e-5), weight_decay=1e-4),
  )
  trainable = {"unet": params["unet"], "text_encoder": params["text_encoder"]}
  opt_state = optimizer.init(trainable)
  ema = trainable

  @jax.jit
  def step(trainable, opt_state, ema, images, token_ids, key):
    grads, metrics = jax.grad(functools.partial(denoising_loss, model), has_aux=True)(
      trainable, params["vae"], images, token_ids, key
    )
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    ema = optax.incremental_update(trainable, ema, 1 - ema_decay)
    return trainable, opt_state, ema, metrics

  start = time.time()
  for i in range(steps):
    images, captions = shapes.sample_batch(rng, batch_size)
    captions = ["" if rng.random() < caption_dropout else c for c in captions]
    token_ids = models.tokenize(model, captions)
    trainable, opt_state, ema, metrics = step(
      trainable, opt_state, ema, to_unit_range(images), token_ids, jax.random.fold_in(key, i)
    )
    if i % 250 == 0 or i in (10, steps - 1):
      logging.info("unet step %d/%d %s (%.0f s)", i, steps, jax.tree.map(float, metrics), time.time() - start)
  return dict(params, **ema)


def pretrain(
  out: str,
  seed: int,
  vae_steps: int,
  vae_batch_size: int,
  unet_steps: int,
  unet_batch_size: int,
  caption_dropout: float,
  vae_from: str = "",
):
  """Runs both stages and saves the model to `out`.

  With `vae_from`, a model folder written by an earlier run with the same
  seed and VAE settings, stage 1 is not trained again: its VAE is loaded and
  the data stream is advanced past stage 1, so the result is the same.
  """
  rng = np.random.default_rng(seed)
  key = jax.random.PRNGKey(seed)
  with tempfile.TemporaryDirectory() as tokenizer_dir:
    model, params = build_random(seed, tokenizer_dir)
    if vae_from:
      _, earlier = models.load(vae_from)
      params = dict(params, vae=earlier["vae"])
      for _ in range(vae_steps):
        shapes.sample_batch(rng, vae_batch_size)
    else:
      params = train_vae(model, params, vae_steps, vae_batch_size, rng, jax.random.fold_in(key, 1))
    std = latent_std(model, params, rng)
    logging.info("latent std %.4f -> scaling factor %.4f", std, 1 / std)
    model = models.with_vae_scaling_factor(model, 1 / std)
    params = train_unet(model, params, unet_steps, unet_batch_size, caption_dropout, rng, jax.random.fold_in(key, 2))
    models.save(model, params, out)
  logging.info("saved the toy model to %s", out)


def define_flags():
  """Command-line flags (defined only when run as a script, so tests can import it)."""
  flags.DEFINE_string("out", models.TOY_MODEL_DIR, "Folder to write the model to.")
  flags.DEFINE_integer("seed", 0, "Seed of the weights, the data and the noise.")
  flags.DEFINE_integer("vae_steps", 2000, "Optimiser steps of the VAE stage.")
  flags.DEFINE_integer("vae_batch_size", 32, "Images per optimiser step of the VAE stage.")
  flags.DEFINE_integer("unet_steps", 8000, "Optimiser steps of the UNet stage.")
  flags.DEFINE_integer("unet_batch_size", 64, "Images per optimiser step of the UNet stage.")
  flags.DEFINE_float("caption_dropout", 0.1, "Fraction of captions replaced by the empty one.")
  flags.DEFINE_string("vae_from", "", "Reuse the VAE of this model folder (an earlier run with the same seed).")


def main(argv):
  del argv
  pretrain(
    FLAGS.out,
    FLAGS.seed,
    FLAGS.vae_steps,
    FLAGS.vae_batch_size,
    FLAGS.unet_steps,
    FLAGS.unet_batch_size,
    FLAGS.caption_dropout,
    FLAGS.vae_from,
  )


if __name__ == "__main__":
  define_flags()
  app.run(main)
