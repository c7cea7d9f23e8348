r"""Toy prompt alignment: reward = the fraction of the caption's four attributes
(shape colour, shape, background pattern, background colour) that the image
shows, read from its pixels (ddpo_jax/rewards/toy_alignment.py).

    python -m ddpo_jax.main --config=configs/toy_alignment.py:tiny --workdir=runs/toy-alignment-tiny

The toy world's stand-in for the paper's VLM alignment task, exact and cheap:
the shipped toy-world model is trained on the captions of the "train" split
(shape colour × shape pairs outside `ddpo_jax.toy.shapes.HELDOUT_PAIRS`) and
evaluated on the held-out pairs. It exists for the toy model only, so the
config with and without the `tiny` preset is the same.
"""

from ddpo_jax import config_utils

base = config_utils.load_sibling(__file__, "base")


def get_config(preset: str | None = None):
  config = base.get_config()
  base.apply_tiny(config)
  if preset:
    base.apply_preset(config, preset)
  config.reward.name = "toy_alignment"
  base.apply_toy_captions(config)
  config.eval.rewards = ("jpeg_compressibility", "jpeg_incompressibility")
  return config
