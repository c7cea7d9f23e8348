"""Procedural captioned images: one coloured shape on a patterned background.

The toy world of ddpo_jax. Every image is drawn from five attributes and its
caption names all of them, e.g. "a red circle on a striped blue background".
Backgrounds range from flat (compresses well as JPEG) to per-pixel noise
(compresses badly), so the JPEG rewards have room to move both ways, and the
attributes can be read back from pixels by `analyse` (the ground truth of the
toy alignment reward, see `ddpo_jax.rewards.toy_alignment`).

All background tones are the background colour scaled by a brightness factor
in [DARK, 1]; the shape is drawn at full brightness. That keeps each pixel
classifiable by colour, whatever the pattern.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

IMAGE_SIZE = 32  # pixels, square

COLOURS: dict[str, tuple[int, int, int]] = {
  "red": (220, 40, 40),
  "orange": (245, 140, 30),
  "yellow": (235, 215, 40),
  "green": (40, 180, 60),
  "blue": (40, 80, 220),
  "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle", "cross")
PATTERNS = ("plain", "striped", "checked", "noisy", "gradient")
# Brightness of the darker tone of a background, as a fraction of its colour.
DARK = 0.45
# Stripe and check period in pixels (half of it light, half dark).
PERIOD = 8

COLOUR_NAMES = tuple(COLOURS)
CAPTION_RE = re.compile(r"^an? (?P<colour>\w+) (?P<shape>\w+) on an? (?P<pattern>\w+) (?P<background>\w+) background$")


@dataclasses.dataclass(frozen=True)
class Scene:
  """The attributes of one toy image; `caption` is its text."""

  colour: str
  shape: str
  pattern: str
  background: str

  @property
  def caption(self) -> str:
    return f"{_article(self.colour)} {self.colour} {self.shape} on a {self.pattern} {self.background} background"

  @classmethod
  def from_caption(cls, caption: str) -> "Scene":
    """Parses a caption of the toy vocabulary; raises ValueError otherwise."""
    match = CAPTION_RE.match(caption.strip().lower())
    if not match:
      raise ValueError(
        f"{caption!r} is not a toy-world caption; expected the form "
        "'a <colour> <shape> on a <pattern> <colour> background'."
      )
    scene = cls(**match.groupdict())
    for value, allowed in (
      (scene.colour, COLOUR_NAMES),
      (scene.shape, SHAPES),
      (scene.pattern, PATTERNS),
      (scene.background, COLOUR_NAMES),
    ):
      if value not in allowed:
        raise ValueError(f"{value!r} in {caption!r} is not one of {allowed}.")
    return scene


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def all_scenes() -> list[Scene]:
  """Every scene of the vocabulary whose shape and background colours differ."""
  return [Scene(c, s, p, b) for c in COLOUR_NAMES for s in SHAPES for p in PATTERNS for b in COLOUR_NAMES if b != c]


# Shape colour × shape pairs kept out of RL fine-tuning, to evaluate generalisation
# to unseen combinations: every colour misses one shape, every shape one or two
# colours (the pretrained model saw them all).
HELDOUT_PAIRS = frozenset(
  (colour, shape) for i, colour in enumerate(COLOUR_NAMES) for j, shape in enumerate(SHAPES) if (i + j) % 4 == 0
)
SPLITS = ("all", "train", "heldout")


def scenes(split: str = "all") -> list[Scene]:
  """`all_scenes()`, or those whose (colour, shape) is not ("train") or is
  ("heldout") one of `HELDOUT_PAIRS`."""
  if split not in SPLITS:
    raise ValueError(f"toy-world split {split!r} is unknown; choose one of {SPLITS}.")
  if split == "all":
    return all_scenes()
  heldout = split == "heldout"
  return [s for s in all_scenes() if ((s.colour, s.shape) in HELDOUT_PAIRS) == heldout]


def vocabulary() -> list[str]:
  """The words captions are made of (the toy tokenizer's whole-word tokens)."""
  return ["a", "an", "on", "background", *COLOUR_NAMES, *SHAPES, *PATTERNS]


def random_scene(rng: np.random.Generator) -> Scene:
  colour, background = rng.choice(len(COLOUR_NAMES), size=2, replace=False)
  return Scene(
    COLOUR_NAMES[colour],
    SHAPES[rng.integers(len(SHAPES))],
    PATTERNS[rng.integers(len(PATTERNS))],
    COLOUR_NAMES[background],
  )


def shape_mask(shape: str, size: int, box: int, cy: float, cx: float) -> np.ndarray:
  """Boolean [size, size] mask of `shape` with a `box`-pixel bounding box."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  dy, dx = (yy - cy) / (box / 2), (xx - cx) / (box / 2)  # in [-1, 1] inside the box
  inside = (np.abs(dy) <= 1) & (np.abs(dx) <= 1)
  if shape == "circle":
    return dy**2 + dx**2 <= 1
  if shape == "square":
    return inside
  if shape == "triangle":  # apex up, base down
    return inside & (np.abs(dx) <= (dy + 1) / 2)
  if shape == "cross":
    arm = 1 / 3
    return inside & ((np.abs(dx) <= arm) | (np.abs(dy) <= arm))
  raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def brightness(pattern: str, size: int, rng: np.random.Generator) -> np.ndarray:
  """[size, size] background brightness in [DARK, 1] for `pattern`."""
  yy, xx = np.mgrid[0:size, 0:size]
  half = PERIOD // 2
  if pattern == "plain":
    return np.ones((size, size), np.float32)
  if pattern == "striped":  # vertical stripes
    phase = rng.integers(PERIOD)
    return np.where(((xx + phase) // half) % 2 == 0, 1.0, DARK).astype(np.float32)
  if pattern == "checked":
    py, px = rng.integers(PERIOD, size=2)
    parity = ((yy + py) // half + (xx + px) // half) % 2
    return np.where(parity == 0, 1.0, DARK).astype(np.float32)
  if pattern == "noisy":
    return rng.uniform(DARK, 1.0, size=(size, size)).astype(np.float32)
  if pattern == "gradient":  # bright at the top, dark at the bottom
    return np.broadcast_to(np.linspace(1.0, DARK, size, dtype=np.float32)[:, None], (size, size)).copy()
  raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
  """Draws `scene`: uint8 [size, size, 3]. Position, size and phases come from rng."""
  scale = size / 32
  box = rng.uniform(14, 22) * scale
  cy, cx = size / 2 + rng.uniform(-3, 3, size=2) * scale
  background = np.asarray(COLOURS[scene.background], np.float32)
  image = brightness(scene.pattern, size, rng)[..., None] * background
  mask = shape_mask(scene.shape, size, box, cy, cx)
  image[mask] = np.asarray(COLOURS[scene.colour], np.float32)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def sample_batch(rng: np.random.Generator, batch_size: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[str]]:
  """A fresh batch: uint8 images [B, size, size, 3] and their captions."""
  scenes = [random_scene(rng) for _ in range(batch_size)]
  images = np.stack([render(s, rng, size) for s in scenes])
  return images, [s.caption for s in scenes]


# ----------------------------------------------------------------------------
# Reading the attributes back from pixels.
# ----------------------------------------------------------------------------

_TONES = np.linspace(1.0, DARK, 4, dtype=np.float32)
# [K * len(_TONES), 3] prototypes: every colour at every background tone.
_PROTOTYPES = np.concatenate([np.outer(_TONES, COLOURS[c]) for c in COLOUR_NAMES]).astype(np.float32)


def _classify_pixels(image: np.ndarray) -> np.ndarray:
  """Nearest colour index for each pixel of uint8 [H, W, 3] (int [H, W])."""
  pixels = image.reshape(-1, 3).astype(np.float32)
  dist = ((pixels[:, None, :] - _PROTOTYPES[None]) ** 2).sum(-1)
  return (dist.argmin(-1) // len(_TONES)).reshape(image.shape[:2])


def _majority_filter(mask: np.ndarray) -> np.ndarray:
  padded = np.pad(mask.astype(np.int32), 1)
  h, w = mask.shape
  counts = sum(padded[i : i + h, j : j + w] for i in range(3) for j in range(3))
  return counts >= 5


def _grow(mask: np.ndarray) -> np.ndarray:
  """`mask` grown by one pixel in the four axis directions."""
  padded = np.pad(mask, 1)
  return mask | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]


def _lag1_correlation(values: np.ndarray, valid: np.ndarray, axis: int) -> float:
  a, b = (values[:, :-1], values[:, 1:]) if axis == 1 else (values[:-1], values[1:])
  ok = (valid[:, :-1] & valid[:, 1:]) if axis == 1 else (valid[:-1] & valid[1:])
  a, b = a[ok], b[ok]
  if a.size < 8 or a.std() < 1e-6 or b.std() < 1e-6:
    return 1.0
  return float(np.corrcoef(a, b)[0, 1])


def _classify_shape(mask: np.ndarray) -> str | None:
  ys, xs = np.nonzero(mask)
  if ys.size < 12:
    return None
  y0, y1 = ys.min(), ys.max() + 1
  x0, x1 = xs.min(), xs.max() + 1
  crop = mask[y0:y1, x0:x1]
  n = 16
  rows = (np.arange(n) * crop.shape[0] / n).astype(int)
  cols = (np.arange(n) * crop.shape[1] / n).astype(int)
  crop = crop[rows][:, cols]
  best, best_iou = None, -1.0
  for shape in SHAPES:
    template = shape_mask(shape, n, n, n / 2, n / 2)
    iou = (crop & template).sum() / max((crop | template).sum(), 1)
    if iou > best_iou:
      best, best_iou = shape, iou
  return best


def _classify_pattern(image: np.ndarray, colour: str, valid: np.ndarray) -> str:
  base = np.asarray(COLOURS[colour], np.float32)
  tone = image.astype(np.float32) @ base / (base @ base)  # brightness relative to the colour
  spread = float(tone[valid].std()) if valid.any() else 0.0
  if spread < 0.06:
    return "plain"
  horizontal = _lag1_correlation(tone, valid, axis=1)
  vertical = _lag1_correlation(tone, valid, axis=0)
  if horizontal > 0.8 and vertical > 0.8:
    return "gradient"
  if vertical > 0.8:
    return "striped"
  if horizontal < 0.3 and vertical < 0.3:
    return "noisy"
  return "checked"


def analyse(image: np.ndarray) -> Scene | None:
  """Reads the scene back from uint8 [H, W, 3] pixels (None if no shape is found).

  The background colour is the majority colour of a two-pixel frame; the shape
  is the majority other colour, cleaned by a 3x3 majority filter; its kind is
  the template with the highest IoU inside its bounding box; the pattern comes
  from the spread and the lag-1 correlations of the background's brightness.
  """
  ids = _classify_pixels(image)
  frame = np.ones(ids.shape, bool)
  frame[2:-2, 2:-2] = False
  background = int(np.bincount(ids[frame], minlength=len(COLOUR_NAMES)).argmax())
  others = ids[ids != background]
  if others.size == 0:
    return None
  colour = int(np.bincount(others, minlength=len(COLOUR_NAMES)).argmax())
  mask = _majority_filter(ids == colour)
  shape = _classify_shape(mask)
  if shape is None:
    return None
  valid = ~_grow(_majority_filter(mask) | mask)  # the background, away from the shape's edge
  pattern = _classify_pattern(image, COLOUR_NAMES[background], valid)
  return Scene(COLOUR_NAMES[colour], shape, pattern, COLOUR_NAMES[background])


def alignment(image: np.ndarray, caption: str) -> float:
  """Fraction of the caption's four attributes the image shows, in [0, 1]."""
  wanted = Scene.from_caption(caption)
  seen = analyse(image)
  if seen is None:
    return 0.0
  fields = dataclasses.fields(Scene)
  return sum(getattr(seen, f.name) == getattr(wanted, f.name) for f in fields) / len(fields)
