"""The memory pre-flight (ddpo_jax/preflight.py): verdicts, fixes, and the trainer stopping before epoch 0."""

import dataclasses
import hashlib
import os
import re

import jax.numpy as jnp
import pytest

from ddpo_jax import config_utils
from ddpo_jax import models
from ddpo_jax import preflight
from ddpo_jax import steps
from ddpo_jax import train
from ddpo_jax import validation
from ddpo_jax import workdir_lock
from tests.conftest import tiny_config

GiB, MiB = 2**30, 2**20


def tiny():
  """compress.py:tiny on 8 devices: sampling calls of 4 per device (2 per epoch), minibatches of 8 per device,
  10 per optimiser step (640 transitions)."""
  return config_utils.get_config("configs/compress.py:tiny")


class FakeDevice:
  def __init__(self, limit, kind="TPU v5 lite"):
    self.limit, self.device_kind = limit, kind

  def memory_stats(self):
    return None if self.limit is None else {"bytes_limit": self.limit, "bytes_in_use": 0}


def test_device_memory_and_its_override():
  assert preflight.device_memory([FakeDevice(16 * GiB), FakeDevice(15 * GiB)]) == 15 * GiB
  assert preflight.device_memory([FakeDevice(16 * GiB), FakeDevice(None, "cpu")]) is None
  limit, source = preflight.memory_limit(0, [FakeDevice(16 * GiB)])
  assert limit == 16 * GiB and "TPU v5 lite" in source
  assert preflight.memory_limit(0, [FakeDevice(None, "cpu")])[0] is None  # the CPU: skipped
  limit, source = preflight.memory_limit(1000, [FakeDevice(None, "cpu")])
  assert limit == 1000 and source == "config.preflight.device_memory_bytes=1000"


def test_peaks_over_the_allowed_bytes():
  assert preflight.Peaks(sampling=10, training=20).over(15) == ("training",)
  assert preflight.Peaks(sampling=10, training=20).over(20) == ()
  assert preflight.Peaks(sampling=30, training=20).over(5) == ("sampling", "training")


def test_levers_keep_the_epoch():
  config = tiny()
  assert preflight.sample_batch(config, 2, 8) == {"sample.batch_size": 16, "sample.num_batches_per_epoch": 4}
  assert preflight.train_batch(config, 5, 8) == {"train.batch_size": 40, "train.gradient_accumulation_steps": 16}
  names = lambda levers: [name for name, _ in levers]
  assert names(preflight.global_levers(config, 8)) == [preflight.FSDP, preflight.BFLOAT16, preflight.LORA]
  assert dict(preflight.global_levers(config, 8))[preflight.FSDP] == {"mesh.data": 1, "mesh.fsdp": 8}
  assert names(preflight.global_levers(config, 1)) == [preflight.BFLOAT16, preflight.LORA]
  used = config_utils.override(tiny(), {"model.dtype": "bfloat16", "lora.rank": 2, "mesh.data": 1, "mesh.fsdp": -1})
  assert preflight.global_levers(used, 8) == []


def test_only_the_steps_a_setting_changes_recompile():
  config = tiny()
  changed = lambda overrides: {k for k, v in preflight.changed_steps(config, overrides).items() if v}
  assert changed({"train.remat": True}) == {"optimizer_step"}
  assert changed(preflight.train_batch(config, 2, 8)) == {"optimizer_step"}
  assert changed(preflight.sample_batch(config, 2, 8)) == {"sample"}
  assert changed({"model.dtype": "bfloat16"}) == changed({"lora.rank": 4}) == {"sample", "optimizer_step"}
  assert changed({"train.remat": False, "model.dtype": "float32"}) == set()  # the config's own values


def fake_measure(calls, sampling_mib=None):
  """A `Measurer.measure` of hand-made peaks for tiny() on 8 devices, in MiB:
  sampling = 100 + 10 x samples per device (or `sampling_mib`), training = 100 + 20 x transitions
  per device (x 0.75 with remat, x 0.5 in bfloat16); fsdp takes 50 off both, LoRA 20 off training."""

  def measure(lever, overrides):
    calls.append(overrides)
    config = config_utils.override(tiny(), overrides)
    s, t = config.sample.batch_size // 8, config.train.batch_size // 8
    training = 20 * t * (0.75 if config.train.remat else 1) * (0.5 if config.model.dtype == "bfloat16" else 1)
    sampling, training = 100 + 10 * s, 100 + training
    if config.mesh.fsdp == 8:
      sampling, training = sampling - 50, training - 50
    if config.lora.rank:
      training -= 20
    sampling = sampling if sampling_mib is None else sampling_mib
    return preflight.Trial(lever, overrides, preflight.Peaks(int(sampling * MiB), int(training * MiB)))

  return measure


