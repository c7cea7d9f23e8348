"""models.tokenizer against transformers' CLIPTokenizer and CLIPTokenizerFast, the references."""

import json
import os
import shutil

import numpy as np
import pytest
import transformers

from ddpo_jax.models import tokenizer as clip_tokenizer
from ddpo_jax.toy import shapes

TOY_TOKENIZER = os.path.join(os.path.dirname(shapes.__file__), "model", "tokenizer")

# Words of another closed vocabulary: contractions, digits and punctuation as
# words of their own, and non-ASCII words (made of their bytes' symbols).
VARIED_WORDS = [
  *["a", "photo", "of", "cat", "cats", "dog", "the", "painting", "astronaut", "riding", "horse", "hello", "world"],
  *["it", "we", "they", "'s", "'ll", "'re", "2", "0", "4", "!", "...", ",", "café", "über", "日本"],
]

# Prompts on which transformers' slow (without ftfy) and fast tokenizers agree.
PROMPTS = [
  "a red circle on a blue background",
  "A Red CIRCLE On A BLUE Background",
  "  a   red\tcircle\n\non a\r\nblue background  ",
  "\u00a0a\u3000cat\u2003",
  "a red circle, on a blue background!!",
  "hello!world?... (a) [photo] #1 -- x_y",
  "it's we'll IT'S they're don't i'd you've i'm",
  "2024 cats, 3.5 dogs",
  "café über Ünïcödé cafe\u0301",
  "a photo of a cat 🐈 riding a 🚀",
  "",
  " ",
  "a red circle " * 10,
  "zebra xylophone quokka",
  "<|startoftext|> a <|endoftext|> b <|ENDOFTEXT|>",
]
# Prompts on which the slow tokenizer differs from the fast one, which we
# follow: it splits CJK ideographs into single-character words, deletes control
# and format characters (U+0000, U+FFFD, the zero-width joiner of emoji
# sequences), deletes U+000B, U+000C and U+0085 where the fast one sees
# whitespace, and lower-cases a final capital sigma to "ς" (the fast one: "σ").
FAST_ONLY_PROMPTS = [
  "日本 中文字 カタカナ 한국어",
  "an astronaut 👩\u200d🚀",
  "a\x0bcat\x0cdog\x85x\u2028y",
  "nul\x00here \ufffd",
  "ΟΔΟΣ",
]


def _reference_call(reference, prompts, max_length):
  return np.array(
    reference(list(prompts), padding="max_length", max_length=max_length, truncation=True).input_ids, np.int32
  )


def _built(words, directory, max_length):
  """(ours, slow, fast) of build_tokenizer's files, the references made as the
  former build_tokenizer made its tokenizer."""
  ours = clip_tokenizer.build_tokenizer(words, directory, max_length)
  files = {"vocab_file": os.path.join(directory, "vocab.json"), "merges_file": os.path.join(directory, "merges.txt")}
  slow = transformers.CLIPTokenizer(**files, model_max_length=max_length)
  fast = transformers.CLIPTokenizerFast(**files, model_max_length=max_length)
  return ours, slow, fast


def _from_folder(path):
  """(ours, slow, fast) of a tokenizer folder."""
  return (
    clip_tokenizer.CLIPTokenizer.from_folder(path),
    transformers.CLIPTokenizer.from_pretrained(path),
    transformers.CLIPTokenizerFast.from_pretrained(path),
  )


@pytest.fixture(scope="module", params=["toy", "shapes", "varied"])
def trio(request, tmp_path_factory):
  """(ours, transformers slow, transformers fast) of one vocabulary."""
  if request.param == "toy":
    return _from_folder(TOY_TOKENIZER)
  directory = str(tmp_path_factory.mktemp(request.param))
  if request.param == "shapes":
    return _built(shapes.vocabulary(), directory, max_length=12)
  return _built(VARIED_WORDS, directory, max_length=20)


def _copy_toy(tmp_path, name="tokenizer"):
  folder = str(tmp_path / name)
  shutil.copytree(TOY_TOKENIZER, folder)
  return folder


def _edit_json(path, edit):
  with open(path) as f:
    value = json.load(f)
  edit(value)
  with open(path, "w") as f:
    json.dump(value, f)


# ----------------------------------------------------------------------------
# Against transformers.
# ----------------------------------------------------------------------------


def test_attributes_match_transformers(trio):
  ours, slow, fast = trio
  for reference in (slow, fast):
    assert ours.model_max_length == reference.model_max_length
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
      reference.bos_token_id,
      reference.eos_token_id,
      reference.pad_token_id,
    )
    assert ours.vocab_size == reference.vocab_size
    assert len(ours) == len(reference)
    assert ours.get_vocab() == reference.get_vocab()


