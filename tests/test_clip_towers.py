"""Our CLIP towers (ddpo_jax/models/clip_towers.py) against transformers' PyTorch CLIP classes.

Tiny random PyTorch models are saved in transformers' layout (safetensors) and
loaded by our loaders, without torch; every output agrees with PyTorch's in
float32 to 1e-5 of its largest magnitude.
"""

import os

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file
import torch
import transformers

from ddpo_jax.models import clip_towers
from ddpo_jax.models import pytorch_weights

LENGTH = 12
TEXT = dict(
  vocab_size=99,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=3,
  num_attention_heads=4,
  max_position_embeddings=LENGTH,
  projection_dim=24,
  bos_token_id=96,
  eos_token_id=98,
  pad_token_id=98,
)
CLIP_L_TEXT = dict(TEXT, hidden_act="quick_gelu")
# SD 2's OpenCLIP-H and SDXL's OpenCLIP-G configs keep the pre-#24773 eos_token_id 2 (pooled at the largest id).
OPENCLIP_TEXT = dict(TEXT, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
VISION = dict(
  image_size=32,
  patch_size=8,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  projection_dim=24,
)


def relative_error(ours, theirs) -> float:
  """max |ours - theirs| / max |theirs|."""
  theirs = np.asarray(theirs, np.float64)
  return float(np.abs(np.asarray(ours, np.float64) - theirs).max() / np.abs(theirs).max())


def assert_close(ours, theirs, what: str, tolerance: float = 1e-5):
  assert np.shape(ours) == np.shape(theirs), what
  error = relative_error(ours, theirs)
  assert error < tolerance, f"{what}: relative error {error:.2e}"


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """The model in eval mode with every param moved off its init (layer norms off 1 and 0, attention off uniform)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.1 * torch.randn(param.shape, generator=generator))
  return model.eval()


def saved(model: torch.nn.Module, folder) -> str:
  model.save_pretrained(str(folder), safe_serialization=True)
  assert os.path.exists(os.path.join(folder, "model.safetensors"))
  return str(folder)


def token_ids(config: dict, eos_positions=(4, 7, LENGTH - 1)) -> np.ndarray:
  """[B, LENGTH] ids: random tokens, then the EOS, then padding, as CLIP's tokenizers write them.

  With eos_token_id 2 (OpenCLIP) the EOS is the vocabulary's last id and the
  padding 0 (as SD 2's tokenizer pads); else the EOS is eos_token_id and pads.
  """
  rng = np.random.default_rng(0)
  ids = rng.integers(3, config["vocab_size"] - 3, (len(eos_positions), LENGTH))
  openclip = config["eos_token_id"] == 2
  eos, pad = (config["vocab_size"] - 1, 0) if openclip else (config["eos_token_id"], config["eos_token_id"])
  for row, position in enumerate(eos_positions):
    ids[row, position] = eos
    ids[row, position + 1 :] = pad
  return ids


def padding_mask(eos_positions=(4, 7, LENGTH - 1)) -> np.ndarray:
  return (np.arange(LENGTH)[None] <= np.array(eos_positions)[:, None]).astype(np.int64)


def torch_text_outputs(model, ids, attention_mask=None):
  with torch.no_grad():
    mask = None if attention_mask is None else torch.from_numpy(attention_mask)
    return model(input_ids=torch.from_numpy(ids), attention_mask=mask, output_hidden_states=True)


def param_shapes(tree) -> dict[str, tuple[int, ...]]:
  """{"['text_model']['final_layer_norm']['bias']": shape, ...} of a param tree."""
  return {jax.tree_util.keystr(path): np.shape(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_hidden_states(ours, theirs, what: str):
  assert len(ours) == len(theirs) == TEXT["num_hidden_layers"] + 1
  for index, (mine, reference) in enumerate(zip(ours, theirs)):
    assert_close(mine, reference.numpy(), f"{what} hidden_states[{index}]")


@pytest.mark.parametrize("config", [CLIP_L_TEXT, OPENCLIP_TEXT], ids=["clip_l_quick_gelu", "openclip_h_gelu"])
def test_text_encoder_matches_pytorch(config, tmp_path):
  torch.manual_seed(0)
  model = perturbed(transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)))
  module, params = clip_towers.load_text_encoder(saved(model, tmp_path))
  assert isinstance(module, clip_towers.CLIPTextModel)
  assert module.config.hidden_act == config["hidden_act"] and module.config.eos_token_id == config["eos_token_id"]
  ids = token_ids(config)
  for attention_mask in (None, padding_mask()):
    theirs = torch_text_outputs(model, ids, attention_mask)
    ours = module.apply({"params": params}, ids, attention_mask, output_hidden_states=True)
    what = f"{config['hidden_act']} mask={attention_mask is not None}"
    assert_close(ours.last_hidden_state, theirs.last_hidden_state.numpy(), f"{what} last_hidden_state")
    assert_close(ours.pooled, theirs.pooler_output.numpy(), f"{what} pooled")
    check_hidden_states(ours.hidden_states, theirs.hidden_states, what)
  unmasked = module.apply({"params": params}, ids)
  assert unmasked.hidden_states is None
  # Causal attention: the padding mask changes only the padding positions' outputs.
  masked = ours.last_hidden_state
  tokens = padding_mask().astype(bool)
  np.testing.assert_allclose(masked[tokens], unmasked.last_hidden_state[tokens], rtol=1e-6)
  assert np.abs(masked[~tokens] - unmasked.last_hidden_state[~tokens]).min() > 1e-4


def test_text_encoder_with_projection_matches_pytorch(tmp_path):
  """SDXL's second text encoder: text_embeds and the penultimate hidden state."""
  torch.manual_seed(0)
  model = perturbed(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**OPENCLIP_TEXT)))
  module, params = clip_towers.load_text_encoder(saved(model, tmp_path))
  assert isinstance(module, clip_towers.CLIPTextModelWithProjection)
  assert params["text_projection"]["kernel"].shape == (TEXT["hidden_size"], TEXT["projection_dim"])
  ids = token_ids(OPENCLIP_TEXT)
  theirs = torch_text_outputs(model, ids)
  ours = module.apply({"params": params}, ids, output_hidden_states=True)
  assert_close(ours.text_embeds, theirs.text_embeds.numpy(), "text_embeds")
  assert_close(ours.last_hidden_state, theirs.last_hidden_state.numpy(), "last_hidden_state")
  assert_close(ours.hidden_states[-2], theirs.hidden_states[-2].numpy(), "penultimate hidden state")
  check_hidden_states(ours.hidden_states, theirs.hidden_states, "with projection")


