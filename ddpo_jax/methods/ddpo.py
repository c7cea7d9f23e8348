"""DDPO's policy gradients over (x_t, x_{t-1}) transitions: ddpo_is and ddpo_sf.

Black et al., "Training Diffusion Models with Reinforcement Learning" (ICLR
2024): eq. 3 (DDPO_SF, REINFORCE) and eq. 4 (DDPO_IS, PPO's clipped
importance ratio). The policy is the whole guided DDIM sampler, so the
training pass recomputes each transition's Gaussian with the sampling CFG.

Examples: an inner epoch shuffles the trajectories and, per trajectory, its
timesteps, keeps `num_timesteps_kept` of the steps, and lays the transitions
out time-major, so that one minibatch holds many trajectories, each at its own
timestep. Weights: one advantage per trajectory, from per-prompt statistics or
the batch ("stat_tracking") or from its group of samples of the same prompt
("group"). With config.train.kl_coef > 0 the loss adds the per-step KL to the
frozen pretrained model.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import ml_collections
import numpy as np

from ddpo_jax import advantages as advantages_lib
from ddpo_jax import ddim
from ddpo_jax import models
from ddpo_jax import objectives
from ddpo_jax import rewards
from ddpo_jax import sampling
from ddpo_jax import update
from ddpo_jax.methods import base


@flax.struct.dataclass
class Transitions:
  """Minibatches of transitions: leading axes [num_updates, accumulation, M].

  Attributes:
    latents: [..., C, h, w] x_t; next_latents: [..., C, h, w] x_{t-1};
    timesteps: int32 [...] t; old_log_probs: [...] log p_θold(x_{t-1} | x_t, c);
    advantages: [...] the trajectory's advantage; context: [..., L, D].
  """

  latents: jax.Array
  next_latents: jax.Array
  timesteps: jax.Array
  old_log_probs: jax.Array
  advantages: jax.Array
  context: jax.Array


def make_transitions(rollouts: update.Rollouts, key: jax.Array, settings: update.UpdateSettings) -> Transitions:
  """Shuffles trajectories and their timesteps, subsamples, and lays out minibatches."""
  num_trajectories, num_steps = rollouts.log_probs.shape
  trajectory_key, time_key = jax.random.split(key)
  order = jax.random.permutation(trajectory_key, num_trajectories)
  time_keys = jax.random.split(time_key, num_trajectories)
  steps = jax.vmap(lambda k: jax.random.permutation(k, num_steps))(time_keys)[:, : settings.num_timesteps_kept]
  rows = order[:, None]  # [N, 1]
  steps = steps[order]  # [N, K]
  time_major = functools.partial(update.time_major, settings=settings)
  num_kept = settings.num_timesteps_kept
  return Transitions(
    latents=time_major(rollouts.latents[rows, steps]),
    next_latents=time_major(rollouts.latents[rows, steps + 1]),
    timesteps=time_major(rollouts.timesteps[steps]),
    old_log_probs=time_major(rollouts.log_probs[rows, steps]),
    advantages=time_major(update.per_example(rollouts.weights[order], num_kept)),
    context=time_major(update.per_example(rollouts.context[order], num_kept)),
  )


def transition_distribution(
  model: models.DiffusionModel,
  unet: Any,
  minibatch: Transitions,
  negative_context: jax.Array,
  sampler: sampling.SamplerSettings,
  remat: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """The guided policy's Gaussian p(x_{t-1} | x_t, c) of given transitions:
  mean [M, C, h, w] and std [M, 1, 1, 1] (see `ddim.ddim_mean_and_std`)."""
  output = sampling.guided_noise(
    model,
    unet,
    minibatch.latents,
    minibatch.timesteps,
    minibatch.context,
    negative_context,
    sampler.guidance_scale,
    remat=remat,
  )
  return ddim.ddim_mean_and_std(output, minibatch.timesteps, minibatch.latents, **sampling.ddim_kwargs(model, sampler))


def transition_log_probs(
  model: models.DiffusionModel,
  unet: Any,
  minibatch: Transitions,
  negative_context: jax.Array,
  sampler: sampling.SamplerSettings,
  remat: bool = False,
) -> jax.Array:
  """log p_θ(x_{t-1} | x_t, c) of given transitions [M], with the sampling CFG."""
  mean, std = transition_distribution(model, unet, minibatch, negative_context, sampler, remat)
  return ddim.gaussian_log_prob(minibatch.next_latents, mean, std)


def policy_loss(
  model: models.DiffusionModel,
  unet: Any,
  minibatch: Transitions,
  negative_context: jax.Array,
  settings: update.UpdateSettings,
  reference: Any = None,
  *,
  objective,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`objective` (clipped IS or score function) of the minibatch's log-probs, plus kl_coef × KL.

  Returns:
    (loss, metrics): metrics hold the objective's diagnostics, "loss" (the
    total) and, with KL, "kl_to_reference" (the minibatch mean of
    `ddim.gaussian_kl` to the frozen `reference` UNet).
  """
  mean, std = transition_distribution(model, unet, minibatch, negative_context, settings.sampler, settings.remat)
  log_probs = ddim.gaussian_log_prob(minibatch.next_latents, mean, std)
  loss, metrics = objective(log_probs, minibatch.old_log_probs, minibatch.advantages, settings.clip_range)
  if settings.kl_coef > 0:
    # The reference is the pretrained model (with LoRA: the adapters switched off); σ is the same for both.
    reference_mean, _ = transition_distribution(
      model, jax.lax.stop_gradient(reference), minibatch, negative_context, settings.sampler
    )
    kl = ddim.gaussian_kl(mean, jax.lax.stop_gradient(reference_mean), std).mean()
    loss = loss + settings.kl_coef * kl
    metrics = dict(metrics, kl_to_reference=kl)
  return loss, dict(metrics, loss=loss)


