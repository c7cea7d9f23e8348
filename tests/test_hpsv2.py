"""The hpsv2 reward and its converter: OpenCLIP's names to transformers', against a PyTorch transcription of
OpenCLIP's CLIP on a tiny checkpoint saved as HPSv2 is (a pickle of {"state_dict": ...}), the pickle refused
unless asked and never executed, and the converted folder loaded by transformers' CLIPModel.

The reference is a transcription, not open_clip_torch itself: open_clip imports torchvision when it is
imported, and the registry's torchvision 0.28.0 is built for CUDA torch (with torch 2.13.0+cpu its _C.so needs
libtorch_cuda.so and `import torchvision` fails), so it cannot be installed beside the CPU build of torch.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pickle

import numpy as np
from PIL import Image
import pytest

from ddpo_jax import models
from ddpo_jax import rewards
from ddpo_jax.models import diffusion
from ddpo_jax.models import open_clip
from ddpo_jax.rewards import convert_hpsv2
from ddpo_jax.rewards import hpsv2
from ddpo_jax.toy import shapes
from tests.test_clip_rewards import PROMPTS
from tests.test_clip_rewards import relative_error

torch = pytest.importorskip("torch")
nn = torch.nn

# ViT-H-14's head widths (80 in the vision tower, 64 in the text tower) on tiny towers: 2 heads each.
VISION_WIDTH, TEXT_WIDTH, EMBED_DIM, LAYERS = 160, 128, 16, 2
IMAGE_SIZE, PATCH_SIZE = 32, 8
IMAGE_SHAPE = (40, 56, 3)  # resized to 32 x 44, then centre-cropped
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------
# The reference: open_clip 3.3.0's CLIP (a ViT tower, token pooling; a text tower, argmax pooling), transcribed.
# ----------------------------------------------------------------------------


class ResidualAttentionBlock(nn.Module):
  """open_clip.transformer.ResidualAttentionBlock without layer scale: pre-LN attention and MLP, exact GELU."""

  def __init__(self, width: int, heads: int):
    super().__init__()
    self.ln_1 = nn.LayerNorm(width)
    self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
    self.ln_2 = nn.LayerNorm(width)
    self.mlp = nn.Sequential(
      collections.OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), c_proj=nn.Linear(4 * width, width))
    )

  def forward(self, x, attn_mask=None):
    y = self.ln_1(x)
    x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
    return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
  def __init__(self, width: int, heads: int, layers: int):
    super().__init__()
    self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

  def forward(self, x, attn_mask=None):
    for block in self.resblocks:
      x = block(x, attn_mask)
    return x


class VisionTransformer(nn.Module):
  """open_clip.transformer.VisionTransformer: conv patches, class token, ln_pre, blocks, ln_post, x[:, 0] @ proj."""

  def __init__(self):
    super().__init__()
    grid = IMAGE_SIZE // PATCH_SIZE
    self.conv1 = nn.Conv2d(3, VISION_WIDTH, PATCH_SIZE, stride=PATCH_SIZE, bias=False)
    self.class_embedding = nn.Parameter(torch.randn(VISION_WIDTH))
    self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, VISION_WIDTH))
    self.ln_pre = nn.LayerNorm(VISION_WIDTH)
    self.transformer = Transformer(VISION_WIDTH, VISION_WIDTH // 80, LAYERS)
    self.ln_post = nn.LayerNorm(VISION_WIDTH)
    self.proj = nn.Parameter(torch.randn(VISION_WIDTH, EMBED_DIM))

  def forward(self, x):
    x = self.conv1(x).flatten(2).permute(0, 2, 1)  # [B, grid², W]
    x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
    x = self.ln_post(self.transformer(self.ln_pre(x)))
    return x[:, 0] @ self.proj


class OpenCLIP(nn.Module):
  """open_clip.model.CLIP: the text tower at the top level, the vision tower under `visual`."""

  def __init__(self, vocab_size: int):
    super().__init__()
    self.visual = VisionTransformer()
    self.token_embedding = nn.Embedding(vocab_size, TEXT_WIDTH)
    self.positional_embedding = nn.Parameter(torch.randn(77, TEXT_WIDTH))
    self.transformer = Transformer(TEXT_WIDTH, TEXT_WIDTH // 64, LAYERS)
    self.ln_final = nn.LayerNorm(TEXT_WIDTH)
    self.text_projection = nn.Parameter(torch.randn(TEXT_WIDTH, EMBED_DIM))
    self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
    self.register_buffer("attn_mask", torch.empty(77, 77).fill_(float("-inf")).triu_(1), persistent=False)

  def encode_text(self, text):
    x = self.token_embedding(text) + self.positional_embedding
    x = self.ln_final(self.transformer(x, self.attn_mask))
    return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection  # the EOT: the largest id

  def hps_scores(self, pixels, text):
    """HPSv2's score: diagonal(normalised image features @ normalised text features.T)."""
    image = nn.functional.normalize(self.visual(pixels), dim=-1)
    text = nn.functional.normalize(self.encode_text(text), dim=-1)
    return torch.diagonal(image @ text.T)


