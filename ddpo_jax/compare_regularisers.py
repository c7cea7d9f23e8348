r"""DDPO against its regularised variants on the tiny preset, as a PNG plot.

    python -m ddpo_jax.compare_regularisers --out=docs/regularisers.png --workdir=runs/regularisers

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

import math
import os
from typing import Any
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from ddpo_jax import config_utils
from ddpo_jax import metrics

FLAGS = flags.FLAGS
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "compress.py")
# The trained reward and the cross reward, as `weighted` logs them.
REWARD, CROSS_REWARD = "reward_jpeg_compressibility_mean", "reward_toy_alignment_mean"

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
COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))


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
  overrides = dict(VARIANTS[name][1])
  if name in ("kl", "group_kl") and kl_coef is not None:
    overrides["train.kl_coef"] = kl_coef
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def run_variant(name: str, workdir: str, num_epochs: int, kl_coef: float | None = None) -> list[dict[str, Any]]:
  """The metrics.jsonl records of variant `name`, running (or finishing) it first."""
  from ddpo_jax import train

  path = os.path.join(workdir, name)
  done = os.path.exists(os.path.join(path, metrics.METRICS_FILE)) and len(metrics.read_metrics(path)) >= num_epochs
  if not done:
    logging.info("running %s in %s", name, path)
    train.train_and_evaluate(variant_config(name, num_epochs, kl_coef), path)
  return metrics.read_metrics(path)[:num_epochs]


# ----------------------------------------------------------------------------
# A line chart with PIL.
# ----------------------------------------------------------------------------


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
  """About `count` round tick values (1, 2 or 5 × 10^k apart) covering [low, high]."""
  if not high > low:
    low, high = low - 0.5, high + 0.5
  raw = (high - low) / count
  magnitude = 10 ** math.floor(math.log10(raw))
  step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
  first = math.ceil(low / step - 1e-9) * step
  return [first + i * step for i in range(int(math.floor((high - first) / step + 1e-9)) + 1)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: the fixed bitmap font
    return ImageFont.load_default()


def line_chart(
  series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
  title: str,
  xlabel: str,
  ylabel: str,
  size: tuple[int, int] = (620, 420),
  legend: bool = True,
) -> Image.Image:
  """A chart of (label, xs, ys) lines, one colour each, with axes, ticks, grid and (optionally) a legend."""
  width, height = size
  left, right, top, bottom = 72, 16, 36, 52
  font, small = _font(15), _font(12)
  image = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(image)
  xs_all = [x for _, xs, _ in series for x in xs]
  ys_all = [y for _, _, ys in series for y in ys if np.isfinite(y)]
  x_ticks = nice_ticks(min(xs_all), max(xs_all), 6)
  y_ticks = nice_ticks(min(ys_all), max(ys_all), 5)
  x_low, x_high = min(x_ticks[0], min(xs_all)), max(x_ticks[-1], max(xs_all))
  y_low, y_high = min(y_ticks[0], min(ys_all)), max(y_ticks[-1], max(ys_all))
  to_px = lambda x, y: (
    left + (x - x_low) / (x_high - x_low) * (width - left - right),
    height - bottom - (y - y_low) / (y_high - y_low) * (height - top - bottom),
  )
  for y in y_ticks:
    _, py = to_px(x_low, y)
    draw.line([(left, py), (width - right, py)], fill=(230, 230, 230))
    text = f"{y:.3g}"
    draw.text((left - 6 - draw.textlength(text, font=small), py - 7), text, fill="black", font=small)
  for x in x_ticks:
    px, _ = to_px(x, y_low)
    draw.line([(px, height - bottom), (px, height - bottom + 4)], fill="black")
    text = f"{x:g}"
    draw.text((px - draw.textlength(text, font=small) / 2, height - bottom + 6), text, fill="black", font=small)
  draw.rectangle([left, top, width - right, height - bottom], outline="black")
  for (_, xs, ys), colour in zip(series, COLOURS):
    points = [to_px(x, y) for x, y in zip(xs, ys) if np.isfinite(y)]
    draw.line(points, fill=colour, width=2, joint="curve")
    for px, py in points:
      draw.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=colour)
  if legend:
    for i, ((label, _, _), colour) in enumerate(zip(series, COLOURS)):
      y = top + 8 + 18 * i
      draw.line([(left + 10, y + 7), (left + 34, y + 7)], fill=colour, width=3)
      draw.text((left + 40, y), label, fill="black", font=small)
  draw.text(((width - draw.textlength(title, font=font)) / 2, 10), title, fill="black", font=font)
  draw.text(((width - draw.textlength(xlabel, font=small)) / 2, height - 22), xlabel, fill="black", font=small)
  label_image = Image.new("RGB", (int(draw.textlength(ylabel, font=small)) + 4, 16), "white")
  ImageDraw.Draw(label_image).text((2, 0), ylabel, fill="black", font=small)
  rotated = label_image.rotate(90, expand=True)
  image.paste(rotated, (6, top + (height - top - bottom - rotated.height) // 2))
  return image


def legend_strip(labels: Sequence[str], width: int) -> Image.Image:
  """One row of colour swatches and labels, centred in `width` pixels."""
  font = _font(13)
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  widths = [34 + measure.textlength(label, font=font) + 24 for label in labels]
  image = Image.new("RGB", (width, 30), "white")
  draw = ImageDraw.Draw(image)
  x = (width - sum(widths)) / 2
  for label, colour, w in zip(labels, COLOURS, widths):
    draw.line([(x, 15), (x + 26, 15)], fill=colour, width=3)
    draw.text((x + 32, 7), label, fill="black", font=font)
    x += w
  return image


def stack(images: Sequence[Image.Image], horizontal: bool) -> Image.Image:
  """Images side by side (or one above the other), on white."""
  if horizontal:
    size = (sum(i.width for i in images), max(i.height for i in images))
  else:
    size = (max(i.width for i in images), sum(i.height for i in images))
  out = Image.new("RGB", size, "white")
  offset = 0
  for image in images:
    out.paste(image, (offset, 0) if horizontal else (0, offset))
    offset += image.width if horizontal else image.height
  return out


def comparison_figure(runs: dict[str, list[dict[str, Any]]]) -> Image.Image:
  """Two panels over epochs: the trained reward and the cross reward, one line per variant."""

  def series(key):
    return [
      (VARIANTS[n][0], [r["epoch"] for r in rs], [r.get(key, float("nan")) for r in rs]) for n, rs in runs.items()
    ]

  panels = stack(
    [
      line_chart(series(REWARD), "trained: JPEG compressibility", "epoch", "reward = -kB (batch mean)", legend=False),
      line_chart(
        series(CROSS_REWARD), "not trained: toy alignment", "epoch", "attributes shown (batch mean)", legend=False
      ),
    ],
    horizontal=True,
  )
  return stack([panels, legend_strip([VARIANTS[n][0] for n in runs], panels.width)], horizontal=False)


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
