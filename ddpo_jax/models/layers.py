"""The blocks shared by our Stable Diffusion UNet (`unet.py`) and KL autoencoder (`vae.py`).

Flax Linen modules on NHWC feature maps [B, h, w, C], named so that param paths equal
those of diffusers' (deprecated) Flax classes: "resnets_0/conv1/kernel",
"transformer_blocks_0/attn1/to_q/kernel", "ff/net_0/proj/kernel", ... Each module
takes `dtype`, the compute dtype; params are float32, norms' statistics and the
softmax are computed in float32.

Attention is a field, `attention_fn(q, k, v, mask=None, scale=None) -> out` with
q [B, T, H, D] and k, v [B, S, H, D] -> [B, T, H, D], called with `scale=` only:
`attention.make_attention(name)` gives each implementation in that convention
(default: the plain `attention.dot_product_attention`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpo_jax.models.attention import AttentionFn
from ddpo_jax.models.attention import dot_product_attention


def timestep_embedding(
  timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> jax.Array:
  """Sinusoidal embedding of timesteps [N] -> float32 [N, dim], as diffusers' get_timestep_embedding.

  Frequencies exp(-log(max_period) · i / (dim/2 - freq_shift)) for i < dim/2; the sines come
  first, or the cosines when flip_sin_to_cos.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class TimestepEmbedding(nn.Module):
  """Dense, SiLU, Dense: [N, any] -> [N, features] ("linear_1", "linear_2")."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
    return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


def conv3x3(features: int, dtype: jnp.dtype, name: str, strides: int = 1) -> nn.Conv:
  """A 3x3 convolution padded by one on each side (PyTorch's Conv2d(..., 3, padding=1))."""
  return nn.Conv(features, (3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)), dtype=dtype, name=name)


