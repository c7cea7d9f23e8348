"""The CLIP similarity rewards, clip_score and pickscore: against transformers' PyTorch CLIPModel and
CLIPProcessor on a tiny random CLIPModel folder, their gradients, the factories by name, a short run."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from ddpo_jax import config_utils
from ddpo_jax import metrics
from ddpo_jax import models
from ddpo_jax import rewards
from ddpo_jax import train
from ddpo_jax.models import clip
from ddpo_jax.rewards import aesthetic
from ddpo_jax.rewards import clip_score
from ddpo_jax.toy import shapes
from tests.conftest import TESTS_TRAINING

# A logit scale other than CLIP's init (ln 1/0.07) and OpenAI's trained one (ln 100).
LOGIT_SCALE = math.log(37.0)
IMAGE_SIZE = 32
# Wide images, 40 x 56: resized to 32 x 44 (the width shrinks more, so PIL's passes run in clip_pixels' order), cropped.
IMAGE_SHAPE = (40, 56, 3)
LONG_PROMPT = " ".join(["a red circle on a striped blue background"] * 12)  # 96 words: truncated to 75 tokens
PROMPTS = ["a red circle", "a blue square on a plain green background", LONG_PROMPT, "an zebra, Riding a bike!", ""]


def relative_error(ours, theirs) -> float:
  """max |ours - theirs| / max |theirs|."""
  theirs = np.asarray(theirs, np.float64)
  return float(np.abs(np.asarray(ours, np.float64) - theirs).max() / np.abs(theirs).max())


def _images(num: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (num, *IMAGE_SHAPE), dtype=np.uint8)


@pytest.fixture(scope="module")
def torch_clip(tmp_path_factory):
  """(folder, torch model): a tiny random transformers CLIPModel saved with its tokenizer and image processor
  (a Hub repo's layout), every param moved off its init and logit_scale = LOGIT_SCALE."""
  torch = pytest.importorskip("torch")
  import transformers

  folder = str(tmp_path_factory.mktemp("tiny_clip"))
  tokenizer = models.build_tokenizer([*shapes.vocabulary(), "zebra", "riding", "bike"], folder, max_length=77)
  tokenizer.save(folder)
  layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
  text = dict(
    layers,
    vocab_size=tokenizer.vocab_size,
    max_position_embeddings=77,
    bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id,
    pad_token_id=tokenizer.pad_token_id,
  )
  vision = dict(layers, image_size=IMAGE_SIZE, patch_size=4)
  torch.manual_seed(0)
  model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.1 * torch.randn(param.shape, generator=generator))
    model.logit_scale.fill_(LOGIT_SCALE)
  model.eval().save_pretrained(folder, safe_serialization=True)
  transformers.CLIPImageProcessor(
    size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
  ).save_pretrained(folder)
  return folder, model


def _torch_cosines(folder: str, model, images: np.ndarray, prompts: list[str]) -> np.ndarray:
  """cos(image features, text features) of transformers' CLIPModel on CLIPProcessor's inputs, as PickScore's
  inference code calls them (padding=True, truncation=True, max_length=77)."""
  import torch
  import transformers

  processor = transformers.CLIPProcessor.from_pretrained(folder)
  inputs = processor(
    text=prompts,
    images=[Image.fromarray(image) for image in images],
    padding=True,
    truncation=True,
    max_length=77,
    return_tensors="pt",
  )
  assert inputs["input_ids"].shape[1] == 77  # the long prompt was truncated, not dropped or wrapped
  with torch.no_grad():
    image_output = model.get_image_features(pixel_values=inputs["pixel_values"])
    text_output = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
  image_features = getattr(image_output, "pooler_output", image_output).numpy().astype(np.float64)
  text_features = getattr(text_output, "pooler_output", text_output).numpy().astype(np.float64)
  image_features /= np.linalg.norm(image_features, axis=-1, keepdims=True)
  text_features /= np.linalg.norm(text_features, axis=-1, keepdims=True)
  return np.sum(image_features * text_features, axis=-1)


# ----------------------------------------------------------------------------
# Against PyTorch.
# ----------------------------------------------------------------------------


