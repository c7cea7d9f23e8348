r"""kvablack/ddpo-pytorch's own sampling and training loop, timed on the speed bench's models.

The yardstick of the bench's PyTorch reference (benchmarks/reference.py): the
same work as `python -m benchmarks rollout|train --size=tiny|mid`, done the
way ddpo-pytorch (commit 1958463) does it, under the library versions it was
written for. It lives in its own virtual environment, so it takes two steps.

1. In ours (ddpo_jax installed), from the repository root: write the bench's
   model (random weights, the same as the bench's `--size`) as a diffusers
   pipeline folder, with the bench's prompts and settings in bench.json:

       python -m benchmarks.ddpo_pytorch_loop export --size=tiny --out=/tmp/ddpo_tiny
       python -m benchmarks.ddpo_pytorch_loop export --size=mid --out=/tmp/ddpo_mid

2. In ddpo-pytorch's environment (Python 3.11; the CPU build of torch, e.g.
   from /opt/wheels or https://download.pytorch.org/whl/cpu):

       python3 -m venv /work/venv_ddpo17
       /work/venv_ddpo17/bin/pip install torch==2.13.0 diffusers==0.17.1 transformers==4.30.2 \
           accelerate==1.16.0 huggingface_hub==0.25.2 numpy==1.26.4
       /work/venv_ddpo17/bin/python -m benchmarks.ddpo_pytorch_loop time --model=/tmp/ddpo_tiny --what=train

   One JSON line per measurement on stdout: `seconds` (the median of
   --repeats timed runs after --warmup untimed ones) and `seconds_all`.
   To compare with the bench, alternate the two processes (this one, the
   bench, this one, ...) so that a busy machine slows both alike.

What is timed (the structure of ddpo-pytorch's scripts/train.py and its
diffusers_patch/, transcribed, full fine-tuning, float32, one process):
  * rollout: tokenise and encode the batch's prompts, then its
    `pipeline_with_logprob`: CFG on the doubled batch, T DDIM steps of eta 1
    with `ddim_step_with_logprob`, VAE decoding to a [0, 1] image tensor;
    under `torch.no_grad`, the UNet in eval mode (its params requiring grad,
    as ddpo-pytorch leaves them);
  * train: one inner epoch over one rollout's B x T transitions, under
    accelerate's `Accelerator(gradient_accumulation_steps=B / 4 x T)`: the
    samples shuffled along the batch and, per sample, along time; per
    minibatch of 4 trajectories, one forward (CFG on the doubled batch) and
    one backward pass per timestep inside `accelerator.accumulate`, the PPO
    clipped loss, the debugging values kept as tensors, the global norm
    clipped and one AdamW step at the end of the epoch.
Not timed: ddpo-pytorch's rewards, logging and its progress bars.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

# Fields of bench.json: what a bench run of that size does.
BENCH_FILE = "bench.json"


# ----------------------------------------------------------------------------
# Step 1 (our environment): the bench's model and settings.
# ----------------------------------------------------------------------------


def export(size: str, out: str) -> dict:
  """Writes the bench's model of `size` to `out` (diffusers' layout) and bench.json; returns bench.json's dict."""
  from benchmarks import speed
  from configs import compress
  from ddpo_jax import models

  preset = speed.PRESETS[size]
  config = speed.bench_config(
    compress.get_config("tiny"), preset, dict(batch_size=0, num_steps=0, minibatch=0), 1, "float32"
  )
  model, params = speed.build_model(size, config, "float32", config.seed)
  models.save(model, params, out)
  settings = {
    "size": size,
    "prompts": speed.bench_prompts(preset.batch_size),
    "num_steps": preset.num_steps,
    "guidance_scale": float(config.sample.guidance_scale),
    "eta": float(config.sample.eta),
    "trajectories_per_minibatch": preset.reference_minibatch,
    "learning_rate": float(config.train.learning_rate),
    "clip_range": float(config.train.clip_range),
    "adv_clip_max": float(config.train.adv_clip_max),
    "max_grad_norm": float(config.train.max_grad_norm),
  }
  with open(os.path.join(out, BENCH_FILE), "w") as f:
    json.dump(settings, f, indent=2)
  return settings


