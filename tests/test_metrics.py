from __future__ import annotations

import json
import math
import os

import numpy as np
from PIL import Image
import pytest

from ddpo_jax import metrics
from ddpo_jax.metrics import MetricWriter
from ddpo_jax.metrics import make_grid
from ddpo_jax.metrics import read_metrics


def test_scalars_jsonl_and_tensorboard(tmp_path):
  workdir = str(tmp_path / "run")
  with MetricWriter(workdir) as writer:
    writer.write_scalars(0, {"reward_mean": np.float32(0.5), "num_steps": np.int64(3)})
    writer.write_scalars(1, {"reward_mean": 0.75, "epoch": 7, "loss": float("nan")})
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = f.read().splitlines()
  assert len(lines) == 2
  first, second = (json.loads(line) for line in lines)
  assert first == {"epoch": 0, "reward_mean": 0.5, "num_steps": 3}
  assert isinstance(first["num_steps"], int)
  assert second["epoch"] == 7 and second["reward_mean"] == 0.75 and math.isnan(second["loss"])
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(name.startswith("events.out.tfevents") for name in events)


def test_non_scalar_metric_rejected(tmp_path):
  with MetricWriter(str(tmp_path)) as writer:
    with pytest.raises(ValueError, match="'vec'"):
      writer.write_scalars(0, {"vec": np.zeros(3)})


def test_torn_line_is_isolated(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"epoch": 0, "a": 1}\n{"epoch": 1, "a"')  # a crash mid-line
  with MetricWriter(str(tmp_path)) as writer:
    writer.write_scalars(2, {"a": 3})
  assert read_metrics(str(tmp_path)) == [{"epoch": 0, "a": 1}, {"epoch": 2, "a": 3}]


def test_histogram_and_images(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
  with MetricWriter(str(tmp_path)) as writer:
    writer.write_histogram(4, "rewards", np.array([0.1, 0.2, np.nan, 0.3]))
    path = writer.write_images(4, "eval/samples", images, ["a", "b", "c"], scale=2)
  assert path == str(tmp_path / "images" / "eval_samples_00004.png")
  saved = np.asarray(Image.open(path))
  np.testing.assert_array_equal(saved, make_grid(images, ["a", "b", "c"], scale=2))


def test_grid_shape_and_pixels():
  images = np.zeros((10, 32, 32, 3), np.uint8)
  images[1] = 255
  labels = ["a red circle on a striped blue background"] * 9 + ["x" * 200]
  grid = make_grid(images, labels, columns=4, scale=4)
  cell_w = 32 * 4 + metrics.GAP
  cell_h = 32 * 4 + metrics.label_strip_height() + metrics.GAP
  assert grid.dtype == np.uint8
  assert grid.shape == (3 * cell_h, 4 * cell_w, 3)
  # image 1 sits at row 0, column 1, upscaled to 128 x 128
  assert (grid[:128, cell_w : cell_w + 128] == 255).all()
  assert (grid[:128, :128] == 0).all()
  # the label strip holds dark text on white
  strip = grid[128 : 128 + metrics.label_strip_height(), :128]
  assert strip.max() == 255 and strip.min() < 128
  assert make_grid(images[:2], ["a", "b"]).shape == (cell_h, 2 * cell_w, 3)


def test_grid_cell_reads_back_each_image():
  images = np.random.default_rng(0).integers(0, 256, (7, 6, 5, 3), dtype=np.uint8)
  for columns, scale in ((3, 2), (8, 4)):
    grid = make_grid(images, list("abcdefg"), columns=columns, scale=scale)
    cells = [metrics.grid_cell(grid, i, (6, 5), columns=columns, scale=scale) for i in range(7)]
    np.testing.assert_array_equal(np.stack(cells), images)


def test_wrap_label_limits_lines_and_width():
  font = metrics._font()
  lines = metrics.wrap_label("word " * 50 + "x" * 100, 120, font)
  assert len(lines) == metrics.LABEL_LINES and lines[-1].endswith("...")
  assert all(font.getlength(line) <= 120 for line in lines)
  assert metrics.wrap_label("a cat", 120, font) == ["a cat"]


def test_grid_checks_labels():
  with pytest.raises(ValueError, match="labels"):
    make_grid(np.zeros((2, 4, 4, 3), np.uint8), ["a"])


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  writer = MetricWriter(str(workdir), enabled=False)
  writer.write_scalars(0, {"a": 1.0})
  writer.write_histogram(0, "h", np.ones(3))
  assert writer.write_images(0, "s", np.zeros((1, 4, 4, 3), np.uint8), ["a"]) is None
  writer.close()
  assert not workdir.exists()
