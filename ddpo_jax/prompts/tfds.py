"""Prompts drawn from a text feature of a TensorFlow Datasets (TFDS) dataset: the optional `tfds` extra.

`tfds_prompts(dataset="coco_captions", feature="captions/text", data_dir=...)`, registered as the prompt function
"tfds", reads the texts once and returns a prompt function drawing uniformly among them with the numpy rng
(`ddpo_jax.prompts.uniform`). tensorflow_datasets is imported only then, so that `ddpo_jax.prompts`, which imports
this module to register it, works without the extra.

What needs TensorFlow:
  - Reading a dataset prepared in a random-access format (array_record or parquet: `tfds build NAME
    --file_format=array_record`) does not. The prepared files are opened by their own metadata (features.json), so
    the dataset's builder code is not run, and the examples are decoded with NumPy.
  - Reading one stored as tfrecord (TFDS's default format) does: it goes through tf.data.
  - Preparing one (`download=True`, or `tfds build`) runs the dataset's builder code, which for most datasets of the
    TFDS catalogue uses TensorFlow.

`pip install -e '.[tfds]'` installs tensorflow-datasets without TensorFlow; `pip install tensorflow` adds it.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Any
from typing import Iterator

from absl import logging
import numpy as np

from ddpo_jax.prompts import base

INSTALL_HINT = "pip install -e '.[tfds]'"
# Examples fetched per read of a random-access data source.
READ_CHUNK = 256


@base.register("tfds")
def tfds_prompts(
  dataset: str,
  feature: str,
  split: str = "train",
  data_dir: str | None = None,
  max_prompts: int | None = None,
  download: bool = False,
) -> base.PromptFn:
  """A prompt function drawing uniformly, with replacement, among the texts of a TFDS text feature.

  Args:
    dataset: the TFDS dataset's name, with optional config and version: "coco_captions", "my_set/my_config:1.0.0".
      (Not `name`: `prompts.get(name, **kwargs)` takes that one.)
    feature: the text feature, its levels joined by "/": "caption", "captions/text" (a Sequence of dicts), or a key
      that itself holds "/" such as coco_captions' "image/filename". A scalar text, a sequence of texts or a string
      tensor; each non-empty text (bytes decoded as UTF-8, stripped) is one prompt, duplicates kept.
    split: TFDS split, slices included: "train", "validation[:10%]", "train+test".
    data_dir: where the prepared dataset lies (TFDS's data dir: `{data_dir}/{name}/{config}/{version}/`); None: TFDS's
      default (~/tensorflow_datasets, or $TFDS_DATA_DIR).
    max_prompts: keep only the first max_prompts texts, reading examples in stored order only until that many are
      found (so at most max_prompts examples when each has a text). TFDS shuffles the examples by key when it
      prepares a dataset (unless its builder disables shuffling), so these are a fixed sample rather than the
      source's first lines. None: every example.
    download: prepare the dataset (download and write it as array_record) if it is not prepared in data_dir.

  Returns:
    `fn(rng, batch_size) -> list[str]`, deterministic given the numpy Generator rng.
  """
  return base.uniform(read_texts(dataset, feature, split, data_dir, max_prompts, download))


def read_texts(
  dataset: str,
  feature: str,
  split: str = "train",
  data_dir: str | None = None,
  max_prompts: int | None = None,
  download: bool = False,
) -> list[str]:
  """The texts of `feature` in `split` of TFDS dataset `dataset`, in stored order; arguments as in `tfds_prompts`."""
  if max_prompts is not None and max_prompts < 1:
    raise ValueError(f"config.prompt.kwargs.max_prompts={max_prompts} must be None (every example) or at least 1")
  tfds = import_tfds()
  builder = _builder(tfds, dataset, data_dir, download)
  path = feature_path(tfds, builder.info.features, feature, dataset)
  _check_split(builder.info.splits, split, dataset)
  if builder.info.available_file_formats() & set(tfds.core.FileFormat.with_random_access()):
    chunk = min(READ_CHUNK, max_prompts or READ_CHUNK)
    examples = _numpy_examples(tfds, builder, split, path, chunk)
  else:
    examples = _tf_examples(tfds, builder, split, path)

  texts = []
  for example in examples:
    value = example
    for key in path:
      value = value[key]
    texts.extend(strings(value))
    if max_prompts is not None and len(texts) >= max_prompts:
      del texts[max_prompts:]
      break
  if not texts:
    raise ValueError(
      f"feature {feature!r} of split {split!r} of TFDS dataset {dataset!r} (in {builder.data_dir}) has no non-empty "
      "text: choose another config.prompt.kwargs.feature or config.prompt.kwargs.split"
    )
  logging.info("%d prompts from feature %r of %s[%s] in %s", len(texts), feature, dataset, split, builder.data_dir)
  return texts


def import_tfds():
  """The tensorflow_datasets module; ImportError saying how to install it if it is missing."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(
      f"prompts from TensorFlow Datasets (config.prompt.name 'tfds') need tensorflow-datasets: {INSTALL_HINT}"
    ) from e
  return tfds


