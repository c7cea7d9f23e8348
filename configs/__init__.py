"""The task configs, installed with the package as `ddpo_jax.configs` (see setup.py).

Each file is loaded by path (absl's --config, `ddpo_jax.config_utils.get_config`), never imported as a module of
this package; this file only makes the folder a package, so that a wheel ships it and
`ddpo_jax.config_utils.find_config_file` finds the installed copies from any folder.
"""
