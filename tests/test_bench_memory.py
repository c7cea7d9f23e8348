"""`python -m ddpo_jax.bench memory`: abstract models, bytes per device, verdicts, output."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ddpo_jax import config_utils
from ddpo_jax import models
from ddpo_jax.bench import memory
from ddpo_jax.models import architectures

GiB = memory.GiB
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  config = config_utils.get_config(os.path.join(REPO, "configs/compress.py:tiny"))
  return memory.with_overrides(config, overrides)


@pytest.fixture(scope="module")
def toy():
  return models.load(models.TOY_MODEL)


def test_abstract_toy_model_is_the_loaded_one(toy):
  model, params = toy
  abstract, shapes = architectures.abstract_model(models.TOY_MODEL)
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  for s, p in zip(jax.tree.leaves(shapes), jax.tree.leaves(params)):
    assert (s.shape, s.dtype) == (p.shape, p.dtype)
  for module in ("unet", "vae"):
    assert type(getattr(abstract, module)) is type(getattr(model, module))
    assert getattr(abstract, module).config == getattr(model, module).config
  assert type(abstract.text_encoder) is type(model.text_encoder)
  assert (abstract.latent_size, abstract.image_size, abstract.max_prompt_tokens, abstract.text_hidden_size) == (
    model.latent_size,
    model.image_size,
    model.max_prompt_tokens,
    model.text_hidden_size,
  )
  np.testing.assert_array_equal(models.tokenize(abstract, [""]), models.tokenize(model, [""]))
  np.testing.assert_allclose(abstract.schedule.alphas_cumprod, model.schedule.alphas_cumprod)


def test_abstract_model_from_component_configs():
  configs = architectures.folder_configs(models.TOY_MODEL)
  model, shapes = architectures.abstract_model(configs, dtype="bfloat16")
  assert model.unet.dtype == "bfloat16" and model.text_encoder.dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {np.dtype("float32")}  # params stay float32, as loaded
  assert jax.tree.structure(shapes) == jax.tree.structure(architectures.abstract_model(models.TOY_MODEL)[1])


def test_remat_lowers_the_saved_activations():
  config = tiny_config()
  setting = memory.Setting(config, jax.devices()[:8], compile_=False)
  _, without = setting.train(per_device=8)
  _, with_remat = memory.Setting(
    memory.with_overrides(config, {"train.remat": True}), jax.devices()[:8], compile_=False
  ).train(per_device=8)
  assert 0 < with_remat < without


def test_sd_v1_4_architecture_offline():
  model, params = architectures.abstract_model("CompVis/stable-diffusion-v1-4")
  # SD v1.4's published parameter counts.
  assert architectures.num_params(params["unet"]) == 859_520_964
  assert architectures.num_params(params["vae"]) == 83_653_863
  assert architectures.num_params(params["text_encoder"]) == 123_060_480
  assert (model.latent_size, model.image_size, model.max_prompt_tokens, model.text_hidden_size) == (64, 512, 77, 768)
  assert model.vae_scaling_factor == pytest.approx(0.18215)
  assert model.schedule.steps_offset == 1 and model.schedule.final_alpha_cumprod == pytest.approx(0.99915, abs=1e-5)
  ids = models.tokenize(model, ["", ""])
  assert ids.shape == (2, 77) and list(ids[0, :3]) == [49406, 49407, 49407]
  with pytest.raises(ValueError, match="only the empty prompt"):
    models.tokenize(model, ["a cat"])
  with pytest.raises(ValueError, match="no architecture is known"):
    architectures.abstract_model("someone/unknown-model")


def test_report_param_bytes_equal_the_real_params(toy):
  _, params = toy
  sizes = memory.Setting(tiny_config(), jax.devices()[:8], compile_=False).static_sizes()
  unet = architectures.num_bytes(params["unet"])
  assert sizes["unet_params"] == unet
  assert sizes["frozen_params"] == architectures.num_bytes(params["vae"]) + architectures.num_bytes(
    params["text_encoder"]
  )
  # AdamW's mu and nu, its int32 count and the train state's int32 step.
  assert sizes["opt_state"] == 2 * unet + 8


def test_fsdp_divides_the_sharded_part_of_the_state():
  devices = jax.devices()[:8]
  replicated = memory.Setting(tiny_config(**{"mesh.fsdp": 1}), devices, compile_=False).static_sizes()
  sharded = memory.Setting(tiny_config(**{"mesh.data": 1, "mesh.fsdp": 8}), devices, compile_=False).static_sizes()
  total = replicated["unet_params"] + replicated["opt_state"]
  fraction = sharded["state_sharded_fraction"]
  assert replicated["state_sharded_fraction"] == 0 and fraction > 0.5  # toy-world: many leaves below fsdp_min_size
  expected = total * (1 - fraction) + total * fraction / 8
  assert sharded["unet_params"] + sharded["opt_state"] == pytest.approx(expected, rel=1e-6)
  assert sharded["frozen_params"] == replicated["frozen_params"]


def test_compiled_sampler_memory_is_per_device():
  config = tiny_config(**{"sample.num_steps": 2})
  setting = memory.Setting(config, jax.devices()[:8], compile_=True)
  compiled, sizes = setting.sample(per_device=2)
  plan, params = setting.plan(config.train.batch_size // 8)
  args = memory.sampler_args(plan, params, batch=16)
  assert compiled.argument == memory.bytes_per_device(args)
  # The sampler does not read the VAE's encoder, nor the KL's reference params (the preset's kl_coef > 0; full
  # fine-tuning samples with the policy alone): pruned from the program, still on the device.
  assert config.train.kl_coef > 0 and plan.layout.base is not None
  unused = architectures.num_bytes({k: params["vae"][k] for k in ("encoder", "quant_conv")})
  unused += memory.bytes_per_device(plan.layout.base)
  assert compiled.compiled_argument == compiled.argument - unused
  assert sizes["sample_outputs"] == memory.bytes_per_device(memory.sampler_outputs(plan, args))
  assert compiled.output == pytest.approx(sizes["sample_outputs"], abs=256)  # XLA:CPU pads its output table
  assert compiled.temp > 0 and compiled.seconds > 0
  assert sizes["num_batches"] == 64 // 16


def test_json_output_parses():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  command = [sys.executable, "-m", "ddpo_jax.bench", "memory", "--config=configs/compress.py:tiny", "--target=v5e-8"]
  command += ["--grid=config", "--nocompile", "--json"]
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in result.stdout.splitlines()]
  assert len(records) == 1
  record = records[0]
  assert (record["target"], record["devices"], record["mesh"]) == ("v5e-8", 8, {"data": 8, "fsdp": 1})
  assert record["model"] == "toy-world" and record["estimate"].startswith("analytical")
  assert record["verdict"] == "fits" and record["fits"] and record["largest_fitting"] is None
  assert record["sample"]["batch_per_device"] == 4 and record["train"]["batch_per_device"] == 8
  assert record["train"]["unet_rows_per_device"] == 16 and record["train"]["saved_activations"] > 0
  assert record["peak_bytes"] == max(record["sample"]["peak"], record["train"]["peak"])
  assert "| v5e-8 | 8×1 | full | float32 | off |" in memory.format_table(records)


@pytest.mark.parametrize(
  "peak, expected", [(14 * GiB, "fits"), (int(14.4 * GiB), "fits"), (15 * GiB, "tight"), (17 * GiB, "does not fit")]
)
def test_verdict(peak, expected):
  assert memory.verdict(peak, 16 * GiB, headroom=0.9) == expected


def test_phase_peaks():
  sample = memory.Memory(argument=10, output=3, alias=0, temp=100)
  step = memory.Memory(argument=50, output=40, alias=40, temp=200)
  sizes = {"opt_state": 20, "sample_outputs": 3, "num_batches": 4, "frozen_params": 7, "epoch_buffers": 12}
  assert memory.sampling_peak(sample, sizes) == 113 + 20 + 3 * 3
  assert memory.training_peak(step, sizes) == 250 + 7 + 12


def test_largest_fitting_follows_the_linear_fit():
  points = {1: 13, 16: 58}  # 10 + 3 b
  assert memory.largest_fitting(points, limit=30, candidates=[1, 2, 4, 5, 8]) == 5
  assert memory.largest_fitting(points, limit=12, candidates=[1, 2]) is None


@pytest.mark.parametrize("peak_of", [lambda b: 10 + 3 * b, lambda b: 10 + b**1.6, lambda b: 10 + 2 * b * b])
def test_search_batch_finds_the_largest_fitting_batch(peak_of):
  calls = []

  def measured(b):
    calls.append(b)
    return peak_of(b)

  candidates = memory.divisors_below(total=400 * 8, unit=8, below=64)
  best, points = memory.search_batch(measured, 64, candidates, limit=40, max_tries=6)
  assert best == max(c for c in candidates if peak_of(c) <= 40)
  assert len(calls) <= 8 and set(points) == set(calls)


def test_search_batch_edges():
  assert memory.search_batch(lambda b: b, 8, [1, 2, 4], limit=10) == (8, {8: 8})
  assert memory.search_batch(lambda b: 100 + b, 8, [1, 2, 4], limit=10) == (None, {8: 108, 1: 101})
  assert memory.divisors_below(256, 8, 32) == [1, 2, 4, 8, 16]


def test_grid_and_measuring_config():
  config = tiny_config()
  grid = memory.grid_overrides(config, 8, "paper")
  assert len(grid) == 8 and {g["mesh.fsdp"] for g in grid} == {1, 8}
  assert len(memory.grid_overrides(config, 1, "paper")) == 4
  assert memory.grid_overrides(config, 8, "config") == [{"mesh.data": 8, "mesh.fsdp": 1}]
  # finetuning: bfloat16 first, full before LoRA, remat on first; all on the config's mesh (here all-FSDP).
  fsdp = memory.with_overrides(config, {"mesh.data": 1, "mesh.fsdp": -1})
  finetuning = memory.grid_overrides(fsdp, 8, "finetuning")
  assert [(g["model.dtype"], g["lora.rank"], g["train.remat"]) for g in finetuning[:3]] == [
    ("bfloat16", 0, True),
    ("bfloat16", 0, False),
    ("bfloat16", memory.GRID_LORA_RANK, True),
  ]
  assert len(finetuning) == 8 and {(g["mesh.data"], g["mesh.fsdp"]) for g in finetuning} == {(1, 8)}
  measuring = memory.measuring_config(config, 8, sample_per_device=2, train_per_device=4)
  assert (measuring.sample.batch_size, measuring.sample.num_batches_per_epoch) == (16, 4)
  assert (measuring.train.batch_size, measuring.train.gradient_accumulation_steps) == (32, 1)
  assert config.train.gradient_accumulation_steps == 10  # the original is left alone


def test_cpu_environment_and_child_flags():
  env = memory.cpu_environment(4, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1"})
  assert env["XLA_FLAGS"].split() == [
    "--xla_foo=1",
    "--xla_force_host_platform_device_count=4",
    "--xla_disable_hlo_passes=cse_barrier_expander",
  ]
  assert env["JAX_PLATFORMS"] == "cpu"
  argv = ["--config=configs/compress.py", "--target", "all", "--json", "--num_devices=2", "--nocompile"]
  assert memory._own_flags(argv) == ["--config=configs/compress.py", "--nocompile"]