BASE = preflight.Peaks(sampling=140 * MiB, training=260 * MiB)  # fake_measure of tiny() itself


def fitting(trials, allowed):
  return {preflight.flags(t.overrides) for t in preflight.best_fits(trials, allowed)}


def test_fixes_of_the_training_phase():
  calls = []
  trials = preflight.find_fixes(tiny(), 8, BASE, 200 * MiB, fake_measure(calls))
  # Per device 1 fits (120), then the line through 1 and 8 predicts 5 (200), which fits; remat
  # alone (220) does not; the global levers at the config's batches.
  assert [t.lever for t in trials] == [
    preflight.TRAIN_BATCH,
    preflight.TRAIN_BATCH,
    preflight.REMAT,
    preflight.FSDP,
    preflight.BFLOAT16,
    preflight.LORA,
  ]
  assert fitting(trials, 200 * MiB) == {
    "--config.train.batch_size=40 --config.train.gradient_accumulation_steps=16",
    "--config.model.dtype=bfloat16",
  }
  message = preflight.refusal(BASE, 250 * MiB, "config.preflight.device_memory_bytes=262144000", 0.8, trials, 6, 12)
  head, measured = message.split("Measured to fit")
  assert "the training phase needs 260.00 MiB per device; the sampling phase" not in head  # sampling first
  assert "the sampling phase needs 140.00 MiB per device (fits); the training phase needs 260.00 MiB" in head
  assert "config.preflight.headroom=0.8 x 250.00 MiB (config.preflight.device_memory_bytes=262144000)" in head
  assert "= 200.00 MiB" in head and "headroom=1.0" not in head
  fits, rest = measured.split("Measured, does not fit:")
  assert "--config.train.batch_size=40 --config.train.gradient_accumulation_steps=16" in fits
  assert "--config.train.batch_size=8 " not in fits  # the smaller batch that fits too is not the best
  assert "--config.mesh.data=1 --config.mesh.fsdp=8" in rest and "LoRA" in rest
  assert "  remat: --config.train.remat=True  (sampling 140.00 MiB, training 220.00 MiB)" in rest
  assert "6 compilation(s) in 12 s" in fits
  assert "  bfloat16: --config.model.dtype=bfloat16  (sampling 140.00 MiB, training 180.00 MiB)" in fits


def test_fixes_of_both_phases_compose():
  trials = preflight.find_fixes(tiny(), 8, BASE, 130 * MiB, fake_measure([]))
  # Sampling: per device 1 (110) fits, then 2 (120): calls of 16, 4 per epoch. The training fixes keep them:
  # per device 1 (120) fits, 2 (140) does not.
  sample_fix = "--config.sample.batch_size=16 --config.sample.num_batches_per_epoch=4"
  assert fitting(trials, 130 * MiB) == {
    sample_fix + " --config.train.batch_size=8 --config.train.gradient_accumulation_steps=80"
  }
  assert all(t.overrides["sample.batch_size"] == 16 for t in trials[2:])


def test_remat_with_smaller_minibatches_when_those_alone_do_not_fit():
  trials = preflight.find_fixes(tiny(), 8, preflight.Peaks(10 * MiB, 260 * MiB), 117 * MiB, fake_measure([], 10))
  # Per device 1 needs 120: no fit; remat (220) lowers the peak: with it, per device 1 (115) fits, 2 (130) does not.
  assert [t.lever for t in trials[:5]] == [preflight.TRAIN_BATCH, preflight.REMAT] + [preflight.TRAIN_BATCH] * 2 + [
    preflight.FSDP
  ]
  assert fitting(trials, 117 * MiB) == {
    "--config.train.remat=True --config.train.batch_size=8 --config.train.gradient_accumulation_steps=80"
  }


def test_a_sampling_fix_that_pushes_training_over_gets_a_training_fix():
  def measure(lever, overrides):  # training holds 30 MiB more with more than 2 sampling calls per epoch
    config = config_utils.override(tiny(), overrides)
    s, t, calls = config.sample.batch_size // 8, config.train.batch_size // 8, config.sample.num_batches_per_epoch
    peaks = preflight.Peaks((110 + 10 * s) * MiB, (60 + 10 * t + (30 if calls > 2 else 0)) * MiB)
    return preflight.Trial(lever, overrides, peaks)

  trials = preflight.find_fixes(tiny(), 8, preflight.Peaks(150 * MiB, 140 * MiB), 145 * MiB, measure)
  assert fitting(trials, 145 * MiB) == {
    "--config.sample.batch_size=16 --config.sample.num_batches_per_epoch=4 "
    "--config.train.batch_size=40 --config.train.gradient_accumulation_steps=16"
  }


