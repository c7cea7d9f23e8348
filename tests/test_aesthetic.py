"""The LAION aesthetic reward: weight conversion, CLIP preprocessing, the
sharded scorer, and CLIP loading (offline: tiny random CLIP towers), against
transformers' PyTorch CLIP."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from ddpo_jax import rewards
from ddpo_jax.models import clip
from ddpo_jax.models import clip_towers
from ddpo_jax.rewards import aesthetic

ORIGINAL_WEIGHTS = "/work/shared/data/weights/sac+logos+ava1-l14-linearMSE.pth"
# One uint8 level after CLIP's normalisation, at the smallest channel std.
ONE_LEVEL = 1 / 255 / min(aesthetic.CLIP_STD)


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
  """CLIP's preprocessing written plainly with PIL: float32 [3, size, size] (channels first, as CLIPImageProcessor)."""
  height, width = image.shape[:2]
  new_height, new_width = aesthetic.resized_shape(height, width, size)
  resized = np.asarray(Image.fromarray(image).resize((new_width, new_height), Image.BICUBIC), np.float32)
  top, left = (new_height - size) // 2, (new_width - size) // 2
  crop = resized[top : top + size, left : left + size]
  return ((crop / 255 - np.array(aesthetic.CLIP_MEAN)) / np.array(aesthetic.CLIP_STD)).transpose(2, 0, 1)


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
  assert got.shape == (3, 224, 224) and got.dtype == np.float32
  difference = np.abs(got - expected)
  assert difference.max() <= ONE_LEVEL + 1e-5
  assert (difference > 1e-5).mean() < 0.01


def test_pil_reference_is_clip_image_processor():
  from transformers import CLIPImageProcessor

  processor = CLIPImageProcessor()  # CLIP's defaults: 224, bicubic, centre crop, CLIP mean/std
  image = np.random.default_rng(0).integers(0, 256, (250, 170, 3), dtype=np.uint8)
  expected = processor(images=Image.fromarray(image), return_tensors="np").pixel_values[0]
  np.testing.assert_allclose(_pil_clip_pixels(image, 224), expected, atol=1e-5)


# ----------------------------------------------------------------------------
# (c) The reward, sharded over the 8 CPU devices.
# ----------------------------------------------------------------------------


def test_reward_sharded_equals_one_device(tiny_reward):
  assert len(jax.local_devices()) == 8
  images = np.random.default_rng(0).integers(0, 256, (13, 32, 48, 3), dtype=np.uint8)  # 13: padded to 16
  scores = tiny_reward(images, ["a cat"] * 13)
  assert scores.dtype == np.float32 and scores.shape == (13,)
  assert np.isfinite(scores).all() and np.ptp(scores) > 0

  module, vision_params, image_size = clip.load_vision(clip.TINY_RANDOM)
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
# (d) Loading CLIP towers, and the reward against transformers' PyTorch CLIP.
# ----------------------------------------------------------------------------

# TINY_CONFIG without projection_dim, which a CLIPModel config keeps at its top level.
TINY_VISION = {k: v for k, v in clip.TINY_CONFIG.items() if k != "projection_dim"}


def _pixels(size: int, num: int = 2) -> np.ndarray:
  return np.array(jax.random.normal(jax.random.PRNGKey(1), (num, 3, size, size)))


def relative_error(ours, theirs) -> float:
  """max |ours - theirs| / max |theirs|."""
  theirs = np.asarray(theirs, np.float64)
  return float(np.abs(np.asarray(ours, np.float64) - theirs).max() / np.abs(theirs).max())


def _perturbed(model, seed: int = 0):
  """The torch model in eval mode with every param moved off its init (layer norms off 1 and 0)."""
  import torch

  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.1 * torch.randn(param.shape, generator=generator))
  return model.eval()


def _flax_folder(folder, config: dict, params) -> str:
  """A folder as transformers' Flax save_pretrained writes it: config.json and flax_model.msgpack."""
  from flax import serialization

  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(folder, clip.FLAX_WEIGHTS), "wb") as f:
    f.write(serialization.msgpack_serialize(jax.device_get(params)))
  return str(folder)