def test_scores_match_torch_clip_model(torch_clip):
  """pickscore = exp(the checkpoint's logit_scale) · cos, clip_score = 100 · cos, as transformers computes cos on
  CLIPProcessor's pixel_values and token ids; 5 images (padded to the 8 devices), one prompt truncated."""
  folder, model = torch_clip
  images = _images(len(PROMPTS))
  cosines = _torch_cosines(folder, model, images, PROMPTS)
  assert np.ptp(cosines) > 0.1  # the prompts' and images' scores differ, so the comparison means something

  picked = rewards.make("pickscore", model=folder, processor=folder)(images, PROMPTS)
  assert picked.dtype == np.float32 and picked.shape == (len(PROMPTS),)
  assert model.logit_scale.exp().item() == pytest.approx(37.0, rel=1e-6)
  assert relative_error(picked, model.logit_scale.exp().item() * cosines) < 1e-4
  scored = rewards.make("clip_score", clip_model=folder)(images, PROMPTS)  # the tokenizer: the model's own folder
  assert relative_error(scored, clip_score.CLIP_SCORE_SCALE * cosines) < 1e-4


def test_token_ids_are_clip_processors(torch_clip):
  """Our ids are CLIPProcessor's with padding="max_length", truncation=True, max_length=77 (bos, 75 tokens, eos)."""
  import transformers

  folder, _ = torch_clip
  scorer = clip_score.load(folder)
  expected = transformers.CLIPTokenizer.from_pretrained(folder)(
    PROMPTS, padding="max_length", truncation=True, max_length=77
  ).input_ids
  ids = scorer.token_ids(PROMPTS)
  assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
  np.testing.assert_array_equal(ids, np.asarray(expected))
  assert ids[2, -1] == scorer.tokenizer.eos_token_id  # the long prompt ends in eos at position 76


def test_hub_ids_download_the_model_and_the_processor_files(torch_clip, monkeypatch):
  """The model's config.json and safetensors at the revision; the processor's tokenizer and preprocessing files
  at its default revision, or the model's own at the revision when no processor is named."""
  import huggingface_hub

  folder, _ = torch_clip
  calls = []
  monkeypatch.setattr(
    huggingface_hub, "snapshot_download", lambda repo, **kwargs: calls.append((repo, kwargs)) or folder
  )
  scorer = clip_score.load("owner/clip", processor="owner/processor", revision="abc123")
  assert scorer.image_size == IMAGE_SIZE and scorer.max_tokens == 77
  assert calls == [
    ("owner/clip", {"revision": "abc123", "allow_patterns": list(clip.HUB_PATTERNS)}),
    ("owner/processor", {"revision": None, "allow_patterns": list(clip_score.PROCESSOR_FILES)}),
  ]
  calls.clear()
  clip_score.load("owner/clip", revision="abc123")
  assert [call[0] for call in calls] == ["owner/clip", "owner/clip"]
  assert calls[1][1] == {"revision": "abc123", "allow_patterns": list(clip_score.PROCESSOR_FILES)}


# ----------------------------------------------------------------------------
# Gradients.
# ----------------------------------------------------------------------------


def test_round_levels_rounds_halves_up_and_passes_gradients():
  x = jnp.array([0.5, 1.5, 2.49, 254.5, -0.5])
  np.testing.assert_array_equal(aesthetic.round_levels(x), [1.0, 2.0, 2.0, 255.0, 0.0])
  np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(3.0 * aesthetic.round_levels(v)))(x), np.full(5, 3.0))


def test_scores_are_differentiable_wrt_float_images(torch_clip):
  """jax.grad through the resize (40 x 56 -> 32 x 44), the crop and both towers: finite, non-zero over the crop."""
  folder, _ = torch_clip
  scorer = clip_score.load(folder)
  images = _images(2, seed=1)
  ids = scorer.token_ids(PROMPTS[:2])

  def total(float_images):
    return jnp.sum(
      clip_score.clip_similarity_scores(
        scorer.text_module, scorer.vision_module, scorer.image_size, scorer.params, float_images, ids
      )
    )

  grad = np.asarray(jax.jit(jax.grad(total))(jnp.asarray(images, jnp.float32)))
  assert grad.shape == images.shape and grad.dtype == np.float32
  assert np.isfinite(grad).all()
  # The crop keeps about the central 32 of the 44 resized columns: most pixels there move the score.
  assert (grad[:, :, 8:48] != 0).mean() > 0.9


