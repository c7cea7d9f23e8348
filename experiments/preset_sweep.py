r"""The sweep that chooses the tiny presets' training values (configs/base.py:apply_tiny).

    python -m experiments.preset_sweep --task=compress --candidates=preset,kl0.3 --workdir=runs/preset_sweep

Trains each candidate (a set of config overrides beside the task's tiny
preset) as its own `python -m ddpo_jax.main` run and scores it by what issue
22 asks of the presets:
  gain         the trained reward's batch mean, mean of the last two epochs
               minus the mean of the first two (compress must gain >= 0.2 kB);
  shapes       the fraction of the trained prompt's logged samples in which
               the toy world's scene parser finds a shape (`toy.shapes.analyse`
               on each cell of images/samples_EPOCH.png), per logged epoch:
               does the subject stay?
  alignment    the held-out evaluation's toy alignment before training and
               after the last epoch (within 0.05 of its start, or higher).
Prints a Markdown table and writes {workdir}/TASK/sweep.json, then the JPEG
kB of the toy world's own renders per background pattern (`rendered_kb`),
which bound what compressibility can gain while the shape stays. A candidate
whose run is complete in --workdir is scored without training.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from typing import Any

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from ddpo_jax import metrics
from ddpo_jax.rewards import jpeg
from ddpo_jax.toy import shapes
from experiments import study

FLAGS = flags.FLAGS

# name -> overrides beside the tiny preset (the preset's own values when empty).
CANDIDATES: dict[str, dict[str, Any]] = {
  # The pretrained model's own samples (lr 1e-12: no visible step), the shape baseline.
  "pretrained": {"train.learning_rate": 1e-12},
  "preset": {},
  "kl0.15": {"train.kl_coef": 0.15},
  "kl0.2": {"train.kl_coef": 0.2},
  "kl0.3": {"train.kl_coef": 0.3},
  "kl0.2_lr1e-3": {"train.kl_coef": 0.2, "train.learning_rate": 1e-3},
  "kl0.3_lr1e-3": {"train.kl_coef": 0.3, "train.learning_rate": 1e-3},
  "kl0.2_16ep": {"train.kl_coef": 0.2, "num_epochs": 16},
}
# Logged samples per epoch: enough for the shape fraction to mean something.
NUM_IMAGES = 32


def define_flags():
  flags.DEFINE_enum("task", "compress", list(study.TASKS), "The tiny task to sweep.")
  flags.DEFINE_list("candidates", list(CANDIDATES), f"Candidates, of {list(CANDIDATES)}.")
  flags.DEFINE_string("workdir", "runs/preset_sweep", "Parent folder of the runs (TASK/CANDIDATE).")
  flags.DEFINE_integer("seed", 0, "config.seed of every run.")


def run(task: str, name: str, workdir: str, seed: int) -> str:
  """The run folder of candidate `name`, training it first unless its last evaluation is written."""
  overrides = {"seed": seed, "logging.num_images": NUM_IMAGES, **CANDIDATES[name]}
  path = os.path.join(workdir, task, name)
  evals = metrics.read_metrics(path, "eval") if os.path.exists(os.path.join(path, metrics.METRICS_FILE)) else []
  config = json.load(open(os.path.join(path, "config.json"))) if evals else None
  if not evals or evals[-1]["epoch"] != config["num_epochs"] - 1:
    command = [sys.executable, "-m", "ddpo_jax.main", f"--config={study.config_spec(task)}", f"--workdir={path}"]
    command += [f"--config.{key}={value}" for key, value in overrides.items()]
    subprocess.run(command, check=True)
  return path


def shape_fraction(grid_path: str, num_images: int, image_shape: tuple[int, int]) -> float:
  """Fraction of the images of a samples grid in which `toy.shapes.analyse` finds a shape."""
  grid = np.asarray(Image.open(grid_path).convert("RGB"))
  cells = [metrics.grid_cell(grid, i, image_shape) for i in range(num_images)]
  return float(np.mean([shapes.analyse(cell) is not None for cell in cells]))


def score(path: str) -> dict[str, Any]:
  """One run's gain, shape fractions per logged epoch and held-out toy alignment."""
  records = metrics.read_metrics(path)
  train = sorted((r for r in records if r.get("split", "train") == "train"), key=lambda r: r["epoch"])
  evals = {r["epoch"]: r for r in records if r.get("split") == "eval"}
  rewards = [r["reward_mean"] for r in train]
  num_images = min(NUM_IMAGES, train[0]["samples"])
  grids = sorted(glob.glob(os.path.join(path, "images", "samples_[0-9]*.png")))
  size = (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
  return {
    "gain": float(np.mean(rewards[-2:]) - np.mean(rewards[:2])),
    "reward_start": float(np.mean(rewards[:2])),
    "reward_end": float(np.mean(rewards[-2:])),
    "shapes": {os.path.basename(g)[8:13].lstrip("0") or "0": shape_fraction(g, num_images, size) for g in grids},
    "alignment_start": evals[-1]["reward_toy_alignment_mean"],
    "alignment_end": evals[max(evals)]["reward_toy_alignment_mean"],
    "seconds": float(sum(r["seconds"] for r in train)),
  }


def rendered_kb(seed: int = 0) -> dict[str, tuple[float, float]]:
  """JPEG kB (mean, std) of the toy world's own renders of every scene, per background pattern,
  and of a flat image without a shape ("no shape"): how far compressibility can go with the shape kept."""
  rng = np.random.default_rng(seed)
  by_pattern: dict[str, list[float]] = {}
  for scene in shapes.all_scenes():
    by_pattern.setdefault(scene.pattern, []).append(jpeg.jpeg_size_kb(shapes.render(scene, rng)))
  flat = np.broadcast_to(np.asarray(shapes.COLOURS["purple"], np.uint8), (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3))
  kb = {pattern: (float(np.mean(v)), float(np.std(v))) for pattern, v in by_pattern.items()}
  kb["no shape"] = (jpeg.jpeg_size_kb(np.ascontiguousarray(flat)), 0.0)
  return kb


def table(task: str, scores: dict[str, dict[str, Any]]) -> str:
  lines = [
    f"| {task} candidate | overrides | trained reward, first 2 → last 2 | gain | shape found, per logged epoch"
    " | held-out toy alignment | s |",
    "|---|---|---|---|---|---|---|",
  ]
  for name, s in scores.items():
    overrides = ", ".join(f"{k}={v}" for k, v in CANDIDATES[name].items()) or "the preset"
    found = ", ".join(f"{epoch}: {fraction:.2f}" for epoch, fraction in s["shapes"].items())
    lines.append(
      f"| {name} | {overrides} | {s['reward_start']:.3f} → {s['reward_end']:.3f} | {s['gain']:+.3f} | {found} | "
      f"{s['alignment_start']:.3f} → {s['alignment_end']:.3f} | {s['seconds']:.0f} |"
    )
  return "\n".join(lines)


def main(argv):
  del argv
  unknown = sorted(set(FLAGS.candidates) - set(CANDIDATES))
  if unknown:
    raise app.UsageError(f"--candidates: unknown {unknown}; the candidates are {list(CANDIDATES)}.")
  scores = {name: score(run(FLAGS.task, name, FLAGS.workdir, FLAGS.seed)) for name in FLAGS.candidates}
  with open(os.path.join(FLAGS.workdir, FLAGS.task, "sweep.json"), "w") as f:
    json.dump(scores, f, indent=1)
  print(table(FLAGS.task, scores))
  print("\nThe toy world's renders, JPEG kB by background pattern (mean ± std over its scenes):")
  print(", ".join(f"{pattern} {mean:.3f} ± {std:.3f}" for pattern, (mean, std) in rendered_kb().items()))


if __name__ == "__main__":
  define_flags()
  app.run(main)
