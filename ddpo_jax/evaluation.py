"""Held-out evaluation: fixed prompts, fixed noise, several rewards, diversity.

Every `config.eval.every_epochs` epochs (and before the first and after the
last) the current params sample `config.eval.num_samples` images of a held-out
prompt set. The prompts and every noise draw are functions of
`config.eval.seed` alone, so two evaluations of the same params give the same
images bit for bit, and evaluations of a run differ only by its params. Each
evaluation reports the trained reward, the other rewards of `config.eval.rewards`
(a policy that games its reward shows it in the others), and the diversity of
the samples.

The first `config.logging.num_images` samples of the evaluation before training
are kept (images/eval_start.npz, so that a resumed run has them), and the last
evaluation writes them beside the final params' samples of the same prompts and
noise: images/before_after.png.
"""

from __future__ import annotations

import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from ddpo_jax import metrics as metrics_lib
from ddpo_jax import prompts as prompts_lib
from ddpo_jax import rewards as rewards_lib
from ddpo_jax import sharding

START_SAMPLES = "eval_start"  # images/eval_start.npz: the evaluation before training's first images
BEFORE_AFTER = "before_after"  # images/before_after.png


def before_after_titles(epoch: int) -> tuple[str, str]:
  return "before training: reward, prompt", f"after epoch {epoch}: reward, prompt"


def pairwise_rms_distance(images: np.ndarray) -> float:
  """Mean over pairs i < j of the RMS pixel difference of uint8 images [n, H, W, C], in [0, 1] units.

  NaN for fewer than two images.
  """
  n = len(images)
  if n < 2:
    return float("nan")
  flat = images.reshape(n, -1).astype(np.float64) / 255.0
  squared = np.sum(flat**2, axis=1)
  gram = flat @ flat.T
  distances = np.sqrt(np.maximum(squared[:, None] + squared[None] - 2 * gram, 0.0) / flat.shape[1])
  return float(distances[np.triu_indices(n, 1)].mean())


def group_diversity(images: np.ndarray, group_size: int) -> np.ndarray:
  """`pairwise_rms_distance` within each group of `group_size` consecutive images: float64 [n / group_size]."""
  return np.array([pairwise_rms_distance(g) for g in images.reshape((-1, group_size) + images.shape[1:])])


class Evaluator:
  """Samples and scores the held-out set with given params.

  Args:
    config: the run's config (config.eval, config.sample, config.reward).
    steps: the run's compiled steps (`steps.build`): their `eval_sample`.
    reward_fn: the trained reward (config.reward.name's).
  """

  def __init__(self, config: ml_collections.ConfigDict, steps, reward_fn):
    e = config.eval
    self.config = config
    self.steps = steps
    self.batch_size = config.sample.batch_size
    self.num_batches = e.num_samples // self.batch_size
    self.local_batch = self.batch_size // jax.process_count()
    prompt_fn = prompts_lib.grouped(prompts_lib.get(e.prompt.name, **e.prompt.kwargs.to_dict()), e.samples_per_prompt)
    # The global prompt list, batch after batch; a batch's rows are process 0's, then process 1's, ...
    self.prompts = prompt_fn(np.random.default_rng(e.seed), e.num_samples)
    self.reward_fns = {config.reward.name: reward_fn}
    for name in e.rewards:
      if name not in self.reward_fns:
        self.reward_fns[name] = rewards_lib.make(name)
    root = jax.random.PRNGKey(e.seed)
    self.keys = [jax.random.fold_in(root, b) for b in range(self.num_batches)]

  def local_prompts(self, batch: int) -> list[str]:
    """This process's prompts of evaluation batch `batch`."""
    start = batch * self.batch_size + jax.process_index() * self.local_batch
    return self.prompts[start : start + self.local_batch]

  def sample(self, params, base=None) -> tuple[np.ndarray, list[str]]:
    """This process's samples: (uint8 images [n, H, W, 3], their prompts)."""
    images, prompts = [], []
    for b in range(self.num_batches):
      batch_prompts = self.local_prompts(b)
      token_ids = self.steps.token_ids(batch_prompts)
      _, _, batch_images = self.steps.eval_sample(params, base, token_ids, self.steps.negative_tokens, self.keys[b])
      images.append(sharding.local_rows(batch_images))
      prompts += batch_prompts
    return np.concatenate(images), prompts

  def evaluate(self, params, base=None) -> tuple[dict[str, Any], np.ndarray, list[str]]:
    """Samples the held-out set with `params` {"unet", "vae", "text_encoder"}
    and scores it.

    Returns:
      (metrics, images, labels): metrics over every process's samples, the
      same on all processes: for each reward NAME, reward_NAME_mean/_std over
      the samples it could score and reward_NAME_invalid (the count it could
      not); reward_mean/_std (the trained reward's); diversity (the mean
      pairwise RMS pixel distance, in [0, 1], between samples of the same
      prompt) and diversity_all (between all of this process's samples);
      seconds. images: this process's; labels: "trained reward, prompt" of each.
    """
    start = time.time()
    images, prompts = self.sample(params, base)
    out: dict[str, Any] = {}
    labels = []
    for name, fn in self.reward_fns.items():
      scored = rewards_lib.score_batch(name, fn, images, prompts, "drop")
      if name == self.config.reward.name:
        labels = [f"{r:.3g} {p}" for r, p in zip(scored.rewards, prompts)]
      rewards = sharding.gather_rows(np.where(scored.valid, scored.rewards, np.nan), self.num_batches)
      valid = rewards[np.isfinite(rewards)]
      out[f"reward_{name}_mean"] = float(valid.mean()) if valid.size else float("nan")
      out[f"reward_{name}_std"] = float(valid.std()) if valid.size else float("nan")
      out[f"reward_{name}_invalid"] = int(rewards.size - valid.size)
    trained = self.config.reward.name
    out["reward_mean"], out["reward_std"] = out[f"reward_{trained}_mean"], out[f"reward_{trained}_std"]
    k = self.config.eval.samples_per_prompt
    if k >= 2:
      out["diversity"] = float(np.mean(sharding.gather_rows(group_diversity(images, k), self.num_batches)))
    out["diversity_all"] = float(np.mean(sharding.allgather_rows(np.array([pairwise_rms_distance(images)]))))
    out["seconds"] = time.time() - start
    return out, images, labels

  def write(self, writer, epoch: int, samples: int, metrics: dict[str, Any], images, labels, final=False) -> None:
    """Writes an evaluation's record (split "eval", with the samples trained
    on so far) and its grid: images/eval_samples_EPOCH.png, or
    images/eval_samples_start_00000.png for the evaluation before training (epoch -1),
    whose first images are also kept as images/eval_start.npz; with `final`,
    images/before_after.png too."""
    writer.write_scalars(epoch, dict(metrics, samples=samples), split="eval")
    n = min(self.config.logging.num_images, len(images))
    name = "eval_samples" if epoch >= 0 else "eval_samples_start"
    writer.write_images(max(epoch, 0), name, images[:n], labels[:n])
    if epoch < 0:
      writer.write_arrays(START_SAMPLES, images=images[:n], labels=np.asarray(labels[:n]))
    if final and writer.enabled:
      start = writer.read_arrays(START_SAMPLES)
      if start is None or len(start["images"]) != n:
        logging.warning("no images of the evaluation before training in %s: no %s.png", writer.workdir, BEFORE_AFTER)
        return
      titles = before_after_titles(epoch)
      grid = metrics_lib.before_after_grid(start["images"], list(start["labels"]), images[:n], labels[:n], titles)
      writer.write_grid(BEFORE_AFTER, grid)