def open_clip_pixels(image: np.ndarray) -> np.ndarray:
  """open_clip's validation transform on a PIL image: Resize(32, bicubic) of the shorter side as torchvision
  computes it (the longer side int(32 * long / short)), CenterCrop (offsets round((size - 32) / 2)), ToTensor,
  Normalize with OpenAI's mean and std. float32 [3, 32, 32]."""
  height, width = image.shape[:2]
  short, long = min(height, width), max(height, width)
  new_long = int(IMAGE_SIZE * long / short)
  size = (new_long, IMAGE_SIZE) if width >= height else (IMAGE_SIZE, new_long)  # PIL's (width, height)
  resized = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC), np.float32) / 255
  top = int(round((resized.shape[0] - IMAGE_SIZE) / 2))
  left = int(round((resized.shape[1] - IMAGE_SIZE) / 2))
  crop = resized[top : top + IMAGE_SIZE, left : left + IMAGE_SIZE]
  return ((crop - np.asarray(OPENAI_MEAN, np.float32)) / np.asarray(OPENAI_STD, np.float32)).transpose(2, 0, 1)


def open_clip_token_ids(folder: str, prompts: list[str]) -> np.ndarray:
  """OpenCLIP's tokenize(): <start_of_text>, the BPE tokens, <end_of_text>, cut to 77 with the last set to
  <end_of_text>, padded with 0 (transformers' CLIPTokenizer gives the BPE of the same vocabulary)."""
  import transformers

  tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
  rows = np.zeros((len(prompts), 77), np.int64)
  for row, prompt in zip(rows, prompts):
    ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    ids = ids[:77]
    ids[-1] = tokenizer.eos_token_id
    row[: len(ids)] = ids
  return rows


@pytest.fixture(scope="module")
def hps_checkpoint(tmp_path_factory):
  """(checkpoint path, processor folder, reference model): a tiny random OpenCLIP saved as HPSv2 is, a pickle of
  {"state_dict": {"module." + name: tensor}}, with a tokenizer folder whose <|endoftext|> is its largest id."""
  root = tmp_path_factory.mktemp("hps")
  folder = str(root / "processor")
  tokenizer = models.build_tokenizer([*shapes.vocabulary(), "zebra", "riding", "bike"], folder, max_length=77)
  tokenizer.save(folder)
  assert tokenizer.eos_token_id == tokenizer.vocab_size - 1  # as in CLIP's vocabulary: OpenCLIP's argmax pooling
  with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
    json.dump({"size": IMAGE_SIZE, "crop_size": IMAGE_SIZE, "resample": 3}, f)
  torch.manual_seed(0)
  model = OpenCLIP(tokenizer.vocab_size)
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for param in model.parameters():
      param.copy_(0.1 * torch.randn(param.shape, generator=generator) + (1.0 if param.ndim == 1 else 0.0))
  model.eval()
  path = str(root / "HPS_tiny.pt")
  torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
  return path, folder, model


