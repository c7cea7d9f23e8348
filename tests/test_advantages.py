from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ddpo_jax import advantages
from ddpo_jax.advantages import PerPromptStatTracker
from ddpo_jax.advantages import compute_advantages
from ddpo_jax.advantages import normalize


def test_normalize():
  # mean 2, std sqrt(2/3)
  np.testing.assert_allclose(normalize(np.array([1.0, 2.0, 3.0])), [-1.2247449, 0, 1.2247449], rtol=1e-5)
  np.testing.assert_allclose(normalize(np.array([5.0, 5.0])), [0.0, 0.0])


def test_ring_buffer_drops_oldest():
  tracker = PerPromptStatTracker(buffer_size=3, min_count=1)
  tracker.update(["a", "a"], np.array([1.0, 2.0]))
  adv = tracker.update(["a", "a"], np.array([3.0, 4.0]))
  assert tracker.state() == {"a": [2.0, 3.0, 4.0]}
  # buffer [2, 3, 4]: mean 3, std sqrt(2/3)
  np.testing.assert_allclose(adv, [0.0, 1 / math.sqrt(2 / 3)], rtol=1e-5)
  assert adv.dtype == np.float32


def test_below_min_count_uses_batch_stats():
  tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
  # one reward per prompt buffered: batch mean 2, std 1
  np.testing.assert_allclose(tracker.update(["a", "b"], np.array([1.0, 3.0])), [-1.0, 1.0], rtol=1e-5)


def test_mix_of_tracked_and_unseen_prompts():
  tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
  tracker.update(["a", "a", "a"], np.array([1.0, 2.0, 3.0]))
  adv = tracker.update(["b", "a"], np.array([10.0, 4.0]))
  # "a": buffer [1, 2, 3, 4], mean 2.5, std sqrt(1.25); "b" unseen: batch mean 7, std 3
  np.testing.assert_allclose(adv, [1.0, 1.5 / math.sqrt(1.25)], rtol=1e-5)
  assert tracker.stats() == {"num_prompts": 2, "mean_buffer_length": 2.5}


def test_unseen_prompt_with_min_count_one_has_zero_advantage():
  tracker = PerPromptStatTracker(buffer_size=4, min_count=1)
  np.testing.assert_allclose(tracker.update(["new", "other"], np.array([5.0, 1.0])), [0.0, 0.0])


def test_compute_advantages_clips():
  # mean 2.5, std sqrt(75/4): [-0.577, -0.577, -0.577, 1.732] before clipping
  adv = compute_advantages(["p"] * 4, np.array([0.0, 0.0, 0.0, 10.0]), None, clip=1.5)
  np.testing.assert_allclose(adv, [-1 / math.sqrt(3)] * 3 + [1.5], rtol=1e-5)
  assert adv.dtype == np.float32
  tracker = PerPromptStatTracker(buffer_size=8, min_count=1)
  adv = compute_advantages(["p"] * 4, np.array([0.0, 0.0, 0.0, 10.0]), tracker, clip=1.0)
  np.testing.assert_allclose(adv, [-1 / math.sqrt(3)] * 3 + [1.0], rtol=1e-5)


def test_compute_advantages_checks_inputs():
  with pytest.raises(ValueError, match="clip"):
    compute_advantages(["p"], np.array([1.0]), None, clip=0.0)
  with pytest.raises(ValueError, match="2 prompts"):
    compute_advantages(["p", "q"], np.array([1.0]), None, clip=1.0)


def test_state_round_trip():
  tracker = PerPromptStatTracker(buffer_size=3, min_count=2)
  tracker.update(["a", "b", "a"], np.array([1.0, 2.0, 3.0]))
  state = json.loads(json.dumps(tracker.state()))
  assert state == {"a": [1.0, 3.0], "b": [2.0]}
  restored = PerPromptStatTracker(buffer_size=3, min_count=2)
  restored.load_state(state)
  batch = (["a", "b", "c"], np.array([5.0, 0.0, 7.0]))
  np.testing.assert_array_equal(restored.update(*batch), tracker.update(*batch))
  assert restored.state() == tracker.state()


def test_load_state_keeps_newest():
  tracker = PerPromptStatTracker(buffer_size=2, min_count=1)
  tracker.load_state({"a": [1.0, 2.0, 3.0]})
  assert tracker.state() == {"a": [2.0, 3.0]}


def test_invalid_sizes():
  with pytest.raises(ValueError):
    PerPromptStatTracker(buffer_size=0, min_count=0)
  with pytest.raises(ValueError):
    PerPromptStatTracker(buffer_size=4, min_count=5)


def test_group_advantages_by_hand():
  rewards_ = np.array([1.0, 3.0, 2.0, 2.0, 5.0, 5.0, 0.0, 4.0, np.nan, 7.0, 1.0, np.nan])
  adv, tied = advantages.group_advantages(rewards_, 2, std="group")
  # groups: (1, 3): mean 2, std 1; (2, 2) tied; (5, 5) tied; (0, 4): mean 2, std 2;
  # (nan, 7): one valid sample: tied; (1, nan): tied.
  np.testing.assert_allclose(adv, [-1, 1, 0, 0, 0, 0, -1, 1, 0, 0, 0, 0], atol=1e-5)
  np.testing.assert_array_equal(tied, [False, True, True, False, True, True])
  assert adv.dtype == np.float32

  adv, tied = advantages.group_advantages(rewards_, 2, std="batch")
  batch_std = np.nanstd(rewards_)  # over the 10 valid rewards
  np.testing.assert_allclose(adv, np.array([-1, 1, 0, 0, 0, 0, -2, 2, 0, 0, 0, 0]) / batch_std, rtol=1e-5)

  adv, tied = advantages.group_advantages(np.array([1.0, 2.0, 3.0, 9.0, 9.0, 9.0]), 3)
  np.testing.assert_allclose(adv, [-np.sqrt(1.5), 0, np.sqrt(1.5), 0, 0, 0], rtol=1e-5)
  np.testing.assert_array_equal(tied, [False, True])
  with pytest.raises(ValueError, match="groups of 4"):
    advantages.group_advantages(np.zeros(6), 4)
