r"""The paper's comparison of DDPO with reward-weighted regression, on the toy world, each method tuned.

    python -m experiments.study --out=docs/study --workdir=runs/study               # all of it, ~3.5 h on 2 cores
    python -m experiments.study --out=docs/study --workdir=runs/study --tasks=compress  # one part, ~70 min

Trains the shipped toy-world model with DDPO_IS, DDPO_SF, RWR and RWR-sparse on
JPEG compressibility, incompressibility and toy prompt alignment (the tiny
presets of configs/compress.py, incompress.py and toy_alignment.py), every run
with the same samples per epoch and epochs. In two stages per task and method:
  sweep  one run per learning rate of --learning_rates with the first seed of --seeds;
         the method's best learning rate is the one with the highest trained
         reward over the last WINDOW epochs;
  seeds  the other seeds at that learning rate.
Writes {out}/runs/TASK/METHOD/lrLR_seedN.json (one run's summary: commit these),
{out}/study_TASK.png (the trained reward's batch mean against the samples drawn,
mean over seeds with a ±1 std band, one line per method at its best learning
rate), {out}/study.md (the tables) and {out}/study.json (the assembled results).

Resumable in parts: a run whose summary is in {out}/runs is not repeated while
every setting it recorded is unchanged (settings added later are taken to keep
their old behaviour, as new settings do); a run complete in --workdir is
summarised without training. With --summaries_only nothing trains: the tables
and plots are rebuilt from the summaries alone.

Methods (the tiny preset's optimiser at the swept learning rate, no KL, no EMA):
  DDPO_IS     two inner epochs: two optimiser steps per epoch, the second one
              off-policy through the clipped importance ratio, with clip 0.1:
              one step at lr 3e-4 moves the per-step log-ratios of the toy
              model by ~0.03-0.12 RMS (measured), so the paper's 1e-4, set for
              SD's far smaller steps, clips ~90% of the second step's
              transitions and leaves it mostly noise;
  DDPO_SF     one optimiser step per epoch on fresh samples (it cannot reuse them);
  RWR         two optimiser steps of the denoising loss per epoch, samples
              weighted by exp(r / T), T = the task's reward scale (below);
  RWR sparse  the same on the top 10% of each epoch's samples (weight 1).
Compiled programs are cached in --compilation_cache, so only the first run of
each method compiles.
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
  "ddpo_sf": ("DDPO_SF", {"train.method": "ddpo_sf", "train.num_inner_epochs": 1}),
  "rwr": ("RWR", {"train.method": "rwr", "train.num_inner_epochs": 2}),
  "rwr_sparse": (
    "RWR sparse",
    {"train.method": "rwr_sparse", "train.num_inner_epochs": 2, "train.rwr_percentile": 90.0},
  ),
}
LEARNING_RATES = ("1e-4", "3e-4", "1e-3")
# Epochs averaged for the end of a run (one epoch is 64 samples: noisy).
WINDOW = 3


def define_flags():
  """Command-line flags (defined only when run as a script, so tests can import it)."""
  flags.DEFINE_string("out", "docs/study", "Folder of the run summaries, the plots, the tables and the JSON.")
  flags.DEFINE_string("workdir", "runs/study", "Parent folder of the runs (TASK/METHOD/lrLR_seedN).")
  flags.DEFINE_list("tasks", list(TASKS), f"Tasks, of {list(TASKS)}.")
  flags.DEFINE_list("methods", list(METHODS), f"Methods, of {list(METHODS)}.")
  flags.DEFINE_list("learning_rates", list(LEARNING_RATES), "Learning rates swept per method (with the first seed).")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (config.seed); the first one is the sweep's.")
  flags.DEFINE_integer("num_epochs", 10, "Epochs per run (64 samples each).")
  flags.DEFINE_bool("summaries_only", False, "Train nothing: rebuild the tables and plots from {out}/runs.")
  flags.DEFINE_string(
    "compilation_cache", os.path.expanduser("~/.cache/ddpo_jax/jax"), "JAX's persistent compilation cache ('' : off)."
  )


def run_overrides(task: str, method: str, learning_rate: float, seed: int, num_epochs: int) -> dict[str, Any]:
  """The settings of one run beside its task's tiny preset, as {"section.name": value}."""
  return {
    "seed": seed,
    "num_epochs": num_epochs,
    "train.learning_rate": learning_rate,
    "train.rwr_temperature": TASKS[task][2],
    "train.kl_coef": 0.0,
    "train.ema_decay": 0.0,
    # A held-out evaluation before training and after the last epoch only.
    "eval.every_epochs": num_epochs,
    "checkpoint.every_epochs": 0,
    "logging.images_every_epochs": num_epochs,
    **METHODS[method][1],
  }


