"""`python -m benchmarks rollout|train|epoch`: each runs on the smallest model and prints sane JSON lines.

A smoke test of the figures' presence and sanity (positive, finite), and of
the fairness check against the PyTorch reference; never of timings.
"""

import importlib.util
import json
import math
import os

from absl import flags
import pytest

from benchmarks import epoch
from benchmarks import rollout
from benchmarks import speed
from benchmarks import training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture
def run_bench(monkeypatch, capsys):
  """Runs a subcommand's main in this process with the test size; its JSON records."""

  def run(module, *args):
    flag_values = flags.FlagValues()
    speed.define_flags(flag_values)
    flag_values(
      ["bench", f"--config={REPO}/configs/compress.py:tiny", "--size=test", "--repeats=1", "--warmup=0"]
      + ["--matmul_size=256", f"--reference={HAS_TORCH}", *args]
    )
    monkeypatch.setattr(speed, "FLAGS", flag_values)
    capsys.readouterr()
    module.main(["bench"])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]

  return run


def by_impl(records, bench):
  return {r["impl"]: r for r in records if r["bench"] == bench}


def positive(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_fairness(records):
  if not HAS_TORCH:
    return
  (check,) = [r for r in records if r["bench"] == "check"]
  assert check["passed"], check
  assert check["log_prob_max_abs_diff"] <= check["tolerance"]
  assert check["image_max_abs_diff_uint8"] <= 2


def test_rollout(run_bench):
  records = run_bench(rollout)
  check_fairness(records)
  impls = by_impl(records, "rollout")
  ours = impls["ddpo_jax"]
  for key in ("seconds", "images_per_s", "steps_per_s", "compile_s", "peak_mb", "flops", "flops_per_s"):
    assert positive(ours[key]), (key, ours)
  assert 0 < ours["peak_fraction"] < 10
  assert ours["unet_params"] > 0 and ours["batch_size"] == speed.PRESETS["test"].batch_size
  if HAS_TORCH:
    assert positive(impls["torch_reference"]["images_per_s"])
    assert positive(impls["ratio"]["images_per_s"])


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_reference_options_keep_the_log_probs(run_bench):
  records = run_bench(rollout, "--torch_attention=math", "--torch_channels_last")
  check_fairness(records)
  reference_record = by_impl(records, "rollout")["torch_reference"]
  assert reference_record["torch_attention"] == "math" and reference_record["torch_channels_last"]


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_check_fails_when_the_reference_computes_other_log_probs(run_bench, monkeypatch):
  from benchmarks import reference

  gaussian_log_prob = reference.gaussian_log_prob
  monkeypatch.setattr(reference, "gaussian_log_prob", lambda *args: gaussian_log_prob(*args) + 1e-3)
  (check,) = [r for r in run_bench(rollout) if r["bench"] == "check"]
  assert not check["passed"] and check["log_prob_max_abs_diff"] > check["tolerance"], check


def test_train(run_bench):
  records = run_bench(training)
  check_fairness(records)
  impls = by_impl(records, "train")
  ours = impls["ddpo_jax"]
  preset = speed.PRESETS["test"]
  assert ours["transitions"] == preset.batch_size * preset.num_steps
  for key in ("seconds", "transitions_per_s", "compile_s", "peak_mb", "flops", "flops_per_s"):
    assert positive(ours[key]), (key, ours)
  if HAS_TORCH:
    assert positive(impls["torch_reference"]["transitions_per_s"])
    assert positive(impls["ratio"]["transitions_per_s"])


def test_epoch(run_bench):
  impls = by_impl(run_bench(epoch, "--num_batches=2"), "epoch")
  ours = impls["ddpo_jax"]
  for key in ("seconds", "device_work_s", "overhead", "samples_per_s", "first_epoch_s"):
    assert positive(ours[key]), (key, ours)
  if HAS_TORCH:
    assert positive(impls["ratio"]["samples_per_s"])
