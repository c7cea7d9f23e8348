"""CLIP image-prompt similarity rewards: `clip_score` (CLIPScore-style) and `pickscore` (PickScore).

Both score an image by the cosine between the CLIP image embedding of the
image and the CLIP text embedding of its prompt, each L2-normalised, times a
scale:

  reward = scale · cos(image_embeds, text_embeds)

- `clip_score`: scale = 100 (`CLIP_SCORE_SCALE`), fixed whatever the
  checkpoint, on openai/clip-vit-large-patch14 by default. 100 is the logit
  scale of OpenAI's trained CLIP (exp(logit_scale), clamped at 100 in training;
  CLIP starts from 1/0.07), so on OpenAI's checkpoints this is their logits.
  CLIPScore (Hessel et al., 2021) uses 2.5 · max(cos, 0) instead: the same
  order for positive cosines (divide by 40 for its values), while this reward
  also orders the negative ones, which CLIPScore sets to 0.
- `pickscore`: scale = exp(logit_scale) read from the checkpoint (key
  `logit_scale` of its safetensors), as PickScore's own inference code does
  (`model.logit_scale.exp() * (text_embs @ image_embs.T)`), on
  yuvalkirstain/PickScore_v1 (a CLIP-H/14 fine-tuned on Pick-a-Pic) with the
  tokenizer of laion/CLIP-ViT-H-14-laion2B-s32B-b79K, its processor.

The model is a CLIPModel in transformers' layout (config.json with text_config
and vision_config, *.safetensors): a Hugging Face id or a local folder; the
processor (tokenizer files, and preprocessor_config.json when there is one) is
another id or folder, or the model's own. Both towers are ddpo_jax's own Flax
modules (`models.clip_towers`). Prompts are tokenised on the host as
CLIPProcessor(truncation=True, max_length=77) does: <|startoftext|>, the first
75 tokens, <|endoftext|>, then padding, which CLIP's causal text tower never
sees from the pooled EOS position (so padding to 77 or to the longest prompt
gives the same embeddings). Images get CLIP's preprocessing in JAX
(`aesthetic.clip_pixels`: bicubic resize of the shorter side, centre crop,
CLIP's mean and std); a processor's preprocessor_config.json that asks for
another one is refused (`check_preprocessing`). The whole path, pixels and
token ids to scores, is one jitted function on this process's local devices.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.models import clip as clip_models
from ddpo_jax.models import clip_towers
from ddpo_jax.models import diffusion
from ddpo_jax.models import pytorch_weights
from ddpo_jax.models import tokenizer as tokenizer_lib
from ddpo_jax.rewards import aesthetic
from ddpo_jax.rewards.base import RewardFn
from ddpo_jax.rewards.base import register

Params = dict[str, Any]

CLIP_MODEL = "openai/clip-vit-large-patch14"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# clip_score's scale of the cosine (see the module docstring).
CLIP_SCORE_SCALE = 100.0
# What a processor id downloads: the tokenizer's files and the image preprocessing's config.
PROCESSOR_FILES = (
  "tokenizer_config.json",
  "vocab.json",
  "merges.txt",
  "tokenizer.json",
  "special_tokens_map.json",
  "preprocessor_config.json",
)
PREPROCESSOR_CONFIG = "preprocessor_config.json"
# PIL's BICUBIC, the `resample` of CLIP's image processors.
BICUBIC = 3

# The text tower of "tiny-random", beside `clip_models.TINY_CONFIG`'s vision tower, with the
# toy-world model's tokenizer (its vocabulary: every byte, so any prompt tokenises) at CLIP's 77 tokens.
TINY_TEXT_CONFIG = dict(
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=2,
  max_position_embeddings=77,
  projection_dim=clip_models.TINY_CONFIG["projection_dim"],
)
# CLIP's logit scale at initialisation, ln(1 / 0.07).
TINY_LOGIT_SCALE = math.log(1 / 0.07)


class CLIPScorer(NamedTuple):
  """A loaded CLIPModel: both towers, their params, the tokenizer, the image size.

  params = {"text": the text tower's, "vision": the vision tower's,
  "logit_scale": float32 scalar, the log of the cosine's scale}.
  """

  text_module: clip_towers.CLIPTextModelWithProjection
  vision_module: clip_towers.CLIPVisionModelWithProjection
  params: Params
  tokenizer: tokenizer_lib.CLIPTokenizer
  image_size: int

  @property
  def max_tokens(self) -> int:
    """Tokens per prompt row (77 for CLIP), bos and eos included."""
    return int(self.text_module.config.max_position_embeddings)

  def token_ids(self, prompts: list[str]) -> np.ndarray:
    """int32 [B, max_tokens]: the prompts as CLIPProcessor(truncation=True, max_length=77) tokenises them."""
    return self.tokenizer.encode(prompts, max_length=self.max_tokens)


# ----------------------------------------------------------------------------
# The score.
# ----------------------------------------------------------------------------


def clip_similarity_scores(
  text_module: nn.Module,
  vision_module: nn.Module,
  image_size: int,
  params: Params,
  images: jax.Array,
  token_ids: jax.Array,
) -> jax.Array:
  """exp(logit_scale) · cos(image embedding, text embedding): float32 [B].

  Args:
    text_module, vision_module: CLIP's towers (`CLIPScorer`'s).
    image_size: the vision tower's input size.
    params: {"text", "vision", "logit_scale"} (`CLIPScorer.params`).
    images: [B, H, W, 3], uint8 or float levels in [0, 255]; the scores are
      differentiable w.r.t. float images.
    token_ids: int32 [B, L] (`CLIPScorer.token_ids`).

  The towers compute in their own dtype, the normalisation and the cosine in float32.
  """
  pixels = aesthetic.clip_pixels(images, image_size)
  image_embeds = vision_module.apply({"params": params["vision"]}, pixels).astype(jnp.float32)
  text_embeds = text_module.apply({"params": params["text"]}, token_ids).text_embeds.astype(jnp.float32)
  cosine = jnp.sum(aesthetic.l2_normalize(image_embeds) * aesthetic.l2_normalize(text_embeds), axis=-1)
  return jnp.exp(params["logit_scale"].astype(jnp.float32)) * cosine


# ----------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def load_clip_folder(
  folder: str, dtype: jnp.dtype = jnp.float32
) -> tuple[clip_towers.CLIPTextModelWithProjection, clip_towers.CLIPVisionModelWithProjection, Params]:
  """(text module, vision module, float32 params) of a CLIPModel folder (config.json, *.safetensors).

  The safetensors are read once; params as `CLIPScorer.params`. Raises
  ValueError when the weights lack text_projection or logit_scale (not a
  two-tower CLIPModel), pytorch_weights.PickledWeightsError when the folder has
  only pickled weights.
  """
  config = _read_json(os.path.join(folder, "config.json"))
  text_config, vision_config = clip_towers.TextConfig.from_json(config), clip_towers.VisionConfig.from_json(config)
  state_dict = pytorch_weights.read_state_dict(folder)
  missing = [key for key in ("text_projection.weight", "logit_scale") if key not in state_dict]
  if missing:
    raise ValueError(f"{folder!r} is not a CLIPModel (text and vision towers, logit_scale): it lacks {missing}")
  params = {
    "text": clip_towers.text_params_from_pytorch(state_dict, text_config),
    "vision": clip_towers.vision_params_from_pytorch(state_dict, vision_config),
    "logit_scale": jnp.asarray(np.asarray(state_dict["logit_scale"]).reshape(()), jnp.float32),
  }
  text_module = clip_towers.text_encoder(text_config, with_projection=True, dtype=dtype)
  return text_module, clip_towers.CLIPVisionModelWithProjection(vision_config, dtype=dtype), params


@functools.cache
def tiny_tokenizer() -> tokenizer_lib.CLIPTokenizer:
  """The toy-world model's tokenizer, rows of CLIP's 77 tokens."""
  toy = tokenizer_lib.CLIPTokenizer.from_folder(os.path.join(diffusion.TOY_MODEL_DIR, "tokenizer"))
  return tokenizer_lib.CLIPTokenizer(toy.get_vocab(), toy.merges, TINY_TEXT_CONFIG["max_position_embeddings"])


def tiny_text_config() -> clip_towers.TextConfig:
  """`TINY_TEXT_CONFIG` with the tiny tokenizer's vocabulary and EOS."""
  tokenizer = tiny_tokenizer()
  return clip_towers.TextConfig(
    vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id, **TINY_TEXT_CONFIG
  )


