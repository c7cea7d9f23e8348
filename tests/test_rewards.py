from __future__ import annotations

import numpy as np
import pytest

from ddpo_jax import rewards
from ddpo_jax.toy import shapes


def _flat_and_noise(size: int = 64) -> np.ndarray:
  rng = np.random.default_rng(0)
  flat = np.full((size, size, 3), 128, np.uint8)
  noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
  return np.stack([flat, noise])


def test_jpeg_flat_is_more_compressible_than_noise():
  images = _flat_and_noise()
  compress = rewards.make("jpeg_compressibility")(images, ["x", "y"])
  incompress = rewards.make("jpeg_incompressibility")(images, ["x", "y"])
  assert compress.dtype == np.float32 and compress.shape == (2,)
  assert compress[0] > compress[1]
  assert (compress < 0).all()
  np.testing.assert_array_equal(incompress, -compress)


def test_jpeg_size_is_in_kilobytes():
  noise = _flat_and_noise(64)[1]
  # 64*64*3 bytes of noise stay around that size at quality 95.
  assert 5 < rewards.jpeg.jpeg_size_kb(noise) < 20


def test_jpeg_rejects_non_uint8():
  with pytest.raises(ValueError, match="uint8"):
    rewards.make("jpeg_compressibility")(np.zeros((1, 8, 8, 3), np.float32), ["x"])


def test_toy_alignment_own_vs_shuffled_captions():
  images, captions = shapes.sample_batch(np.random.default_rng(0), 16)
  reward = rewards.make("toy_alignment")
  own = reward(images, captions)
  assert own.dtype == np.float32 and own.shape == (16,)
  np.testing.assert_array_equal(own, 1.0)
  shuffled = captions[5:] + captions[:5]
  assert reward(images, shuffled).mean() < 0.6


def test_registered_builtins():
  assert {"jpeg_compressibility", "jpeg_incompressibility", "toy_alignment"} <= set(rewards.registered())


def test_import_path_lookup(tmp_path, monkeypatch):
  (tmp_path / "my_reward_mod.py").write_text(
    "import numpy as np\n"
    "def make_constant(value=1.0):\n"
    "  return lambda images, prompts: np.full(len(images), value, np.float32)\n"
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  fn = rewards.make("my_reward_mod:make_constant", value=3.0)
  np.testing.assert_array_equal(fn(np.zeros((2, 4, 4, 3), np.uint8), ["a", "b"]), [3.0, 3.0])
  with pytest.raises(ValueError, match="cannot import"):
    rewards.make("no_such_module_xyz:f")


def test_unknown_reward():
  with pytest.raises(ValueError) as info:
    rewards.make("aesthetic_score_nope")
  message = str(info.value)
  assert "'aesthetic_score_nope'" in message
  assert "jpeg_compressibility" in message and "toy_alignment" in message


def test_check_rewards_ok_converts_to_float32():
  images = np.zeros((3, 4, 4, 3), np.uint8)
  out = rewards.check_rewards("r", [1, 2.5, -1], images, ["a", "b", "c"])
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, [1, 2.5, -1])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_rewards_not_finite(bad):
  images = np.zeros((3, 4, 4, 3), np.uint8)
  with pytest.raises(ValueError) as info:
    rewards.check_rewards("my_reward", np.array([0.0, bad, bad]), images, ["a cat", "a dog", "a fox"])
  message = str(info.value)
  assert "'my_reward'" in message and "'a dog'" in message


def test_check_rewards_wrong_shape():
  images = np.zeros((2, 4, 4, 3), np.uint8)
  for bad in (np.zeros(3), np.zeros((2, 1)), 1.0):
    with pytest.raises(ValueError) as info:
      rewards.check_rewards("my_reward", bad, images, ["a cat", "a dog"])
    message = str(info.value)
    assert "'my_reward'" in message and "'a cat'" in message and "(2,)" in message


def test_check_rewards_non_numeric():
  images = np.zeros((1, 4, 4, 3), np.uint8)
  with pytest.raises(ValueError, match="'my_reward'.*'a cat'"):
    rewards.check_rewards("my_reward", ["high"], images, ["a cat"])