def _reference_scores(model, folder: str, images: np.ndarray, prompts: list[str]) -> np.ndarray:
  pixels = torch.from_numpy(np.stack([open_clip_pixels(image) for image in images]))
  with torch.no_grad():
    return model.hps_scores(pixels, torch.from_numpy(open_clip_token_ids(folder, prompts))).numpy()


@pytest.fixture(scope="module")
def converted(hps_checkpoint, tmp_path_factory):
  path, _, _ = hps_checkpoint
  dst = str(tmp_path_factory.mktemp("converted") / "hpsv2-tiny")
  convert_hpsv2.convert(path, dst, "ViT-H-14", allow_pickle=True)
  return dst


# ----------------------------------------------------------------------------
# Against the reference.
# ----------------------------------------------------------------------------


def test_scores_match_open_clip(hps_checkpoint, converted):
  """The reward = HPSv2's score of the OpenCLIP model it was converted from, on OpenCLIP's own preprocessing and
  tokens (padded with 0, pooled at the largest id); 5 images, padded to the 8 devices, one prompt truncated."""
  _, folder, model = hps_checkpoint
  images = np.random.default_rng(0).integers(0, 256, (len(PROMPTS), *IMAGE_SHAPE), dtype=np.uint8)
  expected = _reference_scores(model, folder, images, PROMPTS)
  assert np.ptp(expected) > 0.1  # the scores differ, so the comparison means something
  scores = rewards.make("hpsv2", model=converted, processor=folder)(images, PROMPTS)
  assert scores.dtype == np.float32 and scores.shape == (len(PROMPTS),)
  assert relative_error(scores, expected) < 1e-4


