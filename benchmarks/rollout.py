r"""`python -m benchmarks rollout`: sampling throughput, ours against the PyTorch reference.

    python -m benchmarks rollout --size=tiny
    python -m benchmarks rollout --size=mid --repeats=3

One sampling call (text encoding, T guided DDIM steps with log-probs, VAE
decoding) of the Trainer's compiled sampler; see benchmarks/speed.py for
the figures and the reference.
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
  sampler, compile_s = speed.compile_ahead(s.jitted.sample, *args)
  trajectory, context, images = jax.block_until_ready(sampler(*args))
  negative_context = s.negative_context(args[0])
  runs = {"ours": lambda: jax.block_until_ready(sampler(*args))}
  if use_reference:
    from benchmarks import reference

    ref = reference.convert(s.model, s.params, speed.reference_options())
    speed.emit(
      dict(speed.check_against_reference(s, ref, trajectory, context, negative_context, images), **s.describe())
    )
    token_ids, negative_ids = np.asarray(args[2]), np.asarray(args[3])
    timesteps = np.asarray(trajectory.timesteps)
    kwargs = speed.reference_kwargs(s)
    runs["reference"] = lambda: reference.rollout(ref, token_ids, negative_ids, timesteps, seed=0, **kwargs)
  seconds = speed.interleaved(runs, speed.FLAGS.repeats, speed.FLAGS.warmup)
  flops = speed.rollout_flops(s, context, negative_context)
  records = {}
  for name, values in seconds.items():
    median = speed.median(values)
    record = dict(
      s.describe(),
      bench="rollout",
      impl="ddpo_jax" if name == "ours" else "torch_reference",
      seconds=median,
      seconds_all=values,
      images_per_s=s.batch_size / median,
      steps_per_s=s.num_steps / median,
    )
    if name == "ours":
      record.update(compile_s=compile_s, peak_mb=speed.peak_mb(sampler), **speed.flops_fields(flops, median, peak))
    else:
      record.update(
        torch_threads=reference.num_threads(),
        **speed.reference_fields(speed.reference_options()),
        **speed.flops_fields(flops, median, peak),
      )
    records[name] = record
    speed.emit(record)
  if speed.FLAGS.compile_steps:
    steps = [int(n) for n in speed.FLAGS.compile_steps]
    by_steps = speed.compile_seconds_by_steps(s, args, steps, max(1, speed.FLAGS.repeats))
    record = dict(s.describe(), bench="compile", impl="ddpo_jax", what="sampler: lower + compile, per step count")
    record.update({f"compile_s_{n}_steps": speed.median(v) for n, v in by_steps.items()})
    record[f"ratio_{steps[-1]}_to_{steps[0]}"] = speed.median(by_steps[steps[-1]]) / speed.median(by_steps[steps[0]])
    speed.emit(record)
  if "reference" in records:
    speed.emit(speed.ratio_record("rollout", records["ours"], records["reference"], ["images_per_s", "steps_per_s"]))