# ----------------------------------------------------------------------------
# Step 2 (ddpo-pytorch's environment): its DDIM step, pipeline and trainer.
# ----------------------------------------------------------------------------


def _broadcast_to(values, shape):
  """values [B] (or a scalar) as `shape` [B, ...]."""
  return values.reshape(values.shape + (1,) * (len(shape) - values.ndim)).broadcast_to(shape)


def ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta: float, prev_sample=None):
  """ddpo-pytorch's DDIM step (epsilon prediction): (prev_sample [B, C, h, w], log_prob [B]).

  timestep: int64, a scalar or [B]. Without `prev_sample` draws it from the
  global RNG; log_prob is the mean over C, h, w of its Gaussian log-density.
  As in ddpo-pytorch, the previous timestep is clamped at 0, so the last
  step's ᾱ_prev is ᾱ[0], and sigma has no floor.
  """
  import torch

  num_train = scheduler.config.num_train_timesteps
  prev_timestep = torch.clamp(timestep - num_train // scheduler.num_inference_steps, 0, num_train - 1)
  alphas = scheduler.alphas_cumprod
  alpha_t = alphas.gather(0, timestep.cpu())
  alpha_prev = torch.where(
    prev_timestep.cpu() >= 0, alphas.gather(0, prev_timestep.cpu()), scheduler.final_alpha_cumprod
  )
  variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
  alpha_t = _broadcast_to(alpha_t, sample.shape).to(sample.device)
  alpha_prev = _broadcast_to(alpha_prev, sample.shape).to(sample.device)
  std = _broadcast_to(eta * variance**0.5, sample.shape).to(sample.device)
  x0 = (sample - (1 - alpha_t) ** 0.5 * model_output) / alpha_t**0.5
  mean = alpha_prev**0.5 * x0 + (1 - alpha_prev - std**2) ** 0.5 * model_output
  if prev_sample is None:
    prev_sample = mean + std * torch.randn(model_output.shape, dtype=model_output.dtype)
  log_prob = (
    -((prev_sample.detach() - mean) ** 2) / (2 * std**2)
    - torch.log(std)
    - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
  )
  return prev_sample.type(sample.dtype), log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def pipeline_with_logprob(pipeline, prompt_embeds, negative_prompt_embeds, num_steps, guidance_scale, eta):
  """ddpo-pytorch's sampler: (images [B, 3, H, W] in [0, 1], latents T+1 x [B, C, h, w], log_probs T x [B]).

  Called under `torch.no_grad()`. The pipeline's own prompt handling
  (`_encode_prompt` concatenates the negative and the prompts' embeddings),
  latent preparation, scheduler and image post-processing, as
  StableDiffusionPipeline.__call__ uses them in diffusers 0.17.
  """
  import torch

  batch_size = prompt_embeds.shape[0]
  size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
  device = pipeline._execution_device
  embeds = pipeline._encode_prompt(
    None, device, 1, True, None, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds
  )
  pipeline.scheduler.set_timesteps(num_steps, device=device)
  latents = pipeline.prepare_latents(
    batch_size, pipeline.unet.config.in_channels, size, size, embeds.dtype, device, None, None
  )
  all_latents, all_log_probs = [latents], []
  for t in pipeline.scheduler.timesteps:
    model_input = pipeline.scheduler.scale_model_input(torch.cat([latents] * 2), t)
    noise_pred = pipeline.unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
    uncond, cond = noise_pred.chunk(2)
    latents, log_prob = ddim_step_with_logprob(
      pipeline.scheduler, uncond + guidance_scale * (cond - uncond), t, latents, eta
    )
    all_latents.append(latents)
    all_log_probs.append(log_prob)
  image = pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor, return_dict=False)[0]
  image = pipeline.image_processor.postprocess(image, output_type="pt", do_denormalize=[True] * batch_size)
  return image, all_latents, all_log_probs