@functools.lru_cache(maxsize=4)
def _tiny_text_params(seed: int) -> Params:
  """Our module's init of the tiny text tower for `seed` (cached, as `clip_models._tiny_params`)."""
  module = clip_towers.text_encoder(tiny_text_config(), with_projection=True)
  return module.init(jax.random.key(seed), jnp.zeros((1, TINY_TEXT_CONFIG["max_position_embeddings"]), jnp.int32))[
    "params"
  ]


def tiny_scorer(seed: int = clip_models.TINY_SEED, dtype: jnp.dtype = jnp.float32) -> CLIPScorer:
  """A random two-tower CLIP built offline (the same for a given seed): `clip_models.tiny_vision`'s
  vision tower, a text tower of `TINY_TEXT_CONFIG`, logit scale `TINY_LOGIT_SCALE`."""
  vision_module, vision_params = clip_models.tiny_vision(seed, dtype)
  text_module = clip_towers.text_encoder(tiny_text_config(), with_projection=True, dtype=dtype)
  params = {
    "text": jax.tree.map(lambda x: x, _tiny_text_params(seed)),
    "vision": vision_params,
    "logit_scale": jnp.asarray(TINY_LOGIT_SCALE, jnp.float32),
  }
  return CLIPScorer(text_module, vision_module, params, tiny_tokenizer(), int(vision_module.config.image_size))