def test_when_nothing_fits_the_levers_that_helped_are_tried_together():
  trials = preflight.find_fixes(tiny(), 8, BASE, 50 * MiB, fake_measure([]))
  assert not preflight.best_fits(trials, 50 * MiB)
  together = trials[-1]
  assert together.lever == preflight.COMBINED
  assert together.overrides == {
    "sample.batch_size": 8,
    "sample.num_batches_per_epoch": 8,
    "train.remat": True,
    "train.batch_size": 8,
    "train.gradient_accumulation_steps": 80,
    "mesh.data": 1,
    "mesh.fsdp": 8,
    "model.dtype": "bfloat16",
  }
  message = preflight.refusal(BASE, 100 * MiB, "the bytes_limit of TPU v4", 0.5, trials, 9, 30.0)
  assert "No setting measured fits" in message and "--platform=native" in message


def test_a_fit_within_the_memory_but_not_the_headroom_names_the_headroom():
  message = preflight.refusal(preflight.Peaks(90 * GiB, 95 * GiB), 100 * GiB, "x", 0.9, [], 0, 0.0)
  assert "the training phase needs 95.00 GiB per device; " in message
  assert "= 90.00 GiB" in message and "config.preflight.headroom=1.0 accepts it" in message
  assert "the sampling phase needs 90.00 GiB per device (fits)" in message
  not_measured = preflight.Trial(preflight.LORA, {"lora.rank": 4}, note="needs 2 compilation(s), 1 left")
  message = preflight.refusal(preflight.Peaks(1, 2 * GiB), GiB, "x", 0.9, [not_measured], 5, 1.0)
  assert "Not measured:\n  LoRA (trains adapters only): --config.lora.rank=4  (needs 2 compilation(s), 1 left)" in (
    message
  )
  assert "headroom=1.0" not in message


def test_the_bfloat16_lever_computes_as_loading_in_bfloat16(tiny_model_dir, tiny_loaded):
  model, _ = tiny_loaded
  loaded, _ = models.load(tiny_model_dir, dtype="bfloat16")
  converted = models.with_dtype(model, "bfloat16")
  for name in ("unet", "vae", "text_encoder"):
    module, expected = getattr(converted, name), getattr(loaded, name)
    assert module.dtype == expected.dtype == jnp.bfloat16 and module.config == expected.config, name
  assert converted.dtype == jnp.bfloat16 and model.dtype == jnp.float32


# ----------------------------------------------------------------------------
# On the tiny test model's compiled steps.
# ----------------------------------------------------------------------------


def test_nothing_more_compiles_when_the_check_is_off_or_fits(tiny_run, monkeypatch):
  config, params, run, _, _, _ = tiny_run
  frozen = {"vae": params["vae"], "text_encoder": params["text_encoder"]}

  def no_compilation(*args):
    raise AssertionError("the pre-flight compiled a step")

  monkeypatch.setattr(steps, "compile_ahead", no_compilation)
  resolved = config_utils.resolve_auto(config, "cpu")
  on_cpu = config_utils.override(resolved.copy_and_resolve_references(), {"preflight.device_memory_bytes": 0})
  assert preflight.check(on_cpu, run, params["unet"], frozen) is None  # the CPU reports no memory: skipped
  off = config_utils.override(on_cpu.copy_and_resolve_references(), {"preflight.enabled": False})
  assert preflight.check(off, run, params["unet"], frozen) is None
  large = config_utils.override(on_cpu.copy_and_resolve_references(), {"preflight.device_memory_bytes": 2**40})
  peaks = preflight.check(large, run, params["unet"], frozen)
  # The planner's count: the sampler's own peak plus the rest of the state; the step's plus the frozen params.
  assert peaks.sampling > run.memory["sample"].peak and peaks.training > run.memory["optimizer_step"].peak
  assert peaks == preflight.run_peaks(resolved, run)


def refused(memory, available=16 * GiB):
  """`memory` as steps.compile_ahead returns it when the compiler refuses the program (XLA:TPU's message)."""
  message = (
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (24.00G) "
    f"exceeds available HBM ({available / GiB:.2f}G)."
  )
  refusal = steps.out_of_memory(RuntimeError(message))
  assert refusal == steps.OutOfMemory(24 * GiB, available, False, message)
  return dataclasses.replace(memory, temporaries=refusal.required, outputs=0, aliased=0, out_of_memory=refusal)


