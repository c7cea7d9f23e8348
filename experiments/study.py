r"""The paper's comparison of DDPO with reward-weighted regression, on the toy world.

    python -m experiments.study --out=docs/study --workdir=runs/study --seeds=0,1,2

Trains the shipped toy-world model with DDPO_IS, DDPO_SF, RWR and RWR-sparse
on JPEG compressibility, incompressibility and toy prompt alignment (the tiny
presets of configs/compress.py, incompress.py and toy_alignment.py), every
method with the same samples per epoch and epochs, for each seed. Writes
{out}/study_TASK.png (the trained reward's batch mean against the samples
drawn, averaged over seeds, one line per method), {out}/study.md (a table of
the rewards at the start and the end, mean ± std over seeds, the held-out
evaluation at the end, and whether the paper's ordering DDPO_IS ≥ DDPO_SF > RWR
holds) and {out}/study.json (every number of the table).

Methods (the tiny preset's optimiser, lr 3e-4, for all):
  DDPO_IS     two inner epochs: two optimiser steps per epoch, the second one
              off-policy through the clipped importance ratio, with clip 0.1:
              one step at this learning rate moves the per-step log-ratios of
              the toy model by ~0.03-0.12 RMS (measured), so the paper's 1e-4,
              set for SD's far smaller steps, clips ~90% of the second
              step's transitions and leaves it mostly noise;
  DDPO_SF     one optimiser step per epoch on fresh samples (it cannot reuse them);
  RWR         two optimiser steps of the denoising loss per epoch, samples
              weighted by exp(r / T), T = the task's reward scale (below);
  RWR sparse  the same on the top 10% of each epoch's samples (weight 1).

Runs already complete in --workdir are read back, not repeated (delete a run's
folder to redo it). Compiled programs are cached in --compilation_cache, so
only the first run of each method compiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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

# name -> (config file, title, RWR temperature: the pretrained model's reward std on the task, measured).
TASKS: dict[str, tuple[str, str, float]] = {
  "compress": ("compress.py", "JPEG compressibility (reward = -kB)", 0.1),
  "incompress": ("incompress.py", "JPEG incompressibility (reward = +kB)", 0.1),
  "toy_alignment": ("toy_alignment.py", "toy prompt alignment (attributes shown)", 0.25),
}
# name -> (label, config overrides).
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
  "ddpo_is": ("DDPO_IS", {"train.method": "ddpo_is", "train.num_inner_epochs": 2, "train.clip_range": 0.1}),
  "ddpo_sf": ("DDPO_SF", {"train.method": "ddpo_sf"}),
  "rwr": ("RWR", {"train.method": "rwr", "train.num_inner_epochs": 2}),
  "rwr_sparse": (
    "RWR sparse",
    {"train.method": "rwr_sparse", "train.num_inner_epochs": 2, "train.rwr_percentile": 90.0},
  ),
}
# Epochs averaged for the end of a run (one epoch is 64 samples: noisy).
WINDOW = 3


def define_flags():
  """Command-line flags (defined only when run as a script, so tests can import it)."""
  flags.DEFINE_string("out", "docs/study", "Folder of the plots, the table and the JSON summary.")
  flags.DEFINE_string("workdir", "runs/study", "Parent folder of the runs (TASK/METHOD/seedN).")
  flags.DEFINE_list("tasks", list(TASKS), f"Tasks, of {list(TASKS)}.")
  flags.DEFINE_list("methods", list(METHODS), f"Methods, of {list(METHODS)}.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (config.seed) of each task and method.")
  flags.DEFINE_integer("num_epochs", 12, "Epochs per run (64 samples each).")
  flags.DEFINE_string(
    "compilation_cache", os.path.expanduser("~/.cache/ddpo_jax/jax"), "JAX's persistent compilation cache ('' : off)."
  )


def run_overrides(task: str, method: str, seed: int, num_epochs: int) -> dict[str, Any]:
  """The settings of one run beside its task's tiny preset, as {"section.name": value}."""
  return {
    "seed": seed,
    "num_epochs": num_epochs,
    "train.rwr_temperature": TASKS[task][2],
    # A held-out evaluation before training and after the last epoch only.
    "eval.every_epochs": num_epochs,
    "checkpoint.every_epochs": 0,
    "logging.images_every_epochs": num_epochs,
    **METHODS[method][1],
  }