def _edge(value: Any) -> Any:
  """A size of preprocessor_config.json (n, {"shortest_edge": n} or {"height", "width"}) as n or (height, width)."""
  if isinstance(value, dict):
    if "shortest_edge" in value:
      return value["shortest_edge"]
    return (value.get("height"), value.get("width"))
  return value


def check_preprocessing(config: dict, image_size: int, where: str = PREPROCESSOR_CONFIG) -> None:
  """Raises ValueError when an image processor's config asks for other preprocessing than `clip_pixels` does.

  `clip_pixels`: resize the shorter side to image_size (bicubic), centre crop
  to image_size², rescale by 1/255, normalise by CLIP's mean and std. Keys the
  config leaves out take CLIPImageProcessor's defaults, which are those.
  """
  problems = [
    f"{key}={config[key]!r}"
    for key, expected in (("do_resize", True), ("do_center_crop", True), ("do_rescale", True), ("do_normalize", True))
    if config.get(key, expected) != expected
  ]
  if config.get("resample", BICUBIC) != BICUBIC:
    problems.append(f"resample={config['resample']!r} (not bicubic, {BICUBIC})")
  if _edge(config.get("size", image_size)) != image_size:
    problems.append(f"size={config['size']!r}")
  if _edge(config.get("crop_size", image_size)) not in (image_size, (image_size, image_size)):
    problems.append(f"crop_size={config['crop_size']!r}")
  if not math.isclose(config.get("rescale_factor", 1 / 255), 1 / 255, rel_tol=1e-6):
    problems.append(f"rescale_factor={config['rescale_factor']!r}")
  for key, expected in (("image_mean", aesthetic.CLIP_MEAN), ("image_std", aesthetic.CLIP_STD)):
    if not np.allclose(config.get(key, expected), expected, rtol=0, atol=1e-6):
      problems.append(f"{key}={config[key]!r}")
  if problems:
    raise ValueError(
      f"{where} asks for other image preprocessing than CLIP's (resize and centre crop to {image_size}, "
      f"bicubic, CLIP's mean and std), which is what ddpo_jax computes: {', '.join(problems)}"
    )


def _folder(name: str, revision: str | None, patterns: tuple[str, ...]) -> str:
  """The folder of a local name, or the Hub snapshot of `patterns` of an id."""
  if diffusion.is_local(name):
    return clip_models.local_folder(name, revision)
  return clip_models.download(name, revision, patterns)