def test_the_compilers_refusals_are_read_from_its_two_messages():
  whole = steps.out_of_memory(
    RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 17.46G of 15.75G hbm. Exceeded")
  )
  assert (whole.required, whole.available, whole.whole_program) == (int(17.46 * GiB), int(15.75 * GiB), True)
  assert steps.out_of_memory(RuntimeError("INVALID_ARGUMENT: shapes")) is None
  assert steps.out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: no figure")) is None


def test_a_step_the_compiler_refused_stops_the_run_naming_it(tiny_run):
  """On a TPU the compiler itself refuses a step too big for the HBM (steps.compile_ahead then returns its Memory
  with `out_of_memory`): the pre-flight counts the refusal's figure, on the limit the refusal names where the
  device reports none, and stops the run; with the check off, it stops the run too, naming the check."""
  config, params, run, _, _, _ = tiny_run
  frozen = {"vae": params["vae"], "text_encoder": params["text_encoder"]}
  memory = dict(run.memory, optimizer_step=refused(run.memory["optimizer_step"]))
  over = dataclasses.replace(run, memory=memory)
  resolved = config_utils.resolve_auto(config, "cpu")
  on_cpu = config_utils.override(
    resolved.copy_and_resolve_references(), {"preflight.device_memory_bytes": 0, "preflight.max_compilations": 0}
  )
  with pytest.raises(validation.ConfigError) as error:
    preflight.check(on_cpu, over, params["unet"], frozen)
  message = str(error.value)
  assert message.startswith("The compiler refused the optimizer_step step (RESOURCE_EXHAUSTED: Ran out of memory")
  assert "the limit is config.preflight.headroom=0.9 x 16.00 GiB (the device memory the compiler's refusal" in message
  assert "the training phase needs 24." in message and "--config.train.batch_size=" in message
  off = config_utils.override(on_cpu.copy_and_resolve_references(), {"preflight.enabled": False})
  with pytest.raises(validation.ConfigError, match=r"refused the optimizer_step step .*preflight.enabled=True"):
    preflight.check(off, over, params["unet"], frozen)


def snapshot(folder):
  """{relative path: sha256} of the files under `folder`, but the run's lock (workdir_lock: an empty file once the
  run has ended)."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      if name == workdir_lock.LOCK_FILE:
        continue
      with open(os.path.join(root, name), "rb") as f:
        out[os.path.relpath(os.path.join(root, name), folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_the_trainer_refuses_a_setting_that_does_not_fit(tiny_run, tiny_model_dir, tmp_path, monkeypatch):
  """A device memory 1 byte below the tiny run's training peak: the run stops after compiling, before placing
  a param or writing a file, naming the fix it measured to fit: minibatches of 1 per device, accumulation 4."""
  config, _, run, _, _, _ = tiny_run
  base = preflight.run_peaks(config, run)  # the peaks the trainer compiles too: the same config
  assert base.sampling < base.training
  (tmp_path / "config.json").write_text("{}")  # an earlier run's files
  (tmp_path / "metrics.jsonl").write_text('{"epoch": 0}\n')
  before = snapshot(tmp_path)

  def placed(*args):
    raise AssertionError("params were placed before the pre-flight")

  monkeypatch.setattr(steps.Steps, "place_frozen", placed)
  limit = base.training - 1
  overrides = {"preflight.device_memory_bytes": limit, "preflight.headroom": 1.0, "preflight.max_compilations": 1}
  with pytest.raises(validation.ConfigError) as error:
    train.train(tiny_config(tiny_model_dir, **overrides), str(tmp_path))
  message = str(error.value)
  print(message)
  assert f"the sampling phase needs {preflight.size(base.sampling)} per device (fits)" in message
  assert f"the training phase needs {preflight.size(base.training)} per device;" in message
  fits = message.split("Measured to fit (1 compilation(s)")[1].split("Not measured:")[0]
  line = re.search(r"  (.*): (--config.*)  \(sampling ([0-9.]+) MiB, training ([0-9.]+) MiB\)", fits)
  assert line.groups()[:2] == (
    preflight.TRAIN_BATCH,
    "--config.train.batch_size=8 --config.train.gradient_accumulation_steps=4",
  )
  assert float(line.group(4)) * MiB < limit
  not_measured = message.split("Not measured:")[1]
  for lever in ("--config.train.remat=True", "--config.mesh.data=1 --config.mesh.fsdp=8", "--config.lora.rank=4"):
    assert lever in not_measured
  assert "0 left of config.preflight.max_compilations=1" in not_measured
  assert snapshot(tmp_path) == before
