"""The toy model's architecture: SD v1's classes, shrunk (the component configs the shipped model was built from).

Without jax imports, so that the benchmarks can size their models from it before jax starts.
"""

from ddpo_jax.toy import shapes

# Component configs of the toy model: the classes of SD v1, shrunk.
UNET_CONFIG = dict(
  sample_size=8,
  in_channels=4,
  out_channels=4,
  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
  block_out_channels=(32, 64),
  layers_per_block=1,
  attention_head_dim=8,
  cross_attention_dim=32,
)
VAE_CONFIG = dict(
  in_channels=3,
  out_channels=3,
  down_block_types=("DownEncoderBlock2D",) * 3,
  up_block_types=("UpDecoderBlock2D",) * 3,
  block_out_channels=(32, 64, 64),
  layers_per_block=1,
  latent_channels=4,
  norm_num_groups=16,
  sample_size=shapes.IMAGE_SIZE,
)
TEXT_CONFIG = dict(
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=2,
  projection_dim=32,
)
MAX_PROMPT_TOKENS = 16
