"""Reading PyTorch safetensors without torch (ddpo_jax/models/pytorch_weights.py)."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from ddpo_jax.models import pytorch_weights


def test_reads_single_and_sharded_folders(tmp_path):
  a, b = np.arange(6, dtype=np.float16).reshape(2, 3), np.arange(4, dtype=np.int64)
  save_file({"x.weight": a, "y": b}, str(tmp_path / "model.safetensors"))
  state = pytorch_weights.read_state_dict(str(tmp_path))
  assert state["x.weight"].dtype == np.float32 and state["y"].dtype == np.int64
  np.testing.assert_array_equal(state["x.weight"], a.astype(np.float32))
  sharded = tmp_path / "sharded"
  sharded.mkdir()
  save_file({"x.weight": a}, str(sharded / "model-00001-of-00002.safetensors"))
  save_file({"y": b}, str(sharded / "model-00002-of-00002.safetensors"))
  index = {"weight_map": {"x.weight": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}
  (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
  assert sorted(pytorch_weights.read_state_dict(str(sharded))) == ["x.weight", "y"]


def test_pickled_weights_are_refused_with_the_way_out(tmp_path):
  (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not unpickled")
  with pytest.raises(pytorch_weights.PickledWeightsError, match="safetensors") as error:
    pytorch_weights.read_state_dict(str(tmp_path))
  assert "diffusion_pytorch_model.bin" in str(error.value) and "weights_only=True" in str(error.value)
  os.remove(tmp_path / "diffusion_pytorch_model.bin")
  with pytest.raises(FileNotFoundError):
    pytorch_weights.read_state_dict(str(tmp_path))


def test_layouts_compute_what_pytorch_does():
  rng = np.random.default_rng(0)
  weight, x = rng.standard_normal((5, 3)), rng.standard_normal((2, 3))  # Linear(3, 5)
  np.testing.assert_allclose(x @ pytorch_weights.linear_kernel(weight), x @ weight.T)
  conv = rng.standard_normal((8, 4, 3, 2))  # Conv2d(4, 8, (3, 2))
  assert pytorch_weights.conv_kernel(conv).shape == (3, 2, 4, 8)
  assert pytorch_weights.conv_kernel(conv)[1, 0, 2, 7] == conv[7, 2, 1, 0]


def test_tree_helpers():
  tree = pytorch_weights.unflatten({("a", "b"): 1, ("a", "c"): 2, ("d",): 3})
  assert tree == {"a": {"b": 1, "c": 2}, "d": 3}
  expected = {"a": {"kernel": np.zeros((2, 3))}, "b": np.zeros(4)}
  pytorch_weights.check_tree({"a": {"kernel": np.zeros((2, 3))}, "b": np.zeros(4)}, expected, "unet")
  with pytest.raises(ValueError, match="missing b .*unexpected c"):
    pytorch_weights.check_tree({"a": {"kernel": np.zeros((2, 3))}, "c": np.zeros(1)}, expected, "unet")
  with pytest.raises(ValueError, match=r"a/kernel: \(3, 2\) instead of \(2, 3\)"):
    pytorch_weights.check_tree({"a": {"kernel": np.zeros((3, 2))}, "b": np.zeros(4)}, expected, "unet")
