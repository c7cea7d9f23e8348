"""The package list, which setup.cfg cannot express; everything else is in setup.cfg.

configs/ stays at the top of the repository but installs as the package `ddpo_jax.configs`: setup.cfg's
`packages = find:` only finds folders under ddpo_jax/, and its list form would have to name every subpackage, so
the found packages and the mapped one are joined here. benchmarks/, experiments/ and tests/ are not installed.
"""

import setuptools

setuptools.setup(
  packages=setuptools.find_packages(include=["ddpo_jax", "ddpo_jax.*"]) + ["ddpo_jax.configs"],
  package_dir={"ddpo_jax.configs": "configs"},
)
