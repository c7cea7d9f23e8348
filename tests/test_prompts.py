from __future__ import annotations

import numpy as np
import pytest

from ddpo_jax import prompts
from ddpo_jax.toy import shapes


def test_packaged_counts():
  assert len(prompts.load_list("imagenet_classes.txt")) == 1000
  assert len(prompts.load_list("common_animals.txt")) == 45
  assert prompts.load_list("activities.txt") == ["washing the dishes", "riding a bike", "playing chess"]


def test_imagenet_animals_are_the_first_398_lines_as_written():
  fn = prompts.get("imagenet_animals")
  seen = set(fn(np.random.default_rng(0), 4000))
  allowed = set(prompts.load_list("imagenet_classes.txt")[:398])
  assert len(allowed) == 398
  assert seen <= allowed
  assert "tench, Tinca tinca" in seen  # synonyms kept
  assert "abacus" not in seen


def test_common_animals_covers_all_45():
  assert len(set(prompts.get("common_animals")(np.random.default_rng(0), 2000))) == 45


def test_deterministic_given_seed():
  for name in ("imagenet_animals", "nouns_activities", "toy_scenes", "unseen_activity"):
    fn = prompts.get(name)
    a = fn(np.random.default_rng(7), 16)
    assert a == fn(np.random.default_rng(7), 16)
    assert len(a) == 16 and all(isinstance(p, str) for p in a)
    assert a != fn(np.random.default_rng(8), 16)


def test_nouns_activities_articles():
  got = set(prompts.get("nouns_activities")(np.random.default_rng(0), 2000))
  assert len(got) == 45 * 3
  assert "a cat washing the dishes" in got
  assert "an ant playing chess" in got
  for p in got:
    article, noun = p.split()[:2]
    assert article == ("an" if noun[0] in "aeiou" else "a")


def test_nouns_activities_custom_files(tmp_path):
  (tmp_path / "n.txt").write_text("otter\nbee\n")
  (tmp_path / "a.txt").write_text("\nsinging\n")
  fn = prompts.get("nouns_activities", nouns_file=str(tmp_path / "n.txt"), activities_file=str(tmp_path / "a.txt"))
  assert set(fn(np.random.default_rng(0), 50)) == {"an otter singing", "a bee singing"}


def test_held_out_sets():
  rng = np.random.default_rng(0)
  assert set(prompts.get("unseen_activity")(rng, 500)) <= {
    f"{prompts.article(a)} {a} taking an exam" for a in prompts.load_list("common_animals.txt")
  }
  assert set(prompts.get("uncommon_animals")(rng, 10)) <= set(prompts.load_list("uncommon_animals.txt"))
  assert set(prompts.get("everyday_objects")(rng, 10)) <= set(prompts.load_list("everyday_objects.txt"))
  assert set(prompts.get("simple_animals")(rng, 10)) <= set(prompts.load_list("very_simple_animals.txt"))


def test_toy_scenes_are_parseable_captions():
  for caption in prompts.get("toy_scenes")(np.random.default_rng(0), 20):
    shapes.Scene.from_caption(caption)


def test_from_file(tmp_path):
  path = tmp_path / "p.txt"
  path.write_text("  a photo of a cat \n\n\na dog\n")
  got = prompts.get("from_file", path=str(path))(np.random.default_rng(0), 100)
  assert set(got) == {"a photo of a cat", "a dog"}
  (tmp_path / "empty.txt").write_text("\n \n")
  with pytest.raises(ValueError, match="no non-empty lines"):
    prompts.get("from_file", path=str(tmp_path / "empty.txt"))


def test_import_path_lookup(tmp_path, monkeypatch):
  (tmp_path / "my_prompts_mod.py").write_text(
    "def fixed(text='hi'):\n  return lambda rng, batch_size: [text] * batch_size\n"
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  assert prompts.get("my_prompts_mod:fixed", text="yo")(np.random.default_rng(0), 3) == ["yo"] * 3
  with pytest.raises(ValueError, match="no attribute 'missing'"):
    prompts.get("my_prompts_mod:missing")


def test_unknown_name():
  with pytest.raises(ValueError) as info:
    prompts.get("no_such_prompts")
  message = str(info.value)
  assert "'no_such_prompts'" in message
  for name in ("imagenet_animals", "common_animals", "toy_scenes", "from_file"):
    assert name in message


def test_register_duplicate():
  with pytest.raises(ValueError, match="already registered"):
    prompts.register("common_animals")(lambda: None)


def test_grouped_prompts():
  fn = prompts.grouped(prompts.uniform(["a", "b", "c", "d", "e"]), 3)
  drawn = fn(np.random.default_rng(0), 9)
  assert [drawn[i] for i in (0, 3, 6)] == prompts.uniform(["a", "b", "c", "d", "e"])(np.random.default_rng(0), 3)
  assert all(drawn[g * 3] == drawn[g * 3 + 1] == drawn[g * 3 + 2] for g in range(3))
  one = prompts.uniform(["a", "b"])
  assert prompts.grouped(one, 1) is one
  with pytest.raises(ValueError, match="groups of 3"):
    fn(np.random.default_rng(0), 8)