def test_vision_tower_matches_pytorch(tmp_path):
  torch.manual_seed(0)
  model = perturbed(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION)))
  module, params = clip_towers.load_vision_tower(saved(model, tmp_path))
  pixels = np.random.default_rng(0).standard_normal((2, 3, VISION["image_size"], VISION["image_size"]), np.float32)
  with torch.no_grad():
    theirs = model(pixel_values=torch.from_numpy(pixels)).image_embeds.numpy()
  ours = module.apply({"params": params}, pixels)
  assert ours.shape == (2, VISION["projection_dim"])
  assert_close(ours, theirs, "image_embeds")
  with pytest.raises(ValueError, match="NCHW"):
    module.apply({"params": params}, pixels.transpose(0, 2, 3, 1))


def features(output) -> np.ndarray:
  """get_image_features / get_text_features: a tensor in transformers 4, an output whose pooler_output is the
  projected features in transformers 5."""
  return getattr(output, "pooler_output", output).numpy()


def test_both_towers_of_a_clip_model_folder(tmp_path):
  """A two-tower CLIPModel folder (as "openai/clip-vit-large-patch14" is): each loader takes its tower."""
  torch.manual_seed(0)
  config = transformers.CLIPConfig(text_config=CLIP_L_TEXT, vision_config=VISION, projection_dim=20)
  model = perturbed(transformers.CLIPModel(config))
  folder = saved(model, tmp_path)
  pixels = np.random.default_rng(1).standard_normal((2, 3, VISION["image_size"], VISION["image_size"]), np.float32)
  ids = token_ids(CLIP_L_TEXT)
  with torch.no_grad():
    image_features = features(model.get_image_features(pixel_values=torch.from_numpy(pixels)))
    text_features = features(model.get_text_features(input_ids=torch.from_numpy(ids)))
  vision, vision_params = clip_towers.load_vision_tower(folder)
  assert vision.config.projection_dim == 20
  assert_close(vision.apply({"params": vision_params}, pixels), image_features, "image features")
  text, text_params = clip_towers.load_text_encoder(folder)
  assert isinstance(text, clip_towers.CLIPTextModelWithProjection)
  assert_close(text.apply({"params": text_params}, ids).text_embeds, text_features, "text features")


def test_pickled_or_mismatched_weights_are_refused(tmp_path):
  config = transformers.CLIPTextConfig(**CLIP_L_TEXT)
  config.save_pretrained(str(tmp_path))
  (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
  with pytest.raises(pytorch_weights.PickledWeightsError, match="pytorch_model.bin"):
    clip_towers.load_text_encoder(str(tmp_path))
  with pytest.raises(pytorch_weights.PickledWeightsError):
    clip_towers.load_vision_tower(str(tmp_path))

  torch.manual_seed(0)
  state = transformers.CLIPTextModel(config).state_dict()
  # The names of checkpoints on the Hub (transformers 4; version 5 drops "text_model." from its own).
  state = {name if name.startswith("text_model.") else f"text_model.{name}": t.numpy() for name, t in state.items()}
  # Older transformers saved the position_ids buffer; it is not a weight.
  state["text_model.embeddings.position_ids"] = np.arange(LENGTH)[None]
  save_file(state, str(tmp_path / "model.safetensors"))
  clip_towers.load_text_encoder(str(tmp_path))
  del state["text_model.final_layer_norm.bias"]
  state["text_model.embeddings.token_embedding.weight"] = np.zeros((5, TEXT["hidden_size"]), np.float32)
  save_file(state, str(tmp_path / "model.safetensors"))
  with pytest.raises(
    ValueError, match="missing text_model/final_layer_norm/bias.*token_embedding/embedding: \\(5, 32\\)"
  ):
    clip_towers.load_text_encoder(str(tmp_path))
