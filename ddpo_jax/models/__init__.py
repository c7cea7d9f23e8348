"""The model layer: Stable-Diffusion-shaped models and their pure functions.

diffusion.py        `DiffusionModel`, loading and saving in diffusers' layout, and the
                    functions the rest of ddpo_jax calls (tokenize, encode_prompts,
                    predict_noise, decode_latents, encode_images); re-exported here.
unet.py, vae.py     SD's UNet2DConditionModel and AutoencoderKL in Flax (layers.py: their blocks).
clip_towers.py      CLIP's text encoders and vision tower in Flax.
tokenizer.py        CLIP's BPE tokenizer (the `tokenizers` library).
pytorch_weights.py  PyTorch safetensors <-> NumPy, without torch.
attention.py        attention by name (make_attention, resolve): xla, blocked (CPU), cudnn, flash (TPU).
architectures.py    the modules of a model without its weights (memory planning).
clip.py             loading the CLIP vision tower of CLIP-based rewards.
"""

from ddpo_jax.models.clip_towers import params_to_pytorch as text_params_to_pytorch
from ddpo_jax.models.diffusion import SD_V1_SCHEDULER
from ddpo_jax.models.diffusion import TOY_MODEL
from ddpo_jax.models.diffusion import TOY_MODEL_DIR
from ddpo_jax.models.diffusion import DiffusionModel
from ddpo_jax.models.diffusion import NoiseSchedule
from ddpo_jax.models.diffusion import Params
from ddpo_jax.models.diffusion import build
from ddpo_jax.models.diffusion import check_model_folder
from ddpo_jax.models.diffusion import decode_latents
from ddpo_jax.models.diffusion import encode_images
from ddpo_jax.models.diffusion import encode_prompts
from ddpo_jax.models.diffusion import is_local
from ddpo_jax.models.diffusion import load
from ddpo_jax.models.diffusion import predict_noise
from ddpo_jax.models.diffusion import pytorch_configs
from ddpo_jax.models.diffusion import resolve_path
from ddpo_jax.models.diffusion import save
from ddpo_jax.models.diffusion import tokenize
from ddpo_jax.models.diffusion import with_attention
from ddpo_jax.models.diffusion import with_attention_block
from ddpo_jax.models.diffusion import with_dtype
from ddpo_jax.models.diffusion import with_vae_scaling_factor
from ddpo_jax.models.tokenizer import build_tokenizer
from ddpo_jax.models.unet import unet_params_to_pytorch
from ddpo_jax.models.vae import vae_params_to_pytorch

__all__ = [
  "SD_V1_SCHEDULER",
  "TOY_MODEL",
  "TOY_MODEL_DIR",
  "DiffusionModel",
  "NoiseSchedule",
  "Params",
  "build",
  "build_tokenizer",
  "check_model_folder",
  "decode_latents",
  "encode_images",
  "encode_prompts",
  "is_local",
  "load",
  "predict_noise",
  "pytorch_configs",
  "resolve_path",
  "save",
  "text_params_to_pytorch",
  "tokenize",
  "unet_params_to_pytorch",
  "vae_params_to_pytorch",
  "with_attention",
  "with_attention_block",
  "with_dtype",
  "with_vae_scaling_factor",
]
