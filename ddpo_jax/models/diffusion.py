"""Loading, building and saving Stable-Diffusion-shaped models.

With its siblings architectures.py (modules without weights) and clip.py (the
CLIP vision tower), the only code of ddpo_jax that imports diffusers or
transformers: everything else sees a `DiffusionModel` (modules, tokenizer,
noise schedule) plus a params dict {"unet", "vae", "text_encoder"} and the pure
functions below, so replacing those libraries is a change to models/ alone.

A model is a folder in diffusers' `save_pretrained` layout (model_index.json,
unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a Hugging Face id of one;
the shipped toy-world model is such a folder inside the package, so it loads
through exactly the same code path as Stable Diffusion.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.models import attention

# The shipped toy-world model: `model.name = TOY_MODEL` selects it.
TOY_MODEL = "toy-world"
TOY_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "toy", "model")
_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """The training noise schedule of the model's scheduler config.

  Attributes:
    alphas_cumprod: [num_train_timesteps] float64, the cumulative products ᾱ_t.
    final_alpha_cumprod: ᾱ used for the step past t = 0 (ᾱ[0] for SD v1,
      whose config has set_alpha_to_one = false).
    steps_offset: added to the inference timesteps (1 for SD v1).
    prediction_type: "epsilon", "v_prediction" or "sample".
  """

  alphas_cumprod: np.ndarray
  final_alpha_cumprod: float
  steps_offset: int
  prediction_type: str

  @property
  def num_train_timesteps(self) -> int:
    return int(self.alphas_cumprod.shape[0])


@dataclasses.dataclass(frozen=True)
class DiffusionModel:
  """The modules of a latent text-to-image model (no params inside)."""

  unet: Any
  vae: Any
  text_encoder: Any
  tokenizer: Any
  schedule: NoiseSchedule
  path: str
  # Bytes of float32 scores per block of our blocked attention (`attention.blocked_attention`) in the
  # UNet's attention layers; 0 keeps diffusers' own layers. Set from config.model.attention_block_mb.
  attention_block_bytes: int = 0

  @property
  def latent_channels(self) -> int:
    return int(self.unet.config.in_channels)

  @property
  def latent_size(self) -> int:
    return int(self.unet.config.sample_size)

  @property
  def vae_scale_factor(self) -> int:
    return 2 ** (len(self.vae.config.block_out_channels) - 1)

  @property
  def image_size(self) -> int:
    return self.latent_size * self.vae_scale_factor

  @property
  def vae_scaling_factor(self) -> float:
    return float(self.vae.config.scaling_factor)

  @property
  def max_prompt_tokens(self) -> int:
    return int(self.tokenizer.model_max_length)

  @property
  def text_hidden_size(self) -> int:
    return int(self.text_encoder.config.hidden_size)


# ----------------------------------------------------------------------------
# Where a model lives.
# ----------------------------------------------------------------------------


def resolve_path(name: str) -> str:
  """Maps `TOY_MODEL` to the shipped folder; anything else is returned as is."""
  return TOY_MODEL_DIR if name == TOY_MODEL else name


def is_local(name: str) -> bool:
  """Whether `name` is meant as a local folder rather than a Hugging Face id."""
  path = resolve_path(name)
  return os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path) or path.count("/") != 1


def check_model_folder(name: str) -> str | None:
  """Returns a description of what is wrong with a local model folder, or None."""
  path = os.path.expanduser(resolve_path(name))
  if not os.path.isdir(path):
    return f"{path!r} is not a folder"
  missing = [c for c in _COMPONENTS if not os.path.isdir(os.path.join(path, c))]
  if missing:
    return f"{path!r} lacks the sub-folders {missing} of a diffusers save_pretrained layout"
  return None


# ----------------------------------------------------------------------------
# Loading and saving.
# ----------------------------------------------------------------------------


def _schedule_from_scheduler(scheduler) -> NoiseSchedule:
  state = scheduler.create_state()
  config = scheduler.config
  return NoiseSchedule(
    alphas_cumprod=np.asarray(state.common.alphas_cumprod, np.float64),
    final_alpha_cumprod=float(state.final_alpha_cumprod),
    steps_offset=int(config.steps_offset),
    prediction_type=str(config.prediction_type),
  )


def load(
  name: str,
  revision: str | None = None,
  dtype: str = "float32",
  from_pt: bool = False,
) -> tuple[DiffusionModel, Params]:
  """Loads a model from a local folder or a Hugging Face id.

  Args:
    name: a folder in diffusers' layout, a Hugging Face id such as
      "CompVis/stable-diffusion-v1-4", or `TOY_MODEL`.
    revision: the Hub revision ("flax" holds SD v1.4's Flax weights).
    dtype: compute dtype of the modules ("float32" or "bfloat16"); params stay
      as stored (float32 master weights).
    from_pt: convert PyTorch weights (needs torch installed).

  Returns:
    The model and its params {"unet", "vae", "text_encoder"}, float32 NumPy arrays.
  """
  from diffusers import FlaxAutoencoderKL
  from diffusers import FlaxDDIMScheduler
  from diffusers import FlaxUNet2DConditionModel
  from transformers import CLIPTokenizer
  from transformers import FlaxCLIPTextModel

  path = os.path.expanduser(resolve_path(name))
  compute_dtype = jnp.dtype(dtype)
  common = dict(revision=revision, from_pt=from_pt, dtype=compute_dtype)
  unet, unet_params = FlaxUNet2DConditionModel.from_pretrained(path, subfolder="unet", **common)
  vae, vae_params = FlaxAutoencoderKL.from_pretrained(path, subfolder="vae", **common)
  text_encoder = FlaxCLIPTextModel.from_pretrained(path, subfolder="text_encoder", _do_init=True, **common)
  tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
  scheduler, _ = FlaxDDIMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
  model = DiffusionModel(
    unet=unet,
    vae=vae,
    text_encoder=text_encoder,
    tokenizer=tokenizer,
    schedule=_schedule_from_scheduler(scheduler),
    path=path,
  )
  params = {"unet": unet_params, "vae": vae_params, "text_encoder": text_encoder.params}
  # On the host: placed on the mesh by the caller (a global sharding may span hosts).
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  return model, params


def save(model: DiffusionModel, params: Params, path: str) -> None:
  """Writes `model` with `params` in diffusers' save_pretrained layout.

  The folder loads back with `load` and with diffusers'
  FlaxStableDiffusionPipeline.from_pretrained(path, safety_checker=None,
  feature_extractor=None).
  """
  import diffusers
  from diffusers import FlaxDDIMScheduler

  os.makedirs(path, exist_ok=True)
  to_numpy = lambda tree: jax.tree.map(np.asarray, tree)
  model.unet.save_pretrained(os.path.join(path, "unet"), params=to_numpy(params["unet"]))
  model.vae.save_pretrained(os.path.join(path, "vae"), params=to_numpy(params["vae"]))
  model.text_encoder.save_pretrained(os.path.join(path, "text_encoder"), params=to_numpy(params["text_encoder"]))
  model.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
  FlaxDDIMScheduler(**_scheduler_config(model.schedule)).save_pretrained(os.path.join(path, "scheduler"))
  index = {
    "_class_name": "FlaxStableDiffusionPipeline",
    "_diffusers_version": diffusers.__version__,
    "feature_extractor": [None, None],
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "FlaxDDIMScheduler"],
    "text_encoder": ["transformers", "FlaxCLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "FlaxUNet2DConditionModel"],
    "vae": ["diffusers", "FlaxAutoencoderKL"],
  }
  with open(os.path.join(path, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2)


# SD v1's scheduler settings (scaled-linear betas over 1000 steps, epsilon
# prediction, steps_offset 1, set_alpha_to_one false).
SD_V1_SCHEDULER = dict(
  num_train_timesteps=1000,
  beta_start=0.00085,
  beta_end=0.012,
  beta_schedule="scaled_linear",
  clip_sample=False,
  set_alpha_to_one=False,
  steps_offset=1,
  prediction_type="epsilon",
)


def _scheduler_config(schedule: NoiseSchedule) -> dict:
  config = dict(SD_V1_SCHEDULER)
  config.update(steps_offset=schedule.steps_offset, prediction_type=schedule.prediction_type)
  return config


def build_tokenizer(words: list[str], directory: str, max_length: int):
  """Builds a CLIP BPE tokenizer from the words of a closed vocabulary.

  CLIP's byte-level BPE needs every byte symbol (alone and word-final) in the
  vocabulary; each word adds the merges that spell it left to right. Merges
  are tried lowest rank first, so a few words end up as two or three pieces
  ("purple" -> "pur", "pl", "e</w>", since "pl" of "plain" ranks earlier), as
  in CLIP's own vocabulary; the pieces are the same for every caption.
  """
  from transformers import CLIPTokenizer
  from transformers.models.clip.tokenization_clip import bytes_to_unicode

  symbols = list(bytes_to_unicode().values())
  vocab = symbols + [s + "</w>" for s in symbols]
  merges = []
  for word in sorted(set(words)):
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    current = pieces[0]
    for piece in pieces[1:]:
      merged = current + piece
      if (current, piece) not in merges:
        merges.append((current, piece))
      if merged not in vocab:
        vocab.append(merged)
      current = merged
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  os.makedirs(directory, exist_ok=True)
  vocab_file = os.path.join(directory, "vocab.json")
  merges_file = os.path.join(directory, "merges.txt")
  with open(vocab_file, "w") as f:
    json.dump({token: i for i, token in enumerate(vocab)}, f)
  with open(merges_file, "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return CLIPTokenizer(vocab_file, merges_file, model_max_length=max_length)


def build(
  unet_config: dict,
  vae_config: dict,
  text_config: dict,
  tokenizer,
  seed: int,
  schedule_config: dict | None = None,
) -> tuple[DiffusionModel, Params]:
  """A randomly initialised model of the given component configs (for the toy
  world's pretraining and for tests)."""
  from diffusers import FlaxAutoencoderKL
  from diffusers import FlaxDDIMScheduler
  from diffusers import FlaxUNet2DConditionModel
  from transformers import CLIPTextConfig
  from transformers import FlaxCLIPTextModel

  unet_key, vae_key, text_key = jax.random.split(jax.random.PRNGKey(seed), 3)
  unet = FlaxUNet2DConditionModel(**unet_config)
  vae = FlaxAutoencoderKL(**vae_config)
  text_config = dict(text_config, vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length)
  text_config.setdefault("eos_token_id", tokenizer.eos_token_id)
  text_config.setdefault("bos_token_id", tokenizer.bos_token_id)
  text_config.setdefault("pad_token_id", tokenizer.pad_token_id)
  text_encoder = FlaxCLIPTextModel(
    CLIPTextConfig(**text_config), seed=int(jax.random.randint(text_key, (), 0, 2**31 - 1))
  )
  scheduler = FlaxDDIMScheduler(**(schedule_config or SD_V1_SCHEDULER))
  model = DiffusionModel(
    unet=unet,
    vae=vae,
    text_encoder=text_encoder,
    tokenizer=tokenizer,
    schedule=_schedule_from_scheduler(scheduler),
    path="",
  )
  params = {
    "unet": unet.init_weights(unet_key),
    "vae": vae.init_weights(vae_key),
    "text_encoder": text_encoder.params,
  }
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), jax.tree.map(np.asarray, _unfreeze(params)))
  return model, params


