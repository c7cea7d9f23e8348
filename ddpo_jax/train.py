"""The training loop: sample, reward, weigh, train; repeat.

`train_and_evaluate(config, workdir)` is the whole program behind
`python -m ddpo_jax.main`; a notebook can call it as well. The loop only
orchestrates: the train state's layout is `train_state`, the compiled steps
are `steps`, the method (examples, loss, trajectory weights) is a record of
`methods`, and what is reported after an epoch is `reporting`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from ddpo_jax import advantages as advantages_lib
from ddpo_jax import checkpoints
from ddpo_jax import config_utils
from ddpo_jax import evaluation
from ddpo_jax import lora
from ddpo_jax import methods
from ddpo_jax import metrics as metrics_lib
from ddpo_jax import models
from ddpo_jax import periodic
from ddpo_jax import preflight
from ddpo_jax import prompts as prompts_lib
from ddpo_jax import reporting
from ddpo_jax import rewards as rewards_lib
from ddpo_jax import sharding
from ddpo_jax import steps as steps_lib
from ddpo_jax import train_state
from ddpo_jax import update
from ddpo_jax import validation
from ddpo_jax import workdir_lock

# fold_in offset of the inner epochs' keys (batches of an epoch fold in 0, 1, ...).
INNER_EPOCH_FOLD = 10_000


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the config's training, writing everything into `workdir`.

  Resumes from the latest checkpoint in `workdir` when there is one (and stops
  with an error naming what differs when none fits this config), else starts
  from the pretrained weights. Returns the last epoch's metrics (with
  "preempted": True when a SIGTERM stopped the run early).
  """
  summary, _ = train(config, workdir)
  return summary


