r"""DDPO against its regularised variants on the tiny preset, as a PNG plot.

    python -m experiments.compare_regularisers --out=docs/regularisers.png --workdir=runs/regularisers

Trains the shipped toy-world model for JPEG compressibility
(`configs/compress.py:tiny`) on toy-world captions (`toy_scenes`) several
times, one option changed each time, and plots per epoch the trained reward
(-kB) and a reward it is not trained on: `toy_alignment`, the fraction of the
caption's attributes the image shows (both logged by the `weighted` reward,
alignment with weight 0). Over-optimising compressibility erases what the
caption asks for; a regulariser should keep more of it per unit of reward.

Runs already complete in --workdir are read back, not repeated (delete the
folder to start over). The chart is drawn with PIL (no matplotlib needed).
"""

from __future__ import annotations

import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np
from PIL import Image

from ddpo_jax import config_utils
from ddpo_jax import metrics
from experiments import charts

FLAGS = flags.FLAGS
# configs/ of the current folder (the repository root), else the installed one (config_utils.find_config_file).
CONFIG = "configs/compress.py"
# The trained reward and the cross reward, as `weighted` logs them.
REWARD, CROSS_REWARD = "reward_jpeg_compressibility_mean", "reward_toy_alignment_mean"

# The training values every variant starts from: the tiny preset's before it
# gained KL and a second inner epoch (docs/regularisers.png was run with them),
# so that "DDPO" is unregularised.
COMMON: dict[str, Any] = {
  "train.kl_coef": 0.0,
  "train.num_inner_epochs": 1,
  "train.clip_range": 1e-4,
  "train.learning_rate": 3e-4,
}
# name -> (legend label, config overrides beside the common ones).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
  "ddpo": ("DDPO", {}),
  "kl": ("DDPO + KL (kl_coef 0.1)", {"train.kl_coef": 0.1}),
  "group": ("group advantages (k = 4)", {"sample.group_size": 4, "train.advantages": "group"}),
  "group_kl": (
    "group advantages + KL (kl_coef 0.1)",
    {"sample.group_size": 4, "train.advantages": "group", "train.kl_coef": 0.1},
  ),
  "lora": ("LoRA rank 4 (lr 3e-3)", {"lora.rank": 4, "lora.alpha": 4.0, "train.learning_rate": 3e-3}),
}


def define_flags():
  """Command-line flags (defined only when run as a script, so tests can import it)."""
  flags.DEFINE_string("out", "docs/regularisers.png", "Where to write the PNG.")
  flags.DEFINE_string("workdir", "runs/regularisers", "Parent folder of the runs (one sub-folder per variant).")
  flags.DEFINE_list("variants", ["ddpo", "kl", "group", "group_kl"], f"Variants to run, of {sorted(VARIANTS)}.")
  flags.DEFINE_integer("num_epochs", 12, "Epochs per run.")
  flags.DEFINE_float("kl_coef", None, "Overrides config.train.kl_coef of the variants with KL.")


def variant_config(name: str, num_epochs: int, kl_coef: float | None = None) -> ml_collections.ConfigDict:
  """`configs/compress.py:tiny` on toy captions, with variant `name`'s overrides."""
  config = config_utils.get_config(CONFIG + ":tiny")
  config.num_epochs = num_epochs
  config.prompt.name = "toy_scenes"
  config.prompt.kwargs = ml_collections.ConfigDict()
  config.reward.name = "weighted"
  config.reward.kwargs = ml_collections.ConfigDict({"weights": {"jpeg_compressibility": 1.0, "toy_alignment": 0.0}})
  config.logging.images_every_epochs = num_epochs  # the first and the last grid only
  overrides = dict(COMMON, **VARIANTS[name][1])
  if name in ("kl", "group_kl") and kl_coef is not None:
    overrides["train.kl_coef"] = kl_coef
  return config_utils.override(config, overrides)


def run_variant(name: str, workdir: str, num_epochs: int, kl_coef: float | None = None) -> list[dict[str, Any]]:
  """The metrics.jsonl records of variant `name`, running (or finishing) it first."""
  from ddpo_jax import train

  path = os.path.join(workdir, name)
  done = (
    os.path.exists(os.path.join(path, metrics.METRICS_FILE)) and len(metrics.read_metrics(path, "train")) >= num_epochs
  )
  if not done:
    logging.info("running %s in %s", name, path)
    train.train_and_evaluate(variant_config(name, num_epochs, kl_coef), path)
  return metrics.read_metrics(path, "train")[:num_epochs]


def comparison_figure(runs: dict[str, list[dict[str, Any]]]) -> Image.Image:
  """Two panels over epochs: the trained reward and the cross reward, one line per variant."""

  def series(key):
    return [
      (VARIANTS[n][0], [r["epoch"] for r in rs], [r.get(key, float("nan")) for r in rs]) for n, rs in runs.items()
    ]

  panels = charts.stack(
    [
      charts.line_chart(
        series(REWARD), "trained: JPEG compressibility", "epoch", "reward = -kB (batch mean)", legend=False
      ),
      charts.line_chart(
        series(CROSS_REWARD), "not trained: toy alignment", "epoch", "attributes shown (batch mean)", legend=False
      ),
    ],
    horizontal=True,
  )
  return charts.stack([panels, charts.legend_strip([VARIANTS[n][0] for n in runs], panels.width)], horizontal=False)


def summary_table(runs: dict[str, list[dict[str, Any]]], window: int = 3) -> str:
  """Markdown: each variant's rewards averaged over its first and its last
  `window` epochs (single epochs are noisy: 64 samples), and its mean KL to
  the pretrained model over the last `window` epochs."""
  lines = [
    f"| run | -kB, first {window} → last {window} epochs | toy alignment, first {window} → last {window} | "
    f"kl_to_reference, last {window} |",
    "|---|---|---|---|",
  ]
  mean = lambda records, key: float(np.mean([r[key] for r in records]))
  for name, records in runs.items():
    first, last = records[:window], records[-window:]
    kl = f"{mean(last, 'kl_to_reference'):.3g}" if "kl_to_reference" in last[-1] else "–"
    lines.append(
      f"| {VARIANTS[name][0]} | {mean(first, REWARD):.3f} → {mean(last, REWARD):.3f} | "
      f"{mean(first, CROSS_REWARD):.3f} → {mean(last, CROSS_REWARD):.3f} | {kl} |"
    )
  return "\n".join(lines)


def main(argv):
  del argv
  unknown = sorted(set(FLAGS.variants) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f"--variants: unknown {unknown}; choose of {sorted(VARIANTS)}.")
  logging.set_verbosity(logging.INFO)
  runs = {name: run_variant(name, FLAGS.workdir, FLAGS.num_epochs, FLAGS.kl_coef) for name in FLAGS.variants}
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  comparison_figure(runs).save(FLAGS.out)
  print(summary_table(runs))
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
