r"""Speed benchmarks shared by `python -m benchmarks rollout|train|epoch`.

    python -m benchmarks rollout --size=tiny
    python -m benchmarks train --size=mid --repeats=3
    python -m benchmarks epoch --size=tiny --noreference
    python -m benchmarks rollout --size=config --config=configs/compress.py --noreference   # SD v1.4, on a TPU

The model has random weights: `--size=tiny` (UNet 0.8M params, 16x16 latents,
batch 16, 10 steps), `--size=mid` (12.5M params, 3 levels, 32x32 latents,
batch 8, 10 steps) or `--size=config` (the model of --config, e.g. SD v1.4,
built from its architecture without downloading weights). CFG is on (the
config's guidance scale), eta 1.

Each measurement is one JSON line on stdout. With --reference (the default
when torch is importable) the PyTorch reference (benchmarks/reference.py:
the same modules with our weights converted, run in the design of DDPO's
PyTorch code) runs in the same process, its repetitions interleaved with ours
(ours, reference, ours, ...) so that a busy machine slows both alike, and a
"ratio" line gives ours / reference for each throughput. Before timing, a
"check" line compares the two implementations' log-probabilities of the same
transitions (and their images of the same latents): the race is only fair if
both compute the same policy.

Figures of a line (seconds are medians over --repeats, after --warmup runs):
  rollout: seconds of one sampling call (text encoding, T guided DDIM steps,
    VAE decoding), images_per_s, steps_per_s (batched denoising steps);
  train: seconds of one inner epoch over a batch's transitions (forward and
    backward of every transition, the optimiser steps), transitions_per_s;
  epoch: an epoch's wall time (sampling calls, rewards on the host, advantages,
    the inner epoch) against the sum of its device work measured alone;
  and for ours: compile_s (lower + compile), peak_mb (XLA's memory analysis:
  arguments + outputs - aliased + temporaries), flops (XLA's cost analysis of
  one denoising step x T + decoding; of one minibatch's forward and backward
  pass x minibatches), flops_per_s and its fraction of matmul_peak_flops_per_s
  (a big jnp.dot timed on the device).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any
from typing import Callable

from absl import flags
from absl import logging
from ml_collections import config_flags

from ddpo_jax.toy import architecture as toy_architecture

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Preset:
  """A model size and its batch: UNet, VAE and text-encoder configs (diffusers' / transformers' fields)."""

  unet: dict[str, Any]
  vae: dict[str, Any]
  text: dict[str, Any]
  batch_size: int
  num_steps: int
  # Transitions per training minibatch (ours) and trajectories per minibatch (the reference).
  minibatch: int
  reference_minibatch: int = 4


# The shipped toy model's components (ddpo_jax/toy/architecture.py), resized.
_VAE = {k: v for k, v in toy_architecture.VAE_CONFIG.items() if k != "sample_size"}
PRESETS = {
  "tiny": Preset(
    unet=dict(toy_architecture.UNET_CONFIG, sample_size=16),
    vae=dict(_VAE, sample_size=64),
    text=dict(toy_architecture.TEXT_CONFIG),
    batch_size=16,
    num_steps=10,
    minibatch=40,
  ),
  "mid": Preset(
    unet=dict(
      sample_size=32,
      in_channels=4,
      out_channels=4,
      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
      block_out_channels=(64, 128, 256),
      layers_per_block=1,
      attention_head_dim=8,
      cross_attention_dim=32,
    ),
    vae=dict(_VAE, sample_size=128),
    text=dict(toy_architecture.TEXT_CONFIG),
    batch_size=8,
    num_steps=10,
    minibatch=16,
  ),
}
# The smallest model, for the CI smoke test.
PRESETS["test"] = dataclasses.replace(
  PRESETS["tiny"],
  unet=dict(PRESETS["tiny"].unet, sample_size=8, block_out_channels=(32, 32)),
  vae=dict(_VAE, block_out_channels=(16, 16, 16), norm_num_groups=8, sample_size=32),
  batch_size=4,
  num_steps=2,
  minibatch=4,
  reference_minibatch=2,
)
PROMPT_TOKENS = 16


def _torch_available() -> bool:
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """The flags of the rollout, train and epoch subcommands."""
  config_flags.DEFINE_config_file(
    "config",
    "configs/compress.py:tiny",
    "The config whose sampling and training settings (and with --size=config, model) are benchmarked.",
    lock_config=True,
    flag_values=flag_values,
  )
  flags.DEFINE_enum(
    "size", "tiny", ["tiny", "mid", "test", "config"], "Model size (see the module docstring).", flag_values=flag_values
  )
  flags.DEFINE_integer("batch_size", 0, "Samples per sampling call; 0: the size's.", flag_values=flag_values)
  flags.DEFINE_integer("num_steps", 0, "DDIM steps; 0: the size's.", flag_values=flag_values)
  flags.DEFINE_integer(
    "minibatch", 0, "Transitions per training minibatch (ours); 0: the size's.", flag_values=flag_values
  )
  flags.DEFINE_integer(
    "reference_minibatch", 0, "Trajectories per minibatch of the reference; 0: the size's.", flag_values=flag_values
  )
  flags.DEFINE_integer("num_batches", 2, "Sampling calls per epoch (epoch subcommand).", flag_values=flag_values)
  flags.DEFINE_integer("repeats", 3, "Timed repetitions of each implementation.", flag_values=flag_values)
  flags.DEFINE_integer("warmup", 1, "Untimed repetitions before timing.", flag_values=flag_values)
  flags.DEFINE_bool(
    "reference", None, "Run the PyTorch reference too (default: when torch is importable).", flag_values=flag_values
  )
  flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"], "Compute dtype of our modules.", flag_values=flag_values
  )
  flags.DEFINE_string("xla_flags", "", "Appended to XLA_FLAGS before jax starts.", flag_values=flag_values)
  flags.DEFINE_string(
    "compilation_cache_dir", "", "jax's persistent compilation cache (empty: off).", flag_values=flag_values
  )
  flags.DEFINE_list(
    "compile_steps",
    [],
    "rollout: also compile the sampler for these step counts (e.g. 10,50), alternately, and report each's seconds.",
    flag_values=flag_values,
  )
  flags.DEFINE_string(
    "omp_wait_policy",
    "PASSIVE",
    "OMP_WAIT_POLICY of torch's OpenMP threads (empty: the library's default). On a shared machine the default "
    "spinning makes the reference 5-8x slower (measured: tiny rollout 26-33 s against 3.5 s passive).",
    flag_values=flag_values,
  )
  flags.DEFINE_integer(
    "torch_threads", 0, "torch.set_num_threads for the reference; 0: torch's default.", flag_values=flag_values
  )
  flags.DEFINE_enum(
    "torch_attention",
    "sdpa",
    ["sdpa", "math"],
    "The reference's attention: diffusers' AttnProcessor2_0 (scaled_dot_product_attention) or AttnProcessor.",
    flag_values=flag_values,
  )
  flags.DEFINE_bool(
    "torch_channels_last", False, "The reference's UNet in channels_last memory order.", flag_values=flag_values
  )
  flags.DEFINE_bool(
    "torch_compile",
    False,
    "torch.compile the reference's UNet (its compilation falls in the fairness check and the warm-up runs, "
    "outside the timed medians).",
    flag_values=flag_values,
  )
  flags.DEFINE_integer(
    "matmul_size", 2048, "n of the n x n matmul that measures the peak FLOP/s.", flag_values=flag_values
  )


# ----------------------------------------------------------------------------
# Set-up: jax, the model, the Trainer.
# ----------------------------------------------------------------------------


def start_jax(xla_flags: str, cache_dir: str, omp_wait_policy: str = ""):
  """Sets XLA_FLAGS and the compilation cache before jax's backend starts (and
  OMP_WAIT_POLICY before anything loads torch's OpenMP runtime)."""
  if omp_wait_policy:
    os.environ["OMP_WAIT_POLICY"] = omp_wait_policy
  if xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags).strip()
  import jax

  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return jax


