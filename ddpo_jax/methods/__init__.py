"""Training methods, by name (config.train.method): see base.py for the record.

ddpo.py  ddpo_is (clipped importance sampling), ddpo_sf (score function)
rwr.py   rwr, rwr_sparse (the paper's reward-weighted regression baselines)
"""

from ddpo_jax.methods import ddpo  # noqa: F401 (registers its methods)
from ddpo_jax.methods import rwr  # noqa: F401 (registers its methods)
from ddpo_jax.methods.base import Method
from ddpo_jax.methods.base import get
from ddpo_jax.methods.base import names
from ddpo_jax.methods.base import register

__all__ = ["Method", "get", "names", "register"]