def with_vae_scaling_factor(model: DiffusionModel, scaling_factor: float) -> DiffusionModel:
  """The same model with the VAE config's latent scaling factor replaced."""
  from diffusers import FlaxAutoencoderKL

  config = {k: v for k, v in model.vae.config.items() if not k.startswith("_")}
  config["scaling_factor"] = float(scaling_factor)
  config["dtype"] = model.vae.dtype
  return dataclasses.replace(model, vae=FlaxAutoencoderKL(**config))


def with_attention_block(model: DiffusionModel, block_mb: float) -> DiffusionModel:
  """The same model whose UNet attention runs in blocks of `block_mb` MB of scores (0: diffusers' layers)."""
  return dataclasses.replace(model, attention_block_bytes=int(float(block_mb) * 2**20))


def _unfreeze(tree):
  from flax.core import unfreeze

  return unfreeze(tree)


# ----------------------------------------------------------------------------
# Pure functions of (model, params, arrays): what the rest of ddpo_jax calls.
# ----------------------------------------------------------------------------


def tokenize(model: DiffusionModel, prompts: list[str]) -> np.ndarray:
  """Token ids int32 [B, max_prompt_tokens], padded and truncated like SD."""
  tokens = model.tokenizer(
    list(prompts), padding="max_length", max_length=model.max_prompt_tokens, truncation=True, return_tensors="np"
  )
  return tokens.input_ids.astype(np.int32)


