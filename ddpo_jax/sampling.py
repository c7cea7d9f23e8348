"""The denoising rollout: T DDIM steps with log-probabilities as one lax.scan.

The policy of DDPO is the whole guided sampler: classifier-free guidance is
part of it, so `guided_noise` is shared by the rollout and the training pass.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax import ddim
from ddpo_jax import models


@flax.struct.dataclass
class Trajectory:
  """One batch of rollouts.

  Attributes:
    latents: [B, T+1, C, h, w] x_T, ..., x_0 (x_t of step j is latents[:, j],
      x_{t-1} is latents[:, j+1]).
    log_probs: [B, T] log p(x_{t-1} | x_t) under the sampling params.
    timesteps: [T] int32, the t of each step, descending.
  """

  latents: jax.Array
  log_probs: jax.Array
  timesteps: jax.Array

  @property
  def final_latents(self) -> jax.Array:
    return self.latents[:, -1]


@flax.struct.dataclass
class SamplerSettings:
  """Static settings of the guided DDIM sampler (hashable: jit's static args)."""

  num_steps: int = flax.struct.field(pytree_node=False)
  eta: float = flax.struct.field(pytree_node=False)
  guidance_scale: float = flax.struct.field(pytree_node=False)
  # Consecutive rows of a batch in groups of this size share the initial noise x_T.
  noise_group_size: int = flax.struct.field(pytree_node=False, default=1)


def guided_noise(
  model: models.DiffusionModel,
  unet_params,
  latents: jax.Array,
  timesteps: jax.Array,
  context: jax.Array,
  negative_context: jax.Array,
  guidance_scale: float,
  remat: bool = False,
) -> jax.Array:
  """The guided model output ε_u + w (ε_c - ε_u): [B, C, h, w].

  Args:
    latents: [B, C, h, w]; timesteps: int [B]; context: [B, L, D];
    negative_context: [L, D] or [B, L, D] (the empty prompt's embedding).
    remat: rematerialise the UNet's blocks when differentiated.
  """
  if guidance_scale == 1.0:
    return models.predict_noise(model, unet_params, latents, timesteps, context, remat=remat)
  negative_context = jnp.broadcast_to(negative_context, context.shape)
  output = models.predict_noise(
    model,
    unet_params,
    jnp.concatenate([latents, latents]),
    jnp.concatenate([timesteps, timesteps]),
    jnp.concatenate([negative_context, context]),
    remat=remat,
  )
  unconditional, conditional = jnp.split(output, 2)
  return unconditional + guidance_scale * (conditional - unconditional)


def step_ratio(model: models.DiffusionModel, num_steps: int) -> int:
  return model.schedule.num_train_timesteps // num_steps


def ddim_kwargs(model: models.DiffusionModel, settings: SamplerSettings) -> dict:
  """The schedule arguments of `ddim.ddim_step_with_logprob` for this model."""
  return dict(
    alphas_cumprod=jnp.asarray(model.schedule.alphas_cumprod, jnp.float32),
    final_alpha_cumprod=model.schedule.final_alpha_cumprod,
    step_ratio=step_ratio(model, settings.num_steps),
    eta=settings.eta,
    prediction_type=model.schedule.prediction_type,
  )


def denoise_step(
  model: models.DiffusionModel,
  unet_params,
  latents: jax.Array,
  t: jax.Array,
  key: jax.Array,
  context: jax.Array,
  negative_context: jax.Array,
  settings: SamplerSettings,
) -> tuple[jax.Array, jax.Array]:
  """One guided DDIM step, the body of `rollout`'s loop: x_t [B, C, h, w] at timestep t (int scalar)
  -> (x_{t-1} [B, C, h, w], log p(x_{t-1} | x_t) [B]), its noise drawn with `key`.

  context: [B, L, D]; negative_context: [L, D].
  """
  timesteps = jnp.full((latents.shape[0],), t)
  output = guided_noise(model, unet_params, latents, timesteps, context, negative_context, settings.guidance_scale)
  return ddim.ddim_step_with_logprob(output, t, latents, key=key, **ddim_kwargs(model, settings))


def rollout(
  model: models.DiffusionModel,
  unet_params,
  context: jax.Array,
  negative_context: jax.Array,
  key: jax.Array,
  settings: SamplerSettings,
) -> Trajectory:
  """Samples x_T ~ N(0, I) and denoises it in `settings.num_steps` DDIM steps.

  Args:
    context: [B, L, D] prompt embeddings; negative_context: [L, D].
    key: PRNG key of the initial noise and of every step's noise. Rows in
      consecutive groups of `settings.noise_group_size` start from the same
      x_T (the steps' noise differs from row to row).

  Returns:
    The trajectory (see `Trajectory`).
  """
  batch = context.shape[0]
  timesteps = jnp.asarray(
    ddim.inference_timesteps(model.schedule.num_train_timesteps, settings.num_steps, model.schedule.steps_offset)
  )
  init_key, steps_key = jax.random.split(key)
  group = settings.noise_group_size
  if batch % group:
    raise ValueError(f"a batch of {batch} is not a whole number of noise groups of {group}")
  shape = (batch // group, model.latent_channels, model.latent_size, model.latent_size)
  initial = jax.random.normal(init_key, shape, jnp.float32)
  if group > 1:
    initial = jnp.repeat(initial, group, axis=0)
  step_keys = jax.random.split(steps_key, settings.num_steps)

  def denoise(latents, inputs):
    t, step_key = inputs
    prev_latents, log_prob = denoise_step(model, unet_params, latents, t, step_key, context, negative_context, settings)
    return prev_latents, (prev_latents, log_prob)

  _, (latents, log_probs) = jax.lax.scan(denoise, initial, (timesteps, step_keys))
  latents = jnp.concatenate([initial[None], latents])  # [T+1, B, C, h, w]
  return Trajectory(
    latents=jnp.swapaxes(latents, 0, 1),
    log_probs=jnp.swapaxes(log_probs, 0, 1),
    timesteps=timesteps,
  )


def to_uint8(images: jax.Array) -> jax.Array:
  """[B, H, W, 3] in [0, 1] -> uint8."""
  return jnp.round(images * 255).astype(jnp.uint8)


def sample(
  model: models.DiffusionModel,
  params,
  token_ids: jax.Array,
  negative_token_ids: jax.Array,
  key: jax.Array,
  settings: SamplerSettings,
) -> tuple[Trajectory, jax.Array, jax.Array]:
  """Prompts to images: text encoding, the rollout and VAE decoding.

  Args:
    params: {"unet", "vae", "text_encoder"}.
    token_ids: int32 [B, L]; negative_token_ids: int32 [L] (the empty prompt).

  Returns:
    (trajectory, context [B, L, D], images uint8 [B, H, W, 3]).
  """
  context = models.encode_prompts(model, params["text_encoder"], token_ids)
  negative_context = models.encode_prompts(model, params["text_encoder"], negative_token_ids[None])[0]
  trajectory = rollout(model, params["unet"], context, negative_context, key, settings)
  images = to_uint8(models.decode_latents(model, params["vae"], trajectory.final_latents))
  return trajectory, context, images


def make_sampler(model: models.DiffusionModel, settings: SamplerSettings, **jit_kwargs):
  """`sample` jitted for this model: (params, token_ids, negative_token_ids, key) -> ..."""
  return jax.jit(functools.partial(sample, model, settings=settings), **jit_kwargs)


def generate(
  model: models.DiffusionModel,
  params,
  prompts: list[str],
  key: jax.Array,
  num_steps: int = 50,
  eta: float = 1.0,
  guidance_scale: float = 5.0,
) -> tuple[np.ndarray, Trajectory]:
  """Convenience for notebooks: prompts -> (uint8 images [B, H, W, 3], trajectory)."""
  settings = SamplerSettings(num_steps=num_steps, eta=eta, guidance_scale=guidance_scale)
  sampler = make_sampler(model, settings)
  token_ids = models.tokenize(model, prompts)
  negative = models.tokenize(model, [""])[0]
  trajectory, _, images = sampler(params, token_ids, negative, key)
  return np.asarray(images), trajectory