# ----------------------------------------------------------------------------
# The factories by name, tiny-random.
# ----------------------------------------------------------------------------


def test_factories_by_name_on_tiny_random():
  assert {"clip_score", "pickscore"} <= set(rewards.registered())
  images = np.random.default_rng(2).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)  # 5: padded to 8 devices
  prompts = ["a red circle", "a red circle", "a blue square", "a noisy background", LONG_PROMPT]
  scored = rewards.make("clip_score", clip_model="tiny-random")(images, prompts)
  picked = rewards.make("pickscore", model="tiny-random")(images, prompts)
  for values in (scored, picked):
    assert values.dtype == np.float32 and values.shape == (5,) and np.isfinite(values).all()
  # The same towers, scaled by 100 and by exp(ln 1/0.07).
  np.testing.assert_allclose(picked, scored * math.exp(clip_score.TINY_LOGIT_SCALE) / 100, rtol=1e-5)
  # The prompt matters: one image under two prompts.
  twice = rewards.make("clip_score", clip_model="tiny-random")(images[[0, 0]], ["a red circle", "a blue square"])
  assert abs(twice[0] - twice[1]) > 1e-3
  np.testing.assert_allclose(twice[0], scored[0], rtol=1e-5)
  with pytest.raises(ValueError, match="2 prompts for 5 images"):
    rewards.make("pickscore", model="tiny-random")(images, prompts[:2])


# ----------------------------------------------------------------------------
# What is refused.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "field,value",
  [
    ("image_mean", [0.5, 0.5, 0.5]),
    ("resample", 2),
    ("size", {"shortest_edge": 256}),
    ("crop_size", {"height": 224, "width": 200}),
    ("do_center_crop", False),
  ],
)
def test_other_image_preprocessing_is_refused(field, value):
  clip_score.check_preprocessing({"size": 224, "crop_size": 224, "resample": 3}, 224)  # CLIP's: accepted
  with pytest.raises(ValueError, match=f"{field}="):
    clip_score.check_preprocessing({field: value}, 224)


def test_a_vision_tower_folder_is_not_a_clip_model(tmp_path):
  from transformers import CLIPVisionConfig
  from transformers import CLIPVisionModelWithProjection

  CLIPVisionModelWithProjection(CLIPVisionConfig(**clip.TINY_CONFIG)).save_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match="not a CLIPModel.*logit_scale"):
    clip_score.load_clip_folder(str(tmp_path))


# ----------------------------------------------------------------------------
# A short run.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "spec, reward",
  [
    ("configs/pickscore.py:tiny", "pickscore"),
    ("configs/clip_score.py:tiny", "clip_score"),
    ("configs/hpsv2.py:tiny", "hpsv2"),
  ],
)
def test_tiny_preset_trains_two_epochs(spec, reward, tiny_model_dir, tmp_path):
  """Each tiny preset (tiny-random CLIP on toy captions) on the tests' tiny model, made short: 2 epochs of 8
  samples of 4 steps, one minibatch of 8 per optimiser step (the fewest steps to compile)."""
  config = config_utils.get_config(spec)
  kwargs = config.reward.kwargs
  assert config.reward.name == reward and (kwargs.get("model") or kwargs.get("clip_model")) == "tiny-random"
  assert config.model.name == "toy-world" and config.prompt.name == "toy_scenes"
  overrides = {
    **TESTS_TRAINING,
    "model.name": tiny_model_dir,
    "num_epochs": 2,
    "sample.batch_size": 8,
    "sample.num_batches_per_epoch": 1,
    "sample.num_steps": 4,
    "train.batch_size": 8,
    "train.gradient_accumulation_steps": 1,
    "logging.images_every_epochs": 0,
    "eval.every_epochs": 0,
    "checkpoint.every_epochs": 0,
  }
  config = config_utils.override(config, overrides)
  summary = train.train_and_evaluate(config, str(tmp_path))
  records = metrics.read_metrics(str(tmp_path), "train")
  assert summary["epoch"] == 1 and len(records) == 2
  for record in records:
    assert record["reward_invalid"] == 0
    for key in ("reward_mean", "reward_std", "loss"):
      assert np.isfinite(record[key]), key
    assert record["reward_std"] > 0  # toy captions and samples differ, so their scores do
