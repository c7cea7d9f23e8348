r"""`python -m benchmarks train`: training throughput, ours against the PyTorch reference.

    python -m benchmarks train --size=tiny
    python -m benchmarks train --size=mid --minibatch=16

One inner epoch over one sampling call's transitions (B x T): the Trainer's
compiled `make_transitions` and optimiser steps (forward and backward of
every transition, one AdamW step); the reference does one forward and
backward pass per timestep on minibatches of --reference_minibatch
trajectories. See benchmarks/speed.py.
"""

from __future__ import annotations

from absl import app

from benchmarks import speed

define_flags = speed.define_flags


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  s, use_reference, peak = speed.start()
  import jax
  import numpy as np

  args = speed.sampler_args(s)
  trajectory, context, images = jax.block_until_ready(s.jitted.sample(*args))
  advantages = np.random.default_rng(0).standard_normal(s.batch_size).astype(np.float32)
  rollouts = speed.make_rollouts(s, trajectory, context, advantages)
  negative_context = s.negative_context(args[0])
  key = jax.random.PRNGKey(1)
  state = [s.init_state()]
  make_transitions, transitions_s = speed.compile_ahead(s.jitted.make_examples, rollouts, key)
  transitions = make_transitions(rollouts, key)
  step_args = (state[0], transitions, np.int32(0), negative_context, None)
  step, step_s = speed.compile_ahead(s.jitted.optimizer_step, *step_args)

  def ours():
    batch = make_transitions(rollouts, key)
    for index in range(s.num_updates):
      state[0], metrics = step(state[0], batch, np.int32(index), negative_context, None)
    jax.block_until_ready((state[0], metrics))

  runs = {"ours": ours}
  if use_reference:
    from benchmarks import reference

    ref = reference.convert(s.model, s.params, speed.reference_options())
    speed.emit(
      dict(speed.check_against_reference(s, ref, trajectory, context, negative_context, images), **s.describe())
    )
    optimizer = reference.make_optimizer(ref)
    host = [np.asarray(x) for x in (trajectory.latents, trajectory.log_probs, trajectory.timesteps, context)]
    host_negative = np.asarray(negative_context)
    kwargs = dict(
      trajectories_per_minibatch=s.reference_minibatch, num_updates=s.num_updates, **speed.reference_kwargs(s)
    )
    runs["reference"] = lambda: reference.train_inner_epoch(ref, optimizer, *host, host_negative, advantages, **kwargs)
  seconds = speed.interleaved(runs, speed.FLAGS.repeats, speed.FLAGS.warmup)
  num_minibatches = s.num_updates * s.config.train.gradient_accumulation_steps
  if s.settings.unroll_accumulation:  # the step's cost analysis counts every minibatch
    flops = speed.flops_of(step) * s.num_updates
  else:  # XLA's cost analysis counts a loop's body once
    flops = speed.minibatch_flops(s, transitions, negative_context) * num_minibatches
  num_transitions = s.batch_size * s.num_steps
  records = {}
  for name, values in seconds.items():
    median = speed.median(values)
    record = dict(
      s.describe(),
      bench="train",
      impl="ddpo_jax" if name == "ours" else "torch_reference",
      seconds=median,
      seconds_all=values,
      transitions=num_transitions,
      transitions_per_s=num_transitions / median,
      optimizer_steps=s.num_updates,
    )
    if name == "ours":
      record.update(
        minibatch=int(s.config.train.batch_size),
        compile_s=transitions_s + step_s,
        peak_mb=speed.peak_mb(step),
        **speed.flops_fields(flops, median, peak),
      )
    else:
      record.update(
        minibatch_trajectories=s.reference_minibatch,
        **speed.reference_fields(speed.reference_options()),
        **speed.flops_fields(flops, median, peak),
      )
    records[name] = record
    speed.emit(record)
  if "reference" in records:
    speed.emit(speed.ratio_record("train", records["ours"], records["reference"], ["transitions_per_s"]))
