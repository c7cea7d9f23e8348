r"""The settings shared by every DDPO task; the defaults are the paper's.

Tasks (compress.py, incompress.py, ...) start from `get_config()` here, set their
prompt and reward, and define presets. The paper's setting: Stable Diffusion
v1.4 at 512 px, 50 DDIM steps, eta 1.0, guidance 5.0, 256 samples per epoch,
DDPO_IS with clip 1e-4, AdamW at 1e-5 (DDPO.md's table).

The `tiny` preset of `apply_tiny` is the same program on the shipped toy-world
model: 32 px images, 10 steps, 64 samples per epoch, a few minutes on 2 cores.
"""

import ml_collections


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Root seed: every key and prompt draw of the run derives from it.
  config.seed = 0
  # Number of DDPO epochs (one sampling round and its training pass each).
  config.num_epochs = 100

  config.model = ml_collections.ConfigDict()
  # A Hugging Face id, a local folder in diffusers' layout, or "toy-world".
  config.model.name = "CompVis/stable-diffusion-v1-4"
  # Hub revision (a branch, tag or commit); empty for the default branch.
  config.model.revision = ""
  # Compute dtype of the modules: "float32" or "bfloat16" (params stay float32).
  config.model.dtype = "float32"
  # The attention of the UNet and the VAE: "auto" (TPU: "flash", Pallas' flash attention;
  # GPU: "cudnn", jax.nn.dot_product_attention's cuDNN kernel; CPU: "blocked"), or "xla"
  # (plain einsum-softmax, anywhere); config.json records the resolved value.
  config.model.attention = "auto"
  # MB of float32 attention scores per block of the "blocked" attention. "auto": 4 where
  # the attention is "blocked", else 0; config.json records the resolved value.
  config.model.attention_block_mb = "auto"

  config.mesh = ml_collections.ConfigDict()
  # Devices along the data-parallel axis; -1 means all that the fsdp axis leaves.
  config.mesh.data = -1
  # Devices along the fully-sharded axis (1: params replicated).
  config.mesh.fsdp = 1
  # (regex, "fsdp" | "replicate") over train-state paths such as
  # "params/down_blocks_0/resnets_0/conv1/kernel"; the first match applies,
  # "fsdp" shards a leaf's largest dimension that the fsdp axis divides.
  config.mesh.partition_rules = ((r".*", "fsdp"),)
  # Leaves with fewer elements than this are replicated whatever the rules say.
  config.mesh.fsdp_min_size = 2**14
  # With mesh.fsdp > 1, the run stops before epoch 0 when less than this fraction of the
  # bytes of the train state (and of the frozen base UNet, with LoRA or KL) is sharded
  # (rules that replicate what FSDP should split). 0: no check.
  config.mesh.min_sharded_fraction = 0.5

  config.prompt = ml_collections.ConfigDict()
  # A registered prompt function (ddpo_jax.prompts) or "package.module:factory".
  config.prompt.name = "imagenet_animals"
  # Keyword arguments of the prompt function's factory.
  config.prompt.kwargs = ml_collections.ConfigDict()

  config.reward = ml_collections.ConfigDict()
  # A registered reward (ddpo_jax.rewards) or "package.module:factory".
  config.reward.name = "jpeg_compressibility"
  # Keyword arguments of the reward's factory.
  config.reward.kwargs = ml_collections.ConfigDict()
  # A reward that raises, returns NaN/inf or the wrong shape: "raise" stops the
  # run naming the reward and the prompt; "drop" leaves those samples out of
  # the statistics and the update (advantage 0) and counts them (reward_invalid).
  config.reward.on_invalid = "raise"
  # Host threads that compute rewards while the device samples on.
  config.reward.num_threads = 1

  config.sample = ml_collections.ConfigDict()
  # DDIM steps of the rollout (T).
  config.sample.num_steps = 50
  # DDIM stochasticity; must be > 0 for a policy gradient (1.0: DDPM-like).
  config.sample.eta = 1.0
  # Classifier-free guidance scale w, used in sampling and in training alike.
  config.sample.guidance_scale = 5.0
  # Trajectories per sampling call, over all devices.
  config.sample.batch_size = 256
  # Sampling calls per epoch: samples per epoch = batch_size * num_batches_per_epoch.
  config.sample.num_batches_per_epoch = 1
  # Samples per prompt k: each batch draws batch_size / k prompts and samples
  # each k times, in consecutive rows (needed by train.advantages = "group";
  # 1: every sample draws its own prompt, as the paper).
  config.sample.group_size = 1
  # Whether the k samples of a group start from the same initial noise x_T
  # (the steps' noise always differs).
  config.sample.group_same_noise = False

  config.train = ml_collections.ConfigDict()
  # "ddpo_is" (clipped importance sampling), "ddpo_sf" (score function), or
  # the paper's baselines: "rwr" (reward-weighted regression: the denoising
  # loss on the epoch's samples weighted by exp(r / rwr_temperature), scaled to
  # mean 1) and "rwr_sparse" (the same loss on the samples whose reward is at or
  # above the rwr_percentile-th percentile of the epoch's).
  config.train.method = "ddpo_is"
  # RWR's temperature, in the reward's units (smaller: sharper weights).
  config.train.rwr_temperature = 1.0
  # rwr_sparse keeps the samples at or above this percentile of the epoch's rewards.
  config.train.rwr_percentile = 90.0
  # Transitions per minibatch (one forward and backward pass), over all devices.
  config.train.batch_size = 64
  # Minibatches whose gradients are averaged into one optimiser step.
  config.train.gradient_accumulation_steps = 50
  # Rematerialise the UNet's blocks in the training pass: less activation
  # memory for about a third more compute.
  config.train.remat = False
  # How an optimiser step accumulates its minibatches' gradients: "scan" (lax.scan: one
  # compiled loop body) or "unrolled" (one after another in straight-line code: faster on
  # the CPU, whose loops run convolution gradients slowly). "auto": unrolled on the CPU,
  # scan elsewhere; config.json records the resolved value.
  config.train.accumulation = "auto"
  # Passes over each epoch's transitions.
  config.train.num_inner_epochs = 1
  # Fraction of each trajectory's timesteps trained on, in (0, 1].
  config.train.timestep_fraction = 1.0
  # AdamW settings; the learning rate is constant.
  config.train.learning_rate = 1e-5
  config.train.adam_beta1 = 0.9
  config.train.adam_beta2 = 0.999
  config.train.adam_eps = 1e-8
  config.train.weight_decay = 1e-4
  # Global gradient-norm clip.
  config.train.max_grad_norm = 1.0
  # PPO clip range ε of DDPO_IS.
  config.train.clip_range = 1e-4
  # Advantages are clipped to ±adv_clip_max.
  config.train.adv_clip_max = 10.0
  # How rewards become advantages: "stat_tracking" (per-prompt statistics or
  # batch normalisation, as config.stat_tracking says: the paper's) or "group"
  # ((r - mean of its group of sample.group_size samples) / group_std; groups
  # whose rewards all tie get 0).
  config.train.advantages = "stat_tracking"
  # The std of "group" advantages: "group" (each group's own, as GRPO) or
  # "batch" (the std of all the epoch's rewards).
  config.train.group_std = "group"
  # Coefficient of the KL to the frozen pretrained model, added to the loss:
  # per transition ||μ_θ - μ_ref||² / (2σ²), averaged over latent elements
  # like the log-probabilities (0: off, no reference forward pass).
  config.train.kl_coef = 0.0
  # Decay of an exponential moving average of the trained params, updated
  # after every optimiser step and checkpointed with them (0: off).
  config.train.ema_decay = 0.0

  config.lora = ml_collections.ConfigDict()
  # Rank of LoRA adapters on the UNet's kernels (0: off, full fine-tuning).
  # Only the adapters and their optimiser state are trained and checkpointed.
  config.lora.rank = 0
  # Adapters add (alpha / rank) A @ B to each kernel (alpha = rank: scale 1).
  config.lora.alpha = 4.0
  # Regexes over UNet param paths such as
  # "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel": the
  # 2-D kernels adapted (default: every attention's q, k, v and out projections).
  config.lora.targets = (r"attn\d+/to_(q|k|v|out_0)/kernel$",)

  config.stat_tracking = ml_collections.ConfigDict()
  # Normalise each prompt's rewards by its own recent rewards (else by the batch).
  config.stat_tracking.per_prompt = True
  # Recent rewards kept per prompt.
  config.stat_tracking.buffer_size = 32
  # Below this many, a prompt's rewards are normalised by the batch instead.
  config.stat_tracking.min_count = 16

  config.checkpoint = ml_collections.ConfigDict()
  # Epochs between checkpoints (ddpo_jax/periodic.py; the last epoch and a SIGTERM
  # always save one; 0: only those).
  config.checkpoint.every_epochs = 10
  # Newest checkpoints kept in workdir/checkpoints.
  config.checkpoint.max_to_keep = 3
  # Write checkpoints in the background while training goes on.
  config.checkpoint.asynchronous = True

  config.eval = ml_collections.ConfigDict()
  # Epochs between held-out evaluations (ddpo_jax/periodic.py; 0: none). When on,
  # the run is also evaluated before its first epoch and after its last. Each evaluation
  # samples the same prompts from the same noise (fixed by eval.seed), so
  # evaluations differ only by the params: records with "split": "eval" in
  # metrics.jsonl, eval/ in TensorBoard, images/eval_samples_EPOCH.png.
  config.eval.every_epochs = 10
  # The held-out prompt set: a registered prompt function and its kwargs.
  config.eval.prompt = ml_collections.ConfigDict()
  config.eval.prompt.name = "everyday_objects"
  config.eval.prompt.kwargs = ml_collections.ConfigDict()
  # Samples per evaluation: a multiple of sample.batch_size (the sampler is shared).
  config.eval.num_samples = 256
  # Samples of each prompt (consecutive rows); >= 2 measures diversity within a prompt.
  config.eval.samples_per_prompt = 4
  # Root of the evaluation's prompt draw and noise.
  config.eval.seed = 1234
  # DDIM eta of the evaluation sampler: sample.eta (1.0) samples the trained
  # policy itself; 0.0 gives DDIM's deterministic ODE sampler (compiles a second sampler).
  config.eval.eta = 1.0
  # Rewards reported besides the trained one (registered names, default kwargs),
  # to expose reward hacking; those a sample cannot be scored by count as invalid.
  config.eval.rewards = ("jpeg_compressibility", "jpeg_incompressibility")

  config.logging = ml_collections.ConfigDict()
  # Epochs between PNG grids of samples (ddpo_jax/periodic.py; 0: never).
  config.logging.images_every_epochs = 5
  # Samples per grid.
  config.logging.num_images = 32
  # After the last epoch, also sample a grid with the EMA params
  # (images/samples_ema_EPOCH.png; needs config.train.ema_decay > 0).
  config.logging.sample_with_ema = False

  config.preflight = ml_collections.ConfigDict()
  # Before epoch 0, after the steps compile and before the params are placed or anything is
  # written, compare each phase's peak per device (ddpo_jax/preflight.py) with the device's
  # memory (TPU and GPU report it; the CPU does not: there the check is skipped). A phase above
  # headroom x that memory stops the run naming settings measured to fit.
  config.preflight.enabled = True
  # Fraction of the device memory a phase may use (the rest: the runtime, fragmentation).
  config.preflight.headroom = 0.9
  # Bytes per device to check against instead of the device's own figure (0: the device's).
  # For tests and what-ifs; set, it also makes the check run on the CPU.
  config.preflight.device_memory_bytes = 0
  # Compilations the pre-flight may spend measuring fixes when a step does not fit (0: none).
  config.preflight.max_compilations = 6

  if preset:
    apply_preset(config, preset)
  return config