def build_model(size: str, config, dtype: str, seed: int = 0):
  """(DiffusionModel, params) with random weights: a preset's, or the config's model's architecture."""
  import jax

  from ddpo_jax import models

  if size == "config":
    from ddpo_jax.models import architectures

    configs = architectures.component_configs(config.model.name)
    model = architectures.build_modules(configs, dtype)
    shapes = architectures.abstract_params(model)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(jax.tree.leaves(shapes))))
    params = jax.tree.map(lambda s: 0.02 * jax.random.normal(next(keys), s.shape, s.dtype), shapes)
    return model, params
  from ddpo_jax.toy import shapes as toy_shapes

  preset = PRESETS[size]
  tokenizer = models.build_tokenizer(toy_shapes.vocabulary(), tempfile.mkdtemp(), max_length=PROMPT_TOKENS)
  model, params = models.build(preset.unet, preset.vae, preset.text, tokenizer, seed, dtype=dtype)
  return model, params


@dataclasses.dataclass
class Setup:
  """What every subcommand needs: the model, the run's jitted steps (ddpo_jax.steps) and its settings.

  `model` carries the attention the config resolves to; `config` its resolved "auto" settings.
  """

  size: str
  model: Any
  params: Any
  config: Any
  mesh: Any
  layout: Any
  jitted: Any
  prompts: list[str]
  reference_minibatch: int

  @property
  def settings(self):
    from ddpo_jax import steps

    return steps.update_settings(self.config)

  @property
  def num_updates(self) -> int:
    from ddpo_jax import update

    return update.num_updates_per_inner_epoch(self.config)

  @property
  def negative_tokens(self):
    from ddpo_jax import models

    return models.tokenize(self.model, [""])[0]

  def negative_context(self, params):
    return self.jitted.encode(params["text_encoder"], self.negative_tokens[None])[0]

  def init_state(self):
    import jax

    from ddpo_jax import train_state

    unet = jax.device_put(self.params["unet"], self.layout.unet_sharding, may_alias=False)
    return self.jitted.init_state(unet, train_state.adapter_key(self.config.seed))

  def build_steps(self):
    """The trainer's steps compiled ahead (`steps.build`), as a run compiles them."""
    from ddpo_jax import steps

    frozen = {"vae": self.params["vae"], "text_encoder": self.params["text_encoder"]}
    return steps.build(self.config, self.model, self.mesh, self.layout, frozen)

  @property
  def batch_size(self) -> int:
    return int(self.config.sample.batch_size)

  @property
  def num_steps(self) -> int:
    return int(self.config.sample.num_steps)

  def describe(self) -> dict[str, Any]:
    import jax

    from ddpo_jax.models import architectures

    return {
      "size": self.size,
      "unet_params": architectures.num_params(self.params["unet"]),
      "latent_size": self.model.latent_size,
      "image_size": self.model.image_size,
      "batch_size": self.batch_size,
      "num_steps": self.num_steps,
      "guidance_scale": float(self.config.sample.guidance_scale),
      "dtype": str(self.config.model.dtype),
      # --config.model.attention and --config.model.attention_block_mb set them.
      "attention": self.model.attention,
      "attention_block_mb": self.model.attention_block_bytes / 2**20,
      "device": jax.devices()[0].device_kind,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
      # The machine's load when the line is written (a shared machine slows both implementations).
      "load_average_1min": os.getloadavg()[0],
    }