def encode_prompts(model: DiffusionModel, text_params: Params, token_ids: jax.Array) -> jax.Array:
  """CLIP text embeddings [B, L, D] (the last hidden state, as SD uses)."""
  position_ids = jnp.broadcast_to(jnp.arange(token_ids.shape[-1]), token_ids.shape)
  attention_mask = jnp.ones_like(token_ids)
  outputs = model.text_encoder.module.apply(
    {"params": text_params}, token_ids, attention_mask, position_ids, deterministic=True
  )
  return outputs[0]


# The UNet's blocks, by their names in diffusers' UNet module.
_UNET_BLOCKS = (
  "FlaxCrossAttnDownBlock2D",
  "FlaxDownBlock2D",
  "FlaxUNetMidBlock2DCrossAttn",
  "FlaxCrossAttnUpBlock2D",
  "FlaxUpBlock2D",
)
_remat_lock = threading.RLock()  # re-entrant: the attention and remat patches nest


@contextlib.contextmanager
def _rematerialised_unet_blocks():
  """While active, UNets set up (at apply time) wrap each block in nn.remat.

  diffusers' UNet has no remat option; its setup builds the blocks by their
  module-level names, so those names are swapped for remat'd classes. The
  params' tree is unchanged (tested) and so are the outputs and gradients;
  the backward pass recomputes each block's activations instead of keeping them.
  """
  from diffusers.models.unets import unet_2d_condition_flax as unet_module
  import flax.linen as nn

  with _remat_lock:
    originals = {name: getattr(unet_module, name) for name in _UNET_BLOCKS}
    try:
      for name, block in originals.items():
        setattr(unet_module, name, nn.remat(block))
      yield
    finally:
      for name, block in originals.items():
        setattr(unet_module, name, block)