def conv1x1(features: int, dtype: jnp.dtype, name: str) -> nn.Conv:
  return nn.Conv(features, (1, 1), padding="VALID", dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
  """GroupNorm, SiLU, conv, (+ projected time embedding), GroupNorm, SiLU, conv, plus the shortcut.

  x [B, h, w, C_in], temb [B, T] or None (the VAE's blocks) -> [B, h, w, out_channels]. The
  shortcut is a 1x1 conv ("conv_shortcut") when C_in != out_channels.
  """

  out_channels: int
  norm_groups: int = 32
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    norm = lambda name: nn.GroupNorm(self.norm_groups, epsilon=self.eps, dtype=self.dtype, name=name)
    h = conv3x3(self.out_channels, self.dtype, "conv1")(nn.silu(norm("norm1")(x)))
    if temb is not None:
      h = h + nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None, :]
    h = conv3x3(self.out_channels, self.dtype, "conv2")(nn.silu(norm("norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = conv1x1(self.out_channels, self.dtype, "conv_shortcut")(x)
    return (x + h).astype(self.dtype)


class Downsample2D(nn.Module):
  """A stride-2 3x3 conv ("conv"): [B, h, w, C] -> [B, h/2, w/2, out_channels].

  The UNet pads one pixel on every side; the VAE (`pad_bottom_right_only`) one at the
  bottom and right only, as PyTorch's Downsample2D(padding=0).
  """

  out_channels: int
  pad_bottom_right_only: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pad_bottom_right_only:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      return nn.Conv(self.out_channels, (3, 3), strides=(2, 2), padding="VALID", dtype=self.dtype, name="conv")(x)
    return conv3x3(self.out_channels, self.dtype, "conv", strides=2)(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour 2x upsampling, then a 3x3 conv ("conv"): [B, h, w, C] -> [B, 2h, 2w, out_channels]."""

  out_channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv3x3(self.out_channels, self.dtype, "conv")(x)


class Attention(nn.Module):
  """Multi-head attention of x [B, T, C] on context [B, S, C_ctx] (x itself when None) -> [B, T, C].

  "to_q", "to_k", "to_v" without bias, "to_out_0" with; heads of head_dim features,
  scores scaled by head_dim ** -0.5.
  """

  heads: int
  head_dim: int
  attention_fn: AttentionFn = dot_product_attention
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    context = x if context is None else context
    inner = self.heads * self.head_dim
    split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim)
    q = split(nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_q")(x))
    k = split(nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_k")(context))
    v = split(nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_v")(context))
    out = self.attention_fn(q, k, v, scale=self.head_dim**-0.5)
    out = out.reshape(out.shape[0], out.shape[1], inner)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)


class FeedForward(nn.Module):
  """GEGLU feed-forward [B, T, C] -> [B, T, C]: "net_0/proj" to 2 · 4C, value · GELU(gate), "net_2" back to C.

  `approximate_gelu`: tanh-approximated GELU, as diffusers' Flax classes compute it
  (its PyTorch classes, and the default, use the exact erf GELU).
  """

  approximate_gelu: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    # A module of its own so that the path is "net_0/proj", as diffusers' GEGLU module holds it.
    projected = _GEGLUProjection(channels * 4, self.dtype, name="net_0")
    value, gate = jnp.split(projected(x), 2, axis=-1)
    hidden = value * nn.gelu(gate, approximate=self.approximate_gelu)
    return nn.Dense(channels, dtype=self.dtype, name="net_2")(hidden)


class _GEGLUProjection(nn.Module):
  """The GEGLU's input projection [B, T, C] -> [B, T, 2 · hidden] ("proj")."""

  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(self.hidden * 2, dtype=self.dtype, name="proj")(x)


class BasicTransformerBlock(nn.Module):
  """Pre-norm self-attention ("attn1"), cross-attention on the context ("attn2"), GEGLU ("ff").

  x [B, T, C], context [B, S, C_ctx] -> [B, T, C]; LayerNorms "norm1".."norm3" (eps 1e-5).
  """

  heads: int
  head_dim: int
  attention_fn: AttentionFn = dot_product_attention
  approximate_gelu: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
    attention = lambda name: Attention(self.heads, self.head_dim, self.attention_fn, self.dtype, name=name)
    x = x + attention("attn1")(norm("norm1")(x))
    x = x + attention("attn2")(norm("norm2")(x), context)
    return x + FeedForward(self.approximate_gelu, self.dtype, name="ff")(norm("norm3")(x))


class Transformer2DModel(nn.Module):
  """GroupNorm, projection in, `depth` transformer blocks, projection out, plus the input.

  x [B, h, w, C], context [B, S, C_ctx] -> [B, h, w, C], with C = heads · head_dim. The
  projections ("proj_in", "proj_out") are 1x1 convs, or Dense layers applied to the
  flattened tokens when `use_linear_projection` (SD 2.x, SDXL). `norm_eps` is 1e-6 in
  diffusers' PyTorch Transformer2DModel and 1e-5 in its Flax one.
  """

  heads: int
  head_dim: int
  depth: int = 1
  use_linear_projection: bool = False
  norm_groups: int = 32
  norm_eps: float = 1e-6
  attention_fn: AttentionFn = dot_product_attention
  approximate_gelu: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    inner = self.heads * self.head_dim
    h = nn.GroupNorm(self.norm_groups, epsilon=self.norm_eps, dtype=self.dtype, name="norm")(x)
    if self.use_linear_projection:
      h = nn.Dense(inner, dtype=self.dtype, name="proj_in")(h.reshape(batch, height * width, channels))
    else:
      h = conv1x1(inner, self.dtype, "proj_in")(h).reshape(batch, height * width, inner)
    for i in range(self.depth):
      h = BasicTransformerBlock(
        self.heads, self.head_dim, self.attention_fn, self.approximate_gelu, self.dtype, name=f"transformer_blocks_{i}"
      )(h, context)
    if self.use_linear_projection:
      h = nn.Dense(channels, dtype=self.dtype, name="proj_out")(h).reshape(batch, height, width, channels)
    else:
      h = conv1x1(channels, self.dtype, "proj_out")(h.reshape(batch, height, width, inner))
    return (h + x).astype(self.dtype)


class VAEAttentionBlock(nn.Module):
  """The VAE's mid-block self-attention: one head over all pixels, plus the input.

  x [B, h, w, C] -> [B, h, w, C]: GroupNorm ("group_norm", eps 1e-6), Dense "query", "key",
  "value" and "proj_attn" (all with bias; diffusers' PyTorch names them to_q, to_k, to_v,
  to_out.0), scores scaled by C ** -0.5.
  """

  norm_groups: int = 32
  attention_fn: AttentionFn = dot_product_attention
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    h = nn.GroupNorm(self.norm_groups, epsilon=1e-6, dtype=self.dtype, name="group_norm")(x)
    h = h.reshape(batch, height * width, 1, channels)
    q, k, v = (nn.Dense(channels, dtype=self.dtype, name=name)(h) for name in ("query", "key", "value"))
    out = self.attention_fn(q, k, v, scale=channels**-0.5).reshape(batch, height * width, channels)
    out = nn.Dense(channels, dtype=self.dtype, name="proj_attn")(out)
    return (out.reshape(batch, height, width, channels) + x).astype(self.dtype)
