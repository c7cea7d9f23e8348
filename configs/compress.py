r"""JPEG compressibility (the paper's first task): reward = -JPEG kB.

    python -m ddpo_jax.main --config=configs/compress.py:tiny --workdir=runs/compress-tiny

tiny: the shipped toy-world model on 2 CPU cores, about 5 minutes; reward_mean
rises from the first epoch to the last. No preset: SD v1.4 on ImageNet animal
prompts with the paper's settings (a TPU v4-64 reaches ~50k samples in ~4 h).
"""

from ddpo_jax import config_utils

base = config_utils.load_sibling(__file__, "base")


def get_config(preset: str | None = None):
  config = base.get_config()
  config.reward.name = "jpeg_compressibility"
  config.prompt.name = "imagenet_animals"
  config.num_epochs = 60
  if preset:
    base.apply_preset(config, preset)
  return config
