"""Stable Diffusion's conditional UNet (diffusers' UNet2DConditionModel) in Flax Linen.

`UNet(config)` covers SD 1.x, SD 2.x (use_linear_projection, per-block attention head
counts) and SDXL (addition_embed_type="text_time", per-block transformer depths):

    UNet(config).apply({"params": params}, sample [B, C, h, w], timesteps [B],
                       encoder_hidden_states [B, L, D], text_embeds=[B, E], time_ids=[B, N])
      -> noise prediction [B, out_channels, h, w]

(text_embeds and time_ids for SDXL only), NCHW in and out like diffusers. Param paths
equal those of diffusers' FlaxUNet2DConditionModel ("down_blocks_0/attentions_0/
transformer_blocks_0/attn1/to_q/kernel", "mid_block/resnets_0/conv1/kernel",
"up_blocks_1/upsamplers_0/conv/kernel", ...), so its msgpack checkpoints load as they are.
`load_unet(folder)` reads a diffusers `unet/` folder (config.json and PyTorch safetensors)
without torch.

Numerics: diffusers' PyTorch UNet uses the exact GELU and GroupNorm eps 1e-6 before each
transformer; its Flax one the tanh GELU and eps 1e-5. `UNetConfig.flax_numerics` picks
the latter, and `from_json` sets it for configs saved by the Flax class (whose weights,
like the toy model's, were trained with it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.models import pytorch_weights
from ddpo_jax.models.attention import AttentionFn
from ddpo_jax.models.attention import dot_product_attention
from ddpo_jax.models.layers import Downsample2D
from ddpo_jax.models.layers import ResnetBlock2D
from ddpo_jax.models.layers import TimestepEmbedding
from ddpo_jax.models.layers import Transformer2DModel
from ddpo_jax.models.layers import Upsample2D
from ddpo_jax.models.layers import conv3x3
from ddpo_jax.models.layers import timestep_embedding

Params = dict[str, Any]

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

# diffusers UNet2DConditionModel options this UNet does not implement, with the value it
# assumes; a config.json giving another value is refused.
_UNSUPPORTED_DEFAULTS = {
  "act_fn": "silu",
  "attention_type": "default",
  "center_input_sample": False,
  "class_embed_type": None,
  "class_embeddings_concat": False,
  "conv_in_kernel": 3,
  "conv_out_kernel": 3,
  "cross_attention_norm": None,
  "dropout": 0.0,
  "dual_cross_attention": False,
  "encoder_hid_dim": None,
  "encoder_hid_dim_type": None,
  "mid_block_scale_factor": 1,
  "num_class_embeds": None,
  "resnet_out_scale_factor": 1.0,
  "resnet_skip_time_act": False,
  "resnet_time_scale_shift": "default",
  "reverse_transformer_layers_per_block": None,
  "time_cond_proj_dim": None,
  "time_embedding_act_fn": None,
  "time_embedding_type": "positional",
  "timestep_post_act": None,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The architecture of a UNet, with the names and meanings of a diffusers unet/config.json.

  attention_head_dim is, as diffusers interprets it, the number of heads of each block's
  transformers (a historical misnomer) unless num_attention_heads is given; the head
  width is the block's channels divided by that.
  """

  sample_size: int = 64
  in_channels: int = 4
  out_channels: int = 4
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  attention_head_dim: int | tuple[int, ...] = 8
  num_attention_heads: int | tuple[int, ...] | None = None
  cross_attention_dim: int = 1280
  use_linear_projection: bool = False
  transformer_layers_per_block: int | tuple[int, ...] = 1
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  time_embedding_dim: int | None = None
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None
  flax_numerics: bool = False

  def __post_init__(self):
    blocks = len(self.block_out_channels)
    problems = []
    if len(self.down_block_types) != blocks or len(self.up_block_types) != blocks:
      problems.append("down_block_types, up_block_types and block_out_channels differ in length")
    problems += [f"down block type {t!r}" for t in self.down_block_types if t not in DOWN_BLOCK_TYPES]
    problems += [f"up block type {t!r}" for t in self.up_block_types if t not in UP_BLOCK_TYPES]
    if self.mid_block_type not in MID_BLOCK_TYPES:
      problems.append(f"mid_block_type {self.mid_block_type!r}")
    if not isinstance(self.layers_per_block, int):
      problems.append("per-block layers_per_block")
    if not isinstance(self.cross_attention_dim, int):
      problems.append("per-block cross_attention_dim")
    if self.addition_embed_type not in (None, "text_time"):
      problems.append(f"addition_embed_type {self.addition_embed_type!r}")
    if self.addition_embed_type == "text_time" and not (
      self.addition_time_embed_dim and self.projection_class_embeddings_input_dim
    ):
      problems.append("text_time without addition_time_embed_dim and projection_class_embeddings_input_dim")
    if problems:
      raise ValueError(f"unsupported UNet config: {'; '.join(problems)}")

  @classmethod
  def from_json(cls, config: dict) -> UNetConfig:
    """The config of a diffusers unet/config.json dict (PyTorch's or the Flax class's).

    Raises ValueError for options this UNet does not implement (class embeddings,
    scale-shift time conditioning, ...).
    """
    unsupported = [
      f"{key}={config[key]!r}"
      for key, default in _UNSUPPORTED_DEFAULTS.items()
      if key in config and config[key] != default
    ]
    if any(np.atleast_1d(config.get("only_cross_attention", False))):
      unsupported.append("only_cross_attention")
    if config.get("mid_block_only_cross_attention"):
      unsupported.append("mid_block_only_cross_attention")
    if unsupported:
      raise ValueError(f"unsupported UNet config options: {', '.join(unsupported)}")
    names = {f.name for f in dataclasses.fields(cls)} - {"flax_numerics"}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names}
    flax_numerics = str(config.get("_class_name", "")).startswith("Flax") or bool(config.get("_flax_numerics"))
    return cls(**values, flax_numerics=flax_numerics)

  def _per_block(self, value) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * len(self.block_out_channels)

  @property
  def heads(self) -> tuple[int, ...]:
    """The number of attention heads of each down block's transformers."""
    return self._per_block(self.num_attention_heads or self.attention_head_dim)

  @property
  def transformer_depths(self) -> tuple[int, ...]:
    """The number of transformer blocks in each down block's Transformer2DModels."""
    return self._per_block(self.transformer_layers_per_block)

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or self.block_out_channels[0] * 4

  @property
  def num_time_ids(self) -> int:
    """SDXL's micro-conditions per example: 6 for the base model, 5 for the refiner (as diffusers infers it)."""
    is_refiner = (
      5 * self.addition_time_embed_dim + self.cross_attention_dim == self.projection_class_embeddings_input_dim
    )
    return 5 if is_refiner else 6

  @property
  def text_embeds_dim(self) -> int:
    """The width of SDXL's pooled text embedding."""
    return self.projection_class_embeddings_input_dim - self.num_time_ids * self.addition_time_embed_dim


