"""The model layer: Stable-Diffusion-shaped models and their pure functions.

diffusion.py      `DiffusionModel`, loading and saving in diffusers' layout, and the
                  functions the rest of ddpo_jax calls (tokenize, encode_prompts,
                  predict_noise, decode_latents, encode_images); re-exported here.
attention.py      attention chosen by name (make_attention, resolve): the plain reference,
                  the blocked CPU one with a written-out backward, cuDNN's, TPU flash.
architectures.py  the modules of a model without its weights (memory planning).
clip.py           the CLIP vision tower with projection (the aesthetic reward's).
"""

from ddpo_jax.models.diffusion import SD_V1_SCHEDULER
from ddpo_jax.models.diffusion import TOY_MODEL
from ddpo_jax.models.diffusion import TOY_MODEL_DIR
from ddpo_jax.models.diffusion import DiffusionModel
from ddpo_jax.models.diffusion import NoiseSchedule
from ddpo_jax.models.diffusion import Params
from ddpo_jax.models.diffusion import build
from ddpo_jax.models.diffusion import build_tokenizer
from ddpo_jax.models.diffusion import check_model_folder
from ddpo_jax.models.diffusion import decode_latents
from ddpo_jax.models.diffusion import encode_images
from ddpo_jax.models.diffusion import encode_prompts
from ddpo_jax.models.diffusion import is_local
from ddpo_jax.models.diffusion import load
from ddpo_jax.models.diffusion import predict_noise
from ddpo_jax.models.diffusion import resolve_path
from ddpo_jax.models.diffusion import save
from ddpo_jax.models.diffusion import tokenize
from ddpo_jax.models.diffusion import with_attention_block
from ddpo_jax.models.diffusion import with_vae_scaling_factor

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
  "resolve_path",
  "save",
  "tokenize",
  "with_attention_block",
  "with_vae_scaling_factor",
]
