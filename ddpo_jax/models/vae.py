"""Stable Diffusion's KL autoencoder (diffusers' AutoencoderKL) in Flax Linen.

    vae = AutoencoderKL(config)
    posterior = vae.apply({"params": p}, images [B, 3, H, W], method=vae.encode)
      -> DiagonalGaussian: mean, logvar [B, latent_channels, H/f, W/f]; .sample(key), .mode()
    images = vae.apply({"params": p}, latents [B, latent_channels, h, w], method=vae.decode)
      -> [B, out_channels, h·f, w·f]

with f = 2 ** (len(block_out_channels) - 1), NCHW in and out like diffusers' PyTorch class
(diffusers' Flax class returns the posterior NHWC). Latents are unscaled: multiply by
`config.scaling_factor` (after subtracting `config.shift_factor`) to get the UNet's.
Param paths equal those of diffusers' FlaxAutoencoderKL ("encoder/down_blocks_0/
resnets_0/conv1/kernel", "decoder/mid_block/attentions_0/query/kernel", "quant_conv/kernel").
`load_vae(folder)` reads a diffusers `vae/` folder (config.json, PyTorch safetensors)
without torch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.models import pytorch_weights
from ddpo_jax.models.attention import AttentionFn
from ddpo_jax.models.attention import dot_product_attention
from ddpo_jax.models.layers import Downsample2D
from ddpo_jax.models.layers import ResnetBlock2D
from ddpo_jax.models.layers import Upsample2D
from ddpo_jax.models.layers import VAEAttentionBlock
from ddpo_jax.models.layers import conv1x1
from ddpo_jax.models.layers import conv3x3
from ddpo_jax.models.unet import flax_params_from_pytorch
from ddpo_jax.models.unet import flax_params_to_pytorch
from ddpo_jax.models.unet import param_shapes
from ddpo_jax.models.unet import read_config

Params = dict[str, Any]

# The VAE's mid-block attention: diffusers' PyTorch names -> its Flax class's (and ours).
_ATTENTION_RENAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
_VAE_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The architecture of an AutoencoderKL, with the names of a diffusers vae/config.json."""

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 512
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    blocks = len(self.block_out_channels)
    problems = []
    if len(self.down_block_types) != blocks or len(self.up_block_types) != blocks:
      problems.append("down_block_types, up_block_types and block_out_channels differ in length")
    problems += [f"down block type {t!r}" for t in self.down_block_types if t != "DownEncoderBlock2D"]
    problems += [f"up block type {t!r}" for t in self.up_block_types if t != "UpDecoderBlock2D"]
    if problems:
      raise ValueError(f"unsupported VAE config: {'; '.join(problems)}")

  @classmethod
  def from_json(cls, config: dict) -> VAEConfig:
    """The config of a diffusers vae/config.json dict (PyTorch's or the Flax class's)."""
    if config.get("act_fn", "silu") != "silu":
      raise ValueError(f"unsupported VAE config option: act_fn={config['act_fn']!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names})

  @property
  def downscale(self) -> int:
    """Image pixels per latent pixel along each side."""
    return 2 ** (len(self.block_out_channels) - 1)


@flax.struct.dataclass
class DiagonalGaussian:
  """The encoder's posterior: independent normals of mean and log-variance [B, C, h, w] (clipped to [-30, 20])."""

  mean: jax.Array
  logvar: jax.Array

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, key: jax.Array) -> jax.Array:
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL divergence to the standard normal per example [B], summed over C, h, w (as diffusers')."""
    return 0.5 * jnp.sum(jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar, axis=(1, 2, 3))


class _MidBlock(nn.Module):
  """Resnet, single-head self-attention (unless `with_attention` is off), resnet: [B, h, w, C] -> same."""

  norm_groups: int
  with_attention: bool = True
  attention_fn: AttentionFn = dot_product_attention
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    x = ResnetBlock2D(channels, self.norm_groups, _VAE_EPS, self.dtype, name="resnets_0")(x)
    if self.with_attention:
      x = VAEAttentionBlock(self.norm_groups, self.attention_fn, self.dtype, name="attentions_0")(x)
    return ResnetBlock2D(channels, self.norm_groups, _VAE_EPS, self.dtype, name="resnets_1")(x)


class Encoder(nn.Module):
  """Images [B, H, W, C_in] -> mean and log-variance stacked on channels [B, H/f, W/f, 2 · latent_channels]."""

  config: VAEConfig
  attention_fn: AttentionFn = dot_product_attention
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    config = self.config
    groups = config.norm_num_groups
    x = conv3x3(config.block_out_channels[0], self.dtype, "conv_in")(x)
    last = len(config.block_out_channels) - 1
    for i, channels in enumerate(config.block_out_channels):
      block = _EncoderBlock(channels, config.layers_per_block, groups, i < last, self.dtype, name=f"down_blocks_{i}")
      x = block(x)
    x = _MidBlock(groups, config.mid_block_add_attention, self.attention_fn, self.dtype, name="mid_block")(x)
    x = nn.GroupNorm(groups, epsilon=_VAE_EPS, dtype=self.dtype, name="conv_norm_out")(x)
    return conv3x3(2 * config.latent_channels, self.dtype, "conv_out")(nn.silu(x))


class _EncoderBlock(nn.Module):
  """DownEncoderBlock2D: `layers` resnets, then a stride-2 conv unless last."""

  out_channels: int
  layers: int
  norm_groups: int
  add_downsample: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers):
      x = ResnetBlock2D(self.out_channels, self.norm_groups, _VAE_EPS, self.dtype, name=f"resnets_{i}")(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, pad_bottom_right_only=True, dtype=self.dtype, name="downsamplers_0")(x)
    return x