def apply_preset(config: ml_collections.ConfigDict, preset: str) -> None:
  """Presets change values, never code paths."""
  if preset == "tiny":
    apply_tiny(config)
  else:
    raise ValueError(f"Unknown preset {preset!r}; the presets are: tiny.")


def apply_tiny(config: ml_collections.ConfigDict) -> None:
  """The shipped toy-world model, sized for 2 CPU cores.

  The model is sampled unconditionally (the empty prompt), so the policy is
  free to choose what it draws, as Stable Diffusion is within a prompt: JPEG
  compressibility drives it to flat images, incompressibility to checked
  backgrounds. With full captions the reward is fixed mostly by the caption's
  background pattern and 12 epochs of 64 samples move little (measured).
  One optimiser step per pass over the epoch's 640 transitions: with fewer
  transitions per Adam step the update is mostly noise at this sample budget
  (measured: the reward drifted the same way for both rewards).

  The training values were chosen by a sweep of 12-epoch runs (seed 0) of the
  three tiny tasks, scored by the trained reward's gain and the held-out toy
  alignment at the end (docs/study.md, "The tiny presets' training values"). Without KL, one
  step per epoch at lr 3e-4 and clip 1e-4, compress gained 0.29 kB but its
  samples became flat squares (held-out toy alignment 0.79 -> 0.72) and
  toy_alignment collapsed (reward -0.18). Two passes (the second off-policy
  through the clipped ratio, clip 0.1), lr 5e-4 and KL 0.1 to the pretrained
  model keep the held-out captions' shapes: compress +0.26 kB at alignment
  0.87, incompress +0.10 kB at 0.82, toy_alignment +0.06. The empty prompt's
  own compress samples still lose most of their shapes by epoch 12.
  """
  config.num_epochs = 12
  config.model.name = "toy-world"
  config.model.revision = ""
  config.prompt.name = "constant"
  config.prompt.kwargs = ml_collections.ConfigDict({"prompt": ""})
  config.sample.num_steps = 10
  config.sample.guidance_scale = 5.0
  config.sample.batch_size = 32
  config.sample.num_batches_per_epoch = 2
  config.train.batch_size = 64
  config.train.gradient_accumulation_steps = 10
  config.train.learning_rate = 5e-4
  config.train.num_inner_epochs = 2
  config.train.clip_range = 0.1
  config.train.kl_coef = 0.1
  config.stat_tracking.per_prompt = False
  config.checkpoint.every_epochs = 4
  config.logging.images_every_epochs = 4
  config.logging.num_images = 16
  # Held-out: toy captions whose shape colour × shape pair RL never trains on.
  config.eval.every_epochs = 4
  config.eval.prompt.name = "toy_scenes"
  config.eval.prompt.kwargs = ml_collections.ConfigDict({"split": "heldout"})
  config.eval.num_samples = 32
  config.eval.rewards = ("jpeg_compressibility", "jpeg_incompressibility", "toy_alignment")


def apply_toy_captions(config: ml_collections.ConfigDict) -> None:
  """A tiny preset on the toy world's training captions, for rewards that read the prompt."""
  config.prompt.name = "toy_scenes"
  config.prompt.kwargs = ml_collections.ConfigDict({"split": "train"})