def test_the_converted_folder_is_a_transformers_clip_model(hps_checkpoint, converted):
  """transformers' CLIPModel loads the folder (config.json, model.safetensors) with nothing missing and gives the
  reference's cosines: the names, the q/k/v split and the transposed projections are transformers'."""
  import transformers

  _, folder, model = hps_checkpoint
  clip_model, info = transformers.CLIPModel.from_pretrained(converted, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  config = clip_model.config
  assert (config.vision_config.num_attention_heads, config.text_config.num_attention_heads) == (2, 2)
  assert (config.vision_config.image_size, config.vision_config.patch_size, config.projection_dim) == (32, 8, 16)
  images = np.random.default_rng(1).integers(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  ids = open_clip_token_ids(folder, PROMPTS[:2])
  pixels = torch.from_numpy(np.stack([open_clip_pixels(image) for image in images]))
  with torch.no_grad():
    image_features = clip_model.get_image_features(pixel_values=pixels)
    text_features = clip_model.get_text_features(input_ids=torch.from_numpy(ids))
  image_features = getattr(image_features, "pooler_output", image_features)
  text_features = getattr(text_features, "pooler_output", text_features)
  cosines = nn.functional.cosine_similarity(image_features, text_features, dim=-1).numpy()
  assert relative_error(cosines, _reference_scores(model, folder, images, PROMPTS[:2])) < 1e-4


def test_in_proj_is_split_into_query_key_value():
  """in_proj_weight [3W, W] = [q; k; v] (torch.nn.MultiheadAttention's order); x @ proj [W, E] -> weight [E, W]."""
  width = 4
  in_proj = np.arange(3 * width * width, dtype=np.float32).reshape(3 * width, width)
  state_dict = {"transformer.resblocks.0.attn.in_proj_weight": in_proj, "visual.proj": np.ones((width, 2))}
  with pytest.raises(ValueError, match="lacks"):  # a partial state dict: the rest is reported missing
    open_clip.to_transformers(state_dict)
  full = {**_minimal_state_dict(width), **state_dict}
  converted = open_clip.to_transformers(full)
  for index, part in enumerate("qkv"):
    name = f"text_model.encoder.layers.0.self_attn.{part}_proj.weight"
    np.testing.assert_array_equal(converted[name], in_proj[index * width : (index + 1) * width])
  assert converted["visual_projection.weight"].shape == (2, width)


def _minimal_state_dict(width: int) -> dict[str, np.ndarray]:
  return {key: np.zeros((width, width), np.float32) for key in open_clip._TOP_NAMES}


# ----------------------------------------------------------------------------
# What is refused.
# ----------------------------------------------------------------------------


class _Payload:
  """Unpickling this runs os.system: a pickle that must never be executed."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_a_pickle_is_read_only_when_asked_and_never_executed(tmp_path):
  marker = str(tmp_path / "executed")
  path = str(tmp_path / "evil.pt")
  with open(path, "wb") as f:
    pickle.dump({"state_dict": _Payload(marker)}, f)
  with pytest.raises(ValueError, match="--allow_pickle"):
    convert_hpsv2.convert(path, str(tmp_path / "out"))
  with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only"):
    convert_hpsv2.convert(path, str(tmp_path / "out"), allow_pickle=True)
  assert not os.path.exists(marker) and not os.path.exists(tmp_path / "out")
  assert [p for p in os.listdir(tmp_path) if p.startswith(".convert")] == []  # no staging folder left


def test_features_our_towers_lack_are_refused_by_name(hps_checkpoint, tmp_path):
  path, _, _ = hps_checkpoint
  state_dict = convert_hpsv2.read_checkpoint(path, allow_pickle=True)
  state_dict["visual.transformer.resblocks.0.ls_1.gamma"] = np.ones(VISION_WIDTH, np.float32)  # layer scale
  state_dict["visual.attn_pool.query"] = np.ones((4, VISION_WIDTH), np.float32)
  with pytest.raises(ValueError, match=r"2 keys have no counterpart.*attn_pool.*ls_1"):
    open_clip.to_transformers(state_dict)


def test_the_converter_overwrites_nothing(hps_checkpoint, converted):
  path, _, _ = hps_checkpoint
  before = sorted(os.listdir(converted))
  with pytest.raises(ValueError, match="exists"):
    convert_hpsv2.convert(path, converted, allow_pickle=True)
  with pytest.raises(ValueError, match="architecture='ViT-X'"):
    convert_hpsv2.convert(path, converted + "-2", "ViT-X", allow_pickle=True)
  assert sorted(os.listdir(converted)) == before == ["config.json", "model.safetensors"]


@pytest.mark.parametrize(
  "model, match",
  [
    ("weights/HPS_v2.1_compressed.pt", "pickle"),
    ("empty", "not a converted"),
    ("./weights/hpsv2.1", "not a converted"),
  ],
)
def test_the_reward_names_the_conversion(model, match, tmp_path, monkeypatch):
  """A pickle, a folder that is not a converted one, or configs/hpsv2.py's folder before it is made: the error
  gives the commands that make one, before any download (a local path is not taken for a Hub id)."""
  monkeypatch.chdir(tmp_path)
  os.makedirs("empty")
  with pytest.raises(ValueError, match=rf"config\.reward\.kwargs\.model.*{match}.*convert_hpsv2 --allow_pickle"):
    rewards.make("hpsv2", model=model)
  assert hpsv2.check_model("tiny-random") is None


def test_a_tokenizer_that_is_not_the_models_is_refused(converted):
  """A processor whose <|endoftext|> is not the id the text tower pools at would pool every prompt at position 0."""
  with pytest.raises(ValueError, match="pools at eos_token_id .* do not belong together"):
    rewards.make("hpsv2", model=converted, processor=os.path.join(diffusion.TOY_MODEL_DIR, "tokenizer"))


def test_tiny_random_is_the_plain_cosine():
  """hpsv2 on tiny-random = clip_score's towers with the scale 1 instead of 100."""
  images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  prompts = ["a red circle", "a blue square", ""]
  scores = rewards.make("hpsv2", model="tiny-random")(images, prompts)
  scaled = rewards.make("clip_score", clip_model="tiny-random")(images, prompts)
  np.testing.assert_allclose(scores, scaled / 100, rtol=1e-5)
  assert np.all(np.abs(scores) <= 1)