PAPER_CLIP_RANGE = 1e-4


def bench_config(config, preset: Preset | None, overrides: dict[str, int], num_batches: int, dtype: str):
  """The config with the size's batch, steps and minibatch (flags > preset > config), one device."""
  config = config.copy_and_resolve_references()
  config.unlock()
  pick = lambda flag, preset_value, current: flag or (preset_value if preset else current)
  batch = pick(overrides["batch_size"], preset and preset.batch_size, config.sample.batch_size)
  steps = pick(overrides["num_steps"], preset and preset.num_steps, config.sample.num_steps)
  minibatch = pick(overrides["minibatch"], preset and preset.minibatch, config.train.batch_size)
  transitions = batch * num_batches * steps
  if transitions % minibatch:
    raise ValueError(f"--minibatch={minibatch} must divide the {transitions} transitions of an epoch")
  config.model.dtype = dtype
  config.mesh.data, config.mesh.fsdp = 1, 1
  config.sample.batch_size = batch
  config.sample.num_steps = steps
  config.sample.eta = 1.0
  config.sample.num_batches_per_epoch = num_batches
  config.sample.group_size = 1
  config.train.batch_size = minibatch
  # One optimiser step per inner epoch, over all its transitions.
  config.train.gradient_accumulation_steps = transitions // minibatch
  config.train.timestep_fraction = 1.0
  config.train.num_inner_epochs = 1
  # The paper's clip range, whatever the config's: the log-prob check's tolerance (ratios within
  # 1 ± clip_range are clipped alike), and what ddpo-pytorch's loop uses.
  config.train.clip_range = PAPER_CLIP_RANGE
  config.lora.rank = 0
  config.train.kl_coef = 0.0
  config.train.ema_decay = 0.0
  return config