def _transformer(
  config: UNetConfig, heads: int, depth: int, channels: int, attention_fn: AttentionFn, dtype, name: str
) -> Transformer2DModel:
  return Transformer2DModel(
    heads=heads,
    head_dim=channels // heads,
    depth=depth,
    use_linear_projection=config.use_linear_projection,
    norm_groups=config.norm_num_groups,
    norm_eps=1e-5 if config.flax_numerics else 1e-6,
    attention_fn=attention_fn,
    approximate_gelu=config.flax_numerics,
    dtype=dtype,
    name=name,
  )


def _resnet(config: UNetConfig, channels: int, dtype, name: str) -> ResnetBlock2D:
  return ResnetBlock2D(channels, config.norm_num_groups, config.norm_eps, dtype, name=name)


class DownBlock2D(nn.Module):
  """`layers` resnets (with transformers after each when `heads`), then a stride-2 conv unless last.

  x [B, h, w, C_in], temb [B, T], context [B, L, D] -> (x [B, h', w', out_channels], the skips:
  each layer's output and the downsampled one).
  """

  config: UNetConfig
  out_channels: int
  heads: int | None = None
  depth: int = 1
  add_downsample: bool = True
  attention_fn: AttentionFn = dot_product_attention
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context=None):
    skips = ()
    for i in range(self.config.layers_per_block):
      x = _resnet(self.config, self.out_channels, self.dtype, f"resnets_{i}")(x, temb)
      if self.heads:
        attention = _transformer(
          self.config, self.heads, self.depth, self.out_channels, self.attention_fn, self.dtype, f"attentions_{i}"
        )
        x = attention(x, context)
      skips += (x,)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, dtype=self.dtype, name="downsamplers_0")(x)
      skips += (x,)
    return x, skips


