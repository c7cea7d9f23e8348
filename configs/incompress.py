r"""JPEG incompressibility: reward = +JPEG kB (the mirror of compress.py).

    python -m ddpo_jax.main --config=configs/incompress.py:tiny --workdir=runs/incompress-tiny

tiny: the shipped toy-world model on 2 CPU cores, about 5 minutes; reward_mean
(kB) rises, i.e. the samples become harder to compress. No preset: SD v1.4 on
ImageNet animal prompts with the paper's settings.
"""

from ddpo_jax import config_utils

base = config_utils.load_sibling(__file__, "base")


def get_config(preset: str | None = None):
  config = base.get_config()
  config.reward.name = "jpeg_incompressibility"
  config.prompt.name = "imagenet_animals"
  config.num_epochs = 60
  if preset:
    base.apply_preset(config, preset)
  return config
