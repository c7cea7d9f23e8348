"""Loading, building and saving Stable-Diffusion-shaped models.

Everything outside models/ sees a `DiffusionModel` (our Flax modules: unet.py,
vae.py, clip_towers.py; the tokenizer; the noise schedule) plus a params dict
{"unet", "vae", "text_encoder"} and the pure functions below.

A model is a folder in diffusers' `save_pretrained` layout (model_index.json,
unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a Hugging Face id of one;
the shipped toy-world model is such a folder inside the package, so it loads
through exactly the same code path as Stable Diffusion.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.models import attention as attention_lib
from ddpo_jax.models import clip_towers
from ddpo_jax.models import partitioning
from ddpo_jax.models import pytorch_weights
from ddpo_jax.models import tokenizer as tokenizer_lib
from ddpo_jax.models import unet as unet_lib
from ddpo_jax.models import vae as vae_lib

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
  """The modules of a latent text-to-image model (no params inside).

  unet, vae, text_encoder: our Flax modules (`unet.UNet`, `vae.AutoencoderKL`,
  `clip_towers.CLIPTextModel`), each with its `config`, compute `dtype` and
  `attention_fn`; tokenizer: `tokenizer.CLIPTokenizer`. `attention` names the
  implementation the UNet's attention_fn is (`attention.IMPLEMENTATIONS`) and
  `attention_block_bytes` the block size of "blocked".
  """

  unet: Any
  vae: Any
  text_encoder: Any
  tokenizer: Any
  schedule: NoiseSchedule
  path: str
  attention: str = "xla"
  attention_block_bytes: int = 0
  # The scheduler's config.json (diffusers' names), written back by `save`.
  scheduler_config: tuple[tuple[str, Any], ...] = ()

  @property
  def latent_channels(self) -> int:
    return int(self.unet.config.in_channels)

  @property
  def latent_size(self) -> int:
    return int(self.unet.config.sample_size)

  @property
  def vae_scale_factor(self) -> int:
    return int(self.vae.config.downscale)

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

  @property
  def dtype(self) -> jnp.dtype:
    return jnp.dtype(self.unet.dtype)


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
# The noise schedule.
# ----------------------------------------------------------------------------

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
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _betas(config: dict) -> np.ndarray:
  """float64 [num_train_timesteps] betas of a diffusers scheduler config (DDIMScheduler's rules)."""
  n = int(config.get("num_train_timesteps", 1000))
  if config.get("trained_betas") is not None:
    return np.asarray(config["trained_betas"], np.float64)
  start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
  schedule = config.get("beta_schedule", "linear")
  if schedule == "linear":
    return np.linspace(start, end, n, dtype=np.float32).astype(np.float64)
  if schedule == "scaled_linear":
    return (np.linspace(start**0.5, end**0.5, n, dtype=np.float32) ** 2).astype(np.float64)
  if schedule == "squaredcos_cap_v2":
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
    return np.asarray(betas, np.float32).astype(np.float64)
  raise ValueError(f"unsupported scheduler beta_schedule {schedule!r}; supported: {_BETA_SCHEDULES}")


def schedule_from_config(config: dict) -> NoiseSchedule:
  """The noise schedule of a diffusers scheduler_config.json dict (DDIM's reading of it).

  Raises ValueError for settings our DDIM sampler does not implement (another
  timestep spacing than "leading", zero-terminal-SNR rescaling, thresholding).
  """
  unsupported = []
  if config.get("timestep_spacing", "leading") != "leading":
    unsupported.append(f"timestep_spacing={config['timestep_spacing']!r}")
  if config.get("rescale_betas_zero_snr"):
    unsupported.append("rescale_betas_zero_snr=true")
  if config.get("thresholding"):
    unsupported.append("thresholding=true")
  if unsupported:
    raise ValueError(f"unsupported scheduler settings: {', '.join(unsupported)} (ddpo_jax samples with leading DDIM)")
  # float32 products as diffusers computes them (its torch tensors are float32).
  alphas_cumprod = np.cumprod(1.0 - _betas(config).astype(np.float32), dtype=np.float32).astype(np.float64)
  final = 1.0 if config.get("set_alpha_to_one", True) else float(alphas_cumprod[0])
  return NoiseSchedule(
    alphas_cumprod=alphas_cumprod,
    final_alpha_cumprod=final,
    steps_offset=int(config.get("steps_offset", 0)),
    prediction_type=str(config.get("prediction_type", "epsilon")),
  )


# ----------------------------------------------------------------------------
# Loading and saving.
# ----------------------------------------------------------------------------

# Old Flax checkpoints (diffusers' and transformers' Flax classes) by component.
FLAX_WEIGHTS = {
  "unet": "diffusion_flax_model.msgpack",
  "vae": "diffusion_flax_model.msgpack",
  "text_encoder": "flax_model.msgpack",
}
PYTORCH_WEIGHTS = {
  "unet": "diffusion_pytorch_model.safetensors",
  "vae": "diffusion_pytorch_model.safetensors",
  "text_encoder": "model.safetensors",
}
# What a download from the Hub fetches: configs, tokenizer files and the canonical safetensors weights
# (not their fp16 or non-EMA variants, nor pickles); components without any get their Flax msgpack.
HUB_PATTERNS = (
  "model_index.json",
  "*/*.json",
  "*/*.txt",
  "*/diffusion_pytorch_model.safetensors",
  "*/diffusion_pytorch_model-*.safetensors",
  "*/model.safetensors",
  "*/model-*.safetensors",
)
# The diffusers version whose PyTorch classes read what `save` writes (tested).
_DIFFUSERS_LAYOUT_VERSION = "0.42.1"


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def local_folder(name: str, revision: str | None = None) -> str:
  """The local folder of a model: itself, the shipped toy model, or a Hub download.

  A Hugging Face id is fetched with huggingface_hub (configs, the tokenizer and
  the canonical safetensors weights; a component without them gets its Flax
  msgpack; cached, offline when HF_HUB_OFFLINE=1).
  """
  if is_local(name):
    if revision:
      raise ValueError(f"config.model.revision={revision!r} is for Hugging Face ids; {name!r} is a local folder.")
    return os.path.expanduser(resolve_path(name))
  from huggingface_hub import snapshot_download

  path = snapshot_download(name, revision=revision, allow_patterns=list(HUB_PATTERNS))
  has_weights = lambda c: glob.glob(os.path.join(path, c, "*.safetensors")) or not os.path.isdir(os.path.join(path, c))
  without = [c for c in FLAX_WEIGHTS if not has_weights(c)]
  if without:
    path = snapshot_download(name, revision=revision, allow_patterns=[f"{c}/{FLAX_WEIGHTS[c]}" for c in without])
  return path


def _read_params(folder: str, component: str, from_pytorch, expected: Params) -> Params:
  """A component's params: PyTorch safetensors (converted), else an old Flax msgpack (as stored)."""
  has_safetensors = any(f.endswith(".safetensors") for f in os.listdir(folder))
  msgpack = os.path.join(folder, FLAX_WEIGHTS[component])
  if not has_safetensors and os.path.exists(msgpack):
    from flax import serialization

    with open(msgpack, "rb") as f:
      params = serialization.msgpack_restore(f.read())
    pytorch_weights.check_tree(params, expected, f"{component} (Flax msgpack)")
    return params
  return from_pytorch(pytorch_weights.read_state_dict(folder))


def _float32_numpy(tree) -> Params:
  return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def load(name: str, revision: str | None = None, dtype: str = "float32") -> tuple[DiffusionModel, Params]:
  """Loads a model from a local folder or a Hugging Face id.

  Args:
    name: a folder in diffusers' layout, a Hugging Face id such as
      "CompVis/stable-diffusion-v1-4", or `TOY_MODEL`. Each of unet/, vae/ and
      text_encoder/ holds PyTorch `*.safetensors` weights (the standard format,
      read without torch) or an older Flax `*.msgpack`; pickled weights are
      refused (`pytorch_weights.PickledWeightsError` says how to convert them).
    revision: the Hub revision.
    dtype: compute dtype of the modules ("float32" or "bfloat16"); params stay
      as stored (float32 master weights).

  Returns:
    The model and its params {"unet", "vae", "text_encoder"}, float32 NumPy arrays.
  """
  path = local_folder(name, revision)
  problem = check_model_folder(path)
  if problem:
    raise ValueError(f"cannot load model {name!r}: {problem}.")
  model = build_modules(folder_configs(path), dtype)
  sub = lambda component: os.path.join(path, component)
  params = {
    "unet": _read_params(
      sub("unet"),
      "unet",
      lambda sd: unet_lib.unet_params_from_pytorch(sd, model.unet.config),
      unet_lib.param_shapes(model.unet, unet_lib.example_inputs(model.unet.config)),
    ),
    "vae": _read_params(
      sub("vae"),
      "vae",
      lambda sd: vae_lib.vae_params_from_pytorch(sd, model.vae.config),
      unet_lib.param_shapes(model.vae, vae_lib.example_inputs(model.vae.config)),
    ),
    "text_encoder": _read_params(
      sub("text_encoder"),
      "text_encoder",
      lambda sd: clip_towers.text_params_from_pytorch(sd, model.text_encoder.config),
      clip_towers.text_param_shapes(model.text_encoder),
    ),
  }
  # On the host: placed on the mesh by the caller (a global sharding may span hosts).
  return dataclasses.replace(model, path=path), _float32_numpy(params)


def folder_configs(path: str) -> dict[str, Any]:
  """{"unet", "vae", "text_encoder", "scheduler": config dicts, "tokenizer": {"path"}, "path"} of a model folder."""
  return {
    "unet": _read_json(os.path.join(path, "unet", "config.json")),
    "vae": _read_json(os.path.join(path, "vae", "config.json")),
    "text_encoder": _read_json(os.path.join(path, "text_encoder", "config.json")),
    "scheduler": _read_json(os.path.join(path, "scheduler", "scheduler_config.json")),
    "tokenizer": {"path": os.path.join(path, "tokenizer")},
    "path": path,
  }


def build_modules(configs: dict[str, Any], dtype: str = "float32", tokenizer=None) -> DiffusionModel:
  """The modules of a model from its component configs (diffusers' and transformers' config.json dicts).

  configs["tokenizer"]: {"path": a tokenizer folder}, or the fields of a
  `StandInTokenizer` (an abstract model's); `tokenizer`, when given, is used instead.
  """
  compute_dtype = jnp.dtype(dtype)
  if tokenizer is None:
    spec = configs["tokenizer"]
    if "path" in spec:
      tokenizer = tokenizer_lib.CLIPTokenizer.from_folder(spec["path"])
    else:
      tokenizer = StandInTokenizer(**{f.name: int(spec[f.name]) for f in dataclasses.fields(StandInTokenizer)})
  text_config = clip_towers.TextConfig.from_json(configs["text_encoder"])
  with_projection = "CLIPTextModelWithProjection" in configs["text_encoder"].get("architectures", ())
  return DiffusionModel(
    unet=unet_lib.UNet(unet_lib.UNetConfig.from_json(configs["unet"]), dtype=compute_dtype),
    vae=vae_lib.AutoencoderKL(vae_lib.VAEConfig.from_json(configs["vae"]), dtype=compute_dtype),
    text_encoder=clip_towers.text_encoder(text_config, with_projection, compute_dtype),
    tokenizer=tokenizer,
    schedule=schedule_from_config(configs["scheduler"]),
    path=configs.get("path", ""),
    scheduler_config=tuple(sorted((k, v) for k, v in configs["scheduler"].items() if not k.startswith("_"))),
  )


def _config_fields(config) -> dict:
  """A frozen config dataclass as a JSON-ready dict (tuples as lists)."""
  return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _unet_config_json(config: unet_lib.UNetConfig) -> dict:
  fields = _config_fields(config)
  flax_numerics = fields.pop("flax_numerics")
  out = {"_class_name": "UNet2DConditionModel", "_diffusers_version": _DIFFUSERS_LAYOUT_VERSION, **fields}
  if flax_numerics:
    out["_flax_numerics"] = True  # diffusers ignores "_" keys; our loader reads it (unet.UNetConfig.from_json)
  return out


def _text_config_json(model: DiffusionModel) -> dict:
  config = model.text_encoder.config
  with_projection = isinstance(model.text_encoder, clip_towers.CLIPTextModelWithProjection)
  return {
    "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
    "model_type": "clip_text_model",
    **_config_fields(config),
    "bos_token_id": int(model.tokenizer.bos_token_id),
    "pad_token_id": int(model.tokenizer.pad_token_id),
  }


def _write_json(path: str, value: dict) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2)