def bench_prompts(batch_size: int) -> list[str]:
  """The bench's prompts: 4 toy-world words each, drawn from a fixed seed."""
  import numpy as np

  from ddpo_jax.toy import shapes as toy_shapes

  rng = np.random.default_rng(0)
  return [" ".join(rng.choice(toy_shapes.vocabulary(), 4)) for _ in range(batch_size)]


def setup(num_batches: int = 1) -> Setup:
  """The Setup of this run's flags."""
  import jax

  from ddpo_jax import sharding
  from ddpo_jax import steps

  preset = PRESETS.get(FLAGS.size)
  overrides = {k: getattr(FLAGS, k) for k in ("batch_size", "num_steps", "minibatch")}
  config = bench_config(FLAGS.config, preset, overrides, num_batches, FLAGS.dtype)
  model, params = build_model(FLAGS.size, config, FLAGS.dtype, config.seed)
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  config, model, layout = steps.configure(config, model, params["unet"], mesh)
  jitted = steps.jit(config, model, mesh, layout)
  prompts = bench_prompts(config.sample.batch_size)
  reference_minibatch = FLAGS.reference_minibatch or (preset.reference_minibatch if preset else 4)
  return Setup(FLAGS.size, model, params, config, mesh, layout, jitted, prompts, reference_minibatch)


def want_reference() -> bool:
  if FLAGS.reference is None:
    return _torch_available()
  if FLAGS.reference and not _torch_available():
    raise ImportError("--reference needs torch: pip install -e '.[bench]'")
  return FLAGS.reference


# ----------------------------------------------------------------------------
# Timing, FLOPs, memory.
# ----------------------------------------------------------------------------


def emit(record: dict[str, Any]) -> None:
  """One measurement: a JSON line on stdout."""
  sys.stdout.write(json.dumps(record) + "\n")
  sys.stdout.flush()


def interleaved(runs: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list[float]]:
  """Seconds of each callable, repetitions alternating between them (a, b, a, b, ...)."""
  for _ in range(warmup):
    for run in runs.values():
      run()
  seconds = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      seconds[name].append(time.perf_counter() - start)
  return seconds


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def median(values: list[float]) -> float:
  return float(statistics.median(values))


def compile_ahead(jitted, *args):
  """(compiled, seconds of lower + compile)."""
  return timed(lambda: jitted.lower(*args).compile())


