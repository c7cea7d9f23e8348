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
  tokenizer = models.build_tokenizer(shapes.vocabulary(), os.path.join(path, "_tokenizer_src"), max_length=12)
  model, params = models.build(UNET_CONFIG, VAE_CONFIG, TEXT_CONFIG, tokenizer, seed)
  models.save(model, params, path)


def save_as_pytorch(flax_dir: str, torch_dir: str) -> None:
  """Writes a model folder of the same configs with PyTorch weights (random:
  what matters is that the Flax conversion reproduces the torch outputs)."""
  import shutil

  from diffusers import AutoencoderKL
  from diffusers import UNet2DConditionModel
  from transformers import CLIPTextConfig
  from transformers import CLIPTextModel

  shutil.copytree(flax_dir, torch_dir)
  for sub in ("unet", "vae", "text_encoder"):
    for name in os.listdir(os.path.join(torch_dir, sub)):
      if name.endswith(".msgpack"):
        os.remove(os.path.join(torch_dir, sub, name))
  for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
    folder = os.path.join(torch_dir, sub)
    cls.from_config(cls.load_config(folder)).save_pretrained(folder, safe_serialization=False)
  folder = os.path.join(torch_dir, "text_encoder")
  CLIPTextModel(CLIPTextConfig.from_pretrained(folder)).save_pretrained(folder, safe_serialization=False)