def train(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict[str, Any], train_state.TrainState]:
  """`train_and_evaluate` that also returns the final train state.

  Raises validation.ConfigError for an invalid setting and workdir_lock.WorkdirInUse while another run
  uses `workdir`, both before anything loads, compiles or is written.
  """
  # --- Settings, checked before anything loads or compiles; then the workdir is this run's alone.
  config = config_utils.resolve_auto(config, jax.default_backend())
  validation.validate(config, workdir, jax.device_count(), jax.process_count())
  with workdir_lock.acquire(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
    return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict[str, Any], train_state.TrainState]:
  """`train` with a validated config and the workdir locked."""
  is_main = jax.process_index() == 0
  method = methods.get(config.train.method)
  reward_fn = rewards_lib.make(config.reward.name, **config.reward.kwargs.to_dict())
  prompt_fn = prompts_lib.grouped(
    prompts_lib.get(config.prompt.name, **config.prompt.kwargs.to_dict()), config.sample.group_size
  )
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  model, params = models.load(config.model.name, revision=config.model.revision or None, dtype=config.model.dtype)
  try:
    config, model, layout = steps_lib.configure(config, model, params["unet"], mesh)
  except ValueError as e:  # LoRA targets that match nothing: name the setting
    raise validation.ConfigError(str(e)) from e
  problem = train_state.check_sharded(layout, mesh, config.mesh.min_sharded_fraction)
  if problem:
    raise validation.ConfigError(problem)
  tracker = (
    advantages_lib.PerPromptStatTracker(config.stat_tracking.buffer_size, config.stat_tracking.min_count)
    if config.stat_tracking.per_prompt and config.train.advantages == "stat_tracking"
    else None
  )

  # --- Resume from the latest checkpoint, before anything is written.
  checkpointer = checkpoints.Checkpointer(
    checkpoints.checkpoint_dir(workdir), config.checkpoint.max_to_keep, config.checkpoint.asynchronous
  )
  restored = checkpointer.restore_latest(layout.state)
  start_epoch = 0
  if restored is not None:
    step, state, meta = restored
    if meta["seed"] != config.seed:
      raise validation.ConfigError(
        f"config.seed={config.seed} differs from the seed {meta['seed']} of the checkpoint in {workdir}; "
        "resume with the same seed or start in a new --workdir."
      )
    start_epoch = int(meta["epoch"]) + 1
    if tracker is not None:
      tracker.load_state(meta["tracker"])
    logging.info("resuming from checkpoint %d (epoch %d done) in %s", step, meta["epoch"], workdir)

  # --- The compiled steps, checked against the devices' memory before anything is written or placed.
  frozen_params = {"vae": params["vae"], "text_encoder": params["text_encoder"]}
  run = steps_lib.build(config, model, mesh, layout, frozen_params)
  preflight.check(config, run, params["unet"], frozen_params)
  if is_main:
    _save_config(config, workdir)

  # --- The frozen params and the state on the mesh.
  frozen = run.place_frozen(params)
  unet = run.place_unet(params["unet"])
  base = run.base(unet)
  if restored is None:
    state = run.init_state(unet, train_state.adapter_key(config.seed))
  del params, unet
  negative_context = run.negative_context(frozen["text_encoder"])
  logging.info(
    "train state: %.1f MB per device, %.0f%% of its bytes sharded (mesh %s); %d trained params",
    train_state.bytes_per_device(layout) / 1e6,
    100 * train_state.sharded_state_fraction(layout),
    dict(mesh.shape),
    lora.num_params(layout.state.params),
  )

  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  writer.resume_at(start_epoch)
  epoch_log = reporting.EpochLog(writer, config)
  preemption = checkpoints.PreemptionFlag()
  executor = concurrent.futures.ThreadPoolExecutor(config.reward.num_threads)
  root_key = jax.random.PRNGKey(config.seed)
  num_batches = config.sample.num_batches_per_epoch
  samples_per_epoch = config.sample.batch_size * num_batches
  local_batch = config.sample.batch_size // jax.process_count()
  evaluator = evaluation.Evaluator(config, run, reward_fn) if config.eval.every_epochs else None
  eval_summary: dict[str, Any] = {}
  if evaluator is not None and start_epoch == 0:
    eval_summary = _evaluate(evaluator, writer, frozen, state.params, base, -1, 0)
  preempted = False

  for epoch in range(start_epoch, config.num_epochs):
    epoch_start = time.time()
    epoch_key = jax.random.fold_in(root_key, epoch)
    current = dict(frozen, unet=state.params)

    # --- Sampling: dispatch every batch, then hand each one's images to a
    # reward thread as soon as they are ready, while the device goes on.
    prompt_rng = np.random.default_rng([config.seed, epoch, jax.process_index()])
    batches = []
    for b in range(num_batches):
      batch_prompts = prompt_fn(prompt_rng, local_batch)
      token_ids = run.token_ids(batch_prompts)
      trajectory, context, images = run.sample(
        current, base, token_ids, run.negative_tokens, jax.random.fold_in(epoch_key, b)
      )
      batches.append((batch_prompts, trajectory, context, images))
    epoch_log.flush()  # the device is busy sampling: write the last epoch's record now
    futures, local_prompts, local_images = [], [], []
    for batch_prompts, _, _, images in tqdm.tqdm(
      batches, desc=f"epoch {epoch} sampling", leave=False, disable=not is_main
    ):
      host_images = sharding.local_rows(images)
      futures.append(
        executor.submit(
          rewards_lib.score_batch, config.reward.name, reward_fn, host_images, batch_prompts, config.reward.on_invalid
        )
      )
      local_prompts += batch_prompts
      local_images.append(host_images)
    local_scored = rewards_lib.concatenate([f.result() for f in futures])
    sampling_seconds = time.time() - epoch_start

    # --- Trajectory weights (the method's: advantages, RWR weights) over every
    # process's samples, identical on all processes; one per trajectory.
    all_prompts = sharding.gather_prompts(local_prompts, num_batches)
    scored = rewards_lib.ScoredBatch(
      rewards=sharding.gather_rows(local_scored.rewards, num_batches),
      valid=sharding.gather_rows(local_scored.valid, num_batches),
      parts={k: sharding.gather_rows(v, num_batches) for k, v in local_scored.parts.items()},
      problem=local_scored.problem,
    )
    weights, weight_metrics = method.trajectory_weights(scored, all_prompts, tracker, config, epoch)
    rollouts = update.Rollouts(
      latents=jnp.concatenate([b[1].latents for b in batches]),
      log_probs=jnp.concatenate([b[1].log_probs for b in batches]),
      timesteps=batches[0][1].timesteps,
      context=jnp.concatenate([b[2] for b in batches]),
      weights=sharding.from_global_rows(weights.astype(np.float32), sharding.batch(mesh)),
    )

    # --- Training: dispatched asynchronously, one device call per optimiser step.
    train_start = time.time()
    train_metrics = []
    for inner in tqdm.trange(
      config.train.num_inner_epochs, desc=f"epoch {epoch} training", leave=False, disable=not is_main
    ):
      inner_key = jax.random.fold_in(epoch_key, INNER_EPOCH_FOLD + inner)
      state, inner_metrics = run.train_inner_epoch(state, rollouts, negative_context, inner_key, base)
      train_metrics.append(inner_metrics)
    host_metrics = dict(
      rewards_lib.reward_statistics(scored),
      **weight_metrics,
      samples=(epoch + 1) * samples_per_epoch,
      sampling_seconds=sampling_seconds,
      **({f"stat_tracker_{k}": v for k, v in tracker.stats().items()} if tracker else {}),
    )
    epoch_log.defer(
      reporting.EpochRecord(
        epoch=epoch,
        train_metrics=train_metrics,
        rewards=scored.rewards[scored.valid],
        local_rewards=local_scored.rewards,
        prompts=local_prompts,
        images=local_images,
        host_metrics=host_metrics,
        epoch_start=epoch_start,
        train_start=train_start,
      )
    )

    # --- Held-out evaluation of the params after this epoch (its record after the epoch's own); after the
    # last epoch, images/before_after.png too.
    last = epoch == config.num_epochs - 1
    if evaluator is not None and periodic.is_due(epoch, config.num_epochs, config.eval.every_epochs):
      epoch_log.flush()
      eval_summary = _evaluate(
        evaluator, writer, frozen, state.params, base, epoch, (epoch + 1) * samples_per_epoch, final=last
      )

    # --- Checkpoint: when due, after the last epoch and when preempted (then stop). The
    # epoch's record is written first, so metrics.jsonl never runs ahead of a restore. The flag is read once
    # the epoch's training pass has finished on the device: read at its dispatch, a signal that arrives
    # during the pass would be acted on an epoch late.
    jax.block_until_ready(state)
    preempted = preemption.requested()
    if preempted or last or periodic.is_due(epoch, config.num_epochs, config.checkpoint.every_epochs):
      epoch_log.flush()
      meta = dict(epoch=epoch, seed=config.seed, tracker=tracker.state() if tracker else {})
      checkpointer.save(epoch + 1, state, meta)
    if preempted:
      logging.warning("stopped after epoch %d to be preempted; run again with --workdir=%s to resume", epoch, workdir)
      break

  # --- The end: the last record, the EMA's grid, files closed on every process.
  summary = epoch_log.flush()
  if config.logging.sample_with_ema and not preempted and summary:
    summary.update(
      _ema_grid(run, config, writer, frozen, state.ema_params, base, prompt_fn, reward_fn, summary["epoch"])
    )
  checkpointer.close()
  executor.shutdown()
  writer.close()
  preemption.restore_handlers()
  sharding.sync_processes("train_and_evaluate done")
  if preempted:
    summary["preempted"] = True
  summary.update({f"eval_{name}": value for name, value in eval_summary.items()})
  return summary, state