def config_spec(task: str) -> str:
  """The tiny preset of `task`'s config: in configs/ of the current folder (the repository root), else installed."""
  return os.path.abspath(config_utils.find_config_file(os.path.join("configs", TASKS[task][0]))) + ":tiny"


def run_config(task: str, method: str, learning_rate: float, seed: int, num_epochs: int) -> ml_collections.ConfigDict:
  """The tiny preset of `task` trained by `method` at `learning_rate` with `seed`."""
  return config_utils.override(
    config_utils.get_config(config_spec(task)), run_overrides(task, method, learning_rate, seed, num_epochs)
  )


def run_name(learning_rate: float, seed: int) -> str:
  return f"lr{learning_rate:g}_seed{seed}"


def run(
  task: str,
  method: str,
  learning_rate: float,
  seed: int,
  workdir: str,
  num_epochs: int,
  compilation_cache: str = "",
) -> list[dict[str, Any]]:
  """All metrics.jsonl records of one run, training it first unless complete in `workdir`.

  Each run is its own `python -m ddpo_jax.main` process, so that no run's
  compiled programs or buffers stay in memory for the next; with
  `compilation_cache` they share compiled programs through JAX's persistent cache.
  """
  path = os.path.join(workdir, task, method, run_name(learning_rate, seed))
  complete = os.path.exists(os.path.join(path, metrics.METRICS_FILE)) and any(
    r["epoch"] == num_epochs - 1 for r in metrics.read_metrics(path, "eval")
  )
  if not complete:
    logging.info("study: %s / %s / lr %g / seed %d in %s", task, method, learning_rate, seed, path)
    overrides = run_overrides(task, method, learning_rate, seed, num_epochs)
    command = [sys.executable, "-m", "ddpo_jax.main", f"--config={config_spec(task)}", f"--workdir={path}"]
    command += [f"--config.{key}={value}" for key, value in overrides.items()]
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


