"""The LAION aesthetic reward: weight conversion, CLIP preprocessing, the
sharded scorer, and CLIP loading (offline: tiny random CLIP towers)."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from ddpo_jax import rewards
from ddpo_jax.rewards import aesthetic

ORIGINAL_WEIGHTS = "/work/shared/data/weights/sac+logos+ava1-l14-linearMSE.pth"
# One uint8 level after CLIP's normalisation, at the smallest channel std.
ONE_LEVEL = 1 / 255 / min(aesthetic.CLIP_STD)


@pytest.fixture(scope="module")
def clip_models():
  from ddpo_jax.models import clip as clip_models

  return clip_models


@pytest.fixture(scope="module")
def tiny_reward():
  return rewards.make("aesthetic", clip_model="tiny-random")


def _numpy_mlp(state_dict: dict[str, np.ndarray], embeddings: np.ndarray) -> np.ndarray:
  """The PyTorch predictor's forward pass in eval mode (Dropout is the identity), in float64."""
  x = embeddings.astype(np.float64)
  for index in (0, 2, 4, 6, 7):
    x = x @ state_dict[f"layers.{index}.weight"].T.astype(np.float64) + state_dict[f"layers.{index}.bias"]
  return x[:, 0]


def _unit_embeddings(num: int, seed: int = 0) -> np.ndarray:
  x = np.random.default_rng(seed).normal(size=(num, aesthetic.EMBED_DIM)).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _pil_clip_pixels(image: np.ndarray, size: int) -> np.ndarray:
  """CLIP's preprocessing written plainly with PIL: float32 [size, size, 3]."""
  height, width = image.shape[:2]
  new_height, new_width = aesthetic.resized_shape(height, width, size)
  resized = np.asarray(Image.fromarray(image).resize((new_width, new_height), Image.BICUBIC), np.float32)
  top, left = (new_height - size) // 2, (new_width - size) // 2
  crop = resized[top : top + size, left : left + size]
  return (crop / 255 - np.array(aesthetic.CLIP_MEAN)) / np.array(aesthetic.CLIP_STD)


# ----------------------------------------------------------------------------
# (a) The converted MLP.
# ----------------------------------------------------------------------------


def test_converted_mlp_matches_the_original_state_dict(tmp_path):
  torch = pytest.importorskip("torch")
  if not os.path.exists(ORIGINAL_WEIGHTS):
    pytest.skip(f"{ORIGINAL_WEIGHTS} is not here")
  from safetensors.numpy import load_file

  from ddpo_jax.rewards import convert_aesthetic

  converted = str(tmp_path / "mlp.safetensors")
  convert_aesthetic.convert(ORIGINAL_WEIGHTS, converted)
  state_dict = {k: v.numpy() for k, v in torch.load(ORIGINAL_WEIGHTS, weights_only=True, map_location="cpu").items()}
  embeddings = _unit_embeddings(32)
  expected = _numpy_mlp(state_dict, embeddings)
  for path in (converted, aesthetic.WEIGHTS_FILE):
    scores = aesthetic.AestheticMLP().apply({"params": aesthetic.load_mlp_params(path)}, jnp.asarray(embeddings))
    assert scores.shape == (32,) and scores.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-5, atol=1e-5)
  # The packaged file is exactly what the converter writes.
  fresh, shipped = load_file(converted), load_file(aesthetic.WEIGHTS_FILE)
  assert fresh.keys() == shipped.keys()
  for key in fresh:
    np.testing.assert_array_equal(fresh[key], shipped[key])


def test_to_flax_rejects_other_state_dicts():
  from ddpo_jax.rewards import convert_aesthetic

  with pytest.raises(ValueError, match="LAION aesthetic"):
    convert_aesthetic.to_flax({"layers.0.weight": np.zeros((1024, 512), np.float32)})


# ----------------------------------------------------------------------------
# (b) CLIP's preprocessing.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(300, 451), (37, 53), (250, 200), (32, 32), (512, 512)])
def test_clip_pixels_match_pil(shape):
  """JAX vs PIL on noise (the worst case for resampling).

  PIL resizes in two 1-D passes, width then height, with fixed-point weights
  and a uint8 result after each pass; `clip_pixels` does the same passes in
  float32, rounding likewise. A value within float error of .5 may round the
  other way, so a pixel may differ by one uint8 level (ONE_LEVEL, about 0.015,
  after normalisation) and nearly all are equal. Pillow >= 13 runs the height
  first when it shrinks more than the width (tall images scaled down), which
  would differ by more: those shapes are left out.
  """
  image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
  expected = _pil_clip_pixels(image, 224)
  got = np.asarray(jax.jit(aesthetic.clip_pixels, static_argnums=1)(image[None], 224)[0])
  assert got.shape == (224, 224, 3) and got.dtype == np.float32
  difference = np.abs(got - expected)
  assert difference.max() <= ONE_LEVEL + 1e-5
  assert (difference > 1e-5).mean() < 0.01


