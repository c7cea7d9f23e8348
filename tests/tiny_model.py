"""A tiny random SD-shaped model for tests: 8x8x4 latents, 16 px images."""

from __future__ import annotations

import os

from ddpo_jax import models
from ddpo_jax.toy import architecture
from ddpo_jax.toy import shapes

# The toy model's UNet, narrower.
UNET_CONFIG = dict(architecture.UNET_CONFIG, block_out_channels=(32, 32), cross_attention_dim=16)
VAE_CONFIG = dict(
  down_block_types=("DownEncoderBlock2D",) * 2,
  up_block_types=("UpDecoderBlock2D",) * 2,
  block_out_channels=(16, 16),
  layers_per_block=1,
  latent_channels=4,
  norm_num_groups=8,
  sample_size=16,
)
TEXT_CONFIG = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=16)


def save_tiny_model(path: str, seed: int = 0) -> None:
  """Builds the tiny model with random weights and saves it with `models.save` (PyTorch safetensors)."""
  tokenizer = models.build_tokenizer(shapes.vocabulary(), os.path.join(path, "_tokenizer_src"), max_length=12)
  model, params = models.build(UNET_CONFIG, VAE_CONFIG, TEXT_CONFIG, tokenizer, seed)
  models.save(model, params, path)


def save_with_pytorch(folder: str, torch_dir: str, seed: int = 0) -> None:
  """Writes a model folder of `folder`'s configs whose UNet, VAE and text encoder are randomly initialised and
  saved by diffusers' and transformers' PyTorch classes themselves (save_pretrained, safetensors)."""
  import shutil

  from diffusers import AutoencoderKL
  from diffusers import UNet2DConditionModel
  import torch
  from transformers import CLIPTextConfig
  from transformers import CLIPTextModel

  shutil.copytree(folder, torch_dir)
  torch.manual_seed(seed)
  for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
    path = os.path.join(torch_dir, sub)
    shutil.rmtree(path)
    module = cls.from_config(cls.load_config(os.path.join(folder, sub)))
    with torch.no_grad():  # diffusers zero-initialises some output layers; random everywhere tests more
      for p in module.parameters():
        p.add_(0.02 * torch.randn_like(p))
    module.save_pretrained(path, safe_serialization=True)
  path = os.path.join(torch_dir, "text_encoder")
  config = CLIPTextConfig.from_pretrained(path)
  shutil.rmtree(path)
  CLIPTextModel(config).save_pretrained(path, safe_serialization=True)
