"""Training logs: a JSON-lines file, TensorBoard, and labelled image grids.

`MetricWriter` writes three things under a workdir:

  metrics.jsonl    one JSON object per `write_scalars` call (the source of
                   truth: plain text, appended and flushed line by line, so a
                   crash loses at most the line being written and never the
                   ones before it; `read_metrics` skips a torn last line)
  tensorboard/     TensorBoard event files (scalars, histograms, images)
  images/          PNG grids of samples with their prompts, {name}_{step:05d}.png;
                   before_after.png (`before_after_grid`) and the arrays it is
                   made from (.npz)

Only one process should write: build it with enabled=False elsewhere and every
method is a no-op that touches no file.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

METRICS_FILE = "metrics.jsonl"
# Records of epochs a resumed run repeats, moved out of METRICS_FILE.
DISCARDED_FILE = "metrics.discarded.jsonl"
LABEL_LINES = 3  # lines of label text under each grid image
MARGIN = 2  # pixels around the label text
GAP = 2  # white pixels right of and below each grid cell


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
  return ImageFont.load_default()


def _line_height(font) -> int:
  return font.getbbox("Agjy|")[3] + 1


def label_strip_height() -> int:
  """Height in pixels of the text strip under each image of `make_grid`."""
  return LABEL_LINES * _line_height(_font()) + 2 * MARGIN


def wrap_label(label: str, width: float, font, max_lines: int = LABEL_LINES) -> list[str]:
  """Greedy word wrap of `label` into lines at most `width` pixels wide.

  Words wider than a line are cut; text beyond `max_lines` is dropped and the
  last line ends in "...".
  """
  lines: list[str] = []
  current = ""
  for word in label.split():
    candidate = f"{current} {word}" if current else word
    if font.getlength(candidate) <= width:
      current = candidate
      continue
    if current:
      lines.append(current)
    while len(word) > 1 and font.getlength(word) > width:
      cut = 1
      while cut < len(word) and font.getlength(word[: cut + 1]) <= width:
        cut += 1
      lines.append(word[:cut])
      word = word[cut:]
    current = word
  if current:
    lines.append(current)
  if len(lines) > max_lines:
    last = lines[max_lines - 1]
    while last and font.getlength(last + "...") > width:
      last = last[:-1]
    lines = lines[: max_lines - 1] + [last + "..."]
  return lines


def make_grid(images: np.ndarray, labels: Sequence[str], columns: int = 8, scale: int = 4) -> np.ndarray:
  """A labelled grid of images, uint8 [rows * cell_h, cols * cell_w, 3].

  Args:
    images: uint8 [N, H, W, 3].
    labels: N strings, each drawn under its image, wrapped over up to
      LABEL_LINES lines.
    columns: images per row at most (cols = min(columns, N)).
    scale: integer nearest-neighbour upscaling of each image.

  Each cell is the upscaled image over a white label strip, followed by GAP
  white pixels: cell_w = W * scale + GAP and
  cell_h = H * scale + label_strip_height() + GAP; rows = ceil(N / cols).
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
    raise ValueError(f"make_grid takes uint8 images [N>0, H, W, 3], got {images.dtype} {images.shape}")
  if len(labels) != len(images):
    raise ValueError(f"make_grid got {len(images)} images but {len(labels)} labels")
  if columns < 1 or scale < 1:
    raise ValueError(f"columns and scale must be >= 1, got {columns} and {scale}")
  n, h, w, _ = images.shape
  font = _font()
  line_height = _line_height(font)
  image_w, image_h = w * scale, h * scale
  cell_w, cell_h = image_w + GAP, image_h + label_strip_height() + GAP
  cols = min(columns, n)
  rows = math.ceil(n / cols)
  canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
  draw = ImageDraw.Draw(canvas)
  for i, (image, label) in enumerate(zip(images, labels)):
    x, y = (i % cols) * cell_w, (i // cols) * cell_h
    canvas.paste(Image.fromarray(image.repeat(scale, axis=0).repeat(scale, axis=1)), (x, y))
    for j, line in enumerate(wrap_label(str(label), image_w - 2 * MARGIN, font)):
      draw.text((x + MARGIN, y + image_h + MARGIN + j * line_height), line, fill="black", font=font)
  return np.asarray(canvas)


def grid_cell(grid: np.ndarray, index: int, shape: tuple[int, int], columns: int = 8, scale: int = 4) -> np.ndarray:
  """Image `index` of a `make_grid` grid of images of `shape` (H, W): uint8 [H, W, 3].

  The inverse of `make_grid` for its nearest-neighbour scale (exact on a PNG
  the trainer wrote); `columns` and `scale` are those the grid was made with.
  """
  h, w = shape
  cell_w, cell_h = scale * w + GAP, scale * h + label_strip_height() + GAP
  y, x = (index // columns) * cell_h, (index % columns) * cell_w
  return np.asarray(grid)[y : y + scale * h : scale, x : x + scale * w : scale, :3]


def before_after_grid(
  before: np.ndarray, before_labels: Sequence[str], after: np.ndarray, after_labels: Sequence[str], titles=("", "")
) -> np.ndarray:
  """Two labelled grids side by side (`make_grid`, 4 columns each) under a title each, uint8 [H, W, 3]:
  `before` [N, h, w, 3] on the left, `after` (the same N prompts and noise) on the right."""
  if len(before) != len(after):
    raise ValueError(f"before_after_grid got {len(before)} images before and {len(after)} after")
  left, right = make_grid(before, before_labels, columns=4), make_grid(after, after_labels, columns=4)
  font = _font()
  title_height, separation = _line_height(font) + 2 * MARGIN, 8 * GAP
  canvas = Image.new("RGB", (left.shape[1] + separation + right.shape[1], title_height + left.shape[0]), "white")
  canvas.paste(Image.fromarray(left), (0, title_height))
  canvas.paste(Image.fromarray(right), (left.shape[1] + separation, title_height))
  draw = ImageDraw.Draw(canvas)
  draw.text((MARGIN, MARGIN), titles[0], fill="black", font=font)
  draw.text((left.shape[1] + separation + MARGIN, MARGIN), titles[1], fill="black", font=font)
  return np.asarray(canvas)


def _to_python(name: str, value: Any) -> int | float:
  """A scalar (Python, numpy or jax) as a Python int (integers, bools) or float."""
  array = np.asarray(value)
  if array.size != 1 or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
    raise ValueError(f"metric {name!r} must be a numeric scalar, got {value!r}")
  if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
    return int(array.item())
  return float(array.item())


def read_metrics(workdir: str, split: str | None = None) -> list[dict[str, Any]]:
  """The records of {workdir}/metrics.jsonl, skipping lines that do not parse.

  split: only the records of this split ("train", "eval"); records without a
  split field count as "train".
  """
  records = []
  with open(os.path.join(workdir, METRICS_FILE), encoding="utf-8") as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        pass  # a line torn by a crash
  if split is not None:
    records = [r for r in records if r.get("split", "train") == split]
  return records


class MetricWriter:
  """Writes metrics.jsonl, TensorBoard events and image grids under `workdir`.

  Args:
    workdir: the run's folder (created if needed).
    enabled: False on non-zero processes; every method is then a no-op.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self.metrics_path = os.path.join(workdir, METRICS_FILE)
    self._tensorboard = None
    if not enabled:
      return
    import tensorboardX  # only the writing process pays for the import

    os.makedirs(workdir, exist_ok=True)
    _end_torn_line(self.metrics_path)
    self._tensorboard = tensorboardX.SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))

  def resume_at(self, epoch: int) -> int:
    """Prepares metrics.jsonl for a run that continues at `epoch`.

    Records of epochs >= `epoch` (written after the checkpoint the run resumes
    from, and about to be written again; at epoch 0, every record, the
    evaluation before training too) and torn lines are appended to
    metrics.discarded.jsonl, then metrics.jsonl is replaced atomically by the
    records kept: nothing written is lost. Returns the number moved.
    """
    if not self.enabled or not os.path.exists(self.metrics_path):
      return 0
    with open(self.metrics_path, encoding="utf-8") as f:
      lines = f.read().splitlines()
    kept, moved = [], []
    for line in lines:
      try:
        # epoch 0: the run starts from nothing, its evaluation before training (epoch -1) included
        keep = epoch > 0 and int(json.loads(line)["epoch"]) < epoch
      except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        keep = False
      (kept if keep else moved).append(line)
    if not moved:
      return 0
    with open(os.path.join(self.workdir, DISCARDED_FILE), "a", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in moved))
    temporary = self.metrics_path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in kept))
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, self.metrics_path)
    return len(moved)

  def write_scalars(self, step: int, scalars: dict[str, Any], split: str | None = None) -> None:
    """Appends {"epoch": step, ["split": split,] **scalars} to metrics.jsonl and
    logs each to TensorBoard (as "{split}/{name}" for splits other than "train").

    Values may be Python, numpy or jax scalars; NaN and inf are written as
    Python's json writes them (NaN, Infinity), which json.loads reads back.
    """
    if not self.enabled:
      return
    record: dict[str, int | float | str] = {"epoch": int(step)}
    numbers = {name: _to_python(name, value) for name, value in scalars.items()}
    if split is not None:
      record["split"] = split
    record.update(numbers)
    # One write of one whole line, flushed at once: earlier lines are never touched.
    with open(self.metrics_path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()
    prefix = "" if split in (None, "train") else f"{split}/"
    for name, value in numbers.items():
      self._tensorboard.add_scalar(prefix + name, value, int(step))
    self._tensorboard.flush()

  def write_histogram(self, step: int, name: str, values: np.ndarray) -> None:
    """A TensorBoard histogram of the finite entries of `values` (any shape)."""
    if not self.enabled:
      return
    values = np.asarray(values, np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size:
      self._tensorboard.add_histogram(name, values, int(step))

  def write_images(
    self, step: int, name: str, images: np.ndarray, labels: Sequence[str], columns: int = 8, scale: int = 4
  ) -> str | None:
    """Saves a labelled grid (see `make_grid`) to images/{name}_{step:05d}.png and TensorBoard.

    Returns the PNG's path (None when disabled). "/" in `name` becomes "_" in
    the file name.
    """
    if not self.enabled:
      return None
    grid = make_grid(images, labels, columns=columns, scale=scale)
    return self._save_picture(f"{name.replace('/', '_')}_{int(step):05d}", name, grid, int(step))

  def write_grid(self, name: str, grid: np.ndarray) -> str | None:
    """Saves a composed picture uint8 [H, W, 3] to images/{name}.png (replaced whole) and TensorBoard (step 0)."""
    if not self.enabled:
      return None
    return self._save_picture(name, name, grid, 0)

  def _save_picture(self, file_name: str, tag: str, grid: np.ndarray, step: int) -> str:
    """images/{file_name}.png, written atomically (a kill leaves the old file or the new), and TensorBoard's `tag`."""
    path = os.path.join(self.workdir, "images", f"{file_name}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(grid).save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)
    self._tensorboard.add_image(tag, grid, step, dataformats="HWC")
    self._tensorboard.flush()
    return path

  def write_arrays(self, name: str, **arrays: np.ndarray) -> None:
    """Saves arrays to images/{name}.npz, replaced whole (atomically: a kill leaves the old file or the new)."""
    if not self.enabled:
      return
    path = os.path.join(self.workdir, "images", f"{name}.npz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
      np.savez(f, **arrays)
    os.replace(path + ".tmp", path)

  def read_arrays(self, name: str) -> dict[str, np.ndarray] | None:
    """The arrays of images/{name}.npz, or None when there is no such file (or it cannot be read)."""
    path = os.path.join(self.workdir, "images", f"{name}.npz")
    try:
      with np.load(path) as data:
        return {key: data[key] for key in data.files}
    except (OSError, ValueError):
      return None

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None
    self.enabled = False

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _end_torn_line(path: str) -> None:
  """Ends a last line left unterminated by a crash, so new lines start clean."""
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return
  with open(path, "rb+") as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) != b"\n":
      f.write(b"\n")