def test_pil_reference_is_clip_image_processor():
  from transformers import CLIPImageProcessor

  processor = CLIPImageProcessor()  # CLIP's defaults: 224, bicubic, centre crop, CLIP mean/std
  image = np.random.default_rng(0).integers(0, 256, (250, 170, 3), dtype=np.uint8)
  expected = processor(images=Image.fromarray(image), return_tensors="np").pixel_values[0].transpose(1, 2, 0)
  np.testing.assert_allclose(_pil_clip_pixels(image, 224), expected, atol=1e-5)


# ----------------------------------------------------------------------------
# (c) The reward, sharded over the 8 CPU devices.
# ----------------------------------------------------------------------------


def test_reward_sharded_equals_one_device(tiny_reward, clip_models):
  assert len(jax.local_devices()) == 8
  images = np.random.default_rng(0).integers(0, 256, (13, 32, 48, 3), dtype=np.uint8)  # 13: padded to 16
  scores = tiny_reward(images, ["a cat"] * 13)
  assert scores.dtype == np.float32 and scores.shape == (13,)
  assert np.isfinite(scores).all() and np.ptp(scores) > 0

  module, vision_params, image_size = clip_models.load_vision(clip_models.TINY_RANDOM)
  params = {"vision": vision_params, "mlp": aesthetic.load_mlp_params()}
  device = jax.local_devices()[0]
  score_fn = jax.jit(functools.partial(aesthetic.aesthetic_scores, module, image_size))
  expected = score_fn(jax.device_put(params, device), jax.device_put(images, device))
  assert expected.sharding.device_set == {device}
  np.testing.assert_allclose(scores, np.asarray(expected), rtol=1e-5, atol=1e-5)
  # Each image's score is its own, whatever the batch and its padding.
  np.testing.assert_allclose(tiny_reward(images[:3], ["a cat"] * 3), scores[:3], rtol=1e-5, atol=1e-5)


def test_reward_rejects_float_images(tiny_reward):
  with pytest.raises(ValueError, match="uint8"):
    tiny_reward(np.zeros((2, 32, 32, 3), np.float32), ["a", "b"])


def test_registered():
  assert "aesthetic" in rewards.registered()


# ----------------------------------------------------------------------------
# (d) Loading CLIP towers.
# ----------------------------------------------------------------------------


def _pixels(size: int, num: int = 2) -> jax.Array:
  return jax.random.normal(jax.random.PRNGKey(1), (num, size, size, 3))


def test_load_vision_from_local_folder(tmp_path, clip_models):
  clip_models.build_tiny_vision().save_pretrained(str(tmp_path))
  module, params, image_size = clip_models.load_vision(str(tmp_path))
  tiny_module, tiny_params, tiny_size = clip_models.load_vision(clip_models.TINY_RANDOM)
  assert image_size == tiny_size == 224
  pixels = _pixels(image_size)
  embeddings = module.apply({"params": params}, pixels)
  assert embeddings.shape == (2, aesthetic.EMBED_DIM)
  np.testing.assert_array_equal(np.asarray(embeddings), np.asarray(tiny_module.apply({"params": tiny_params}, pixels)))


def test_load_vision_matches_torch_clip_model(tmp_path, clip_models):
  """A two-tower CLIPModel checkpoint, the layout of openai/clip-vit-large-patch14,
  gives torch's get_image_features: as PyTorch weights, and as Flax weights
  (whose text tower is skipped)."""
  torch = pytest.importorskip("torch")
  from flax import serialization
  from transformers import CLIPConfig
  from transformers import CLIPModel

  vision = {k: v for k, v in clip_models.TINY_CONFIG.items() if k != "projection_dim"}
  text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
  torch.manual_seed(0)
  torch_model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).eval()
  torch_model.save_pretrained(str(tmp_path / "pt"))
  pixels = np.asarray(_pixels(224))
  with torch.no_grad():
    expected = torch_model.get_image_features(torch.tensor(pixels.transpose(0, 3, 1, 2))).numpy()

  module, params, image_size = clip_models.load_vision(str(tmp_path / "pt"), from_pt=True)
  assert image_size == 224
  np.testing.assert_allclose(np.asarray(module.apply({"params": params}, pixels)), expected, rtol=1e-4, atol=1e-5)

  flax_dir = tmp_path / "flax"
  flax_dir.mkdir()
  torch_model.config.to_json_file(str(flax_dir / "config.json"))
  text_tower = {"text_projection": {"kernel": np.zeros((16, 768), np.float32)}, "logit_scale": np.float32(2.0)}
  (flax_dir / "flax_model.msgpack").write_bytes(serialization.to_bytes({**jax.device_get(params), **text_tower}))
  module, params, _ = clip_models.load_vision(str(flax_dir))
  np.testing.assert_allclose(np.asarray(module.apply({"params": params}, pixels)), expected, rtol=1e-4, atol=1e-5)


def test_aesthetic_rejects_other_embedding_widths(tmp_path, clip_models):
  from transformers import CLIPVisionConfig

  config = CLIPVisionConfig(**dict(clip_models.TINY_CONFIG, projection_dim=512))
  clip_models.FlaxCLIPVisionModelWithProjection(config).save_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match="768"):
    rewards.make("aesthetic", clip_model=str(tmp_path))