def flops_of(compiled) -> float:
  """XLA's cost-analysis FLOPs of a compiled function (0 when the backend gives none)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def peak_mb(compiled) -> float | None:
  """Arguments + outputs - aliased + temporaries of a compiled function, in MiB."""
  memory = compiled.memory_analysis()
  if memory is None:
    return None
  total = (
    memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + memory.temp_size_in_bytes
  )
  return round(total / 2**20, 1)


def matmul_peak_flops(n: int, dtype: str, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` n x n x n matmuls on the default device."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.dtype(dtype))
  dot = jax.jit(jnp.dot)
  dot(a, a).block_until_ready()
  best = min(timed(lambda: dot(a, a).block_until_ready())[1] for _ in range(repeats))
  return 2.0 * n**3 / best


def flops_fields(flops: float, seconds: float, peak: float) -> dict[str, float]:
  rate = flops / seconds if seconds > 0 else 0.0
  return {
    "flops": flops,
    "flops_per_s": rate,
    "matmul_peak_flops_per_s": peak,
    "peak_fraction": rate / peak if peak else 0.0,
  }


def ratio_record(bench: str, ours: dict[str, Any], ref: dict[str, Any], keys: list[str]) -> dict[str, Any]:
  """ours / reference of each throughput (> 1: ours is faster) and reference / ours of seconds."""
  record = {"bench": bench, "impl": "ratio", "note": "ours / reference throughput; > 1: ours faster"}
  for key in keys:
    if ref.get(key):
      record[key] = ours[key] / ref[key]
  if ours.get("seconds"):
    record["speedup"] = ref["seconds"] / ours["seconds"]
  return record


# ----------------------------------------------------------------------------
# Our functions, compiled ahead, and their FLOPs.
# ----------------------------------------------------------------------------


def compile_seconds_by_steps(s: Setup, args, steps: list[int], repeats: int) -> dict[int, list[float]]:
  """Seconds of lowering and compiling the sampler for each step count, the counts alternating."""
  import dataclasses as dc

  import jax

  from ddpo_jax import sampling

  params, _, token_ids, negative_ids, key = args
  seconds = {n: [] for n in steps}
  for _ in range(repeats):
    for n in steps:
      settings = dc.replace(s.settings.sampler, num_steps=n)
      jax.clear_caches()
      sampler = sampling.make_sampler(s.model, settings)
      seconds[n].append(compile_ahead(sampler, params, token_ids, negative_ids, key)[1])
  return seconds


def sampler_args(s: Setup, seed: int = 0):
  import jax

  from ddpo_jax import models
  from ddpo_jax import sharding

  token_ids = sharding.host_to_global(models.tokenize(s.model, s.prompts), sharding.batch(s.mesh))
  replicated = sharding.replicated(s.mesh)
  params_sharding = {"unet": s.layout.state_sharding.params, "vae": replicated, "text_encoder": replicated}
  params = jax.device_put(s.params, params_sharding)
  return (params, None, token_ids, s.negative_tokens, jax.random.PRNGKey(seed))


def rollout_flops(s: Setup, context, negative_context) -> float:
  """One guided DDIM step's FLOPs x T, plus the VAE decoding's (XLA cost analysis).

  Counted per part: XLA's cost analysis counts a while loop's body once.
  """
  import jax
  import jax.numpy as jnp

  from ddpo_jax import ddim
  from ddpo_jax import models
  from ddpo_jax import sampling

  settings = s.settings.sampler
  kwargs = sampling.ddim_kwargs(s.model, settings)
  latents = jnp.zeros((s.batch_size, s.model.latent_channels, s.model.latent_size, s.model.latent_size))

  def step(unet, latents, key):
    t = jnp.full((latents.shape[0],), 1)
    output = sampling.guided_noise(s.model, unet, latents, t, context, negative_context, settings.guidance_scale)
    return ddim.ddim_step_with_logprob(output, t, latents, key=key, **kwargs)

  step_flops = flops_of(jax.jit(step).lower(s.params["unet"], latents, jax.random.PRNGKey(0)).compile())
  decode = jax.jit(lambda vae, x: models.decode_latents(s.model, vae, x)).lower(s.params["vae"], latents).compile()
  return step_flops * s.num_steps + flops_of(decode)


def minibatch_flops(s: Setup, transitions, negative_context) -> float:
  """FLOPs of one minibatch's loss and gradient (XLA cost analysis)."""
  import jax

  from ddpo_jax import methods

  minibatch = jax.tree.map(lambda x: x[0, 0], transitions)
  loss = methods.get(s.settings.method).loss
  grad_fn = jax.grad(lambda p, m, n: loss(s.model, p, m, n, s.settings), has_aux=True)
  compiled = jax.jit(grad_fn).lower(s.params["unet"], minibatch, negative_context).compile()
  return flops_of(compiled)


def make_rollouts(s: Setup, trajectory, context, advantages):
  import jax.numpy as jnp

  from ddpo_jax import update

  return update.Rollouts(
    latents=trajectory.latents,
    log_probs=trajectory.log_probs,
    timesteps=trajectory.timesteps,
    context=context,
    weights=jnp.asarray(advantages, jnp.float32),
  )