def load(model_dir: str):
  """ddpo-pytorch's set-up: the pipeline with a DDIM scheduler, VAE and text encoder frozen, UNet trainable."""
  from diffusers import DDIMScheduler
  from diffusers import StableDiffusionPipeline

  pipeline = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
  pipeline.vae.requires_grad_(False)
  pipeline.text_encoder.requires_grad_(False)
  pipeline.unet.requires_grad_(True)
  pipeline.set_progress_bar_config(disable=True)
  pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
  return pipeline


def tokenize(pipeline, prompts):
  """Token ids [B, L] (int64), padded to the tokenizer's length."""
  return pipeline.tokenizer(
    prompts, return_tensors="pt", padding="max_length", truncation=True, max_length=pipeline.tokenizer.model_max_length
  ).input_ids


def rollout(pipeline, settings: dict, negative_embeds) -> dict:
  """One sampling batch as ddpo-pytorch's epoch loop draws it; its tensors for training.

  negative_embeds [1, L, D]. Returns latents / next_latents [B, T, C, h, w],
  log_probs and timesteps [B, T], prompt_embeds [B, L, D], images.
  """
  import torch

  prompts = settings["prompts"]
  prompt_embeds = pipeline.text_encoder(tokenize(pipeline, prompts))[0]
  with torch.no_grad():
    images, latents, log_probs = pipeline_with_logprob(
      pipeline,
      prompt_embeds,
      negative_embeds.repeat(len(prompts), 1, 1),
      settings["num_steps"],
      settings["guidance_scale"],
      settings["eta"],
    )
  latents = torch.stack(latents, dim=1)
  return {
    "prompt_embeds": prompt_embeds,
    "timesteps": pipeline.scheduler.timesteps.repeat(len(prompts), 1),
    "latents": latents[:, :-1],
    "next_latents": latents[:, 1:],
    "log_probs": torch.stack(log_probs, dim=1),
    "images": images,
  }


def shuffled_minibatches(samples: dict, trajectories_per_minibatch: int) -> list[dict]:
  """ddpo-pytorch's rebatching: samples permuted along the batch, each one's timesteps permuted, then split."""
  import torch

  total, num_steps = samples["timesteps"].shape
  perm = torch.randperm(total)
  samples = {k: v[perm] for k, v in samples.items()}
  perms = torch.stack([torch.randperm(num_steps) for _ in range(total)])
  for key in ("timesteps", "latents", "next_latents", "log_probs"):
    samples[key] = samples[key][torch.arange(total)[:, None], perms]
  batched = {k: v.reshape(-1, trajectories_per_minibatch, *v.shape[1:]) for k, v in samples.items()}
  return [dict(zip(batched, values)) for values in zip(*batched.values())]