def _save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes config.json; a resumed run with other settings keeps the old file."""
  path = os.path.join(workdir, "config.json")
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path) as f:
      previous = f.read()
    if previous == text:
      return
    kept = os.path.join(workdir, f"config.{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.replace(path, kept)
    logging.warning("this run's config differs from the one in %s; the old one is kept as %s", workdir, kept)
  with open(path, "w") as f:
    f.write(text)


def _evaluate(evaluator, writer, frozen, trained, base, epoch: int, samples: int, final=False) -> dict[str, Any]:
  """Evaluates the params after epoch `epoch` (-1: before training), writes
  the record and grid (`final`: the before/after picture too), and returns the metrics (with "epoch")."""
  metrics, images, labels = evaluator.evaluate(dict(frozen, unet=trained), base)
  evaluator.write(writer, epoch, samples, metrics, images, labels, final=final)
  reporting.log_evaluation(epoch, metrics)
  return dict(metrics, epoch=epoch)


def _ema_grid(run, config, writer, frozen, ema_params, base, prompt_fn, reward_fn, epoch: int) -> dict[str, float]:
  """Samples a batch with the EMA params, with the prompts and key of epoch
  `epoch`'s first batch; writes images/samples_ema_EPOCH.png and returns
  {"ema_reward_mean": the mean valid reward over every process's samples}."""
  local_batch = config.sample.batch_size // jax.process_count()
  prompts = prompt_fn(np.random.default_rng([config.seed, epoch, jax.process_index()]), local_batch)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), epoch), 0)
  _, _, images = run.sample(dict(frozen, unet=ema_params), base, run.token_ids(prompts), run.negative_tokens, key)
  images = sharding.local_rows(images)
  scored = rewards_lib.score_batch(config.reward.name, reward_fn, images, prompts, "drop")
  rewards = sharding.gather_rows(np.where(scored.valid, scored.rewards, np.nan), 1)
  n = min(config.logging.num_images, len(prompts))
  writer.write_images(epoch, "samples_ema", images[:n], [f"{r:.3g} {p}" for r, p in zip(scored.rewards[:n], prompts)])
  mean = float(np.nanmean(rewards)) if np.isfinite(rewards).any() else float("nan")
  if jax.process_index() == 0:
    logging.info("EMA params after epoch %d: reward %.4f (current params: see the epoch's line)", epoch, mean)
  return {"ema_reward_mean": mean}
