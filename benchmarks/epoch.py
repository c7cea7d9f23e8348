r"""`python -m benchmarks epoch`: an epoch's wall time against the sum of its device work.

    python -m benchmarks epoch --size=tiny --num_batches=2

An epoch as the training loop runs it: --num_batches sampling calls
dispatched back to back, each batch's JPEG-compressibility rewards computed
on the host in a thread as soon as its images arrive, batch-normalised
advantages, and one inner epoch. Its wall time is compared with its device
work measured alone in the same run (sampling calls x num_batches + the inner
epoch): overhead = wall / device work (1.0: the host adds nothing). The
reference runs the same epoch sequentially (DDPO's PyTorch loop).
"""

from __future__ import annotations

import concurrent.futures

from absl import app

from benchmarks import speed

define_flags = speed.define_flags


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  num_batches = speed.FLAGS.num_batches
  s, use_reference, _ = speed.start(num_batches)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ddpo_jax import advantages as advantages_lib
  from ddpo_jax import rewards as rewards_lib
  from ddpo_jax import update

  reward_fn = rewards_lib.make("jpeg_compressibility")
  pool = concurrent.futures.ThreadPoolExecutor(1)
  params, _, token_ids, negative_ids, key = speed.sampler_args(s)
  run = [None]  # the trainer's steps, compiled ahead within the first epoch's time (as a run compiles before epoch 0)
  state = [s.init_state()]
  negative_context = s.negative_context(params)

  def sample(b):
    return run[0].sample(params, None, token_ids, negative_ids, jax.random.fold_in(key, b))

  def train(rollouts):
    state[0], metrics = run[0].train_inner_epoch(state[0], rollouts, negative_context, key)
    return metrics

  def ours_epoch():
    batches = [sample(b) for b in range(num_batches)]  # dispatched asynchronously
    futures = [pool.submit(lambda images: reward_fn(np.asarray(images), s.prompts), b[2]) for b in batches]
    advantages = advantages_lib.normalize(np.concatenate([f.result() for f in futures]))
    rollouts = update.Rollouts(
      latents=jnp.concatenate([b[0].latents for b in batches]),
      log_probs=jnp.concatenate([b[0].log_probs for b in batches]),
      timesteps=batches[0][0].timesteps,
      context=jnp.concatenate([b[1] for b in batches]),
      weights=jnp.asarray(advantages),
    )
    jax.block_until_ready(train(rollouts))

  def first_epoch():
    run[0] = s.build_steps()
    ours_epoch()

  _, first_epoch_s = speed.timed(first_epoch)
  batches = jax.block_until_ready([sample(b) for b in range(num_batches)])
  advantages = np.random.default_rng(0).standard_normal(s.batch_size * num_batches).astype(np.float32)
  fixed = update.Rollouts(
    latents=jnp.concatenate([b[0].latents for b in batches]),
    log_probs=jnp.concatenate([b[0].log_probs for b in batches]),
    timesteps=batches[0][0].timesteps,
    context=jnp.concatenate([b[1] for b in batches]),
    weights=jnp.asarray(advantages),
  )
  runs = {
    "ours": ours_epoch,
    "ours_sample_alone": lambda: jax.block_until_ready(sample(0)),
    "ours_train_alone": lambda: jax.block_until_ready(train(fixed)),
  }
  if use_reference:
    from benchmarks import reference

    ref = reference.convert(s.model, s.params, speed.reference_options())
    optimizer = reference.make_optimizer(ref)
    kwargs = speed.reference_kwargs(s)
    host_tokens, host_negative_ids = np.asarray(token_ids), np.asarray(negative_ids)
    timesteps = np.asarray(batches[0][0].timesteps)
    host_negative = np.asarray(negative_context)

    def reference_epoch():
      outs = [
        reference.rollout(ref, host_tokens, host_negative_ids, timesteps, seed=b, **kwargs) for b in range(num_batches)
      ]
      rewards = np.concatenate([reward_fn(images, s.prompts) for _, _, images in outs])
      context = reference.encode(ref, np.concatenate([host_tokens] * num_batches)).numpy()
      reference.train_inner_epoch(
        ref,
        optimizer,
        np.concatenate([o[0] for o in outs]),
        np.concatenate([o[1] for o in outs]),
        timesteps,
        context,
        host_negative,
        advantages_lib.normalize(rewards),
        trajectories_per_minibatch=s.reference_minibatch,
        num_updates=s.num_updates,
        **kwargs,
      )

    runs["reference"] = reference_epoch
  seconds = speed.interleaved(runs, speed.FLAGS.repeats, speed.FLAGS.warmup)
  device_s = num_batches * speed.median(seconds["ours_sample_alone"]) + speed.median(seconds["ours_train_alone"])
  num_samples = s.batch_size * num_batches
  ours = dict(
    s.describe(),
    bench="epoch",
    impl="ddpo_jax",
    num_batches=num_batches,
    seconds=speed.median(seconds["ours"]),
    seconds_all=seconds["ours"],
    first_epoch_s=first_epoch_s,
    device_work_s=device_s,
    sample_call_s=speed.median(seconds["ours_sample_alone"]),
    train_s=speed.median(seconds["ours_train_alone"]),
  )
  ours.update(overhead=ours["seconds"] / device_s, samples_per_s=num_samples / ours["seconds"])
  speed.emit(ours)
  if use_reference:
    ref_record = dict(
      s.describe(),
      bench="epoch",
      impl="torch_reference",
      num_batches=num_batches,
      seconds=speed.median(seconds["reference"]),
      seconds_all=seconds["reference"],
      **speed.reference_fields(speed.reference_options()),
    )
    ref_record["samples_per_s"] = num_samples / ref_record["seconds"]
    speed.emit(ref_record)
    speed.emit(speed.ratio_record("epoch", ours, ref_record, ["samples_per_s"]))