def test_ids_match_slow_and_fast(trio):
  ours, slow, fast = trio
  ids = ours(PROMPTS)
  assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), ours.model_max_length)
  np.testing.assert_array_equal(ids, _reference_call(slow, PROMPTS, ours.model_max_length))
  np.testing.assert_array_equal(ids, _reference_call(fast, PROMPTS, ours.model_max_length))


def test_pieces_match_slow_and_fast(trio):
  ours, slow, fast = trio
  for prompt in PROMPTS:
    assert ours.tokenize(prompt) == slow.tokenize(prompt) == fast.tokenize(prompt), prompt


def test_fast_only_prompts_match_fast(trio):
  ours, _, fast = trio
  expected = _reference_call(fast, FAST_ONLY_PROMPTS, ours.model_max_length)
  np.testing.assert_array_equal(ours(FAST_ONLY_PROMPTS), expected)
  for prompt in FAST_ONLY_PROMPTS:
    assert ours.tokenize(prompt) == fast.tokenize(prompt), prompt


@pytest.mark.parametrize("max_length", [2, 5, 40])
def test_encode_max_length_matches_fast(trio, max_length):
  ours, _, fast = trio
  ids = ours.encode(PROMPTS, max_length=max_length)
  assert ids.shape == (len(PROMPTS), max_length)
  np.testing.assert_array_equal(ids, _reference_call(fast, PROMPTS, max_length))


def test_prompts_exercise_truncation_and_byte_fallback():
  """The prompts above do reach the cases they are there for."""
  ours = clip_tokenizer.CLIPTokenizer.from_folder(TOY_TOKENIZER)
  long_prompt = "a red circle " * 10
  assert len(ours.tokenize(long_prompt)) > ours.model_max_length
  row = ours([long_prompt])[0]
  assert row[0] == ours.bos_token_id and row[-1] == ours.eos_token_id and ours.pad_token_id not in row[1:-1]
  # Out of the vocabulary: one piece per byte or so, "</w>" on the last.
  assert ours.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"]
  assert ours.tokenize("é") == ["Ã", "©</w>"]
  empty = ours([""])[0]
  assert list(empty[:2]) == [ours.bos_token_id, ours.eos_token_id] and (empty[2:] == ours.pad_token_id).all()


def test_single_string_and_bad_max_length():
  ours = clip_tokenizer.CLIPTokenizer.from_folder(TOY_TOKENIZER)
  np.testing.assert_array_equal(ours("a red circle"), ours(["a red circle"]))
  with pytest.raises(ValueError, match="at least 2"):
    ours.encode(["a"], max_length=1)


# ----------------------------------------------------------------------------
# build_tokenizer.
# ----------------------------------------------------------------------------


