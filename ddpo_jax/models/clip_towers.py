"""CLIP's text encoder and vision tower in Flax Linen, loaded from transformers' PyTorch safetensors.

The towers of Stable Diffusion's text encoders (OpenAI CLIP-L for SD 1, OpenCLIP-H
for SD 2, CLIP-L and OpenCLIP-G with `text_projection` for SDXL) and of CLIP-based
rewards (the vision tower with `visual_projection`), computing what transformers'
CLIPTextModel, CLIPTextModelWithProjection and CLIPVisionModelWithProjection
(4.57) compute. The param trees are those of transformers' Flax classes
(FlaxCLIPTextModel: {"text_model": {"embeddings", "encoder": {"layers": {"0", ...}},
"final_layer_norm"}}; the vision tower: {"vision_model", "visual_projection"}), so
Flax checkpoints saved by those classes, and LoRA targets named by those paths,
apply unchanged.

`load_text_encoder(folder)` / `load_vision_tower(folder)` read a folder in
transformers' save_pretrained layout (config.json and *.safetensors) with NumPy
only (`pytorch_weights`); pickled weights are refused.

Attention is a constructor field, `attention_fn(query, key, value, mask=, scale=)`
with query [B, T, H, Dh], key and value [B, S, H, Dh], mask a boolean array
broadcastable to [B, H, T, S] (True: attend) or None, returning [B, T, H, Dh]:
the calling convention of `attention.make_attention`'s functions and of
`jax.nn.dot_product_attention`, which can be passed as is. The default is
`attention.dot_product_attention`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any
from typing import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.models import pytorch_weights
from ddpo_jax.models.attention import AttentionFn
from ddpo_jax.models.attention import dot_product_attention

Params = dict[str, Any]

# transformers' ACT2FN names of the activations CLIP checkpoints use.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "gelu": functools.partial(jax.nn.gelu, approximate=False),
  "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
  "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def _clip_sub_config(config: dict, tower: str) -> dict:
  """The `tower` ("text_config" or "vision_config") of a two-tower CLIPModel config.json, else the config itself.

  A CLIPModel config keeps projection_dim at its top level; its sub-configs may not repeat it.
  """
  if config.get("model_type") != "clip":
    return config
  sub = dict(config.get(tower) or {})
  if "projection_dim" in config:
    sub["projection_dim"] = config["projection_dim"]
  return sub


def _from_fields(cls, config: dict):
  names = {field.name for field in dataclasses.fields(cls)}
  return cls(**{key: value for key, value in config.items() if key in names})


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The fields of transformers' CLIPTextConfig that the text encoder uses; defaults are transformers'."""

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"  # OpenAI CLIP-L; OpenCLIP-H and -G use "gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512
  eos_token_id: int = 49407

  @classmethod
  def from_json(cls, config: dict) -> TextConfig:
    """From the dict of a transformers config.json (of a CLIPTextModel, ...WithProjection or CLIPModel)."""
    return _from_fields(cls, _clip_sub_config(config, "text_config"))


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The fields of transformers' CLIPVisionConfig that the vision tower uses; defaults are transformers'."""

  image_size: int = 224
  patch_size: int = 32
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512
  num_channels: int = 3

  @classmethod
  def from_json(cls, config: dict) -> VisionConfig:
    """From the dict of a transformers config.json (of a CLIPVisionModelWithProjection or CLIPModel)."""
    return _from_fields(cls, _clip_sub_config(config, "vision_config"))


class CLIPAttention(nn.Module):
  """Multi-head self-attention with biased q, k, v and output projections."""

  config: TextConfig | VisionConfig
  dtype: jnp.dtype = jnp.float32
  attention_fn: AttentionFn = dot_product_attention

  @nn.compact
  def __call__(self, hidden_states: jax.Array, mask: jax.Array | None) -> jax.Array:
    """[B, L, D] -> [B, L, D]; mask boolean, broadcastable to [B, H, L, L], or None."""
    width, heads = self.config.hidden_size, self.config.num_attention_heads
    if width % heads:
      raise ValueError(f"hidden_size {width} is not a multiple of num_attention_heads {heads}")
    dense = functools.partial(nn.Dense, width, dtype=self.dtype, param_dtype=jnp.float32)
    split = lambda x: x.reshape(x.shape[:2] + (heads, width // heads))
    query = split(dense(name="q_proj")(hidden_states))
    key = split(dense(name="k_proj")(hidden_states))
    value = split(dense(name="v_proj")(hidden_states))
    out = self.attention_fn(query, key, value, mask=mask, scale=(width // heads) ** -0.5)
    return dense(name="out_proj")(out.reshape(hidden_states.shape[:2] + (width,)))


class CLIPMLP(nn.Module):
  """fc1, the config's activation, fc2."""

  config: TextConfig | VisionConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden_states: jax.Array) -> jax.Array:
    """[B, L, D] -> [B, L, D]."""
    if self.config.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.config.hidden_act!r} is none of {sorted(ACTIVATIONS)}")
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
    hidden_states = dense(self.config.intermediate_size, name="fc1")(hidden_states)
    hidden_states = ACTIVATIONS[self.config.hidden_act](hidden_states)
    return dense(self.config.hidden_size, name="fc2")(hidden_states)