class UpBlock2D(nn.Module):
  """`layers_per_block + 1` resnets on the input concatenated with a skip (with transformers when
  `heads`), then a 2x upsampling unless last.

  x [B, h, w, C], skips (this block's, in down order), temb [B, T], context [B, L, D]
  -> [B, h', w', out_channels].
  """

  config: UNetConfig
  out_channels: int
  heads: int | None = None
  depth: int = 1
  add_upsample: bool = True
  attention_fn: AttentionFn = dot_product_attention
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, skips, temb, context=None):
    for i, skip in enumerate(reversed(skips)):
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
      x = _resnet(self.config, self.out_channels, self.dtype, f"resnets_{i}")(x, temb)
      if self.heads:
        attention = _transformer(
          self.config, self.heads, self.depth, self.out_channels, self.attention_fn, self.dtype, f"attentions_{i}"
        )
        x = attention(x, context)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
    return x


class MidBlock2DCrossAttn(nn.Module):
  """Resnet, transformer, resnet at the bottom of the UNet: x [B, h, w, C] -> [B, h, w, C]."""

  config: UNetConfig
  heads: int
  depth: int = 1
  attention_fn: AttentionFn = dot_product_attention
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context):
    channels = x.shape[-1]
    x = _resnet(self.config, channels, self.dtype, "resnets_0")(x, temb)
    x = _transformer(self.config, self.heads, self.depth, channels, self.attention_fn, self.dtype, "attentions_0")(
      x, context
    )
    return _resnet(self.config, channels, self.dtype, "resnets_1")(x, temb)