def pytorch_configs(model: DiffusionModel) -> dict[str, dict]:
  """{"unet", "vae", "text_encoder"}: the config.json dicts of diffusers' and transformers' PyTorch classes
  for `model` (what `save` writes; `UNet2DConditionModel.from_config(...)` etc. build them)."""
  return {
    "unet": _unet_config_json(model.unet.config),
    "vae": {
      "_class_name": "AutoencoderKL",
      "_diffusers_version": _DIFFUSERS_LAYOUT_VERSION,
      **_config_fields(model.vae.config),
    },
    "text_encoder": _text_config_json(model),
  }


def save(model: DiffusionModel, params: Params, path: str) -> None:
  """Writes `model` with `params` in diffusers' save_pretrained layout, PyTorch safetensors weights.

  The folder loads back with `load`, and with diffusers' PyTorch
  `StableDiffusionPipeline.from_pretrained(path, safety_checker=None)` (tested).
  """
  os.makedirs(path, exist_ok=True)
  state_dicts = {
    "unet": unet_lib.unet_params_to_pytorch(params["unet"]),
    "vae": vae_lib.vae_params_to_pytorch(params["vae"]),
    "text_encoder": clip_towers.params_to_pytorch(params["text_encoder"]),
  }
  configs = pytorch_configs(model)
  for component, state_dict in state_dicts.items():
    folder = os.path.join(path, component)
    os.makedirs(folder, exist_ok=True)
    pytorch_weights.write_state_dict(state_dict, os.path.join(folder, PYTORCH_WEIGHTS[component]))
    _write_json(os.path.join(folder, "config.json"), configs[component])
  model.tokenizer.save(os.path.join(path, "tokenizer"))
  os.makedirs(os.path.join(path, "scheduler"), exist_ok=True)
  scheduler = {"_class_name": "DDIMScheduler", "_diffusers_version": _DIFFUSERS_LAYOUT_VERSION}
  scheduler.update(dict(model.scheduler_config) or _scheduler_config(model.schedule))
  _write_json(os.path.join(path, "scheduler", "scheduler_config.json"), scheduler)
  index = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": _DIFFUSERS_LAYOUT_VERSION,
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", type(model.text_encoder).__name__],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
  }
  _write_json(os.path.join(path, "model_index.json"), index)