def train_inner_epoch(pipeline, unet, optimizer, accelerator, samples: dict, negative_embeds, settings: dict) -> dict:
  """ddpo-pytorch's inner epoch; samples: rollout's tensors with "advantages" [B]. Returns the mean debug values."""
  import torch

  minibatch = settings["trajectories_per_minibatch"]
  negative = negative_embeds.repeat(minibatch, 1, 1)
  clip_range = settings["clip_range"]
  pipeline.unet.train()
  info = {"approx_kl": [], "clipfrac": [], "loss": []}
  for sample in shuffled_minibatches(samples, minibatch):
    embeds = torch.cat([negative, sample["prompt_embeds"]])
    for j in range(sample["timesteps"].shape[1]):
      with accelerator.accumulate(unet):
        with accelerator.autocast():
          noise_pred = unet(
            torch.cat([sample["latents"][:, j]] * 2), torch.cat([sample["timesteps"][:, j]] * 2), embeds
          ).sample
          uncond, cond = noise_pred.chunk(2)
          noise_pred = uncond + settings["guidance_scale"] * (cond - uncond)
          _, log_prob = ddim_step_with_logprob(
            pipeline.scheduler,
            noise_pred,
            sample["timesteps"][:, j],
            sample["latents"][:, j],
            settings["eta"],
            prev_sample=sample["next_latents"][:, j],
          )
        advantages = torch.clamp(sample["advantages"], -settings["adv_clip_max"], settings["adv_clip_max"])
        ratio = torch.exp(log_prob - sample["log_probs"][:, j])
        clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
        loss = torch.mean(torch.maximum(-advantages * ratio, -advantages * clipped))
        info["approx_kl"].append(0.5 * torch.mean((log_prob - sample["log_probs"][:, j]) ** 2))
        info["clipfrac"].append(torch.mean((torch.abs(ratio - 1.0) > clip_range).float()))
        info["loss"].append(loss)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
          accelerator.clip_grad_norm_(unet.parameters(), settings["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad()
  if not accelerator.sync_gradients:
    raise RuntimeError("the inner epoch ended between optimiser steps")
  return {k: float(torch.mean(torch.stack(v))) for k, v in info.items()}


def seconds_of(fn, repeats: int, warmup: int) -> list[float]:
  for _ in range(warmup):
    fn()
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    seconds.append(time.perf_counter() - start)
  return seconds


def time_loop(model_dir: str, what: list[str], repeats: int, warmup: int, threads: int, seed: int) -> list[dict]:
  """Seconds of ddpo-pytorch's rollout and / or inner epoch on the exported model: one record each."""
  import accelerate
  import diffusers
  import torch
  import transformers

  if threads:
    torch.set_num_threads(threads)
  with open(os.path.join(model_dir, BENCH_FILE)) as f:
    settings = json.load(f)
  torch.manual_seed(seed)
  pipeline = load(model_dir)
  batch_size, num_steps = len(settings["prompts"]), settings["num_steps"]
  minibatches = batch_size // settings["trajectories_per_minibatch"]
  accelerator = accelerate.Accelerator(mixed_precision="no", gradient_accumulation_steps=minibatches * num_steps)
  optimizer = torch.optim.AdamW(
    pipeline.unet.parameters(), lr=settings["learning_rate"], betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8
  )
  unet, optimizer = accelerator.prepare(pipeline.unet, optimizer)
  negative_embeds = pipeline.text_encoder(tokenize(pipeline, [""]))[0]
  pipeline.unet.eval()
  samples = rollout(pipeline, settings, negative_embeds)
  samples.pop("images")
  samples["advantages"] = torch.randn(batch_size)

  def sample():
    pipeline.unet.eval()
    rollout(pipeline, settings, negative_embeds)

  runs = {
    "rollout": sample,
    "train": lambda: train_inner_epoch(pipeline, unet, optimizer, accelerator, samples, negative_embeds, settings),
  }
  common = {
    "impl": "ddpo_pytorch",
    "size": settings["size"],
    "batch_size": batch_size,
    "num_steps": num_steps,
    "torch_threads": torch.get_num_threads(),
    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    "versions": {
      "torch": torch.__version__,
      "diffusers": diffusers.__version__,
      "transformers": transformers.__version__,
      "accelerate": accelerate.__version__,
    },
    "attention_processor": type(next(iter(pipeline.unet.attn_processors.values()))).__name__,
    "load_average_1min": os.getloadavg()[0],
  }
  records = []
  for name in what:
    seconds = seconds_of(runs[name], repeats, warmup)
    record = dict(common, bench=name, seconds=statistics.median(seconds), seconds_all=seconds)
    if name == "train":
      record["transitions"] = batch_size * num_steps
    records.append(record)
  return records


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.ddpo_pytorch_loop", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  export_args = commands.add_parser("export", help="(our env) write the bench's model and settings")
  export_args.add_argument("--size", choices=["tiny", "mid", "test"], default="tiny")
  export_args.add_argument("--out", required=True)
  time_args = commands.add_parser("time", help="(ddpo-pytorch's env) time its rollout and inner epoch")
  time_args.add_argument("--model", required=True, help="a folder written by export")
  time_args.add_argument("--what", default="rollout,train", help="comma-separated: rollout, train")
  time_args.add_argument("--repeats", type=int, default=3)
  time_args.add_argument("--warmup", type=int, default=1)
  time_args.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0: torch's default")
  time_args.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.command == "export":
    print(json.dumps(export(args.size, args.out)))
    return
  for record in time_loop(args.model, args.what.split(","), args.repeats, args.warmup, args.threads, args.seed):
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
