r"""A labelled grid of the toy-world model's samples (the README's picture).

    python -m ddpo_jax.toy.samples --out=docs/toy_samples.png

Each sample is labelled with its prompt and its ground-truth alignment (the
fraction of the prompt's four attributes that `shapes.analyse` reads back).
"""

from __future__ import annotations

from absl import app
from absl import flags
import jax
import numpy as np
from PIL import Image

from ddpo_jax import metrics
from ddpo_jax import models
from ddpo_jax import sampling
from ddpo_jax.toy import shapes

FLAGS = flags.FLAGS


def evaluation_prompts(num: int, seed: int) -> list[str]:
  """`num` distinct toy captions drawn with a fixed seed."""
  scenes = shapes.all_scenes()
  order = np.random.default_rng(seed).permutation(len(scenes))[:num]
  return [scenes[i].caption for i in order]


def define_flags():
  """Command-line flags (defined only when run as a script, so tests can import it)."""
  flags.DEFINE_string("out", "docs/toy_samples.png", "Where to write the PNG.")
  flags.DEFINE_string("model", models.TOY_MODEL, "The model: a folder or 'toy-world'.")
  flags.DEFINE_integer("num_samples", 24, "Samples in the grid.")
  flags.DEFINE_integer("num_steps", 20, "DDIM steps.")
  flags.DEFINE_float("guidance_scale", 5.0, "Classifier-free guidance scale.")
  flags.DEFINE_integer("seed", 0, "Seed of the prompts and the noise.")


def main(argv):
  del argv
  model, params = models.load(FLAGS.model)
  prompts = evaluation_prompts(FLAGS.num_samples, FLAGS.seed)
  images, _ = sampling.generate(
    model,
    params,
    prompts,
    jax.random.PRNGKey(FLAGS.seed),
    num_steps=FLAGS.num_steps,
    eta=1.0,
    guidance_scale=FLAGS.guidance_scale,
  )
  scores = [shapes.alignment(image, prompt) for image, prompt in zip(images, prompts)]
  labels = [f"{score:.2f} {prompt}" for score, prompt in zip(scores, prompts)]
  grid = metrics.make_grid(images, labels, columns=6, scale=4)
  Image.fromarray(grid).save(FLAGS.out)
  print(f"wrote {FLAGS.out}: mean alignment {np.mean(scores):.3f} over {len(prompts)} prompts")


if __name__ == "__main__":
  define_flags()
  app.run(main)