def _scheduler_config(schedule: NoiseSchedule) -> dict:
  config = dict(SD_V1_SCHEDULER)
  config.update(steps_offset=schedule.steps_offset, prediction_type=schedule.prediction_type)
  return config


def build(
  unet_config: dict,
  vae_config: dict,
  text_config: dict,
  tokenizer,
  seed: int,
  schedule_config: dict | None = None,
  dtype: str = "float32",
) -> tuple[DiffusionModel, Params]:
  """A randomly initialised model of the given component configs (diffusers' and
  transformers' config fields; for the toy world's pretraining, tests and benchmarks)."""
  unet_key, vae_key, text_key = jax.random.split(jax.random.PRNGKey(seed), 3)
  text_config = dict(
    text_config,
    vocab_size=len(tokenizer),
    max_position_embeddings=tokenizer.model_max_length,
    eos_token_id=tokenizer.eos_token_id,
  )
  configs = {
    "unet": dict(unet_config),
    "vae": dict(vae_config),
    "text_encoder": text_config,
    "scheduler": dict(schedule_config or SD_V1_SCHEDULER),
  }
  model = build_modules(configs, dtype, tokenizer=tokenizer)
  params = {
    "unet": unet_lib.init_params(model.unet, unet_key),
    "vae": vae_lib.init_params(model.vae, vae_key),
    "text_encoder": model.text_encoder.init(text_key, jnp.zeros((1, model.max_prompt_tokens), jnp.int32))["params"],
  }
  return model, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def with_vae_scaling_factor(model: DiffusionModel, scaling_factor: float) -> DiffusionModel:
  """The same model with the VAE config's latent scaling factor replaced."""
  config = dataclasses.replace(model.vae.config, scaling_factor=float(scaling_factor))
  return dataclasses.replace(model, vae=model.vae.clone(config=config))


