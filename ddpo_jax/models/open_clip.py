"""OpenCLIP's ViT CLIP checkpoints in transformers' CLIPModel layout: their names, shapes and config.json.

OpenCLIP (mlfoundations/open_clip) saves a CLIP as one state dict: the text
tower at the top level (token_embedding, positional_embedding,
transformer.resblocks.N, ln_final, text_projection), the vision tower under
visual. (conv1, class_embedding, positional_embedding, ln_pre,
transformer.resblocks.N, ln_post, proj) and logit_scale. Each block's attention
is a torch.nn.MultiheadAttention, whose in_proj_weight [3W, W] stacks the
query, key and value projections; projections are applied as x @ proj, so
their matrices are [W, E] where transformers' Linear weights are [E, W].

`to_transformers` renames and reshapes such a state dict into transformers'
CLIPModel names, which `clip_towers` reads; `transformers_config` derives the
matching CLIPModel config.json from the shapes. Two things shapes cannot say
are taken from `ARCHITECTURES` (OpenCLIP's model_configs/*.json): the vision
tower's head width and the text tower's. Keys of features our towers
do not have (attentional pooling, layer scale, a Linear text projection, timm
or Hugging Face trunks) are refused by name.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

# OpenCLIP's SimpleTokenizer pads with 0 and appends <start_of_text> and <end_of_text> to the end of CLIP's BPE
# vocabulary (49406 and 49407 of 49408): the largest ids, which is why OpenCLIP can pool the text at the argmax.
PAD_TOKEN_ID = 0
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which OpenCLIP uses


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What an OpenCLIP model config says that its weights' shapes do not."""

  vision_head_width: int = 64  # OpenCLIP's CLIPVisionCfg default
  # The text towers' configs give head counts: width / heads is 64 in every model below.
  text_head_width: int = 64
  # "gelu" (exact, torch.nn.GELU) unless the model is a "-quickgelu" one (OpenAI's weights).
  hidden_act: str = "gelu"


# open_clip 3.3.0's src/open_clip/model_configs/{name}.json (text heads: 8, 8, 12, 16, 16, 20).
ARCHITECTURES: dict[str, Architecture] = {
  "ViT-B-32": Architecture(64),
  "ViT-B-16": Architecture(64),
  "ViT-L-14": Architecture(64),
  "ViT-H-14": Architecture(80),
  "ViT-g-14": Architecture(88),
  "ViT-bigG-14": Architecture(104),
}

_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
# A block's names, OpenCLIP's -> transformers' (in_proj_* is split below).
_BLOCK_NAMES = {
  "ln_1.weight": "layer_norm1.weight",
  "ln_1.bias": "layer_norm1.bias",
  "ln_2.weight": "layer_norm2.weight",
  "ln_2.bias": "layer_norm2.bias",
  "attn.out_proj.weight": "self_attn.out_proj.weight",
  "attn.out_proj.bias": "self_attn.out_proj.bias",
  "mlp.c_fc.weight": "mlp.fc1.weight",
  "mlp.c_fc.bias": "mlp.fc1.bias",
  "mlp.c_proj.weight": "mlp.fc2.weight",
  "mlp.c_proj.bias": "mlp.fc2.bias",
}
# Everything outside the blocks, OpenCLIP's -> transformers' (projections transposed below).
_TOP_NAMES = {
  "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
  "positional_embedding": "text_model.embeddings.position_embedding.weight",
  "ln_final.weight": "text_model.final_layer_norm.weight",
  "ln_final.bias": "text_model.final_layer_norm.bias",
  "text_projection": "text_projection.weight",
  "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
  "visual.class_embedding": "vision_model.embeddings.class_embedding",
  "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
  "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic, transformers' spelling
  "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
  "visual.ln_post.weight": "vision_model.post_layernorm.weight",
  "visual.ln_post.bias": "vision_model.post_layernorm.bias",
  "visual.proj": "visual_projection.weight",
  "logit_scale": "logit_scale",
}
_TRANSPOSED = ("text_projection", "visual.proj")


def strip_prefix(state_dict: dict[str, Any], prefix: str = "module.") -> dict[str, Any]:
  """The state dict without `prefix` on its keys (torch DistributedDataParallel's "module.") where all have it."""
  if state_dict and all(key.startswith(prefix) for key in state_dict):
    return {key[len(prefix) :]: value for key, value in state_dict.items()}
  return dict(state_dict)