def reference_options():
  """The flags' benchmarks.reference.Options."""
  from benchmarks import reference

  return reference.Options(
    attention=FLAGS.torch_attention, channels_last=FLAGS.torch_channels_last, compile=FLAGS.torch_compile
  )


def reference_fields(options) -> dict[str, Any]:
  """The reference's settings, for its records."""
  return {f"torch_{k}": v for k, v in dataclasses.asdict(options).items()}


def reference_kwargs(s: Setup) -> dict[str, Any]:
  from ddpo_jax import sampling

  return dict(
    step_ratio=sampling.step_ratio(s.model, s.num_steps),
    eta=float(s.config.sample.eta),
    guidance_scale=float(s.config.sample.guidance_scale),
  )


def check_against_reference(s: Setup, ref, trajectory, context, negative_context, images) -> dict[str, Any]:
  """Both implementations' log-probs of our rollout's transitions, and images of its final latents.

  Tolerance: the PPO clip range. A log-prob difference below it (a ratio
  within 1 ± clip_range) means both clip the same transitions of the first
  minibatch, so they optimise the same objective.
  """
  import jax
  import numpy as np

  from benchmarks import reference
  from ddpo_jax.methods import ddpo

  latents = np.asarray(trajectory.latents)  # [B, T+1, C, h, w]
  batch, num_steps = np.asarray(trajectory.log_probs).shape
  rows = np.repeat(np.arange(batch), num_steps)
  steps = np.tile(np.arange(num_steps), batch)
  timesteps = np.asarray(trajectory.timesteps)[steps]
  minibatch = ddpo.Transitions(
    latents=latents[rows, steps],
    next_latents=latents[rows, steps + 1],
    timesteps=timesteps,
    old_log_probs=np.asarray(trajectory.log_probs)[rows, steps],
    advantages=np.zeros(len(rows), np.float32),
    context=np.asarray(context)[rows],
  )
  log_probs = jax.jit(lambda p, m, n: ddpo.transition_log_probs(s.model, p, m, n, s.settings.sampler))
  # In chunks of a sampling batch: all B x T transitions at once would hold T times the rollout's attention scores.
  chunks = [jax.tree.map(lambda x, i=i: x[i : i + batch], minibatch) for i in range(0, len(rows), batch)]
  ours = np.concatenate([np.asarray(log_probs(s.params["unet"], c, negative_context)) for c in chunks])
  theirs = np.concatenate(
    [
      reference.transition_log_probs(
        ref, c.latents, c.next_latents, c.timesteps, c.context, np.asarray(negative_context), **reference_kwargs(s)
      )
      for c in chunks
    ]
  )
  diff = np.abs(np.asarray(ours) - theirs)
  ref_images = reference.decode(ref, latents[:, -1])
  image_diff = int(np.abs(ref_images.astype(np.int32) - np.asarray(images).astype(np.int32)).max())
  tolerance = float(s.config.train.clip_range)
  return {
    "bench": "check",
    "transitions": len(rows),
    "log_prob_max_abs_diff": float(diff.max()),
    "log_prob_mean_abs": float(np.abs(theirs).mean()),
    "sampler_vs_reference_max_abs_diff": float(np.abs(minibatch.old_log_probs - theirs).max()),
    "tolerance": tolerance,
    "image_max_abs_diff_uint8": image_diff,
    "passed": bool(diff.max() <= tolerance),
  }


def start(num_batches: int = 1):
  """Starts jax with the flags' XLA options; the Setup, the reference wanted, and the matmul peak."""
  logging.set_verbosity(logging.WARNING)
  start_jax(FLAGS.xla_flags, FLAGS.compilation_cache_dir, FLAGS.omp_wait_policy)
  s = setup(num_batches)
  use_reference = want_reference()
  if use_reference and FLAGS.torch_threads:
    import torch

    torch.set_num_threads(FLAGS.torch_threads)
  return s, use_reference, matmul_peak_flops(FLAGS.matmul_size, FLAGS.dtype)
