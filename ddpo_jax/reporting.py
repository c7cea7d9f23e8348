"""What a run reports after each epoch: its record, its console line and its sample grid.

An epoch's training metrics stay on the device until its record is written;
`EpochLog` holds the record back until the next epoch's sampling is
dispatched, so that fetching them never stalls the device, and writes it
sooner when something that follows must come after it in metrics.jsonl (an
evaluation, a checkpoint, the end of the run).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from ddpo_jax import metrics as metrics_lib
from ddpo_jax import periodic

# Training diagnostics of the epoch's console line, those the method has.
CONSOLE_METRICS = ("loss", "approx_kl", "clipfrac", "denoising_mse", "rwr_effective_fraction")


@dataclasses.dataclass
class EpochRecord:
  """An epoch's results, as dispatched (training metrics not yet fetched).

  Attributes:
    train_metrics: per inner epoch, the device metrics of `Steps.train_inner_epoch`.
    rewards: every process's valid rewards [N].
    local_rewards: this process's rewards [n] (NaN where dropped); prompts: its
      prompts [n]; images: its uint8 images, batch by batch.
    host_metrics: what the host computed (rewards, advantages, timings).
    epoch_start, train_start: time.time() at the epoch's and its training's start.
  """

  epoch: int
  train_metrics: list[dict[str, jax.Array]]
  rewards: np.ndarray
  local_rewards: np.ndarray
  prompts: list[str]
  images: list[np.ndarray]
  host_metrics: dict[str, float]
  epoch_start: float
  train_start: float


def mean_metrics(train_metrics: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Host means over inner epochs and minibatches, plus the on-policy check."""
  host = jax.device_get(train_metrics)
  summary = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
  if "ratio_max_deviation" in host[0]:  # policy gradients (RWR has no ratio)
    # Before any update the ratio of the first minibatch must be 1.
    summary["onpolicy_ratio_deviation"] = float(np.asarray(host[0]["ratio_max_deviation"]).reshape(-1)[0])
  return summary


def write_epoch(writer: metrics_lib.MetricWriter, config: ml_collections.ConfigDict, record: EpochRecord) -> dict:
  """Fetches an epoch's training metrics (blocking until its training is done),
  checks them, and writes its record, reward histogram and (when due) grid."""
  summary = mean_metrics(record.train_metrics)
  done = time.time()
  for name, value in summary.items():
    if not np.isfinite(value):
      raise FloatingPointError(
        f"epoch {record.epoch}: training metric {name} is {value}; lower config.train.learning_rate."
      )
  summary.update(
    record.host_metrics,
    epoch=record.epoch,
    training_seconds=done - record.train_start,
    seconds=done - record.epoch_start,
  )
  writer.write_scalars(record.epoch, summary, split="train")
  writer.write_histogram(record.epoch, "rewards", record.rewards)
  if periodic.is_due(record.epoch, config.num_epochs, config.logging.images_every_epochs):
    n = min(config.logging.num_images, len(record.prompts))
    labels = [f"{r:.3g} {p}" for r, p in zip(record.local_rewards[:n], record.prompts[:n])]
    writer.write_images(record.epoch, "samples", np.concatenate(record.images)[:n], labels)
  if jax.process_index() == 0:
    diagnostics = " | ".join(f"{name} {summary[name]:.3g}" for name in CONSOLE_METRICS if name in summary)
    logging.info(
      "epoch %d | samples %d | reward %.4f ± %.4f | %s | %.1f s",
      record.epoch,
      summary["samples"],
      summary["reward_mean"],
      summary["reward_std"],
      diagnostics,
      summary["seconds"],
    )
  return summary


class EpochLog:
  """The one epoch record waiting to be written, and the last one written (`summary`)."""

  def __init__(self, writer: metrics_lib.MetricWriter, config: ml_collections.ConfigDict):
    self.writer, self.config = writer, config
    self.pending: EpochRecord | None = None
    self.summary: dict[str, Any] = {}

  def defer(self, record: EpochRecord) -> None:
    self.flush()
    self.pending = record

  def flush(self) -> dict[str, Any]:
    """Writes the waiting record, if any; returns the last summary written."""
    if self.pending is not None:
      self.summary = write_epoch(self.writer, self.config, self.pending)
      self.pending = None
    return self.summary


def log_evaluation(epoch: int, metrics: dict[str, Any]) -> None:
  """The console line of an evaluation after epoch `epoch` (-1: before training)."""
  if jax.process_index() != 0:
    return
  others = " | ".join(
    f"{k[len('reward_') : -len('_mean')]} {v:.4g}"
    for k, v in metrics.items()
    if k.endswith("_mean") and k != "reward_mean"
  )
  logging.info(
    "eval after epoch %d | reward %.4f | %s | diversity %.3f | %.1f s",
    epoch,
    metrics["reward_mean"],
    others,
    metrics.get("diversity", metrics["diversity_all"]),
    metrics["seconds"],
  )