@contextlib.contextmanager
def _blocked_attention_modules(block_bytes: int):
  """While active, UNets set up (at apply time) use `blocked_attention` in
  their attention layers: the same params (the subclass keeps diffusers'
  setup: to_q, to_k, to_v, to_out_0) and outputs equal within float rounding."""
  from diffusers.models import attention_flax

  original = attention_flax.FlaxAttention

  class BlockedAttention(original):
    def __call__(self, hidden_states, context=None, deterministic=True):
      context = hidden_states if context is None else context
      split = lambda x: x.reshape(x.shape[:2] + (self.heads, self.dim_head))
      out = attention.blocked_attention(
        split(self.query(hidden_states)), split(self.key(context)), split(self.value(context)), self.scale, block_bytes
      )
      out = self.proj_attn(out.reshape(out.shape[:2] + (-1,)))
      return self.dropout_layer(out, deterministic=deterministic)

  with _remat_lock:
    attention_flax.FlaxAttention = BlockedAttention
    try:
      yield
    finally:
      attention_flax.FlaxAttention = original


def predict_noise(
  model: DiffusionModel,
  unet_params: Params,
  latents: jax.Array,
  timesteps: jax.Array,
  context: jax.Array,
  remat: bool = False,
) -> jax.Array:
  """The UNet's raw output [B, C, h, w] for latents [B, C, h, w] at int timesteps [B].

  remat: rematerialise each UNet block in the backward pass (less memory,
  about one more forward pass of compute).
  """
  apply = lambda: model.unet.apply({"params": unet_params}, latents, jnp.asarray(timesteps), context).sample
  with contextlib.ExitStack() as stack:
    block_bytes = model.attention_block_bytes
    if block_bytes and not getattr(model.unet, "use_memory_efficient_attention", False):
      stack.enter_context(_blocked_attention_modules(block_bytes))
    if remat:
      stack.enter_context(_rematerialised_unet_blocks())
    return apply()


def decode_latents(model: DiffusionModel, vae_params: Params, latents: jax.Array) -> jax.Array:
  """Scaled latents [B, C, h, w] to images [B, H, W, 3] in [0, 1], float32."""
  images = model.vae.apply({"params": vae_params}, latents / model.vae_scaling_factor, method=model.vae.decode).sample
  return jnp.clip(jnp.transpose(images, (0, 2, 3, 1)).astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def encode_images(model: DiffusionModel, vae_params: Params, images: jax.Array, key: jax.Array | None) -> jax.Array:
  """Images [B, H, W, 3] in [-1, 1] to scaled latents [B, C, h, w].

  With a key the posterior is sampled, else its mode is taken.
  """
  posterior = model.vae.apply(
    {"params": vae_params}, jnp.transpose(images, (0, 3, 1, 2)), method=model.vae.encode
  ).latent_dist
  latents = posterior.mode() if key is None else posterior.sample(key)
  return jnp.transpose(latents, (0, 3, 1, 2)) * model.vae_scaling_factor
