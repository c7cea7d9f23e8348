"""Our UNet (ddpo_jax/models/unet.py) against diffusers' PyTorch UNet2DConditionModel.

(The shipped toy model against diffusers' removed Flax class: tests/test_toy_flax_outputs.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpo_jax.models import pytorch_weights
from ddpo_jax.models import unet
from ddpo_jax.models.attention import make_attention

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


_TINY = dict(
  sample_size=8,
  block_out_channels=(32, 64),
  layers_per_block=1,
  norm_num_groups=8,
  cross_attention_dim=16,
  attention_head_dim=4,
  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_CONFIGS = {
  "sd1": dict(_TINY, layers_per_block=2),
  "sd2": dict(
    _TINY,
    use_linear_projection=True,
    attention_head_dim=(2, 4),
    down_block_types=("CrossAttnDownBlock2D",) * 2,
    up_block_types=("CrossAttnUpBlock2D",) * 2,
  ),
  "sdxl": dict(
    _TINY,
    use_linear_projection=True,
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24 + 6 * 8,  # pooled text [24] and 6 time ids
  ),
}


def relative_error(ours, reference) -> float:
  """max |ours - reference| / max |reference|."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


def tiny_inputs(config: unet.UNetConfig, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  size = config.sample_size
  inputs = {
    "sample": rng.standard_normal((2, config.in_channels, size, size)).astype(np.float32),
    "timesteps": np.array([10.0, 700.0], np.float32),
    "encoder_hidden_states": rng.standard_normal((2, 5, config.cross_attention_dim)).astype(np.float32),
  }
  if config.addition_embed_type == "text_time":
    inputs["text_embeds"] = rng.standard_normal((2, config.text_embeds_dim)).astype(np.float32)
    inputs["time_ids"] = np.array([[64, 64, 0, 0, 64, 64], [32, 48, 4, 8, 64, 64]], np.float32)
  return inputs


def torch_forward(model, inputs):
  tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
  added = {k: tensors[k] for k in ("text_embeds", "time_ids") if k in tensors} or None
  return model(
    tensors["sample"], tensors["timesteps"], tensors["encoder_hidden_states"], added_cond_kwargs=added
  ).sample


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def saved_unet(request, tmp_path_factory):
  """(name, random PyTorch UNet2DConditionModel, the folder it is saved in with safetensors)."""
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**TINY_CONFIGS[request.param]).eval()
  with torch.no_grad():  # move zero-initialised biases and unit norm scales off their initial values
    for param in model.parameters():
      param.add_(0.05 * torch.randn_like(param))
  folder = str(tmp_path_factory.mktemp(f"unet_{request.param}"))
  model.save_pretrained(folder, safe_serialization=True)
  return request.param, model, folder


def test_matches_pytorch_forward(saved_unet):
  name, model, folder = saved_unet
  module, params = unet.load_unet(folder)
  assert not module.config.flax_numerics
  inputs = tiny_inputs(module.config)
  with torch.no_grad():
    expected = torch_forward(model, inputs).numpy()
  got = jax.jit(lambda p, x: module.apply({"params": p}, **x))(params, inputs)
  assert got.shape == expected.shape
  error = relative_error(got, expected)
  print(f"{name} forward relative error {error:.2e}")
  assert error < 1e-5


# On the SDXL-shaped config only, which has every kind of layer: each gradient takes a while to
# compile. It goes through remat and the repo's blocked attention (blocks of 4 queries), so that
# both are checked against PyTorch too; the forward tests use the plain attention.
@pytest.mark.parametrize("saved_unet", ["sdxl"], indirect=True)
def test_param_gradients_match_pytorch(saved_unet):
  name, model, folder = saved_unet
  module, params = unet.load_unet(folder, attention_fn=make_attention("blocked", 1024), remat=True)
  inputs = tiny_inputs(module.config)
  weights = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
  model.zero_grad()
  (torch_forward(model, inputs) * torch.from_numpy(weights)).sum().backward()
  torch_grads = {k: p.grad.numpy() for k, p in model.named_parameters()}
  expected = unet.unet_params_from_pytorch(torch_grads, module.config)
  loss = lambda p: jnp.sum(module.apply({"params": p}, **inputs) * weights)
  got = jax.jit(jax.grad(loss))(params)
  errors = jax.tree.map(relative_error, got, expected)
  worst = max(jax.tree_util.tree_leaves_with_path(errors), key=lambda kv: kv[1])
  print(f"{name} gradient worst relative error {worst[1]:.2e} at {jax.tree_util.keystr(worst[0])}")
  assert worst[1] < 1e-4


def test_config_from_pytorch_json_and_refusals(saved_unet):
  _, model, folder = saved_unet
  config = unet.UNetConfig.from_json(unet.read_config(folder))
  assert config.heads == tuple(np.broadcast_to(model.config.attention_head_dim, 2))
  with pytest.raises(ValueError, match="class_embed_type"):
    unet.UNetConfig.from_json({**unet.read_config(folder), "class_embed_type": "timestep"})
  with pytest.raises(ValueError, match="missing"):
    state = pytorch_weights.read_state_dict(folder)
    unet.unet_params_from_pytorch({k: v for k, v in state.items() if "conv_in" not in k}, config)