def _former_build_tokenizer_files(words, directory):
  """What build_tokenizer wrote when it lived in models/diffusion.py (on
  transformers' bytes_to_unicode)."""
  from transformers.models.clip.tokenization_clip import bytes_to_unicode

  symbols = list(bytes_to_unicode().values())
  vocab = symbols + [s + "</w>" for s in symbols]
  merges = []
  for word in sorted(set(words)):
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    current = pieces[0]
    for piece in pieces[1:]:
      merged = current + piece
      if (current, piece) not in merges:
        merges.append((current, piece))
      if merged not in vocab:
        vocab.append(merged)
      current = merged
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump({token: i for i, token in enumerate(vocab)}, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def test_bytes_to_unicode_is_gpt2s():
  from transformers.models.clip.tokenization_clip import bytes_to_unicode

  assert list(clip_tokenizer.bytes_to_unicode().items()) == list(bytes_to_unicode().items())


ASCII_WORDS = [w for w in VARIED_WORDS if w.isascii()]


@pytest.mark.parametrize("words", [shapes.vocabulary(), ASCII_WORDS, ["b", "ab", "abc", "abd", "ba", "b"]])
def test_build_tokenizer_writes_the_former_files(tmp_path, words):
  ours = clip_tokenizer.build_tokenizer(words, str(tmp_path / "new"), max_length=9)
  _former_build_tokenizer_files(words, str(tmp_path / "old"))
  for name in ("vocab.json", "merges.txt"):
    with open(tmp_path / "new" / name, "rb") as new, open(tmp_path / "old" / name, "rb") as old:
      assert new.read() == old.read(), name
  assert sorted(os.listdir(tmp_path / "new")) == ["merges.txt", "vocab.json"]
  assert ours.model_max_length == 9 and ours.pad_token_id == ours.eos_token_id


def test_shipped_toy_tokenizer_is_build_tokenizers(tmp_path):
  ours = clip_tokenizer.build_tokenizer(shapes.vocabulary(), str(tmp_path), max_length=16)
  shipped = clip_tokenizer.CLIPTokenizer.from_folder(TOY_TOKENIZER)
  assert ours.get_vocab() == shipped.get_vocab() and ours.merges == shipped.merges
  assert ours.model_max_length == shipped.model_max_length


def test_build_tokenizer_spells_non_ascii_words_in_bytes(tmp_path):
  ours = clip_tokenizer.build_tokenizer(["café", "日本"], str(tmp_path), max_length=8)
  assert ours.tokenize("Café 日本") == ["cafÃ©</w>", "æĹ¥æľ¬</w>"]


# ----------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------


def test_save_round_trip(tmp_path):
  ours = clip_tokenizer.CLIPTokenizer.from_folder(TOY_TOKENIZER)
  ours.save(str(tmp_path / "saved"))
  again = clip_tokenizer.CLIPTokenizer.from_folder(str(tmp_path / "saved"))
  assert again.get_vocab() == ours.get_vocab() and again.merges == ours.merges
  assert again.model_max_length == ours.model_max_length
  assert (again.bos_token, again.eos_token, again.pad_token, again.unk_token) == (
    ours.bos_token,
    ours.eos_token,
    ours.pad_token,
    ours.unk_token,
  )
  prompts = PROMPTS + FAST_ONLY_PROMPTS
  np.testing.assert_array_equal(again(prompts), ours(prompts))


def test_saved_folder_loads_in_transformers(tmp_path):
  ours = clip_tokenizer.CLIPTokenizer.from_folder(TOY_TOKENIZER)
  folder = str(tmp_path / "saved")
  ours.save(folder)
  slow = transformers.CLIPTokenizer.from_pretrained(folder)
  fast = transformers.CLIPTokenizerFast.from_pretrained(folder)
  for reference in (slow, fast):
    assert reference.model_max_length == ours.model_max_length
    assert (reference.bos_token, reference.eos_token, reference.pad_token, reference.unk_token) == (
      ours.bos_token,
      ours.eos_token,
      ours.pad_token,
      ours.unk_token,
    )
  np.testing.assert_array_equal(_reference_call(slow, PROMPTS, ours.model_max_length), ours(PROMPTS))
  np.testing.assert_array_equal(_reference_call(fast, PROMPTS, ours.model_max_length), ours(PROMPTS))
  # vocab.json and merges.txt in transformers' own layout, byte for byte.
  slow.save_pretrained(str(tmp_path / "by_transformers"))
  for name in ("vocab.json", "merges.txt"):
    with open(tmp_path / "saved" / name, "rb") as a, open(tmp_path / "by_transformers" / name, "rb") as b:
      assert a.read() == b.read(), name


def _sd2_style(tmp_path, pad_token="!"):
  """The toy folder in SD 2's layout: tokenizer_config.json without
  added_tokens_decoder and with pad <|endoftext|>; special_tokens_map.json
  with pad "!"."""
  folder = _copy_toy(tmp_path, "sd2")
  _edit_json(os.path.join(folder, "tokenizer_config.json"), lambda c: c.pop("added_tokens_decoder"))
  _edit_json(os.path.join(folder, "special_tokens_map.json"), lambda m: m.update(pad_token=pad_token))
  return folder


SD2_PROMPTS = ["a red circle!", "a red circle ! on a blue background!!", "", "hello!world"]


@pytest.mark.parametrize("pad_token", ["!", {"content": "!", "lstrip": False, "normalized": False, "rstrip": False}])
def test_sd2_pad_token_from_special_tokens_map(tmp_path, pad_token):
  folder = _sd2_style(tmp_path, pad_token)
  ours, slow, fast = _from_folder(folder)
  sd1 = clip_tokenizer.CLIPTokenizer.from_folder(TOY_TOKENIZER)
  assert ours.pad_token == "!" and ours.pad_token_id == ours.get_vocab()["!"] == 0 != sd1.pad_token_id
  ids = ours(SD2_PROMPTS)
  # The padding changes, and "!" in the text becomes the special token: id 0, not "!</w>".
  assert (ids[2, 2:] == 0).all() and (sd1(SD2_PROMPTS)[2, 2:] == sd1.eos_token_id).all()
  assert ours.tokenize("red!") == ["red</w>", "!"] and sd1.tokenize("red!") == ["red</w>", "!</w>"]
  for reference in (slow, fast):
    assert reference.pad_token_id == ours.pad_token_id
    np.testing.assert_array_equal(ids, _reference_call(reference, SD2_PROMPTS, ours.model_max_length))
    for prompt in SD2_PROMPTS:
      assert ours.tokenize(prompt) == reference.tokenize(prompt), prompt


def test_sd2_pad_token_survives_save(tmp_path):
  ours = clip_tokenizer.CLIPTokenizer.from_folder(_sd2_style(tmp_path))
  folder = str(tmp_path / "saved")
  ours.save(folder)
  again, slow, fast = _from_folder(folder)
  assert again.pad_token_id == slow.pad_token_id == fast.pad_token_id == 0
  np.testing.assert_array_equal(again(SD2_PROMPTS), ours(SD2_PROMPTS))
  np.testing.assert_array_equal(_reference_call(slow, SD2_PROMPTS, ours.model_max_length), ours(SD2_PROMPTS))


@pytest.mark.parametrize("config_pad", ["<|endoftext|>", "!"])
def test_special_tokens_map_is_ignored_beside_added_tokens_decoder(tmp_path, config_pad):
  """As in transformers: with added_tokens_decoder (today's layout) the
  tokenizer_config.json's tokens win over special_tokens_map.json's."""
  folder = _copy_toy(tmp_path)
  _edit_json(os.path.join(folder, "tokenizer_config.json"), lambda c: c.update(pad_token=config_pad))
  other = "!" if config_pad != "!" else "<|endoftext|>"
  _edit_json(os.path.join(folder, "special_tokens_map.json"), lambda m: m.update(pad_token=other))
  ours, slow, fast = _from_folder(folder)
  assert ours.pad_token == slow.pad_token == fast.pad_token == config_pad
  np.testing.assert_array_equal(ours(SD2_PROMPTS), _reference_call(fast, SD2_PROMPTS, ours.model_max_length))


def _declare_unnormalized(config):
  for entry in config["added_tokens_decoder"].values():
    entry["normalized"] = False


_A = {"content": "A", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
FLAG_CASES = {
  # A pad string is matched in the raw text, so "A" but not "a" is the pad token.
  "pad string": ("special_tokens_map.json", lambda m: m.update(pad_token="A")),
  # normalized: true, matched in the lower-cased text.
  "pad dict": ("special_tokens_map.json", lambda m: m.update(pad_token=_A)),
  # added_tokens_decoder's flags apply to the string tokens: "<|ENDOFTEXT|>" is text.
  "declared": ("tokenizer_config.json", _declare_unnormalized),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_special_token_flags_match_fast(tmp_path, case):
  """Whether a special token is matched in the raw or in the normalized text
  (transformers' slow tokenizer ignores that flag: it is left out here)."""
  folder = _sd2_style(tmp_path) if case != "declared" else _copy_toy(tmp_path)
  name, edit = FLAG_CASES[case]
  _edit_json(os.path.join(folder, name), edit)
  ours = clip_tokenizer.CLIPTokenizer.from_folder(folder)
  fast = transformers.CLIPTokenizerFast.from_pretrained(folder)
  prompts = ["A cat a cAt", "a <|ENDOFTEXT|> b <|endoftext|>", "Aa"]
  for prompt in prompts:
    assert ours.tokenize(prompt) == fast.tokenize(prompt), prompt
  np.testing.assert_array_equal(ours(prompts), _reference_call(fast, prompts, ours.model_max_length))


@pytest.mark.parametrize("name", ["vocab.json", "merges.txt", "tokenizer_config.json"])
def test_missing_file_is_named(tmp_path, name):
  folder = _copy_toy(tmp_path)
  os.remove(os.path.join(folder, name))
  with pytest.raises(ValueError, match=f"{folder}/{name} is missing"):
    clip_tokenizer.CLIPTokenizer.from_folder(folder)


def test_folder_without_special_tokens_map_loads(tmp_path):
  folder = _copy_toy(tmp_path)
  os.remove(os.path.join(folder, "special_tokens_map.json"))
  ours = clip_tokenizer.CLIPTokenizer.from_folder(folder)
  np.testing.assert_array_equal(ours(PROMPTS), clip_tokenizer.CLIPTokenizer.from_folder(TOY_TOKENIZER)(PROMPTS))


def test_special_token_missing_from_vocab(tmp_path):
  folder = _copy_toy(tmp_path)
  _edit_json(os.path.join(folder, "special_tokens_map.json"), lambda m: m.update(pad_token="<pad>"))
  config = os.path.join(folder, "tokenizer_config.json")
  _edit_json(config, lambda c: (c.pop("added_tokens_decoder"), c.pop("pad_token")))
  with pytest.raises(ValueError, match=r"\['<pad>'\].*vocab.json"):
    clip_tokenizer.CLIPTokenizer.from_folder(folder)
