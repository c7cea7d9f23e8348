r"""Aesthetic quality (the paper's third task): reward = LAION aesthetic score.

    python -m ddpo_jax.main --config=configs/aesthetic.py:tiny --workdir=runs/aesthetic-tiny

tiny: the shipped toy-world model scored through a tiny random CLIP tower
("tiny-random", built offline) and the real LAION MLP: it checks the whole
program on 2 CPU cores; the scores it optimises mean nothing. No preset: SD v1.4
on the 45 common-animal prompts with per-prompt stat tracking, scored by CLIP
ViT-L/14 (openai/clip-vit-large-patch14, downloaded from the Hub), which runs on
the accelerators beside the sampler.
"""

import ml_collections

from ddpo_jax import config_utils

base = config_utils.load_sibling(__file__, "base")


def get_config(preset: str | None = None):
  config = base.get_config()
  config.reward.name = "aesthetic"
  # The CLIP tower (a Hub id, a local folder or "tiny-random") and its compute dtype.
  config.reward.kwargs = ml_collections.ConfigDict({"clip_model": "openai/clip-vit-large-patch14", "dtype": "float32"})
  config.prompt.name = "common_animals"
  # Generalisation: animals never trained on.
  config.eval.prompt.name = "uncommon_animals"
  config.num_epochs = 60
  if preset:
    base.apply_preset(config, preset)
  if preset == "tiny":
    config.reward.kwargs.clip_model = "tiny-random"
  return config