def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{"section.name": value} of every leaf of `config`, JSON-comparable."""
  flat = {}

  def walk(prefix, node):
    for key, value in node.items():
      if isinstance(value, (dict, ml_collections.ConfigDict)):
        walk(f"{prefix}{key}.", value)
      else:
        flat[prefix + key] = json.loads(json.dumps(value, default=str))

  walk("", config.to_dict())
  return flat


def summary_path(out: str, task: str, method: str, learning_rate: float, seed: int) -> str:
  return os.path.join(out, "runs", task, method, run_name(learning_rate, seed) + ".json")


def changed_settings(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """The settings a summary recorded whose value differs now (or that no longer exist)."""
  return sorted(k for k, v in recorded.items() if k not in current or current[k] != v)


def obtain(
  task: str,
  method: str,
  learning_rate: float,
  seed: int,
  workdir: str,
  out: str,
  num_epochs: int,
  compilation_cache: str = "",
) -> dict[str, Any]:
  """One run's summary: from {out}/runs while its settings hold, else trained (or read from a complete
  `workdir`), summarised and written there."""
  path = summary_path(out, task, method, learning_rate, seed)
  current = settings(run_config(task, method, learning_rate, seed, num_epochs))
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      summary = json.load(f)
    changed = changed_settings(summary["settings"], current)
    if not changed:
      return summary
    logging.warning("study: %s is stale (changed: %s); running it again", path, ", ".join(changed))
  records = run(task, method, learning_rate, seed, workdir, num_epochs, compilation_cache)
  summary = dict(
    summarise(records, num_epochs),
    task=task,
    method=method,
    learning_rate=learning_rate,
    seed=seed,
    num_epochs=num_epochs,
    settings=current,
  )
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  os.replace(path + ".tmp", path)  # a summary is whole or absent
  return summary


def load_summaries(out: str) -> list[dict[str, Any]]:
  """Every run summary under {out}/runs."""
  summaries = []
  for path in sorted(glob.glob(os.path.join(out, "runs", "*", "*", "*.json"))):
    with open(path, encoding="utf-8") as f:
      summaries.append(json.load(f))
  return summaries


def best_learning_rate(end_rewards: dict[float, float]) -> float:
  """The learning rate of the highest end reward (the smallest of a tie)."""
  return max(sorted(end_rewards), key=lambda lr: end_rewards[lr])


def assemble(summaries: list[dict[str, Any]], sweep_seed: int) -> dict[str, dict[str, dict[str, Any]]]:
  """{task: {method: {"learning_rate": best, "sweep": {lr: end reward}, "runs": [summary per seed]}}}.

  The best learning rate is the one whose `sweep_seed` run has the highest end
  reward; "runs" are that learning rate's runs, by seed. Tasks and methods in
  the order of TASKS and METHODS.
  """
  results: dict[str, dict[str, dict[str, Any]]] = {}
  for task in TASKS:
    for method in METHODS:
      mine = [s for s in summaries if s["task"] == task and s["method"] == method]
      sweep = {s["learning_rate"]: s["end"] for s in mine if s["seed"] == sweep_seed}
      if not sweep:
        continue
      best = best_learning_rate(sweep)
      runs = sorted((s for s in mine if s["learning_rate"] == best), key=lambda s: s["seed"])
      results.setdefault(task, {})[method] = {"learning_rate": best, "sweep": dict(sorted(sweep.items())), "runs": runs}
  return results


def mean_std(values) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std())


def ordering(results: dict[str, dict[str, Any]]) -> str:
  """Whether DDPO_IS ≥ DDPO_SF > RWR (dense and sparse) by the mean end reward over seeds."""
  end = {m: mean_std([r["end"] for r in entry["runs"]])[0] for m, entry in results.items()}
  if not {"ddpo_is", "ddpo_sf"} <= set(end):
    return "–"
  rwr = [end[m] for m in ("rwr", "rwr_sparse") if m in end]
  holds = end["ddpo_is"] >= end["ddpo_sf"] and all(end["ddpo_sf"] > r for r in rwr)
  return "yes" if holds else "no"


def task_figure(task: str, results: dict[str, dict[str, Any]]) -> Image.Image:
  """The trained reward's batch mean against samples, one line per method at its best learning rate:
  the mean over seeds, with a band of ±1 std over seeds."""
  series, bands = [], []
  for method, entry in results.items():
    rewards = np.asarray([r["reward"] for r in entry["runs"]], np.float64)
    mean, std = rewards.mean(0), rewards.std(0)
    label = f"{METHODS[method][0]} (lr {entry['learning_rate']:g})"
    series.append((label, entry["runs"][0]["samples"], list(mean)))
    bands.append((list(mean - std), list(mean + std)))
  seeds = sorted({len(entry["runs"]) for entry in results.values()})
  title = f"{TASKS[task][1]}, {'-'.join(map(str, seeds))} seed(s)"
  chart = charts.line_chart(series, title, "samples", "reward (batch mean)", legend=False, bands=bands)
  return charts.stack([chart, charts.legend_strip([s[0] for s in series], chart.width)], horizontal=False)


def table(all_results: dict[str, dict[str, dict[str, Any]]]) -> str:
  """Markdown: per task and method, its best learning rate, the seeds, the trained
  reward at the start and the end (mean ± std over seeds), the held-out
  evaluation's toy alignment and diversity at the end, and whether the paper's
  ordering holds; then the sweep (end reward per learning rate, first seed)."""
  lines = [
    f"| task | method | lr | seeds | reward, epoch 0 | reward, last {WINDOW} epochs | gain | "
    "held-out toy alignment, end (start) | held-out diversity, end (start) | IS ≥ SF > RWR |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for task, results in all_results.items():
    check = ordering(results)
    for method, entry in results.items():
      runs = entry["runs"]
      start, start_std = mean_std([r["start"] for r in runs])
      end, end_std = mean_std([r["end"] for r in runs])
      gain, gain_std = mean_std([r["end"] - r["start"] for r in runs])
      held_out = {
        (key, when): mean_std([r[f"eval_{when}"].get(key, np.nan) for r in runs])[0]
        for key in ("reward_toy_alignment_mean", "diversity")
        for when in ("start", "end")
      }
      lines.append(
        f"| {task} | {METHODS[method][0]} | {entry['learning_rate']:g} | {len(runs)} | "
        f"{start:.3f} ± {start_std:.3f} | {end:.3f} ± {end_std:.3f} | {gain:+.3f} ± {gain_std:.3f} | "
        f"{held_out['reward_toy_alignment_mean', 'end']:.3f} ({held_out['reward_toy_alignment_mean', 'start']:.3f}) | "
        f"{held_out['diversity', 'end']:.3f} ({held_out['diversity', 'start']:.3f}) | {check} |"
      )
  rates = sorted({lr for results in all_results.values() for e in results.values() for lr in e["sweep"]})
  lines += [
    "",
    f"Sweep: reward over the last {WINDOW} epochs per learning rate (first seed; the best in bold).",
    "",
    "| task | method | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |",
    "|---|---|" + "---|" * len(rates),
  ]
  for task, results in all_results.items():
    for method, entry in results.items():
      cells = []
      for lr in rates:
        value = entry["sweep"].get(lr)
        cell = "–" if value is None else f"{value:.3f}"
        cells.append(f"**{cell}**" if lr == entry["learning_rate"] else cell)
      lines.append(f"| {task} | {METHODS[method][0]} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_outputs(all_results: dict[str, dict[str, dict[str, Any]]], out: str) -> list[str]:
  """Writes study_TASK.png per task, study.md and study.json into `out`; returns their paths."""
  os.makedirs(out, exist_ok=True)
  paths = []
  for task, results in all_results.items():
    path = os.path.join(out, f"study_{task}.png")
    task_figure(task, results).save(path)
    paths.append(path)
  path = os.path.join(out, "study.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write(table(all_results) + "\n")
  paths.append(path)
  path = os.path.join(out, "study.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(all_results, f, indent=1)
  paths.append(path)
  return paths


def main(argv):
  del argv
  for name, chosen, known in (("tasks", FLAGS.tasks, TASKS), ("methods", FLAGS.methods, METHODS)):
    unknown = sorted(set(chosen) - set(known))
    if unknown:
      raise app.UsageError(f"--{name}: unknown {unknown}; choose of {list(known)}.")
  try:
    learning_rates = [float(lr) for lr in FLAGS.learning_rates]
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError as e:
    raise app.UsageError(f"--learning_rates and --seeds take numbers: {e}") from None
  if not learning_rates or not seeds:
    raise app.UsageError("--learning_rates and --seeds need at least one value each.")
  logging.set_verbosity(logging.INFO)
  common = dict(
    workdir=FLAGS.workdir,
    out=FLAGS.out,
    num_epochs=FLAGS.num_epochs,
    compilation_cache=FLAGS.compilation_cache,
  )
  if not FLAGS.summaries_only:
    for task in FLAGS.tasks:
      for method in FLAGS.methods:
        sweep = {lr: obtain(task, method, lr, seeds[0], **common)["end"] for lr in learning_rates}
        best = best_learning_rate(sweep)
        for seed in seeds[1:]:
          obtain(task, method, best, seed, **common)
  all_results = assemble(load_summaries(FLAGS.out), seeds[0])
  if not all_results:
    raise app.UsageError(f"no run summaries under {FLAGS.out}/runs; run without --summaries_only first.")
  paths = write_outputs(all_results, FLAGS.out)
  print(table(all_results))
  print("wrote " + ", ".join(paths))


if __name__ == "__main__":
  define_flags()
  app.run(main)