def config_spec(task: str) -> str:
  """The tiny preset of `task`'s config: in configs/ of the current folder (the repository root), else installed."""
  return os.path.abspath(config_utils.find_config_file(os.path.join("configs", TASKS[task][0]))) + ":tiny"


def run_config(task: str, method: str, seed: int, num_epochs: int) -> ml_collections.ConfigDict:
  """The tiny preset of `task` trained by `method` with `seed`."""
  return config_utils.override(
    config_utils.get_config(config_spec(task)), run_overrides(task, method, seed, num_epochs)
  )


def run(
  task: str, method: str, seed: int, workdir: str, num_epochs: int, compilation_cache: str = ""
) -> list[dict[str, Any]]:
  """All metrics.jsonl records of one run, training it first unless complete.

  Each run is its own `python -m ddpo_jax.main` process, so that no run's
  compiled programs or buffers stay in memory for the next; with
  `compilation_cache` they share compiled programs through JAX's persistent cache.
  """
  path = os.path.join(workdir, task, method, f"seed{seed}")
  complete = os.path.exists(os.path.join(path, metrics.METRICS_FILE)) and any(
    r["epoch"] == num_epochs - 1 for r in metrics.read_metrics(path, "eval")
  )
  if not complete:
    logging.info("study: %s / %s / seed %d in %s", task, method, seed, path)
    command = [sys.executable, "-m", "ddpo_jax.main", f"--config={config_spec(task)}", f"--workdir={path}"]
    command += [f"--config.{key}={value}" for key, value in run_overrides(task, method, seed, num_epochs).items()]
    env = dict(os.environ)
    if compilation_cache:
      env.update(JAX_COMPILATION_CACHE_DIR=compilation_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
    subprocess.run(command, check=True, env=env)
  return metrics.read_metrics(path)


def summarise(records: list[dict[str, Any]], num_epochs: int) -> dict[str, Any]:
  """One run's figures: the trained reward's batch mean per epoch, at epoch 0
  (the pretrained model's samples) and averaged over the last WINDOW epochs,
  and the held-out evaluation's metrics before training and after the last epoch."""
  train_records = sorted((r for r in records if r.get("split", "train") == "train"), key=lambda r: r["epoch"])
  train_records = train_records[:num_epochs]
  evals = {r["epoch"]: r for r in records if r.get("split") == "eval"}
  rewards = [r["reward_mean"] for r in train_records]
  return {
    "samples": [r["samples"] for r in train_records],
    "reward": rewards,
    "start": float(rewards[0]),  # the pretrained model's samples: the same for every method of a seed
    "end": float(np.mean(rewards[-WINDOW:])),
    "eval_start": evals.get(-1, {}),
    "eval_end": evals.get(num_epochs - 1, {}),
  }


def mean_std(values) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std())


def ordering(results: dict[str, list[dict[str, Any]]]) -> str:
  """Whether DDPO_IS ≥ DDPO_SF > RWR (dense and sparse) by the mean end reward over seeds."""
  end = {m: mean_std([r["end"] for r in runs])[0] for m, runs in results.items()}
  if not {"ddpo_is", "ddpo_sf"} <= set(end):
    return "–"
  rwr = [end[m] for m in ("rwr", "rwr_sparse") if m in end]
  holds = end["ddpo_is"] >= end["ddpo_sf"] and all(end["ddpo_sf"] > r for r in rwr)
  return "yes" if holds else "no"


