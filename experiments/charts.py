"""Line charts drawn with PIL (no matplotlib needed): the figures of the
comparison scripts (`experiments.compare_regularisers`, `experiments.study`)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))

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
  bands: Sequence[tuple[Sequence[float], Sequence[float]]] | None = None,
) -> Image.Image:
  """A chart of (label, xs, ys) lines, one colour each, with axes, ticks, grid and (optionally) a legend.

  bands: per series, (lows, highs) at its xs, drawn as a pale band behind its line.
  """
  width, height = size
  left, right, top, bottom = 72, 16, 36, 52
  font, small = _font(15), _font(12)
  image = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(image)
  xs_all = [x for _, xs, _ in series for x in xs]
  ys_all = [y for _, _, ys in series for y in ys if np.isfinite(y)]
  ys_all += [y for band in bands or () for edge in band for y in edge if np.isfinite(y)]
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
  if bands:
    overlay = Image.new("RGBA", size, (0, 0, 0, 0))
    overlay_draw = ImageDraw.Draw(overlay)
    for (_, xs, _), (lows, highs), colour in zip(series, bands, COLOURS):
      edge = [(x, lo, hi) for x, lo, hi in zip(xs, lows, highs) if np.isfinite(lo) and np.isfinite(hi)]
      if len(edge) > 1:
        outline = [to_px(x, hi) for x, _, hi in edge] + [to_px(x, lo) for x, lo, _ in reversed(edge)]
        overlay_draw.polygon(outline, fill=colour + (56,))
    image = Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")
    draw = ImageDraw.Draw(image)
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
