"""HPSv2 (Human Preference Score v2, Wu et al. 2023): reward = cos(image embedding, prompt embedding).

HPSv2.1 is an OpenCLIP ViT-H-14 fine-tuned on human preferences between
generated images. Its score is the plain cosine of the two normalised
embeddings, without CLIP's logit scale: HPSv2's own `score` computes
`diagonal(image_features @ text_features.T)` on the normalised outputs of
OpenCLIP's model. Typical values are 0.2 to 0.35.

The weights are published only as a PyTorch pickle (xswu/HPSv2 on the Hugging
Face Hub, HPS_v2.1_compressed.pt); `convert_hpsv2` turns that file once into a
CLIPModel folder (config.json, model.safetensors), which this reward reads with
NumPy and runs on ddpo_jax's own CLIP towers, as `clip_score` and `pickscore`
do (`clip_score.load`: the same tokenisation, CLIP preprocessing in JAX,
jitted over the local devices, differentiable w.r.t. the images). The
tokenizer is OpenCLIP's, CLIP's BPE, as the Hub's
laion/CLIP-ViT-H-14-laion2B-s32B-b79K ships it (HPSv2's base model): OpenCLIP
pads with 0 and pools the text at the largest token id, <end_of_text>, which
is where our tower pools (the first <|endoftext|>), and its image transform
(resize the shorter side to 224, bicubic, centre crop, OpenAI's mean and std)
is CLIP's.
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from ddpo_jax.models import clip as clip_models
from ddpo_jax.models import diffusion
from ddpo_jax.rewards import clip_score
from ddpo_jax.rewards.base import RewardFn
from ddpo_jax.rewards.base import register

HPSV2_REPO = "xswu/HPSv2"
HPSV2_FILE = "HPS_v2.1_compressed.pt"
# HPSv2's base model, whose tokenizer and preprocessing it keeps.
HPSV2_PROCESSOR = clip_score.PICKSCORE_PROCESSOR
CONVERT_COMMANDS = (
  f"huggingface-cli download {HPSV2_REPO} {HPSV2_FILE} --local-dir=weights && "
  f"python -m ddpo_jax.rewards.convert_hpsv2 --allow_pickle --src=weights/{HPSV2_FILE} --dst=weights/hpsv2.1"
)


def check_model(model: str) -> str | None:
  """Why `model` cannot be HPSv2's weights (None when it may be): a pickle, or a local path without config.json."""
  if model == clip_models.TINY_RANDOM:
    return None
  if model.endswith(tuple(f".{suffix}" for suffix in ("pt", "pth", "bin", "ckpt"))):
    return f"{model!r} is a PyTorch pickle, which rewards do not read: convert it once: {CONVERT_COMMANDS}"
  if diffusion.is_local(model) and not os.path.isfile(os.path.join(model, "config.json")):
    return (
      f"{model!r} is not a converted HPSv2 folder (config.json, model.safetensors); to make one: {CONVERT_COMMANDS}"
    )
  return None


@register("hpsv2")
def hpsv2(model: str, processor: str = HPSV2_PROCESSOR, dtype: str = "float32", revision: str = "") -> RewardFn:
  """Reward = HPSv2: cos(image embedding, prompt embedding) of an HPSv2 CLIP, in [-1, 1]: higher is preferred.

  Args:
    model: the folder `convert_hpsv2` writes from HPS_v2.1_compressed.pt (see
      the module docstring), a Hugging Face id of such a folder, or
      "tiny-random" (a random CLIP built offline, which brings its own tokenizer).
    processor: the tokenizer's id or folder (HPSv2's base model's by default).
    dtype: compute dtype of the towers ("float32" or "bfloat16").
    revision: the Hub revision of model; empty for the default.
  """
  problem = check_model(model)
  if problem:
    raise ValueError(f"reward 'hpsv2', config.reward.kwargs.model: {problem}")
  scorer = clip_score.load(model, processor, dtype, revision)
  params = dict(scorer.params, logit_scale=jnp.zeros((), jnp.float32))  # exp(0) = 1: the plain cosine
  return clip_score.scorer_reward(scorer._replace(params=params))
