r"""Prompt-image alignment by CLIP: reward = 100 · cos(CLIP image embedding, prompt embedding).

    python -m ddpo_jax.main --config=configs/clip_score.py:tiny --workdir=runs/clip-score-tiny

No preset: SD v1.4 on "a(n) {animal} {activity}" prompts (45 common animals ×
washing the dishes, riding a bike, playing chess), scored by CLIP ViT-L/14
(openai/clip-vit-large-patch14, its config.json, safetensors and tokenizer
downloaded from the Hub) on the accelerators beside the sampler; held out: the
same animals doing an activity never trained on. tiny: the shipped toy-world
model on toy-scene captions, scored by a tiny random CLIP built offline
("tiny-random"): it checks the whole program on 2 CPU cores; the scores it
optimises mean nothing.
"""

import ml_collections

from ddpo_jax import config_utils

base = config_utils.load_sibling(__file__, "base")


def get_config(preset: str | None = None):
  config = base.get_config()
  config.reward.name = "clip_score"
  # The CLIPModel (a Hub id, a local folder or "tiny-random"), its compute dtype, and
  # where its tokenizer is ("": the model's own files).
  config.reward.kwargs = ml_collections.ConfigDict(
    {"clip_model": "openai/clip-vit-large-patch14", "dtype": "float32", "processor": ""}
  )
  config.prompt.name = "nouns_activities"
  # Generalisation: the same animals doing an activity never trained on.
  config.eval.prompt.name = "unseen_activity"
  if preset:
    base.apply_preset(config, preset)
  if preset == "tiny":
    config.reward.kwargs.clip_model = "tiny-random"
    base.apply_toy_captions(config)
  return config