def tensorflow_installed() -> bool:
  """Whether TensorFlow can be imported (without importing it)."""
  return importlib.util.find_spec("tensorflow") is not None


def strings(value: Any) -> Iterator[str]:
  """The non-empty stripped texts in `value`: bytes, str, or (nested) lists and arrays of them."""
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, (bytes, str)):
    text = (value.decode("utf-8") if isinstance(value, bytes) else value).strip()
    if text:
      yield text
  elif isinstance(value, (list, tuple, np.ndarray)):
    for item in value:
      yield from strings(item)
  else:
    raise TypeError(f"expected text, got {type(value).__name__}: {value!r}")


def feature_path(tfds, features, feature: str, name: str) -> tuple[str, ...]:
  """The keys leading from the top-level FeaturesDict `features` to the text feature named `feature`.

  Sequences are looked through. A key may itself hold "/" ("image/filename"); the longest matching key wins.
  """
  parts = feature.split("/")
  path = []
  node = features
  while parts:
    node = _unwrap_sequences(tfds, node)
    keys = set(node.keys()) if isinstance(node, tfds.features.FeaturesDict) else set()
    n = next((n for n in range(len(parts), 0, -1) if "/".join(parts[:n]) in keys), 0)
    if not n:
      raise ValueError(_unknown_feature_message(tfds, features, feature, name))
    path.append("/".join(parts[:n]))
    node = node[path[-1]]
    parts = parts[n:]
  if not _is_text(tfds, node):
    raise ValueError(
      f"feature {feature!r} of TFDS dataset {name!r} is {type(_unwrap_sequences(tfds, node)).__name__}, not text. "
      + _unknown_feature_message(tfds, features, feature, name, known=True)
    )
  return tuple(path)


def leaf_features(tfds, features, prefix: str = "") -> dict[str, Any]:
  """Every leaf feature under `features` by its "/"-joined name, Sequences looked through."""
  node = _unwrap_sequences(tfds, features)
  if not isinstance(node, tfds.features.FeaturesDict):
    return {prefix: node}
  leaves = {}
  for key, child in node.items():
    leaves.update(leaf_features(tfds, child, f"{prefix}/{key}" if prefix else key))
  return leaves


def _unwrap_sequences(tfds, feature):
  while isinstance(feature, tfds.features.Sequence):
    feature = feature.feature
  return feature


def _is_text(tfds, feature) -> bool:
  feature = _unwrap_sequences(tfds, feature)
  if isinstance(feature, tfds.features.FeaturesDict):
    return False
  # Text and string Tensors hold bytes objects in NumPy.
  return np.dtype(feature.np_dtype) == np.dtype(object)


def _unknown_feature_message(tfds, features, feature: str, name: str, known: bool = False) -> str:
  leaves = leaf_features(tfds, features)
  texts = sorted(k for k, f in leaves.items() if _is_text(tfds, f))
  others = sorted(k for k, f in leaves.items() if not _is_text(tfds, f))
  head = "" if known else f"TFDS dataset {name!r} has no feature {feature!r}. "
  return (
    f"{head}Set config.prompt.kwargs.feature to one of its text features {texts} "
    f"(its other features: {others}; nested levels are joined by '/')."
  )


def _check_split(splits, split: str, name: str) -> None:
  for part in split.split("+"):
    base = part.split("[")[0].strip()
    if base not in splits:
      raise ValueError(
        f"config.prompt.kwargs.split={split!r}: TFDS dataset {name!r} has no split {base!r}; "
        f"its splits are {sorted(splits)}"
      )


