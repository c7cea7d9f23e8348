r"""Human preference: reward = PickScore, exp(logit_scale) · cos(image embedding, prompt embedding).

    python -m ddpo_jax.main --config=configs/pickscore.py:tiny --workdir=runs/pickscore-tiny

No preset: SD v1.4 on "a(n) {animal} {activity}" prompts (45 common animals ×
washing the dishes, riding a bike, playing chess), scored by PickScore
(yuvalkirstain/PickScore_v1, a CLIP-H/14 fine-tuned on Pick-a-Pic; its
config.json and safetensors downloaded from the Hub, the tokenizer from its
processor, laion/CLIP-ViT-H-14-laion2B-s32B-b79K) on the accelerators beside
the sampler; held out: the same animals doing an activity never trained on.
tiny: the shipped toy-world model on toy-scene captions, scored by a tiny
random CLIP built offline ("tiny-random"): it checks the whole program on 2
CPU cores; the scores it optimises mean nothing.
"""

import ml_collections

from ddpo_jax import config_utils

base = config_utils.load_sibling(__file__, "base")


def get_config(preset: str | None = None):
  config = base.get_config()
  config.reward.name = "pickscore"
  # The CLIPModel (a Hub id, a local folder or "tiny-random"), its tokenizer's id or
  # folder, and the towers' compute dtype.
  config.reward.kwargs = ml_collections.ConfigDict(
    {
      "model": "yuvalkirstain/PickScore_v1",
      "processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
      "dtype": "float32",
    }
  )
  config.prompt.name = "nouns_activities"
  # Generalisation: the same animals doing an activity never trained on.
  config.eval.prompt.name = "unseen_activity"
  if preset:
    base.apply_preset(config, preset)
  if preset == "tiny":
    config.reward.kwargs.model = "tiny-random"
    base.apply_toy_captions(config)
  return config
