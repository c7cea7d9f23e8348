"""ddpo_jax: fine-tuning diffusion models with reinforcement learning (DDPO) in JAX."""

from ddpo_jax.ddim import ddim_step_with_logprob
from ddpo_jax.ddim import inference_timesteps

__version__ = "0.1.0"
__all__ = ["ddim_step_with_logprob", "inference_timesteps", "__version__"]