class UNet(nn.Module):
  """diffusers' UNet2DConditionModel: see the module docstring for inputs and outputs.

  `dtype` is the compute dtype (params stay float32); `remat` rematerialises each down,
  mid and up block in the backward pass (nn.remat), trading compute for activation memory.
  `constrain` (x [B, ...] -> x, e.g. `partitioning.batch_constraint(mesh)`) is applied to the
  feature maps between blocks and to the time embedding, so that under a mesh whose params are
  sharded (fsdp) every device still computes on its own rows of the batch.
  """

  config: UNetConfig
  attention_fn: AttentionFn = dot_product_attention
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  constrain: Callable[[jax.Array], jax.Array] | None = None

  @nn.compact
  def __call__(
    self,
    sample: jax.Array,
    timesteps: jax.Array,
    encoder_hidden_states: jax.Array,
    text_embeds: jax.Array | None = None,
    time_ids: jax.Array | None = None,
  ) -> jax.Array:
    config = self.config
    wrap = nn.remat if self.remat else (lambda block: block)
    constrain = self.constrain or (lambda x: x)
    batch = sample.shape[0]
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
    context = encoder_hidden_states.astype(self.dtype)

    time_features = timestep_embedding(
      timesteps, config.block_out_channels[0], config.flip_sin_to_cos, config.freq_shift
    )
    temb = TimestepEmbedding(config.time_embed_dim, self.dtype, name="time_embedding")(time_features.astype(self.dtype))
    if config.addition_embed_type == "text_time":
      if text_embeds is None or time_ids is None:
        raise ValueError("a UNet with addition_embed_type='text_time' (SDXL) needs text_embeds and time_ids")
      time_id_features = timestep_embedding(
        time_ids.reshape(-1), config.addition_time_embed_dim, config.flip_sin_to_cos, config.freq_shift
      ).reshape(batch, -1)
      added = jnp.concatenate([text_embeds.astype(jnp.float32), time_id_features], axis=-1).astype(self.dtype)
      temb = temb + TimestepEmbedding(config.time_embed_dim, self.dtype, name="add_embedding")(added)

    temb = constrain(temb)
    x = constrain(jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype))
    x = constrain(conv3x3(config.block_out_channels[0], self.dtype, "conv_in")(x))

    skips = (x,)
    last = len(config.block_out_channels) - 1
    for i, (block_type, channels) in enumerate(zip(config.down_block_types, config.block_out_channels)):
      with_attention = block_type == "CrossAttnDownBlock2D"
      block = wrap(DownBlock2D)(
        config,
        channels,
        heads=config.heads[i] if with_attention else None,
        depth=config.transformer_depths[i],
        add_downsample=i < last,
        attention_fn=self.attention_fn,
        dtype=self.dtype,
        name=f"down_blocks_{i}",
      )
      x, block_skips = block(x, temb, context) if with_attention else block(x, temb)
      x, block_skips = constrain(x), tuple(constrain(s) for s in block_skips)
      skips += block_skips

    if config.mid_block_type is not None:
      x = wrap(MidBlock2DCrossAttn)(
        config,
        config.heads[-1],
        config.transformer_depths[-1],
        self.attention_fn,
        self.dtype,
        name="mid_block",
      )(x, temb, context)
      x = constrain(x)

    per_up_block = config.layers_per_block + 1
    reversed_channels = tuple(reversed(config.block_out_channels))
    for i, block_type in enumerate(config.up_block_types):
      with_attention = block_type == "CrossAttnUpBlock2D"
      block_skips, skips = skips[-per_up_block:], skips[:-per_up_block]
      block = wrap(UpBlock2D)(
        config,
        reversed_channels[i],
        heads=config.heads[last - i] if with_attention else None,
        depth=config.transformer_depths[last - i],
        add_upsample=i < last,
        attention_fn=self.attention_fn,
        dtype=self.dtype,
        name=f"up_blocks_{i}",
      )
      x = constrain(block(x, block_skips, temb, context) if with_attention else block(x, block_skips, temb))

    x = nn.GroupNorm(config.norm_num_groups, epsilon=config.norm_eps, dtype=self.dtype, name="conv_norm_out")(x)
    x = conv3x3(config.out_channels, self.dtype, "conv_out")(nn.silu(x))
    return jnp.transpose(x, (0, 3, 1, 2))


def example_inputs(config: UNetConfig, batch: int = 1) -> dict[str, jax.Array]:
  """Zero inputs of the shapes a UNet of `config` takes (keyword arguments of its __call__)."""
  inputs = {
    "sample": jnp.zeros((batch, config.in_channels, config.sample_size, config.sample_size), jnp.float32),
    "timesteps": jnp.ones((batch,), jnp.float32),
    "encoder_hidden_states": jnp.zeros((batch, 1, config.cross_attention_dim), jnp.float32),
  }
  if config.addition_embed_type == "text_time":
    inputs["text_embeds"] = jnp.zeros((batch, config.text_embeds_dim), jnp.float32)
    inputs["time_ids"] = jnp.zeros((batch, config.num_time_ids), jnp.float32)
  return inputs


def init_params(module: UNet, rng: jax.Array) -> Params:
  """Randomly initialised params of a UNet."""
  return module.init(rng, **example_inputs(module.config))["params"]


def param_shapes(module: nn.Module, inputs: dict[str, jax.Array]) -> Params:
  """The param tree of `module` applied to `inputs`, as jax.ShapeDtypeStructs (nothing computed)."""
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), **inputs))["params"]


def flax_path(pytorch_name: str, renames: dict[str, str] | None = None) -> tuple[str, ...]:
  """diffusers' PyTorch name -> the path of its Flax param, leaf name excepted.

  "down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.weight"
  -> ("down_blocks_0", "attentions_1", "transformer_blocks_0", "ff", "net_0", "proj"): an
  index joins the name before it. `renames` maps the resulting module names (the VAE's
  "to_q" -> "query", ...).
  """
  path: list[str] = []
  for part in pytorch_name.split(".")[:-1]:
    if part.isdigit():
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  return tuple((renames or {}).get(part, part) for part in path)