class CLIPEncoderLayer(nn.Module):
  """Pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

  config: TextConfig | VisionConfig
  dtype: jnp.dtype = jnp.float32
  attention_fn: AttentionFn = dot_product_attention

  @nn.compact
  def __call__(self, hidden_states: jax.Array, mask: jax.Array | None) -> jax.Array:
    """[B, L, D] -> [B, L, D]."""
    norm = functools.partial(
      nn.LayerNorm, epsilon=self.config.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32
    )
    attention = CLIPAttention(self.config, self.dtype, self.attention_fn, name="self_attn")
    hidden_states = hidden_states + attention(norm(name="layer_norm1")(hidden_states), mask)
    mlp = CLIPMLP(self.config, self.dtype, name="mlp")
    return hidden_states + mlp(norm(name="layer_norm2")(hidden_states))


class CLIPEncoderLayers(nn.Module):
  """The layers "0" ... "N-1" in order."""

  config: TextConfig | VisionConfig
  dtype: jnp.dtype = jnp.float32
  attention_fn: AttentionFn = dot_product_attention

  @nn.compact
  def __call__(
    self, hidden_states: jax.Array, mask: jax.Array | None, output_hidden_states: bool = False
  ) -> tuple[jax.Array, tuple[jax.Array, ...] | None]:
    """(last [B, L, D], the input and every layer's output (N + 1 of [B, L, D]) or None)."""
    all_hidden_states = [hidden_states]
    for index in range(self.config.num_hidden_layers):
      hidden_states = CLIPEncoderLayer(self.config, self.dtype, self.attention_fn, name=str(index))(hidden_states, mask)
      all_hidden_states.append(hidden_states)
    return hidden_states, tuple(all_hidden_states) if output_hidden_states else None


class CLIPEncoder(nn.Module):
  """The layer stack under "layers", as transformers' Flax tree nests it (encoder/layers/0/...)."""

  config: TextConfig | VisionConfig
  dtype: jnp.dtype = jnp.float32
  attention_fn: AttentionFn = dot_product_attention

  @nn.compact
  def __call__(
    self, hidden_states: jax.Array, mask: jax.Array | None, output_hidden_states: bool = False
  ) -> tuple[jax.Array, tuple[jax.Array, ...] | None]:
    """See CLIPEncoderLayers."""
    layers = CLIPEncoderLayers(self.config, self.dtype, self.attention_fn, name="layers")
    return layers(hidden_states, mask, output_hidden_states)


class CLIPTextOutput(NamedTuple):
  """last_hidden_state [B, L, D] (final-layer-normed); pooled [B, D]: last_hidden_state at each
  sequence's EOS; hidden_states: the embeddings and every layer's output (N + 1 of [B, L, D],
  not final-layer-normed; [-2] is the penultimate layer's), or None unless asked for."""

  last_hidden_state: jax.Array
  pooled: jax.Array
  hidden_states: tuple[jax.Array, ...] | None = None


class CLIPTextWithProjectionOutput(NamedTuple):
  """text_embeds [B, projection_dim]: text_projection(pooled); the others as in CLIPTextOutput."""

  text_embeds: jax.Array
  last_hidden_state: jax.Array
  pooled: jax.Array
  hidden_states: tuple[jax.Array, ...] | None = None


class CLIPTextEmbeddings(nn.Module):
  """Token embeddings plus learned position embeddings."""

  config: TextConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    """[B, L] token ids -> [B, L, D], positions 0 ... L-1."""
    embed = functools.partial(nn.Embed, features=self.config.hidden_size, dtype=self.dtype, param_dtype=jnp.float32)
    tokens = embed(self.config.vocab_size, name="token_embedding")(input_ids.astype(jnp.int32))
    positions = embed(self.config.max_position_embeddings, name="position_embedding")(
      jnp.arange(input_ids.shape[-1])[None]
    )
    return tokens + positions


class CLIPTextTransformer(nn.Module):
  """CLIP's causal text transformer: embeddings, the encoder, final_layer_norm, the EOS pooling."""

  config: TextConfig
  dtype: jnp.dtype = jnp.float32
  attention_fn: AttentionFn = dot_product_attention

  @nn.compact
  def __call__(
    self, input_ids: jax.Array, attention_mask: jax.Array | None = None, output_hidden_states: bool = False
  ) -> CLIPTextOutput:
    """The outputs for token ids input_ids [B, L] (L ≤ max_position_embeddings).

    attention_mask [B, L]: 1 for tokens, 0 for padding keys (combined with the
    causal mask); None (as Stable Diffusion calls it): all tokens. The pooled
    position follows transformers: with eos_token_id 2 (configs written before
    transformers' PR #24773) the position of each sequence's largest token id,
    else the first position of eos_token_id.
    """
    config = self.config
    length = input_ids.shape[-1]
    if length > config.max_position_embeddings:
      raise ValueError(f"{length} tokens, more than max_position_embeddings {config.max_position_embeddings}")
    hidden_states = CLIPTextEmbeddings(config, self.dtype, name="embeddings")(input_ids)
    mask = nn.make_causal_mask(jnp.ones((1, length), jnp.int32), dtype=jnp.bool_)  # [1, 1, L, L]
    if attention_mask is not None:
      mask = mask & (attention_mask[:, None, None, :] > 0)
    encoder = CLIPEncoder(config, self.dtype, self.attention_fn, name="encoder")
    last_hidden_state, all_hidden_states = encoder(hidden_states, mask, output_hidden_states)
    last_hidden_state = nn.LayerNorm(
      epsilon=config.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32, name="final_layer_norm"
    )(last_hidden_state)
    if config.eos_token_id == 2:
      eos_positions = jnp.argmax(input_ids, axis=-1)
    else:
      eos_positions = jnp.argmax(input_ids == config.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(last_hidden_state, eos_positions[:, None, None], axis=1)[:, 0]
    return CLIPTextOutput(last_hidden_state, pooled, all_hidden_states)


class CLIPTextModel(nn.Module):
  """The text transformer under "text_model" (SD 1's and SD 2's text encoder; FlaxCLIPTextModel's tree)."""

  config: TextConfig
  dtype: jnp.dtype = jnp.float32
  attention_fn: AttentionFn = dot_product_attention

  @nn.compact
  def __call__(
    self, input_ids: jax.Array, attention_mask: jax.Array | None = None, output_hidden_states: bool = False
  ) -> CLIPTextOutput:
    """See CLIPTextTransformer."""
    text_model = CLIPTextTransformer(self.config, self.dtype, self.attention_fn, name="text_model")
    return text_model(input_ids, attention_mask, output_hidden_states)


class CLIPTextModelWithProjection(nn.Module):
  """The text transformer and `text_projection` (no bias): SDXL's second text encoder (OpenCLIP-G)."""

  config: TextConfig
  dtype: jnp.dtype = jnp.float32
  attention_fn: AttentionFn = dot_product_attention

  @nn.compact
  def __call__(
    self, input_ids: jax.Array, attention_mask: jax.Array | None = None, output_hidden_states: bool = False
  ) -> CLIPTextWithProjectionOutput:
    """See CLIPTextTransformer; text_embeds [B, projection_dim] is the projected pooled output."""
    text_model = CLIPTextTransformer(self.config, self.dtype, self.attention_fn, name="text_model")
    outputs = text_model(input_ids, attention_mask, output_hidden_states)
    text_embeds = nn.Dense(
      self.config.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name="text_projection"
    )(outputs.pooled)
    return CLIPTextWithProjectionOutput(text_embeds, *outputs)


class CLIPVisionEmbeddings(nn.Module):
  """Patch embedding (a conv without bias), a learned class token, learned position embeddings."""

  config: VisionConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    """Channels-last pixels [B, H, W, C] -> [B, 1 + (H/patch)·(W/patch), D], the class token first."""
    config = self.config
    patch = config.patch_size
    patches = nn.Conv(
      config.hidden_size,
      kernel_size=(patch, patch),
      strides=(patch, patch),
      padding="VALID",
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="patch_embedding",
    )(pixels)
    patches = patches.reshape(patches.shape[0], -1, config.hidden_size)
    class_embedding = self.param("class_embedding", nn.initializers.normal(0.02), (config.hidden_size,))
    class_tokens = jnp.broadcast_to(class_embedding.astype(patches.dtype), (patches.shape[0], 1, config.hidden_size))
    num_positions = (config.image_size // patch) ** 2 + 1
    positions = nn.Embed(
      num_positions, config.hidden_size, dtype=self.dtype, param_dtype=jnp.float32, name="position_embedding"
    )(jnp.arange(num_positions)[None])
    return jnp.concatenate([class_tokens, patches], axis=1) + positions


class CLIPVisionTransformer(nn.Module):
  """CLIP's vision transformer: embeddings, pre_layrnorm, the encoder, post_layernorm of the class token."""

  config: VisionConfig
  dtype: jnp.dtype = jnp.float32
  attention_fn: AttentionFn = dot_product_attention

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """Pooled output [B, D] of CLIP-normalised pixel_values [B, C, image_size, image_size] (NCHW)."""
    config = self.config
    if pixel_values.shape[1:] != (config.num_channels, config.image_size, config.image_size):
      raise ValueError(
        f"pixel_values {pixel_values.shape}: the tower takes "
        f"[B, {config.num_channels}, {config.image_size}, {config.image_size}] (NCHW)"
      )
    pixels = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)
    hidden_states = CLIPVisionEmbeddings(config, self.dtype, name="embeddings")(pixels)
    norm = functools.partial(nn.LayerNorm, epsilon=config.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32)
    hidden_states = norm(name="pre_layrnorm")(hidden_states)  # sic: transformers' name
    last_hidden_state, _ = CLIPEncoder(config, self.dtype, self.attention_fn, name="encoder")(hidden_states, None)
    return norm(name="post_layernorm")(last_hidden_state[:, 0])


class CLIPVisionModelWithProjection(nn.Module):
  """The vision transformer under "vision_model" and `visual_projection` (no bias): CLIP's image encoder."""

  config: VisionConfig
  dtype: jnp.dtype = jnp.float32
  attention_fn: AttentionFn = dot_product_attention

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """Image embeddings [B, projection_dim] (not normalised) of CLIP-normalised pixel_values [B, C, H, W]."""
    pooled = CLIPVisionTransformer(self.config, self.dtype, self.attention_fn, name="vision_model")(pixel_values)
    return nn.Dense(
      self.config.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name="visual_projection"
    )(pooled)


def _param_shapes(module: nn.Module, *inputs: jax.ShapeDtypeStruct) -> Params:
  """The module's param tree as ShapeDtypeStructs, without computing anything."""
  return jax.eval_shape(lambda *args: module.init(jax.random.key(0), *args), *inputs)["params"]


def text_param_shapes(module: CLIPTextModel | CLIPTextModelWithProjection) -> Params:
  """The param tree (ShapeDtypeStructs) of a text encoder module."""
  return _param_shapes(module, jax.ShapeDtypeStruct((1, 1), jnp.int32))


def vision_param_shapes(module: CLIPVisionModelWithProjection) -> Params:
  """The param tree (ShapeDtypeStructs) of a vision tower module."""
  config = module.config
  return _param_shapes(
    module, jax.ShapeDtypeStruct((1, config.num_channels, config.image_size, config.image_size), jnp.float32)
  )


# PyTorch names that carry no weights of ours: position_ids buffers (older transformers saved them).
_BUFFER_SUFFIXES = (".position_ids",)


def _flax_path(name: str, array: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
  """A transformers PyTorch name and tensor -> its Flax path and array.

  Linear weights [out, in] become kernels [in, out], the patch Conv2d's a conv
  kernel [kh, kw, in, out], embeddings' weights `embedding`, layer norms'
  weights `scale`; biases and the class embedding are taken as they are. Any
  other name keeps its dotted path, which check_tree then reports as unexpected.
  """
  *module_path, leaf = name.split(".")
  if leaf == "bias" or leaf == "class_embedding":
    return (*module_path, leaf), array
  if leaf != "weight":
    return tuple(name.split(".")), array
  module_name = module_path[-1]
  if module_name == "patch_embedding":
    return (*module_path, "kernel"), pytorch_weights.conv_kernel(array)
  if module_name.endswith("_embedding"):
    return (*module_path, "embedding"), array
  if "norm" in module_name:  # layer_norm1/2, final_layer_norm, pre_layrnorm, post_layernorm
    return (*module_path, "scale"), array
  if array.ndim == 2:
    return (*module_path, "kernel"), pytorch_weights.linear_kernel(array)
  return tuple(name.split(".")), array


def _convert(state_dict: dict[str, np.ndarray], prefixes: tuple[str, ...], expected: Params, what: str) -> Params:
  """The state dict's tensors under `prefixes` as a Flax tree (float32 jax arrays), checked against `expected`."""
  flat = {}
  for name, array in state_dict.items():
    if name.startswith(prefixes) and not name.endswith(_BUFFER_SUFFIXES):
      path, converted = _flax_path(name, array)
      flat[path] = converted
  params = pytorch_weights.unflatten(flat)
  pytorch_weights.check_tree(params, expected, what)
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def text_params_from_pytorch(state_dict: dict[str, np.ndarray], config: TextConfig) -> Params:
  """The params of `text_encoder(config, with_projection)` from transformers' PyTorch names.

  state_dict: {"text_model.encoder.layers.0.self_attn.q_proj.weight": array, ...}
  of a CLIPTextModel, CLIPTextModelWithProjection or CLIPModel (its vision tower
  is skipped); with "text_projection.weight" the tree has `text_projection`.
  Raises ValueError naming what is missing, unexpected or misshapen.
  """
  # transformers 5 names a CLIPTextModel's weights without the "text_model." prefix (its other classes keep it).
  unprefixed = ("embeddings.", "encoder.", "final_layer_norm.")
  state_dict = {f"text_model.{k}" if k.startswith(unprefixed) else k: v for k, v in state_dict.items()}
  with_projection = "text_projection.weight" in state_dict
  expected = text_param_shapes(text_encoder(config, with_projection))
  prefixes = ("text_model.", "text_projection.") if with_projection else ("text_model.",)
  return _convert(state_dict, prefixes, expected, "CLIP text encoder")


def vision_params_from_pytorch(state_dict: dict[str, np.ndarray], config: VisionConfig) -> Params:
  """The params of `CLIPVisionModelWithProjection(config)` from transformers' PyTorch names.

  state_dict: {"vision_model.embeddings.patch_embedding.weight": array, ...,
  "visual_projection.weight": array} of a CLIPVisionModelWithProjection or a
  CLIPModel (its text tower is skipped). Raises ValueError naming what is
  missing, unexpected or misshapen.
  """
  expected = vision_param_shapes(CLIPVisionModelWithProjection(config))
  return _convert(state_dict, ("vision_model.", "visual_projection."), expected, "CLIP vision tower")


def text_encoder(
  config: TextConfig,
  with_projection: bool = False,
  dtype: jnp.dtype = jnp.float32,
  attention_fn: AttentionFn = dot_product_attention,
) -> CLIPTextModel | CLIPTextModelWithProjection:
  """The text encoder module of `config`: CLIPTextModelWithProjection if with_projection, else CLIPTextModel."""
  module_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
  return module_class(config, dtype=dtype, attention_fn=attention_fn)


def params_to_pytorch(params: Params) -> dict[str, np.ndarray]:
  """A text encoder's or vision tower's params -> transformers' PyTorch state dict (float32 NumPy)."""
  state_dict = {}
  for path, array in pytorch_weights.flatten(params).items():
    leaf, tensor = pytorch_weights.pytorch_tensor(path[-1], np.asarray(array))
    state_dict[".".join(path[:-1] + (leaf,))] = tensor
  return state_dict


def _read_config(folder: str) -> dict:
  with open(os.path.join(folder, "config.json")) as f:
    return json.load(f)


def load_text_encoder(
  folder: str, dtype: jnp.dtype = jnp.float32, attention_fn: AttentionFn = dot_product_attention
) -> tuple[CLIPTextModel | CLIPTextModelWithProjection, Params]:
  """(module, float32 params) of a text encoder folder in transformers' layout (config.json, *.safetensors).

  The module is CLIPTextModelWithProjection when the weights have
  `text_projection` (SDXL's text_encoder_2, a CLIPModel), else CLIPTextModel;
  it computes in `dtype`. Raises pytorch_weights.PickledWeightsError for a
  folder with only pickled weights.
  """
  config = TextConfig.from_json(_read_config(folder))
  state_dict = pytorch_weights.read_state_dict(folder)
  params = text_params_from_pytorch(state_dict, config)
  return text_encoder(config, "text_projection" in params, dtype, attention_fn), params


def load_vision_tower(
  folder: str, dtype: jnp.dtype = jnp.float32, attention_fn: AttentionFn = dot_product_attention
) -> tuple[CLIPVisionModelWithProjection, Params]:
  """(module, float32 params) of a CLIPVisionModelWithProjection or CLIPModel folder in transformers' layout.

  The module maps CLIP-normalised pixel_values [B, 3, image_size, image_size]
  to image embeddings [B, projection_dim], computing in `dtype`. Raises
  pytorch_weights.PickledWeightsError for a folder with only pickled weights.
  """
  config = VisionConfig.from_json(_read_config(folder))
  params = vision_params_from_pytorch(pytorch_weights.read_state_dict(folder), config)
  return CLIPVisionModelWithProjection(config, dtype=dtype, attention_fn=attention_fn), params