def with_dtype(model: DiffusionModel, dtype: str) -> DiffusionModel:
  """The same model computing in `dtype` ("float32" or "bfloat16"), as `load(..., dtype=dtype)` builds it."""
  compute_dtype = jnp.dtype(dtype)
  return dataclasses.replace(
    model,
    unet=model.unet.clone(dtype=compute_dtype),
    vae=model.vae.clone(dtype=compute_dtype),
    text_encoder=model.text_encoder.clone(dtype=compute_dtype),
  )


def with_attention(
  model: DiffusionModel, implementation: str, block_mb: float = 0.0, mesh: jax.sharding.Mesh | None = None
) -> DiffusionModel:
  """The same model whose UNet and VAE attention is `implementation` (`attention.IMPLEMENTATIONS`,
  resolved: not "auto"); "blocked" runs in blocks of `block_mb` MB of float32 scores (0: one block);
  "flash" runs per device of `mesh` (Pallas kernels are not partitioned automatically). On a
  mesh of several devices the UNet's activations are also constrained to their rows
  (`partitioning`), so that fsdp-sharded params do not make a device compute the whole batch.
  The text encoder keeps the XLA attention (its causal mask; 77 tokens)."""
  block_bytes = int(float(block_mb) * 2**20)
  fn = attention_lib.make_attention(implementation, block_bytes, mesh)
  unet_fn, constrain = fn, None
  if mesh is not None and mesh.size > 1:
    unet_fn, constrain = partitioning.constrained_attention(fn, mesh), partitioning.batch_constraint(mesh)
  return dataclasses.replace(
    model,
    unet=model.unet.clone(attention_fn=unet_fn, constrain=constrain),
    vae=model.vae.clone(attention_fn=fn),
    attention=implementation,
    attention_block_bytes=block_bytes,
  )


