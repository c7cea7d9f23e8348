"""Our KL autoencoder (ddpo_jax/models/vae.py) against diffusers' PyTorch AutoencoderKL.

(The shipped toy model against diffusers' removed Flax class: tests/test_toy_flax_outputs.py.)"""

import jax
import numpy as np
import pytest

from ddpo_jax.models import pytorch_weights
from ddpo_jax.models import vae
from tests.test_unet import relative_error

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


_TINY = dict(
  block_out_channels=(8, 16),
  down_block_types=("DownEncoderBlock2D",) * 2,
  up_block_types=("UpDecoderBlock2D",) * 2,
  layers_per_block=1,
  norm_num_groups=4,
  sample_size=16,
)
TINY_CONFIGS = {
  "sd": dict(_TINY, latent_channels=4),
  # SD3/FLUX-shaped: 16 latent channels, no quant convs, a shift factor.
  "16_channels": dict(
    _TINY, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1, scaling_factor=1.5
  ),
}


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def saved_vae(request, tmp_path_factory):
  """(name, random PyTorch AutoencoderKL, the folder it is saved in with safetensors)."""
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(**TINY_CONFIGS[request.param]).eval()
  with torch.no_grad():  # move zero-initialised biases and unit norm scales off their initial values
    for param in model.parameters():
      param.add_(0.05 * torch.randn_like(param))
  folder = str(tmp_path_factory.mktemp(f"vae_{request.param}"))
  model.save_pretrained(folder, safe_serialization=True)
  return request.param, model, folder


def test_encode_and_decode_match_pytorch(saved_vae):
  name, model, folder = saved_vae
  module, params = vae.load_vae(folder)
  assert module.config.latent_channels == model.config.latent_channels
  assert module.config.shift_factor == model.config.shift_factor
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
  latents = rng.standard_normal((2, module.config.latent_channels, 8, 8)).astype(np.float32)
  with torch.no_grad():
    posterior = model.encode(torch.from_numpy(images)).latent_dist
    decoded = model.decode(torch.from_numpy(latents)).sample.numpy()
  ours = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode))(params, images)
  errors = {
    "mean": relative_error(ours.mean, posterior.mean.numpy()),
    "logvar": relative_error(ours.logvar, posterior.logvar.numpy()),
    "decode": relative_error(
      jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode))(params, latents), decoded
    ),
  }
  print(f"{name} relative errors " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
  assert max(errors.values()) < 1e-5
  assert ours.sample(jax.random.PRNGKey(0)).shape == ours.mean.shape


def test_converter_names_what_is_missing(saved_vae):
  _, _, folder = saved_vae
  config = vae.VAEConfig.from_json(vae.read_config(folder))
  state = pytorch_weights.read_state_dict(folder)
  with pytest.raises(ValueError, match="missing decoder/mid_block/attentions_0/query/kernel"):
    vae.vae_params_from_pytorch(
      {k: v for k, v in state.items() if "decoder.mid_block.attentions.0.to_q" not in k}, config
    )