def flax_params_from_pytorch(
  state_dict: dict[str, np.ndarray], expected: Params, what: str, renames: dict[str, str] | None = None
) -> Params:
  """A diffusers PyTorch state dict -> the Flax param tree `expected` describes, checked against it.

  Linear weights become Dense kernels, Conv2d weights Conv kernels, 1-D weights (Group
  and LayerNorms) scales. Also converts gradients with respect to those weights (the
  layout changes are linear). Raises ValueError naming what is missing, unexpected or
  misshapen.
  """
  flat = {}
  for name, array in state_dict.items():
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
      key, value = "bias", array
    elif leaf == "weight" and array.ndim == 1:
      key, value = "scale", array
    elif leaf == "weight" and array.ndim == 2:
      key, value = "kernel", pytorch_weights.linear_kernel(array)
    elif leaf == "weight" and array.ndim == 4:
      key, value = "kernel", pytorch_weights.conv_kernel(array)
    else:
      key, value = leaf, array
    flat[flax_path(name, renames) + (key,)] = np.asarray(value)
  params = pytorch_weights.unflatten(flat)
  pytorch_weights.check_tree(params, expected, what)
  return params


def unet_params_from_pytorch(state_dict: dict[str, np.ndarray], config: UNetConfig) -> Params:
  """diffusers UNet2DConditionModel weights {"conv_in.weight": array, ...} -> our UNet's params."""
  expected = param_shapes(UNet(config), example_inputs(config))
  return flax_params_from_pytorch(state_dict, expected, "UNet")


# Module names of ours that end in "_<digit>" without being an index of PyTorch's (TimestepEmbedding's).
_NAMES_WITH_DIGITS = ("linear_1", "linear_2")


def pytorch_name(path: tuple[str, ...], leaf: str, renames: dict[str, str] | None = None) -> str:
  """The inverse of `flax_path`: ("down_blocks_0", "attentions_1", "proj_in"), "weight" ->
  "down_blocks.0.attentions.1.proj_in.weight"; `renames` maps our module names back."""
  parts = []
  for name in path:
    name = (renames or {}).get(name, name)
    base, _, index = name.rpartition("_")
    parts += [base, index] if index.isdigit() and base and name not in _NAMES_WITH_DIGITS else [name]
  return ".".join(parts + [leaf])


def flax_params_to_pytorch(params: Params, renames: dict[str, str] | None = None) -> dict[str, np.ndarray]:
  """Our UNet's or VAE's params -> diffusers' PyTorch state dict (float32 NumPy), the inverse of
  `flax_params_from_pytorch`."""
  state_dict = {}
  for path, array in pytorch_weights.flatten(params).items():
    leaf, tensor = pytorch_weights.pytorch_tensor(path[-1], np.asarray(array))
    state_dict[pytorch_name(path[:-1], leaf, renames)] = tensor
  return state_dict


def unet_params_to_pytorch(params: Params) -> dict[str, np.ndarray]:
  """Our UNet's params -> diffusers UNet2DConditionModel's state dict."""
  return flax_params_to_pytorch(params)


def read_config(folder: str) -> dict:
  with open(os.path.join(folder, "config.json")) as f:
    return json.load(f)


def load_unet(
  folder: str, dtype: jnp.dtype = jnp.float32, attention_fn: AttentionFn = dot_product_attention, remat: bool = False
) -> tuple[UNet, Params]:
  """A diffusers `unet/` folder (config.json, PyTorch *.safetensors) -> (UNet, float32 NumPy params); no torch."""
  config = UNetConfig.from_json(read_config(folder))
  params = unet_params_from_pytorch(pytorch_weights.read_state_dict(folder), config)
  return UNet(config, attention_fn=attention_fn, dtype=dtype, remat=remat), params
