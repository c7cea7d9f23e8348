"""The PyTorch reference of the speed benchmarks (imported only when asked for).

The same UNet, VAE and text encoder as diffusers' and transformers' PyTorch
classes, with our Flax weights converted, run the way DDPO's PyTorch code
runs them:
  * rollout: a Python loop over the DDIM steps, one UNet call per step on the
    concatenated (unconditional, conditional) batch, under `torch.inference_mode`;
  * training: per minibatch of trajectories, a Python loop over its
    (shuffled) timesteps, one forward and one backward pass per timestep, the
    gradients accumulated over the inner epoch's minibatches and one AdamW
    step (after clipping the global norm) per optimiser step.
The DDIM step and its log-probability are the formulas of ddpo_jax.ddim
(mean over C, H, W of the Gaussian log-density, sigma floored at 1e-6).

Speed options a PyTorch user might try (`Options`; the bench's --torch_attention,
--torch_channels_last and --torch_compile) default to what measured fastest
here: diffusers' defaults (docs/speed.md). benchmarks/ddpo_pytorch_loop.py
times DDPO's own PyTorch loop on the same models, the yardstick of this one.

Needs `pip install -e '.[bench]'` (torch, CPU build).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from ddpo_jax import ddim


def _load(torch_module, state_dict: dict[str, np.ndarray]) -> None:
  """Copies a PyTorch-named state dict (our params, converted by ddpo_jax.models) into `torch_module`, strictly."""
  names = set(torch_module.state_dict())
  # transformers 5's CLIPTextModel names its weights without the "text_model." prefix that checkpoints carry.
  strip = lambda k: k if k in names or not k.startswith("text_model.") else k[len("text_model.") :]
  torch_module.load_state_dict({strip(k): torch.from_numpy(np.asarray(v, np.float32)) for k, v in state_dict.items()})


def _flax_numerics(unet) -> None:
  """For UNets trained with diffusers' Flax numerics (UNetConfig.flax_numerics: tanh GELU in GEGLU, GroupNorm
  eps 1e-5 before each transformer): the reference computes the same function as ours."""
  from diffusers.models.activations import GEGLU
  from diffusers.models.transformers.transformer_2d import Transformer2DModel

  for module in unet.modules():
    if isinstance(module, GEGLU):
      module.gelu = lambda gate: torch.nn.functional.gelu(gate, approximate="tanh")
    if isinstance(module, Transformer2DModel):
      module.norm.eps = 1e-5


@dataclasses.dataclass(frozen=True)
class Options:
  """What a PyTorch user might switch on for speed (each keeps the fairness check's log-probs).

  attention: "sdpa", diffusers' default `AttnProcessor2_0`
    (torch.nn.functional.scaled_dot_product_attention), or "math", its
    `AttnProcessor` (baddbmm, softmax, bmm);
  channels_last: the UNet's convolution weights in NHWC memory order;
  compile: the UNet wrapped in `torch.compile` (inductor, C++ kernels on the
    CPU; the first calls of each batch shape compile).
  """

  attention: str = "sdpa"
  channels_last: bool = False
  compile: bool = False


def _apply_options(unet, options: Options):
  """The UNet with `options` applied (compiled: a wrapper module sharing its parameters)."""
  from diffusers.models.attention_processor import AttnProcessor
  from diffusers.models.attention_processor import AttnProcessor2_0

  processors = {"sdpa": AttnProcessor2_0, "math": AttnProcessor}
  if options.attention not in processors:
    raise ValueError(f"attention {options.attention!r}: one of {sorted(processors)}")
  unet.set_attn_processor(processors[options.attention]())
  if options.channels_last:
    unet.to(memory_format=torch.channels_last)
  return torch.compile(unet) if options.compile else unet


@dataclasses.dataclass
class TorchModel:
  """The PyTorch modules with our weights, and the noise schedule."""

  unet: Any
  vae: Any
  text_encoder: Any
  alphas_cumprod: torch.Tensor
  final_alpha_cumprod: float
  vae_scaling_factor: float
  latent_shape: tuple[int, int, int]


def convert(model, params, options: Options = Options()) -> TorchModel:
  """Our DiffusionModel and params {"unet", "vae", "text_encoder"} as PyTorch modules (float32)."""
  from diffusers import AutoencoderKL
  from diffusers import UNet2DConditionModel
  from transformers import CLIPTextConfig
  from transformers import CLIPTextModel

  from ddpo_jax import models

  if model.schedule.prediction_type != "epsilon":
    raise ValueError("the reference implements epsilon prediction only")
  configs = models.pytorch_configs(model)  # exactly as models.save writes them
  unet = UNet2DConditionModel.from_config(configs["unet"])
  vae = AutoencoderKL.from_config(configs["vae"])
  text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
  _load(unet, models.unet_params_to_pytorch(params["unet"]))
  if model.unet.config.flax_numerics:
    _flax_numerics(unet)
  _load(vae, models.vae_params_to_pytorch(params["vae"]))
  _load(text_encoder, models.text_params_to_pytorch(params["text_encoder"]))
  for module in (unet, vae, text_encoder):
    module.float().eval()
  return TorchModel(
    unet=_apply_options(unet, options),
    vae=vae,
    text_encoder=text_encoder,
    alphas_cumprod=torch.tensor(model.schedule.alphas_cumprod, dtype=torch.float32),
    final_alpha_cumprod=float(model.schedule.final_alpha_cumprod),
    vae_scaling_factor=model.vae_scaling_factor,
    latent_shape=(model.latent_channels, model.latent_size, model.latent_size),
  )


def num_threads() -> int:
  return torch.get_num_threads()


# ----------------------------------------------------------------------------
# The DDIM step (ddpo_jax.ddim's formulas, in torch).
# ----------------------------------------------------------------------------


def _alpha_at(ref: TorchModel, t: torch.Tensor) -> torch.Tensor:
  return torch.where(t >= 0, ref.alphas_cumprod[t.clamp(min=0)], torch.tensor(ref.final_alpha_cumprod))


def ddim_mean_and_std(ref: TorchModel, eps, t, sample, step_ratio: int, eta: float):
  """Mean [B, C, h, w] and std [B, 1, 1, 1] of p(x_{t'} | x_t); t: int64 [B]."""
  alpha_t = _alpha_at(ref, t).view(-1, 1, 1, 1)
  alpha_prev = _alpha_at(ref, t - step_ratio).view(-1, 1, 1, 1)
  x0 = (sample - torch.sqrt(1 - alpha_t) * eps) / torch.sqrt(alpha_t)
  variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
  std = eta * torch.sqrt(variance.clamp(min=0))
  mean = torch.sqrt(alpha_prev) * x0 + torch.sqrt((1 - alpha_prev - std**2).clamp(min=0)) * eps
  return mean, std.clamp(min=ddim.MIN_STD)


def gaussian_log_prob(value, mean, std):
  """Mean over C, h, w of log N(value; mean, std^2): [B]."""
  log_density = -((value.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
  return log_density.mean(dim=(1, 2, 3))


def guided_noise(ref: TorchModel, latents, t, context, negative_context, guidance_scale: float):
  """ε_u + w (ε_c - ε_u) from one UNet call on the (unconditional, conditional) batch."""
  negative = negative_context.expand_as(context)
  output = ref.unet(torch.cat([latents, latents]), torch.cat([t, t]), torch.cat([negative, context])).sample
  unconditional, conditional = output.chunk(2)
  return unconditional + guidance_scale * (conditional - unconditional)


# ----------------------------------------------------------------------------
# What the bench times.
# ----------------------------------------------------------------------------


@torch.inference_mode()
def encode(ref: TorchModel, token_ids: np.ndarray):
  return ref.text_encoder(torch.from_numpy(np.asarray(token_ids, np.int64)))[0]


@torch.inference_mode()
def rollout(ref: TorchModel, token_ids, negative_token_ids, timesteps, step_ratio, eta, guidance_scale, seed: int):
  """Prompts to images as DDPO's PyTorch pipeline: a Python loop over the steps.

  Returns (latents [B, T+1, C, h, w], log_probs [B, T], uint8 images [B, H, W, 3]), NumPy.
  """
  generator = torch.Generator().manual_seed(seed)
  context = encode(ref, token_ids)
  negative = encode(ref, np.asarray(negative_token_ids)[None])
  latents = torch.randn((len(token_ids),) + ref.latent_shape, generator=generator)
  trajectory, log_probs = [latents], []
  for t in timesteps:
    t_batch = torch.full((len(token_ids),), int(t), dtype=torch.int64)
    eps = guided_noise(ref, latents, t_batch, context, negative, guidance_scale)
    mean, std = ddim_mean_and_std(ref, eps, t_batch, latents, step_ratio, eta)
    latents = mean + std * torch.randn(mean.shape, generator=generator)
    log_probs.append(gaussian_log_prob(latents, mean, std))
    trajectory.append(latents)
  images = decode(ref, latents)
  return torch.stack(trajectory, 1).numpy(), torch.stack(log_probs, 1).numpy(), images


@torch.inference_mode()
def decode(ref: TorchModel, latents) -> np.ndarray:
  """Scaled latents [B, C, h, w] (NumPy or torch) to uint8 images [B, H, W, 3]."""
  latents = torch.as_tensor(np.asarray(latents, np.float32)) if not torch.is_tensor(latents) else latents
  images = ref.vae.decode(latents / ref.vae_scaling_factor).sample
  return ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.inference_mode()
def transition_log_probs(ref: TorchModel, latents, next_latents, timesteps, context, negative_context, **kw):
  """log p(x_{t-1} | x_t, c) [M] of given transitions (NumPy in and out), for the fairness check.

  kw: step_ratio, eta, guidance_scale.
  """
  as_t = lambda x: torch.from_numpy(np.asarray(x, np.float32))
  t = torch.from_numpy(np.asarray(timesteps, np.int64))
  eps = guided_noise(ref, as_t(latents), t, as_t(context), as_t(negative_context), kw["guidance_scale"])
  mean, std = ddim_mean_and_std(ref, eps, t, as_t(latents), kw["step_ratio"], kw["eta"])
  return gaussian_log_prob(as_t(next_latents), mean, std).numpy()


def make_optimizer(ref: TorchModel, learning_rate: float = 1e-5):
  return torch.optim.AdamW(ref.unet.parameters(), lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)


def train_inner_epoch(
  ref: TorchModel,
  optimizer,
  latents,
  log_probs,
  timesteps,
  context,
  negative_context,
  advantages,
  *,
  trajectories_per_minibatch: int,
  num_updates: int,
  step_ratio: int,
  eta: float,
  guidance_scale: float,
  clip_range: float = 1e-4,
  max_grad_norm: float = 1.0,
  seed: int = 0,
) -> dict[str, float]:
  """One inner epoch as DDPO's PyTorch trainer: NumPy rollouts in, mean loss out.

  latents [N, T+1, C, h, w], log_probs [N, T], timesteps [T], context [N, L, D],
  negative_context [L, D], advantages [N]. Per minibatch of
  `trajectories_per_minibatch` trajectories, each with its own permutation
  of the timesteps: T forward+backward passes; `num_updates` AdamW steps
  over the epoch.
  """
  ref.unet.train()
  rng = np.random.default_rng(seed)
  n, num_steps = log_probs.shape
  order = rng.permutation(n)
  minibatches = [order[i : i + trajectories_per_minibatch] for i in range(0, n, trajectories_per_minibatch)]
  per_update = max(1, len(minibatches) // num_updates)
  negative = torch.from_numpy(np.asarray(negative_context, np.float32))
  losses = []
  optimizer.zero_grad()
  for index, rows in enumerate(minibatches):
    steps = np.stack([rng.permutation(num_steps) for _ in rows])  # [m, T]
    row_context = torch.from_numpy(np.asarray(context[rows], np.float32))
    row_advantages = torch.from_numpy(np.asarray(advantages[rows], np.float32))
    for j in range(num_steps):
      step = steps[:, j]
      x = torch.from_numpy(np.asarray(latents[rows, step], np.float32))
      x_next = torch.from_numpy(np.asarray(latents[rows, step + 1], np.float32))
      t = torch.from_numpy(np.asarray(timesteps, np.int64)[step])
      old = torch.from_numpy(np.asarray(log_probs[rows, step], np.float32))
      eps = guided_noise(ref, x, t, row_context, negative, guidance_scale)
      mean, std = ddim_mean_and_std(ref, eps, t, x, step_ratio, eta)
      ratio = torch.exp(gaussian_log_prob(x_next, mean, std) - old)
      unclipped = -row_advantages * ratio
      clipped = -row_advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
      loss = torch.maximum(unclipped, clipped).mean() / (per_update * num_steps)
      loss.backward()
      losses.append(float(loss.detach()))
    if (index + 1) % per_update == 0:
      torch.nn.utils.clip_grad_norm_(ref.unet.parameters(), max_grad_norm)
      optimizer.step()
      optimizer.zero_grad()
  ref.unet.eval()
  return {"loss": float(np.sum(losses)) / max(1, len(minibatches) // per_update)}
