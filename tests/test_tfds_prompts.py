"""Prompts from a TFDS text feature, on a tiny dataset written here by TFDS's own builder (offline, no TensorFlow)."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from ddpo_jax import prompts
from ddpo_jax.prompts import tfds as tfds_prompts

tfds = pytest.importorskip("tensorflow_datasets", reason="needs the tfds extra: pip install -e '.[tfds]'")

NAME = "tiny_captions"
NUM_TRAIN = 12
NUM_TEST = 4


def example(i: int, split: str) -> dict:
  return {
    # Example 3 has an empty caption, which is skipped.
    "caption": "" if i == 3 else f"  a cat number {i} ({split})\n",
    "captions": {"text": [f"a dog {i}", f"a bird {i}"], "id": [2 * i, 2 * i + 1]},
    "tags": [f"tag {i}", " "],
    "meta/source": f"source {i}",
    "blank": " ",
    "label": i,
  }


class TinyCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Captions as a scalar text, a Sequence of dicts, a Sequence of texts and a key holding "/"."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    features = tfds.features.FeaturesDict(
      {
        "caption": tfds.features.Text(),
        "captions": tfds.features.Sequence({"text": tfds.features.Text(), "id": np.int64}),
        "tags": tfds.features.Sequence(tfds.features.Text()),
        "meta/source": tfds.features.Text(),
        "blank": tfds.features.Text(),
        "label": np.int64,
      }
    )
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(NUM_TRAIN, "train"), "test": self._generate_examples(NUM_TEST, "test")}

  def _generate_examples(self, num_examples, split):
    for i in range(num_examples):
      yield i, example(i, split)


class DdpoJaxTestCaptions(TinyCaptions):
  """TinyCaptions in TFDS's registry of builders, so that it can be prepared by name (download=True)."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp("tfds"))
  TinyCaptions(data_dir=path, file_format="array_record").download_and_prepare()
  return path


def read(data_dir, feature="caption", **kwargs) -> list[str]:
  return tfds_prompts.read_texts(NAME, feature, data_dir=data_dir, **kwargs)


def test_scalar_text_feature_is_stripped_and_skips_empties(data_dir):
  tensorflow_imported = "tensorflow" in sys.modules
  texts = read(data_dir)
  assert len(texts) == NUM_TRAIN - 1
  assert set(texts) == {f"a cat number {i} (train)" for i in range(NUM_TRAIN) if i != 3}
  # array_record is read without TensorFlow.
  assert ("tensorflow" in sys.modules) == tensorflow_imported


def test_nested_and_list_features(data_dir):
  assert sorted(read(data_dir, "captions/text")) == sorted(
    f"a {animal} {i}" for i in range(NUM_TRAIN) for animal in ("dog", "bird")
  )
  assert sorted(read(data_dir, "tags")) == sorted(f"tag {i}" for i in range(NUM_TRAIN))
  # A key that itself holds "/".
  assert len(read(data_dir, "meta/source")) == NUM_TRAIN


def test_splits(data_dir):
  assert set(read(data_dir, split="test")) == {f"a cat number {i} (test)" for i in range(NUM_TEST) if i != 3}
  assert len(read(data_dir, "meta/source", split="train[:5]+test")) == 5 + NUM_TEST


def test_deterministic_given_seed(data_dir):
  fn = prompts.get("tfds", dataset=NAME, feature="captions/text", data_dir=data_dir)  # the registered name
  a = fn(np.random.default_rng(7), 16)
  assert a == fn(np.random.default_rng(7), 16)
  assert a != fn(np.random.default_rng(8), 16)
  assert len(a) == 16 and set(a) <= set(read(data_dir, "captions/text"))


def test_max_prompts_reads_only_the_first_examples(data_dir, monkeypatch):
  every = read(data_dir, "captions/text")
  requested = []
  source_type = type(tfds.data_source(NAME, split="train", data_dir=data_dir))
  get_items = source_type.__getitems__
  monkeypatch.setattr(source_type, "__getitems__", lambda self, keys: requested.extend(keys) or get_items(self, keys))
  assert read(data_dir, "captions/text", max_prompts=3) == every[:3]
  assert max(requested) < 3
  assert read(data_dir, max_prompts=100) == read(data_dir)
  with pytest.raises(ValueError, match="config.prompt.kwargs.max_prompts=0"):
    read(data_dir, max_prompts=0)


def test_unknown_feature_lists_the_text_features(data_dir):
  with pytest.raises(ValueError) as info:
    read(data_dir, "captions/txt")
  message = str(info.value)
  assert "config.prompt.kwargs.feature" in message and "'captions/txt'" in message
  for name in ("'caption'", "'captions/text'", "'tags'", "'meta/source'", "'label'"):
    assert name in message
  with pytest.raises(ValueError, match="'label' of TFDS dataset 'tiny_captions' is Tensor, not text"):
    read(data_dir, "label")
  with pytest.raises(ValueError, match="not text"):
    read(data_dir, "captions")


def test_empty_result_and_bad_names(data_dir, tmp_path):
  with pytest.raises(ValueError, match="'blank' .* has no non-empty text: choose another config.prompt.kwargs.feature"):
    read(data_dir, "blank")
  with pytest.raises(ValueError, match=r"config.prompt.kwargs.split='valid'.*\['test', 'train'\]"):
    read(data_dir, split="valid")
  with pytest.raises(ValueError, match="config.prompt.kwargs.dataset='no_such_captions'"):
    tfds_prompts.read_texts("no_such_captions", "caption", data_dir=str(tmp_path))
  # A config that is not the one prepared: the error names the prepared ones.
  with pytest.raises(ValueError, match=r"Prepared there: \['tiny_captions:1.0.0'\]"):
    tfds_prompts.read_texts(f"{NAME}/other_config", "caption", data_dir=data_dir)


def test_not_prepared_then_download(tmp_path):
  name = "ddpo_jax_test_captions"
  with pytest.raises(ValueError, match="not prepared .*config.prompt.kwargs.download=True"):
    tfds_prompts.read_texts(name, "caption", data_dir=str(tmp_path))
  assert len(tfds_prompts.read_texts(name, "caption", data_dir=str(tmp_path), download=True)) == NUM_TRAIN - 1


def test_tfrecord_without_tensorflow_says_what_to_do(data_dir, tmp_path, monkeypatch):
  # A copy whose metadata says tfrecord: only TensorFlow could read it.
  copy = tmp_path / "copy"
  shutil.copytree(data_dir, copy)
  info_path = copy / NAME / "1.0.0" / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))
  monkeypatch.setattr(tfds_prompts, "tensorflow_installed", lambda: False)
  with pytest.raises(ImportError, match="only TensorFlow reads.*pip install tensorflow.*--file_format=array_record"):
    read(str(copy))


def test_missing_tfds_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match=r"pip install -e '\.\[tfds\]'"):
    tfds_prompts.read_texts(NAME, "caption")


def test_tfrecord_through_tensorflow(tmp_path):
  pytest.importorskip("tensorflow")
  path = str(tmp_path)
  TinyCaptions(data_dir=path, file_format="tfrecord").download_and_prepare()
  assert sorted(read(path, "captions/text")) == sorted(
    f"a {animal} {i}" for i in range(NUM_TRAIN) for animal in ("dog", "bird")
  )
  assert read(path, max_prompts=4) == read(path)[:4]
  assert len(read(path, "tags")) == NUM_TRAIN