def test_tiny_random_is_deterministic():
  module, params, image_size = clip.load_vision(clip.TINY_RANDOM)
  again_module, again, _ = clip.load_vision(clip.TINY_RANDOM)
  assert image_size == 224 and module.config == again_module.config
  assert again is not params  # a fresh tree: editing it leaves the cache alone
  jax.tree.map(np.testing.assert_array_equal, params, again)
  # The init itself, not just the cache, is the seed's.
  fresh = clip._tiny_params.__wrapped__(clip.TINY_SEED)
  jax.tree.map(np.testing.assert_array_equal, params, fresh)
  other = clip._tiny_params.__wrapped__(clip.TINY_SEED + 1)
  assert not np.array_equal(params["visual_projection"]["kernel"], other["visual_projection"]["kernel"])
  assert module.apply({"params": params}, _pixels(image_size)).shape == (2, aesthetic.EMBED_DIM)
  bfloat16, bfloat16_params, _ = clip.load_vision(clip.TINY_RANDOM, dtype="bfloat16")
  assert bfloat16.dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(bfloat16_params))


def test_load_vision_from_flax_msgpack_folder(tmp_path):
  """A folder saved by transformers' Flax classes (flax_model.msgpack) loads, and a misfit is named."""
  _, params, _ = clip.load_vision(clip.TINY_RANDOM)
  config = dict(clip.TINY_CONFIG, model_type="clip_vision_model")
  module, loaded, image_size = clip.load_vision(_flax_folder(tmp_path / "flax", config, params))
  assert image_size == 224 and module.config == clip_towers.VisionConfig(**clip.TINY_CONFIG)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)

  misfit = dict(params, visual_projection={"kernel": np.zeros((32, 512), np.float32)})
  with pytest.raises(ValueError, match="visual_projection/kernel: \\(32, 512\\) instead of \\(32, 768\\)"):
    clip.load_vision(_flax_folder(tmp_path / "misfit", config, misfit))


def test_load_vision_matches_torch_clip_model(tmp_path):
  """A two-tower CLIPModel folder, the layout of openai/clip-vit-large-patch14, gives torch's
  get_image_features: as safetensors, and as Flax msgpack (the text tower skipped in both)."""
  torch = pytest.importorskip("torch")
  from transformers import CLIPConfig
  from transformers import CLIPModel

  text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
  torch.manual_seed(0)
  torch_model = _perturbed(CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_VISION, projection_dim=768)))
  torch_model.save_pretrained(str(tmp_path / "pt"), safe_serialization=True)
  pixels = _pixels(224)
  with torch.no_grad():
    output = torch_model.get_image_features(pixel_values=torch.from_numpy(pixels))
    expected = getattr(output, "pooler_output", output).numpy()  # transformers 5: an output object

  module, params, image_size = clip.load_vision(str(tmp_path / "pt"))
  assert image_size == 224
  assert relative_error(module.apply({"params": params}, pixels), expected) < 1e-5

  text_tower = {"text_projection": {"kernel": np.zeros((16, 768), np.float32)}, "logit_scale": np.float32(2.0)}
  flax_dir = _flax_folder(tmp_path / "flax", torch_model.config.to_dict(), {**jax.device_get(params), **text_tower})
  module, params, _ = clip.load_vision(flax_dir)
  assert relative_error(module.apply({"params": params}, pixels), expected) < 1e-5


def _numpy_scores(embeddings: np.ndarray, mlp_params) -> np.ndarray:
  """The aesthetic MLP on L2-normalised embeddings, in float64 NumPy."""
  x = embeddings.astype(np.float64)
  x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  for index, _ in aesthetic.MLP_LAYERS:
    layer = mlp_params[aesthetic.layer_name(index)]
    x = x @ layer["kernel"].astype(np.float64) + layer["bias"]
  return x[:, 0]