def _builder(tfds, name: str, data_dir: str | None, download: bool):
  """A builder for the prepared dataset: from its files if they exist, else from the TFDS catalogue's code."""
  where = data_dir or tfds.core.constants.DATA_DIR
  try:
    # From the prepared files alone: no builder code to run, so no TensorFlow even for catalogue datasets.
    return tfds.core.read_only_builder.builder_from_files(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    pass
  prepared = prepared_variants(name, where)
  hint = (
    f" Prepared there: {prepared}; name one in config.prompt.kwargs.dataset."
    if prepared
    else " Set config.prompt.kwargs.data_dir to the folder holding NAME/[CONFIG/]VERSION/."
  )
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except tfds.core.DatasetNotFoundError as e:
    raise ValueError(
      f"config.prompt.kwargs.dataset={name!r}: no such dataset prepared in {where}, nor in the TFDS catalogue.{hint}"
    ) from e
  except ImportError as e:
    raise ImportError(
      f"TFDS dataset {name!r} is not prepared in {where}, and its builder code needs a module that is missing ({e}); "
      "preparing most catalogue datasets needs `pip install tensorflow`. Prepare it once where TensorFlow is installed "
      f"(`tfds build {name} --data_dir=DIR --file_format=array_record`), then set config.prompt.kwargs.data_dir=DIR."
      f"{hint}"
    ) from e
  if not builder.is_prepared():
    if not download:
      raise ValueError(
        f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. Prepare it once with "
        f"`tfds build {name} --data_dir=DIR --file_format=array_record` and set config.prompt.kwargs.data_dir=DIR, "
        f"or set config.prompt.kwargs.download=True to prepare it here.{hint}"
      )
    builder.download_and_prepare(file_format="array_record")
  return builder


def prepared_variants(name: str, data_dir: str) -> list[str]:
  """The prepared "NAME/CONFIG:VERSION" (or "NAME:VERSION") of dataset `name` in `data_dir`, sorted."""
  base = name.split(":")[0].split("/")[0]
  root = os.path.join(data_dir, base)
  found = glob.glob(os.path.join(root, "*", "dataset_info.json")) + glob.glob(
    os.path.join(root, "*", "*", "dataset_info.json")
  )
  variants = []
  for info_path in found:
    *config, version = os.path.relpath(os.path.dirname(info_path), root).split(os.sep)
    variants.append("/".join([base, *config]) + f":{version}")
  return sorted(variants)


def _numpy_examples(tfds, builder, split: str, path: tuple[str, ...], chunk: int) -> Iterator[dict[str, Any]]:
  """The examples of a random-access split in stored order, decoded with NumPy (no TensorFlow)."""

  class PassThrough(tfds.decode.Decoder):
    """Hands a feature's parsed value on undecoded (tfds.decode.SkipDecoding has no NumPy batch form)."""

    def decode_example(self, serialized_example):
      return serialized_example

    def decode_example_np(self, serialized_example):
      return serialized_example

    def decode_batch_example_np(self, serialized_example):
      return serialized_example

    def decode_ragged_example_np(self, serialized_example):
      return serialized_example

  def decoders(node, prefix: tuple[str, ...]):
    # Every feature but the one read passes through undecoded, so that e.g. no image is decoded.
    node = _unwrap_sequences(tfds, node)
    if not isinstance(node, tfds.features.FeaturesDict):
      return None if prefix == path else PassThrough()
    nested = {key: decoders(child, prefix + (key,)) for key, child in node.items()}
    return {key: d for key, d in nested.items() if d is not None}

  source = builder.as_data_source(split=split, decoders=decoders(builder.info.features, ()))
  for start in range(0, len(source), chunk):
    yield from source.__getitems__(list(range(start, min(start + chunk, len(source)))))


def _tf_examples(tfds, builder, split: str, path: tuple[str, ...]) -> Iterator[dict[str, Any]]:
  """The examples of a split stored as tfrecord, in stored order, through tf.data (needs TensorFlow)."""
  formats = sorted(f.value for f in builder.info.available_file_formats())
  if not tensorflow_installed():
    raise ImportError(
      f"TFDS dataset {builder.name!r} in {builder.data_dir} is stored as {formats}, which only TensorFlow reads. "
      "Either `pip install tensorflow`, or prepare the dataset in the array_record format "
      f"(`tfds build {builder.name} --data_dir=DIR --file_format=array_record`) and set "
      "config.prompt.kwargs.data_dir=DIR."
    )
  import tensorflow as tf

  try:
    # TensorFlow would otherwise reserve the accelerators' memory that JAX uses.
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass  # TensorFlow already initialised its devices
  selected: Any = True
  for key in reversed(path):
    selected = {key: selected}
  ds = builder.as_dataset(
    split=split,
    shuffle_files=False,
    decoders=tfds.decode.PartialDecoding(selected),
    read_config=tfds.ReadConfig(interleave_cycle_length=1),
  )
  yield from tfds.as_numpy(ds)
