r"""Human preference: reward = HPSv2.1, cos(image embedding, prompt embedding) of a preference-tuned OpenCLIP-H/14.

    python -m ddpo_jax.main --config=configs/hpsv2.py:tiny --workdir=runs/hpsv2-tiny

No preset: SD v1.4 on "a(n) {animal} {activity}" prompts (45 common animals ×
washing the dishes, riding a bike, playing chess), scored by HPSv2.1 on the
accelerators beside the sampler; held out: the same animals doing an activity
never trained on. Its weights are published only as a PyTorch pickle; convert
them once into ./weights/hpsv2.1 (the default of config.reward.kwargs.model):

    huggingface-cli download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir=weights
    python -m ddpo_jax.rewards.convert_hpsv2 --allow_pickle \
      --src=weights/HPS_v2.1_compressed.pt --dst=weights/hpsv2.1

The tokenizer comes from the Hub (laion/CLIP-ViT-H-14-laion2B-s32B-b79K, HPSv2's
base model). tiny: the shipped toy-world model on toy-scene captions, scored by a
tiny random CLIP built offline ("tiny-random"): it checks the whole program on 2
CPU cores; the scores it optimises mean nothing.
"""

import ml_collections

from ddpo_jax import config_utils

base = config_utils.load_sibling(__file__, "base")


def get_config(preset: str | None = None):
  config = base.get_config()
  config.reward.name = "hpsv2"
  # The converted folder (see above; a Hub id of one, or "tiny-random"), its tokenizer's id or folder, and the
  # towers' compute dtype.
  config.reward.kwargs = ml_collections.ConfigDict(
    {
      "model": "./weights/hpsv2.1",
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