def with_attention_block(model: DiffusionModel, block_mb: float) -> DiffusionModel:
  """The same model with blocked attention of `block_mb` MB blocks, or XLA's when block_mb is 0."""
  return with_attention(model, "blocked" if float(block_mb) else "xla", block_mb)


# ----------------------------------------------------------------------------
# Pure functions of (model, params, arrays): what the rest of ddpo_jax calls.
# ----------------------------------------------------------------------------


def tokenize(model: DiffusionModel, prompts: list[str]) -> np.ndarray:
  """Token ids int32 [B, max_prompt_tokens], padded and truncated like SD."""
  return np.asarray(model.tokenizer(list(prompts)), np.int32)


def encode_prompts(model: DiffusionModel, text_params: Params, token_ids: jax.Array) -> jax.Array:
  """CLIP text embeddings [B, L, D] (the last hidden state, as SD uses)."""
  return model.text_encoder.apply({"params": text_params}, token_ids).last_hidden_state


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
  unet = model.unet.clone(remat=True) if remat and not model.unet.remat else model.unet
  return unet.apply({"params": unet_params}, latents, jnp.asarray(timesteps), context)


def decode_latents(model: DiffusionModel, vae_params: Params, latents: jax.Array) -> jax.Array:
  """Scaled latents [B, C, h, w] to images [B, H, W, 3] in [0, 1], float32."""
  config = model.vae.config
  unscaled = latents / config.scaling_factor + (config.shift_factor or 0.0)
  images = model.vae.apply({"params": vae_params}, unscaled, method="decode")
  return jnp.clip(jnp.transpose(images, (0, 2, 3, 1)).astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def encode_images(model: DiffusionModel, vae_params: Params, images: jax.Array, key: jax.Array | None) -> jax.Array:
  """Images [B, H, W, 3] in [-1, 1] to scaled latents [B, C, h, w].

  With a key the posterior is sampled, else its mode is taken.
  """
  posterior = model.vae.apply({"params": vae_params}, jnp.transpose(images, (0, 3, 1, 2)), method="encode")
  latents = posterior.mode() if key is None else posterior.sample(key)
  config = model.vae.config
  return (latents - (config.shift_factor or 0.0)) * config.scaling_factor


@dataclasses.dataclass(frozen=True)
class StandInTokenizer:
  """The part of a CLIP tokenizer's interface that `tokenize` uses, without a
  vocabulary (an abstract model's, `architectures.abstract_model`): it tokenizes
  the empty prompt only (the negative prompt of classifier-free guidance) as CLIP
  does: <|startoftext|> <|endoftext|>, then padding.
  """

  model_max_length: int
  vocab_size: int
  bos_token_id: int
  eos_token_id: int
  pad_token_id: int

  def __len__(self) -> int:
    return self.vocab_size

  def __call__(self, prompts) -> np.ndarray:
    """Token ids int32 [B, model_max_length] of empty prompts; raises for any other prompt."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if any(prompts):
      raise ValueError(
        "the stand-in tokenizer of an abstract model has no vocabulary and tokenizes only the empty prompt; "
        "load the model with models.load to tokenize text."
      )
    ids = np.full((len(prompts), self.model_max_length), self.pad_token_id, np.int32)
    ids[:, 0] = self.bos_token_id
    if self.model_max_length > 1:
      ids[:, 1] = self.eos_token_id
    return ids