def load(model: str, processor: str = "", dtype: str = "float32", revision: str = "") -> CLIPScorer:
  """Loads a CLIPModel and its processor.

  Args:
    model: a Hugging Face id (its config.json and *.safetensors are
      downloaded), a local folder in transformers' CLIPModel layout, or
      "tiny-random" (`tiny_scorer`, offline; `processor` is then unused).
    processor: where the tokenizer (tokenizer_config.json with vocab.json and
      merges.txt or tokenizer.json) and, if any, preprocessor_config.json are:
      a Hugging Face id (default revision) or a local folder; empty: `model`'s own.
    dtype: compute dtype of the towers ("float32" or "bfloat16"); params are float32.
    revision: the Hub revision of `model` (and of its processor when `processor` is empty).
  """
  compute_dtype = jnp.dtype(dtype)
  if model == clip_models.TINY_RANDOM:
    return tiny_scorer(dtype=compute_dtype)
  folder = _folder(model, revision or None, clip_models.HUB_PATTERNS)
  try:
    text_module, vision_module, params = load_clip_folder(folder, compute_dtype)
  except FileNotFoundError as e:
    if diffusion.is_local(model):
      raise
    raise clip_models.missing_hub_weights(model, revision, e) from e
  processor_folder = (
    _folder(processor, None, PROCESSOR_FILES) if processor else _folder(model, revision or None, PROCESSOR_FILES)
  )
  tokenizer = tokenizer_lib.CLIPTokenizer.from_folder(processor_folder)
  pooled_at = text_module.config.eos_token_id
  if pooled_at != 2 and tokenizer.eos_token_id != pooled_at:  # 2: pooled at the largest id, whatever the tokenizer
    raise ValueError(
      f"the tokenizer of {processor or model!r} ends prompts with token {tokenizer.eos_token_id}, but the text tower "
      f"pools at eos_token_id {pooled_at} (its config.json): they do not belong together; give the model's processor"
    )
  image_size = int(vision_module.config.image_size)
  preprocessor_file = os.path.join(processor_folder, PREPROCESSOR_CONFIG)
  if os.path.isfile(preprocessor_file):
    check_preprocessing(_read_json(preprocessor_file), image_size, preprocessor_file)
  return CLIPScorer(text_module, vision_module, params, tokenizer, image_size)


# ----------------------------------------------------------------------------
# The rewards.
# ----------------------------------------------------------------------------


def scorer_reward(scorer: CLIPScorer) -> RewardFn:
  """The reward of a loaded scorer: tokens on the host, `clip_similarity_scores` jitted on the local devices."""
  score_fn = functools.partial(clip_similarity_scores, scorer.text_module, scorer.vision_module, scorer.image_size)
  return aesthetic.local_sharded(score_fn, scorer.params, prompt_inputs=scorer.token_ids)


@register("clip_score")
def clip_score(
  clip_model: str = CLIP_MODEL, dtype: str = "float32", revision: str = "", processor: str = ""
) -> RewardFn:
  """Reward = 100 · cos(CLIP image embedding, CLIP prompt embedding), in [-100, 100]: higher matches better.

  The scale is `CLIP_SCORE_SCALE` whatever the checkpoint's logit_scale (see
  the module docstring for CLIPScore's 2.5 · max(cos, 0)).

  Args:
    clip_model: a CLIPModel: a Hugging Face id, a local folder in transformers'
      layout (config.json, *.safetensors), or "tiny-random" (offline).
    dtype: compute dtype of the towers ("float32" or "bfloat16").
    revision: the Hub revision of clip_model; empty for the default.
    processor: the tokenizer's id or folder; empty: clip_model's own.
  """
  scorer = load(clip_model, processor, dtype, revision)
  params = dict(scorer.params, logit_scale=jnp.asarray(math.log(CLIP_SCORE_SCALE), jnp.float32))
  return scorer_reward(scorer._replace(params=params))


@register("pickscore")
def pickscore(
  model: str = PICKSCORE_MODEL, processor: str = PICKSCORE_PROCESSOR, dtype: str = "float32", revision: str = ""
) -> RewardFn:
  """Reward = PickScore: exp(logit_scale) · cos(image embedding, prompt embedding), the checkpoint's logit_scale.

  CLIP's training clamps exp(logit_scale) at 100, so rewards lie within [-100, 100].

  Args:
    model: the CLIPModel: a Hugging Face id, a local folder in transformers'
      layout (config.json, *.safetensors), or "tiny-random" (offline, which
      brings its own tokenizer: processor is unused).
    processor: the tokenizer's id or folder (PickScore's is the ViT-H/14 one it was fine-tuned from).
    dtype: compute dtype of the towers ("float32" or "bfloat16").
    revision: the Hub revision of model; empty for the default.
  """
  return scorer_reward(load(model, processor, dtype, revision))