def test_reward_equals_torch_clip_vision_model(tmp_path):
  """The reward of fixed images through a tiny tower equals transformers' PyTorch
  CLIPVisionModelWithProjection (the same weights) then the MLP in float64.

  The images are 224 high, so that CLIP's preprocessing is a centre crop and
  the normalisation, written here in NumPy: a bicubic resize could round a
  pixel at a tie of .5 one way in the jitted reward and the other way in the
  reference, moving scores by some 1e-5 (resizing is tested against PIL above).
  """
  torch = pytest.importorskip("torch")
  from transformers import CLIPVisionConfig
  from transformers import CLIPVisionModelWithProjection

  torch.manual_seed(0)
  torch_model = _perturbed(CLIPVisionModelWithProjection(CLIPVisionConfig(**clip.TINY_CONFIG)))
  torch_model.save_pretrained(str(tmp_path), safe_serialization=True)
  images = np.random.default_rng(0).integers(0, 256, (5, 224, 280, 3), dtype=np.uint8)
  scores = rewards.make("aesthetic", clip_model=str(tmp_path))(images, ["a cat"] * 5)

  crop = images[:, :, 28:252] / 255
  pixels = ((crop - np.array(aesthetic.CLIP_MEAN)) / np.array(aesthetic.CLIP_STD)).transpose(0, 3, 1, 2)
  with torch.no_grad():
    embeddings = torch_model(pixel_values=torch.tensor(pixels, dtype=torch.float32)).image_embeds.numpy()
  expected = _numpy_scores(embeddings, aesthetic.load_mlp_params())
  assert np.ptp(expected) > 1e-3  # the images' scores differ, so the comparison means something
  np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


def test_pickled_weights_are_refused_with_the_conversion(tmp_path):
  from transformers import CLIPVisionConfig

  from ddpo_jax.models import pytorch_weights

  CLIPVisionConfig(**clip.TINY_CONFIG).save_pretrained(str(tmp_path))
  (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
  with pytest.raises(pytorch_weights.PickledWeightsError, match="pytorch_model.bin.*safetensors.*st.save_file"):
    rewards.make("aesthetic", clip_model=str(tmp_path))


def test_hub_ids_download_only_config_and_safetensors(tmp_path, monkeypatch):
  """A Hub id asks huggingface_hub for config.json and *.safetensors at the revision; a local name never."""
  huggingface_hub = pytest.importorskip("huggingface_hub")
  _, params, _ = clip.load_vision(clip.TINY_RANDOM)
  snapshot = _flax_folder(tmp_path / "snapshot", dict(clip.TINY_CONFIG, model_type="clip_vision_model"), params)
  calls = []
  monkeypatch.setattr(
    huggingface_hub, "snapshot_download", lambda *args, **kwargs: calls.append((args, kwargs)) or snapshot
  )
  # The snapshot holds msgpack weights only, as if the repo had no safetensors: named, with the ways out.
  with pytest.raises(FileNotFoundError, match="'owner/clip'.*only files ddpo_jax downloads.*st.save_file"):
    clip.load_vision("owner/clip", revision="abc123")
  assert calls == [(("owner/clip",), {"revision": "abc123", "allow_patterns": list(clip.HUB_PATTERNS)})]
  assert clip.HUB_PATTERNS == ("config.json", "*.safetensors", "*.safetensors.index.json")

  with pytest.raises(FileNotFoundError, match="is not a folder"):
    clip.load_vision(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="revision"):
    clip.load_vision(snapshot, revision="abc123")
  assert len(calls) == 1


def test_aesthetic_rejects_other_embedding_widths(tmp_path):
  config = dict(clip.TINY_CONFIG, projection_dim=512, model_type="clip_vision_model")
  module = clip_towers.CLIPVisionModelWithProjection(clip_towers.VisionConfig.from_json(config))
  params = module.init(jax.random.key(0), jnp.zeros((1, 3, 224, 224)))["params"]
  with pytest.raises(ValueError, match="768"):
    rewards.make("aesthetic", clip_model=_flax_folder(tmp_path, config, params))


def test_reward_imports_neither_transformers_nor_torch():
  """The reward builds with the core install only (transformers' Flax classes are gone in v5)."""
  import subprocess
  import sys

  code = (
    "import sys; from ddpo_jax import rewards; rewards.make('aesthetic', clip_model='tiny-random'); "
    "print(sorted(m for m in ('transformers', 'torch', 'diffusers') if m in sys.modules))"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
  assert result.stdout.strip().splitlines()[-1] == "[]"