class _DecoderBlock(nn.Module):
  """UpDecoderBlock2D: `layers` resnets, then a 2x upsampling unless last."""

  out_channels: int
  layers: int
  norm_groups: int
  add_upsample: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers):
      x = ResnetBlock2D(self.out_channels, self.norm_groups, _VAE_EPS, self.dtype, name=f"resnets_{i}")(x)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
    return x


class Decoder(nn.Module):
  """Latents [B, h, w, latent_channels] -> images [B, h·f, w·f, out_channels]."""

  config: VAEConfig
  attention_fn: AttentionFn = dot_product_attention
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    config = self.config
    groups = config.norm_num_groups
    x = conv3x3(config.block_out_channels[-1], self.dtype, "conv_in")(z)
    x = _MidBlock(groups, config.mid_block_add_attention, self.attention_fn, self.dtype, name="mid_block")(x)
    last = len(config.block_out_channels) - 1
    for i, channels in enumerate(reversed(config.block_out_channels)):
      block = _DecoderBlock(channels, config.layers_per_block + 1, groups, i < last, self.dtype, name=f"up_blocks_{i}")
      x = block(x)
    x = nn.GroupNorm(groups, epsilon=_VAE_EPS, dtype=self.dtype, name="conv_norm_out")(x)
    return conv3x3(config.out_channels, self.dtype, "conv_out")(nn.silu(x))


class AutoencoderKL(nn.Module):
  """diffusers' AutoencoderKL: `encode` and `decode` as in the module docstring; `__call__`
  (for init) decodes the posterior's mode. `dtype` is the compute dtype; params stay float32."""

  config: VAEConfig
  attention_fn: AttentionFn = dot_product_attention
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    config = self.config
    self.encoder = Encoder(config, self.attention_fn, self.dtype)
    self.decoder = Decoder(config, self.attention_fn, self.dtype)
    self.quant_conv = conv1x1(2 * config.latent_channels, self.dtype, None) if config.use_quant_conv else None
    self.post_quant_conv = conv1x1(config.latent_channels, self.dtype, None) if config.use_post_quant_conv else None

  def encode(self, images: jax.Array) -> DiagonalGaussian:
    """Images [B, in_channels, H, W] -> the posterior over latents [B, latent_channels, H/f, W/f]."""
    moments = self.encoder(jnp.transpose(images, (0, 2, 3, 1)).astype(self.dtype))
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(jnp.transpose(moments, (0, 3, 1, 2)), 2, axis=1)
    return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

  def decode(self, latents: jax.Array) -> jax.Array:
    """Latents [B, latent_channels, h, w] -> images [B, out_channels, h·f, w·f]."""
    z = jnp.transpose(latents, (0, 2, 3, 1)).astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return jnp.transpose(self.decoder(z), (0, 3, 1, 2))

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.decode(self.encode(images).mode())


def example_inputs(config: VAEConfig, batch: int = 1) -> dict[str, jax.Array]:
  """Zero images of the shape an AutoencoderKL of `config` takes (its __call__'s keyword arguments)."""
  size = config.downscale * 2
  return {"images": jnp.zeros((batch, config.in_channels, size, size), jnp.float32)}


def init_params(module: AutoencoderKL, rng: jax.Array) -> Params:
  """Randomly initialised params of an AutoencoderKL."""
  return module.init(rng, **example_inputs(module.config))["params"]


def vae_params_from_pytorch(state_dict: dict[str, np.ndarray], config: VAEConfig) -> Params:
  """diffusers AutoencoderKL weights {"encoder.conv_in.weight": array, ...} -> our AutoencoderKL's params."""
  expected = param_shapes(AutoencoderKL(config), example_inputs(config))
  return flax_params_from_pytorch(state_dict, expected, "VAE", renames=_ATTENTION_RENAMES)


def vae_params_to_pytorch(params: Params) -> dict[str, np.ndarray]:
  """Our AutoencoderKL's params -> diffusers AutoencoderKL's state dict."""
  return flax_params_to_pytorch(params, renames={v: k for k, v in _ATTENTION_RENAMES.items()})


def load_vae(
  folder: str, dtype: jnp.dtype = jnp.float32, attention_fn: AttentionFn = dot_product_attention
) -> tuple[AutoencoderKL, Params]:
  """A diffusers `vae/` folder (config.json, PyTorch *.safetensors) -> (AutoencoderKL, float32 NumPy params).

  Needs no torch.
  """
  config = VAEConfig.from_json(read_config(folder))
  params = vae_params_from_pytorch(pytorch_weights.read_state_dict(folder), config)
  return AutoencoderKL(config, attention_fn=attention_fn, dtype=dtype), params