def task_figure(task: str, results: dict[str, list[dict[str, Any]]]) -> Image.Image:
  """The trained reward's batch mean against samples, averaged over seeds, one line per method."""
  series = []
  for method, runs in results.items():
    mean = np.mean([r["reward"] for r in runs], axis=0)
    series.append((METHODS[method][0], runs[0]["samples"], list(mean)))
  seeds = len(next(iter(results.values())))
  chart = charts.line_chart(
    series, f"{TASKS[task][1]}, mean of {seeds} seed(s)", "samples", "reward (batch mean)", legend=False
  )
  return charts.stack([chart, charts.legend_strip([s[0] for s in series], chart.width)], horizontal=False)


def table(all_results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
  """Markdown: per task and method, the trained reward at the start and the end
  (mean ± std over seeds), the held-out evaluation's trained reward and
  diversity at the end, and whether the paper's ordering holds."""
  lines = [
    f"| task | method | reward, epoch 0 | reward, last {WINDOW} epochs | gain | "
    "held-out reward, end (start) | held-out diversity, end (start) | IS ≥ SF > RWR |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for task, results in all_results.items():
    check = ordering(results)
    for method, runs in results.items():
      start, start_std = mean_std([r["start"] for r in runs])
      end, end_std = mean_std([r["end"] for r in runs])
      gain, gain_std = mean_std([r["end"] - r["start"] for r in runs])
      held_out = mean_std([r["eval_end"].get("reward_mean", np.nan) for r in runs])[0]
      held_out_start = mean_std([r["eval_start"].get("reward_mean", np.nan) for r in runs])[0]
      diversity = mean_std([r["eval_end"].get("diversity", np.nan) for r in runs])[0]
      diversity_start = mean_std([r["eval_start"].get("diversity", np.nan) for r in runs])[0]
      lines.append(
        f"| {task} | {METHODS[method][0]} | {start:.3f} ± {start_std:.3f} | {end:.3f} ± {end_std:.3f} | "
        f"{gain:+.3f} ± {gain_std:.3f} | {held_out:.3f} ({held_out_start:.3f}) | "
        f"{diversity:.3f} ({diversity_start:.3f}) | {check} |"
      )
  return "\n".join(lines)


def write_outputs(all_results: dict[str, dict[str, list[dict[str, Any]]]], out: str) -> list[str]:
  """Writes study_TASK.png per task, study.md and study.json into `out`; returns their paths."""
  os.makedirs(out, exist_ok=True)
  paths = []
  for task, results in all_results.items():
    path = os.path.join(out, f"study_{task}.png")
    task_figure(task, results).save(path)
    paths.append(path)
  path = os.path.join(out, "study.md")
  with open(path, "w") as f:
    f.write(table(all_results) + "\n")
  paths.append(path)
  path = os.path.join(out, "study.json")
  with open(path, "w") as f:
    json.dump(all_results, f, indent=1)
  paths.append(path)
  return paths


def main(argv):
  del argv
  for name, chosen, known in (("tasks", FLAGS.tasks, TASKS), ("methods", FLAGS.methods, METHODS)):
    unknown = sorted(set(chosen) - set(known))
    if unknown:
      raise app.UsageError(f"--{name}: unknown {unknown}; choose of {list(known)}.")
  logging.set_verbosity(logging.INFO)
  seeds = [int(s) for s in FLAGS.seeds]
  all_results = {
    task: {
      method: [
        summarise(run(task, method, seed, FLAGS.workdir, FLAGS.num_epochs, FLAGS.compilation_cache), FLAGS.num_epochs)
        for seed in seeds
      ]
      for method in FLAGS.methods
    }
    for task in FLAGS.tasks
  }
  paths = write_outputs(all_results, FLAGS.out)
  print(table(all_results))
  print("wrote " + ", ".join(paths))


if __name__ == "__main__":
  define_flags()
  app.run(main)