def stat_tracking_advantages(
  prompts: list[str], scored: rewards.ScoredBatch, tracker, clip: float, epoch: int
) -> np.ndarray:
  """float32 [N] advantages of every process's samples, per prompt (`tracker`) or by the batch (None);
  0 for dropped samples, which take no part in the statistics either."""
  base.valid_rewards(scored, epoch)
  advantages = np.zeros(len(prompts), np.float32)
  kept = [p for p, v in zip(prompts, scored.valid) if v]
  advantages[scored.valid] = advantages_lib.compute_advantages(kept, scored.rewards[scored.valid], tracker, clip)
  return advantages


def group_relative_advantages(
  scored: rewards.ScoredBatch, group_size: int, group_std: str, clip: float, epoch: int
) -> tuple[np.ndarray, dict[str, float]]:
  """float32 [N] group-relative advantages of every process's samples (in
  global order, groups of `group_size` consecutive rows), clipped to ±clip,
  and {"group_tied_fraction": the fraction of groups whose rewards all tie}."""
  advantages, tied = advantages_lib.group_advantages(base.valid_rewards(scored, epoch), group_size, group_std)
  return np.clip(advantages, -clip, clip).astype(np.float32), {"group_tied_fraction": float(tied.mean())}


def advantages(
  scored: rewards.ScoredBatch, prompts: list[str], tracker, config: ml_collections.ConfigDict, epoch: int
) -> tuple[np.ndarray, dict[str, float]]:
  """The trajectories' advantages as config.train.advantages says."""
  t = config.train
  if t.advantages == "group":
    return group_relative_advantages(scored, config.sample.group_size, t.group_std, t.adv_clip_max, epoch)
  return stat_tracking_advantages(prompts, scored, tracker, t.adv_clip_max, epoch), {}


def _examples(model, rollouts, key, settings):
  del model
  return make_transitions(rollouts, key, settings)


def _check_one_step(config: ml_collections.ConfigDict) -> str | None:
  """DDPO_SF is on-policy: one gradient step per batch of fresh samples."""
  t = config.train
  transitions = update.num_transitions(config)
  if t.num_inner_epochs != 1 or transitions != t.batch_size * t.gradient_accumulation_steps:
    return (
      "config.train.method='ddpo_sf' takes one gradient step per batch of fresh samples: set "
      f"config.train.num_inner_epochs=1 and config.train.gradient_accumulation_steps={transitions // t.batch_size}."
    )
  return None


DDPO_IS = base.register(
  base.Method(
    name="ddpo_is",
    make_examples=_examples,
    loss=functools.partial(policy_loss, objective=objectives.clipped_importance_loss),
    trajectory_weights=advantages,
  )
)
DDPO_SF = base.register(
  base.Method(
    name="ddpo_sf",
    make_examples=_examples,
    loss=functools.partial(policy_loss, objective=objectives.score_function_loss),
    trajectory_weights=advantages,
    check_config=_check_one_step,
  )
)