def to_transformers(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """OpenCLIP's ViT CLIP state dict -> transformers' CLIPModel state dict, float32.

  Each block's in_proj_weight [3W, W] and in_proj_bias [3W] become
  self_attn.{q,k,v}_proj.{weight,bias}; text_projection and visual.proj
  [W, E] become text_projection.weight and visual_projection.weight [E, W].
  Buffers OpenCLIP may save (attn_mask) are dropped. Raises ValueError naming
  the keys that have no counterpart in our towers.
  """
  converted: dict[str, np.ndarray] = {}
  unknown = []
  for key, value in state_dict.items():
    array = np.asarray(value, np.float32)
    block = _BLOCK.match(key)
    if block:
      visual, index, name = block.groups()
      prefix = f"{'vision_model' if visual else 'text_model'}.encoder.layers.{index}."
      if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = name.rsplit("_", 1)[-1]  # "weight" or "bias"
        for part, chunk in zip("qkv", np.split(array, 3, axis=0)):
          converted[f"{prefix}self_attn.{part}_proj.{kind}"] = np.ascontiguousarray(chunk)
      elif name in _BLOCK_NAMES:
        converted[prefix + _BLOCK_NAMES[name]] = array
      else:
        unknown.append(key)
    elif key in _TOP_NAMES:
      converted[_TOP_NAMES[key]] = np.ascontiguousarray(array.T) if key in _TRANSPOSED else array
    elif key != "attn_mask":
      unknown.append(key)
  if unknown:
    raise ValueError(
      f"not a plain OpenCLIP ViT CLIP (conv patches, pre- and post-LayerNorm, token pooling, matrix projections): "
      f"{len(unknown)} keys have no counterpart in ddpo_jax's CLIP towers: {sorted(unknown)[:8]}"
    )
  missing = sorted(set(_TOP_NAMES.values()) - set(converted))
  if missing:
    raise ValueError(f"not an OpenCLIP ViT CLIP state dict: it lacks {missing}")
  return converted


def _num_layers(state_dict: dict[str, np.ndarray], tower: str) -> int:
  indices = {
    int(match.group(1)) for key in state_dict if (match := re.match(rf"^{tower}\.encoder\.layers\.(\d+)\.", key))
  }
  if indices != set(range(len(indices))):
    raise ValueError(f"the {tower} blocks are not numbered 0..N-1: {sorted(indices)}")
  return len(indices)


def _heads(width: int, head_width: int, what: str) -> int:
  if width % head_width:
    raise ValueError(f"the {what} width {width} is not a multiple of its head width {head_width}")
  return width // head_width


def transformers_config(state_dict: dict[str, np.ndarray], architecture: Architecture) -> dict[str, Any]:
  """The CLIPModel config.json (as a dict) of a converted state dict (`to_transformers`'s output).

  Widths, layer counts, vocabulary, context length, image and patch size come
  from the shapes; head counts and the activation from `architecture`; the
  special tokens are OpenCLIP's tokenizer's, the vocabulary's last two ids.
  """
  text_width = state_dict["text_model.embeddings.token_embedding.weight"].shape[1]
  vision_width, _, patch_size, _ = state_dict["vision_model.embeddings.patch_embedding.weight"].shape
  num_patches = state_dict["vision_model.embeddings.position_embedding.weight"].shape[0] - 1
  grid = int(round(num_patches**0.5))
  if grid * grid != num_patches:
    raise ValueError(f"the vision tower's {num_patches} position embeddings (after the class one) are not a square")
  text = {
    "vocab_size": int(state_dict["text_model.embeddings.token_embedding.weight"].shape[0]),
    "hidden_size": int(text_width),
    "intermediate_size": int(state_dict["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
    "num_hidden_layers": _num_layers(state_dict, "text_model"),
    "num_attention_heads": _heads(int(text_width), architecture.text_head_width, "text"),
    "max_position_embeddings": int(state_dict["text_model.embeddings.position_embedding.weight"].shape[0]),
    "hidden_act": architecture.hidden_act,
    "layer_norm_eps": LAYER_NORM_EPS,
    "bos_token_id": int(state_dict["text_model.embeddings.token_embedding.weight"].shape[0]) - 2,
    "eos_token_id": int(state_dict["text_model.embeddings.token_embedding.weight"].shape[0]) - 1,
    "pad_token_id": PAD_TOKEN_ID,
  }
  vision = {
    "hidden_size": int(vision_width),
    "intermediate_size": int(state_dict["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
    "num_hidden_layers": _num_layers(state_dict, "vision_model"),
    "num_attention_heads": _heads(int(vision_width), architecture.vision_head_width, "vision"),
    "image_size": int(grid * patch_size),
    "patch_size": int(patch_size),
    "hidden_act": architecture.hidden_act,
    "layer_norm_eps": LAYER_NORM_EPS,
  }
  return {
    "architectures": ["CLIPModel"],
    "model_type": "clip",
    "projection_dim": int(state_dict["text_projection.weight"].shape[0]),
    "logit_scale_init_value": float(np.asarray(state_dict["logit_scale"]).reshape(())),
    "text_config": text,
    "vision_config": vision,
  }
