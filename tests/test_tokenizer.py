"""models.tokenizer against transformers 5's CLIPTokenizer, the reference.

transformers 5 has one CLIPTokenizer, on the `tokenizers` library (4's slow,
pure-Python one is gone; CLIPTokenizerFast is another name for it). It is
built from a folder with `CLIPTokenizer.from_pretrained`: its constructor
takes vocab= and merges= (a dict and a list), and ignores 4's vocab_file= and
merges_file=, leaving a 3-token vocabulary (bos, eos, pad: ids 0, 1, 2).
"""

import itertools
import json
import os
import shutil

import numpy as np
import pytest
import tokenizers
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode as transformers_bytes_to_unicode

from ddpo_jax.models import tokenizer as clip_tokenizer
from ddpo_jax.toy import shapes

TOY_TOKENIZER = os.path.join(os.path.dirname(shapes.__file__), "model", "tokenizer")

# Words of another closed vocabulary: contractions, digits and punctuation as
# words of their own, and non-ASCII words (made of their bytes' symbols).
VARIED_WORDS = [
  *["a", "photo", "of", "cat", "cats", "dog", "the", "painting", "astronaut", "riding", "horse", "hello", "world"],
  *["it", "we", "they", "'s", "'ll", "'re", "2", "0", "4", "!", "...", ",", "café", "über", "日本"],
]

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
  # Special tokens' text where they are not matched as special tokens (where
  # their `normalized` flag is false): transformers 5 splits "<|endoftext|>"
  # as a word of its own (then "<|", "endoftext", "|>"), so "|>>" is two words.
  "x<|ENDOFTEXT|>> <|STARTOFTEXT|>!! (<|endoftext|>)",
  # Where transformers 4's slow tokenizer (without ftfy) differed: CJK
  # ideographs are not split into one word each, control and format
  # characters (U+0000, U+FFFD, the zero-width joiner of emoji sequences) are
  # kept, U+000B, U+000C and U+0085 are whitespace, and a final capital sigma
  # lower-cases to "σ" (not "ς").
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


def _reference(folder, **kwargs):
  return transformers.CLIPTokenizer.from_pretrained(folder, **kwargs)


def _gpt2_bytes_to_unicode():
  """GPT-2's bytes_to_unicode (openai/gpt-2, src/encoder.py), transcribed."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(2**8):
    if b not in bs:
      bs.append(b)
      cs.append(2**8 + n)
      n += 1
  return dict(zip(bs, [chr(c) for c in cs]))


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


def _resaved_by_transformers(folder, out):
  """`folder` loaded and saved by transformers 5: tokenizer.json and
  tokenizer_config.json (no vocab.json, merges.txt, special_tokens_map.json,
  no added_tokens_decoder)."""
  _reference(folder).save_pretrained(out)
  names = sorted(os.listdir(out))
  assert "tokenizer.json" in names and "vocab.json" not in names and "merges.txt" not in names, names
  with open(os.path.join(out, "tokenizer_config.json")) as f:
    assert "added_tokens_decoder" not in json.load(f)
  return out


def _sd1_style(tmp_path):
  """The toy folder in SD v1's layout (CompVis/stable-diffusion-v1-4):
  tokenizer_config.json without added_tokens_decoder, with "__type":
  "AddedToken" dicts; special_tokens_map.json with dicts and pad a string."""
  folder = _copy_toy(tmp_path, "sd1")

  def edit(config):
    config.pop("added_tokens_decoder")
    for key, content in (
      ("bos_token", "<|startoftext|>"),
      ("eos_token", "<|endoftext|>"),
      ("unk_token", "<|endoftext|>"),
    ):
      config[key] = {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False}
      config[key]["single_word"] = False

  _edit_json(os.path.join(folder, "tokenizer_config.json"), edit)
  return folder


def _sd2_style(tmp_path, pad_token="!"):
  """The toy folder in SD 2's layout: tokenizer_config.json without
  added_tokens_decoder and with pad <|endoftext|>; special_tokens_map.json
  with pad "!"."""
  folder = _copy_toy(tmp_path, "sd2")
  _edit_json(os.path.join(folder, "tokenizer_config.json"), lambda c: c.pop("added_tokens_decoder"))
  _edit_json(os.path.join(folder, "special_tokens_map.json"), lambda m: m.update(pad_token=pad_token))
  return folder


@pytest.fixture(scope="module", params=["toy", "toy saved by transformers", "sd1", "shapes", "varied"])
def pair(request, tmp_path_factory):
  """(ours, transformers 5's) of one vocabulary and folder layout."""
  tmp = tmp_path_factory.mktemp("pair")
  if request.param in ("toy", "toy saved by transformers", "sd1"):
    folder = _sd1_style(tmp) if request.param == "sd1" else TOY_TOKENIZER
    if request.param == "toy saved by transformers":
      folder = _resaved_by_transformers(folder, str(tmp / "resaved"))
    return clip_tokenizer.CLIPTokenizer.from_folder(folder), _reference(folder)
  # build_tokenizer's files (vocab.json and merges.txt only), as the toy model builds its tokenizer.
  words, max_length = (shapes.vocabulary(), 12) if request.param == "shapes" else (VARIED_WORDS, 20)
  ours = clip_tokenizer.build_tokenizer(words, str(tmp), max_length)
  return ours, _reference(str(tmp), model_max_length=max_length)


# ----------------------------------------------------------------------------
# Against transformers.
# ----------------------------------------------------------------------------


def test_attributes_match_transformers(pair):
  ours, reference = pair
  assert ours.model_max_length == reference.model_max_length
  assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
    reference.bos_token_id,
    reference.eos_token_id,
    reference.pad_token_id,
  )
  assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token) == (
    reference.bos_token,
    reference.eos_token,
    reference.unk_token,
    reference.pad_token,
  )
  assert ours.vocab_size == reference.vocab_size
  assert len(ours) == len(reference)
  assert ours.get_vocab() == reference.get_vocab()
  assert ours.get_vocab()[ours.bos_token] == ours.bos_token_id != ours.eos_token_id


def test_ids_match_transformers(pair):
  ours, reference = pair
  ids = ours(PROMPTS)
  assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), ours.model_max_length)
  np.testing.assert_array_equal(ids, _reference_call(reference, PROMPTS, ours.model_max_length))


def test_pieces_match_transformers(pair):
  ours, reference = pair
  for prompt in PROMPTS:
    assert ours.tokenize(prompt) == reference.tokenize(prompt), prompt


@pytest.mark.parametrize("max_length", [2, 5, 40])
def test_encode_max_length_matches_transformers(pair, max_length):
  ours, reference = pair
  ids = ours.encode(PROMPTS, max_length=max_length)
  assert ids.shape == (len(PROMPTS), max_length)
  np.testing.assert_array_equal(ids, _reference_call(reference, PROMPTS, max_length))


def test_prompts_exercise_truncation_and_byte_fallback(tmp_path):
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
  # The toy folder's specials are normalized (matched in the lower-cased
  # text); build_tokenizer's are plain strings, matched in the raw text only.
  assert ours.tokenize("<|ENDOFTEXT|>>") == ["<|endoftext|>", "></w>"]
  built = clip_tokenizer.build_tokenizer(shapes.vocabulary(), str(tmp_path), max_length=8)
  pieces = built.tokenize("<|ENDOFTEXT|>>")
  assert pieces[:2] == ["<", "|</w>"] and pieces[-2:] == ["></w>", "></w>"], pieces


def test_single_string_and_bad_max_length():
  ours = clip_tokenizer.CLIPTokenizer.from_folder(TOY_TOKENIZER)
  np.testing.assert_array_equal(ours("a red circle"), ours(["a red circle"]))
  with pytest.raises(ValueError, match="at least 2"):
    ours.encode(["a"], max_length=1)


def test_every_merge_is_read(tmp_path):
  """transformers 5 reads all of merges.txt (4 stopped after CLIP's 48894 merges)."""
  symbols = list(clip_tokenizer.bytes_to_unicode().values())
  vocab = dict.fromkeys(symbols + [s + "</w>" for s in symbols])
  merges = []
  pairs = ["".join(p) for p in itertools.product("abcdefghijklmnopqrstuvwxyz", repeat=2)]
  for a, b in itertools.product("abcdefghijklmnopqrstuvwxyz", repeat=2):
    merges.append((a, b))
  for ab, cd in itertools.product(pairs, repeat=2):
    if len(merges) == 48894:
      break
    merges.append((ab, cd))
  merges.append(("z", "z</w>"))  # The 48895th.
  for a, b in merges:
    vocab.setdefault(a + b)
  vocab.update({"<|startoftext|>": None, "<|endoftext|>": None})
  vocab = {token: i for i, token in enumerate(vocab)}
  with open(tmp_path / "vocab.json", "w") as f:
    json.dump(vocab, f)
  with open(tmp_path / "merges.txt", "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"model_max_length": 8}, f)
  ours = clip_tokenizer.CLIPTokenizer.from_folder(str(tmp_path))
  assert len(ours.merges) == 48895
  reference = _reference(str(tmp_path))
  assert ours.tokenize("zz") == reference.tokenize("zz") == ["zz</w>"]
  assert ours.tokenize("abcdz xy") == reference.tokenize("abcdz xy") == ["abcd", "z</w>", "x", "y</w>"]


# ----------------------------------------------------------------------------
# build_tokenizer.
# ----------------------------------------------------------------------------


def _former_build_tokenizer_files(words, directory):
  """What build_tokenizer wrote when it lived in models/diffusion.py (on
  transformers 4's bytes_to_unicode: GPT-2's)."""
  symbols = list(_gpt2_bytes_to_unicode().values())
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
  table = list(clip_tokenizer.bytes_to_unicode().items())
  assert table == list(_gpt2_bytes_to_unicode().items())
  assert table == list(transformers_bytes_to_unicode().items())
  assert {c for _, c in table} == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
  assert (
    len(table) == 256
    and table[0] == (ord("!"), "!")
    and table[188] == (0, "Ā")
    and table[188 + 32] == (32, "Ġ")
    and table[-1] == (173, "Ń")
  )


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


def _assert_same(ours, other, prompts=PROMPTS):
  assert other.get_vocab() == ours.get_vocab() and other.merges == ours.merges
  assert other.model_max_length == ours.model_max_length
  assert (other.bos_token, other.eos_token, other.pad_token, other.unk_token) == (
    ours.bos_token,
    ours.eos_token,
    ours.pad_token,
    ours.unk_token,
  )
  np.testing.assert_array_equal(other(prompts), ours(prompts))
  for prompt in prompts:
    assert other.tokenize(prompt) == ours.tokenize(prompt), prompt


def test_save_round_trip(tmp_path):
  ours = clip_tokenizer.CLIPTokenizer.from_folder(TOY_TOKENIZER)
  ours.save(str(tmp_path / "saved"))
  names = ["merges.txt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
  assert sorted(os.listdir(tmp_path / "saved")) == names
  _assert_same(ours, clip_tokenizer.CLIPTokenizer.from_folder(str(tmp_path / "saved")))
  # Each layout alone loads the same.
  for removed in (["tokenizer.json"], ["vocab.json", "merges.txt"]):
    folder = shutil.copytree(tmp_path / "saved", tmp_path / f"without_{removed[0]}")
    for name in removed:
      os.remove(folder / name)
    _assert_same(ours, clip_tokenizer.CLIPTokenizer.from_folder(str(folder)))


def _saved_by_both(tmp_path, folder):
  """(ours, transformers', the folder ours saved, the one transformers saved) of `folder`."""
  ours = clip_tokenizer.CLIPTokenizer.from_folder(folder)
  saved = str(tmp_path / "saved")
  ours.save(saved)
  reference = _reference(saved)
  reference.save_pretrained(str(tmp_path / "by_transformers"))
  return ours, reference, saved, str(tmp_path / "by_transformers")


def _read(folder, name):
  with open(os.path.join(folder, name), encoding="utf-8") as f:
    return json.load(f) if name.endswith(".json") else f.read()


@pytest.mark.parametrize("layout", ["toy", "sd1", "sd2"])
def test_saved_folder_loads_in_transformers(tmp_path, layout):
  folder = {"toy": TOY_TOKENIZER, "sd1": _sd1_style(tmp_path), "sd2": _sd2_style(tmp_path)}[layout]
  ours, reference, saved, by_transformers = _saved_by_both(tmp_path, folder)
  assert reference.model_max_length == ours.model_max_length
  assert (reference.bos_token, reference.eos_token, reference.pad_token, reference.unk_token) == (
    ours.bos_token,
    ours.eos_token,
    ours.pad_token,
    ours.unk_token,
  )
  assert (reference.bos_token_id, reference.eos_token_id, reference.pad_token_id) == (
    ours.bos_token_id,
    ours.eos_token_id,
    ours.pad_token_id,
  )
  np.testing.assert_array_equal(_reference_call(reference, PROMPTS, ours.model_max_length), ours(PROMPTS))
  for prompt in PROMPTS:
    assert reference.tokenize(prompt) == ours.tokenize(prompt), prompt
  # The special tokens' flags, and the tokenizer.json transformers 5 writes.
  assert {i: (t.content, t.normalized, t.special) for i, t in reference.added_tokens_decoder.items()} == {
    i: (t.content, t.normalized, t.special) for i, t in ours._tokenizer.get_added_tokens_decoder().items()
  }
  assert _read(saved, "tokenizer.json") == _read(by_transformers, "tokenizer.json")
  # Loaded without its tokenizer.json, transformers 5 reads the same.
  os.remove(os.path.join(saved, "tokenizer.json"))
  np.testing.assert_array_equal(_reference_call(_reference(saved), PROMPTS, ours.model_max_length), ours(PROMPTS))


def test_saved_files_are_transformers_4s_layout(tmp_path):
  """vocab.json and merges.txt byte for byte as the shipped toy folder has
  them (transformers 4's save_pretrained layout; 5 writes neither)."""
  clip_tokenizer.CLIPTokenizer.from_folder(TOY_TOKENIZER).save(str(tmp_path))
  for name in ("vocab.json", "merges.txt"):
    with open(tmp_path / name, "rb") as a, open(os.path.join(TOY_TOKENIZER, name), "rb") as b:
      assert a.read() == b.read(), name


@pytest.mark.parametrize("layout", ["toy", "declared unnormalized", "sd1", "sd2", "pad string", "pad dict"])
def test_folder_saved_by_transformers_loads(tmp_path, layout):
  """A folder written by transformers 5's save_pretrained (tokenizer.json and
  tokenizer_config.json only; the tokens' flags in tokenizer.json's
  added_tokens) loads through from_folder, as transformers reads it."""
  folder = _flag_case_folder(tmp_path, layout)
  resaved = _resaved_by_transformers(folder, str(tmp_path / "resaved"))
  ours, reference = clip_tokenizer.CLIPTokenizer.from_folder(resaved), _reference(resaved)
  _assert_same(clip_tokenizer.CLIPTokenizer.from_folder(folder), ours, PROMPTS + SD2_PROMPTS + FLAG_PROMPTS)
  assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
    reference.bos_token_id,
    reference.eos_token_id,
    reference.pad_token_id,
  )
  for prompts in (PROMPTS, SD2_PROMPTS, FLAG_PROMPTS):
    np.testing.assert_array_equal(ours(prompts), _reference_call(reference, prompts, ours.model_max_length))
    for prompt in prompts:
      assert ours.tokenize(prompt) == reference.tokenize(prompt), prompt


@pytest.mark.parametrize("as_strings", [False, True])
def test_tokenizer_json_wins_over_vocab_json(tmp_path, as_strings):
  """With both layouts in a folder, tokenizer.json's vocabulary and merges
  are read (as transformers 5 does), as lists or as "a b" strings."""
  folder = _copy_toy(tmp_path)
  other = clip_tokenizer.build_tokenizer(VARIED_WORDS, str(tmp_path / "varied"), max_length=16)
  other.save(str(tmp_path / "varied_saved"))
  shutil.copy(tmp_path / "varied_saved" / "tokenizer.json", folder)
  if as_strings:
    _edit_json(
      os.path.join(folder, "tokenizer.json"),
      lambda j: j["model"].update(merges=[" ".join(m) for m in j["model"]["merges"]]),
    )
  ours, reference = clip_tokenizer.CLIPTokenizer.from_folder(folder), _reference(folder)
  assert ours.get_vocab() == other.get_vocab() == reference.get_vocab() and ours.merges == other.merges
  np.testing.assert_array_equal(ours(PROMPTS), _reference_call(reference, PROMPTS, ours.model_max_length))
  assert ours.tokenize("a photo of cats") == other.tokenize("a photo of cats") == reference.tokenize("a photo of cats")
  assert ours.tokenize("a photo of cats") != clip_tokenizer.CLIPTokenizer.from_folder(TOY_TOKENIZER).tokenize(
    "a photo of cats"
  )


def test_tokenizer_json_must_be_bpe(tmp_path):
  folder = _copy_toy(tmp_path)
  shutil.copy(_resaved_by_transformers(TOY_TOKENIZER, str(tmp_path / "resaved")) + "/tokenizer.json", folder)
  _edit_json(os.path.join(folder, "tokenizer.json"), lambda j: j["model"].update(type="WordPiece"))
  with pytest.raises(ValueError, match="tokenizer.json: a CLIP tokenizer.json has a BPE model, got 'WordPiece'"):
    clip_tokenizer.CLIPTokenizer.from_folder(folder)
  _edit_json(os.path.join(folder, "tokenizer.json"), lambda j: j["model"].update(type="BPE", merges=[["a", "b", "c"]]))
  with pytest.raises(ValueError, match="merge 0: a merge is two symbols"):
    clip_tokenizer.CLIPTokenizer.from_folder(folder)


SD2_PROMPTS = ["a red circle!", "a red circle ! on a blue background!!", "", "hello!world"]


@pytest.mark.parametrize("pad_token", ["!", {"content": "!", "lstrip": False, "normalized": False, "rstrip": False}])
def test_sd2_pad_token_from_special_tokens_map(tmp_path, pad_token):
  folder = _sd2_style(tmp_path, pad_token)
  ours, reference = clip_tokenizer.CLIPTokenizer.from_folder(folder), _reference(folder)
  sd1 = clip_tokenizer.CLIPTokenizer.from_folder(TOY_TOKENIZER)
  assert ours.pad_token == "!" and ours.pad_token_id == ours.get_vocab()["!"] == 0 != sd1.pad_token_id
  ids = ours(SD2_PROMPTS)
  # The padding changes, and "!" in the text becomes the special token: id 0, not "!</w>".
  assert (ids[2, 2:] == 0).all() and (sd1(SD2_PROMPTS)[2, 2:] == sd1.eos_token_id).all()
  assert ours.tokenize("red!") == ["red</w>", "!"] and sd1.tokenize("red!") == ["red</w>", "!</w>"]
  assert reference.pad_token_id == ours.pad_token_id
  np.testing.assert_array_equal(ids, _reference_call(reference, SD2_PROMPTS, ours.model_max_length))
  for prompt in SD2_PROMPTS:
    assert ours.tokenize(prompt) == reference.tokenize(prompt), prompt


def test_sd2_pad_token_survives_save(tmp_path):
  ours = clip_tokenizer.CLIPTokenizer.from_folder(_sd2_style(tmp_path))
  folder = str(tmp_path / "saved")
  ours.save(folder)
  again, reference = clip_tokenizer.CLIPTokenizer.from_folder(folder), _reference(folder)
  assert again.pad_token_id == reference.pad_token_id == 0
  np.testing.assert_array_equal(again(SD2_PROMPTS), ours(SD2_PROMPTS))
  np.testing.assert_array_equal(_reference_call(reference, SD2_PROMPTS, ours.model_max_length), ours(SD2_PROMPTS))


@pytest.mark.parametrize("config_pad", ["<|endoftext|>", "!"])
def test_special_tokens_map_is_ignored_beside_added_tokens_decoder(tmp_path, config_pad):
  """As in transformers: with added_tokens_decoder (transformers 4's layout)
  the tokenizer_config.json's tokens win over special_tokens_map.json's."""
  folder = _copy_toy(tmp_path)
  _edit_json(os.path.join(folder, "tokenizer_config.json"), lambda c: c.update(pad_token=config_pad))
  other = "!" if config_pad != "!" else "<|endoftext|>"
  _edit_json(os.path.join(folder, "special_tokens_map.json"), lambda m: m.update(pad_token=other))
  ours, reference = clip_tokenizer.CLIPTokenizer.from_folder(folder), _reference(folder)
  assert ours.pad_token == reference.pad_token == config_pad
  np.testing.assert_array_equal(ours(SD2_PROMPTS), _reference_call(reference, SD2_PROMPTS, ours.model_max_length))


_A = {"content": "A", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
FLAG_CASES = {
  # A plain string is matched in the raw text, so "A" but not "a" is the pad token.
  "pad string": ("special_tokens_map.json", lambda m: m.update(pad_token="A")),
  # normalized: true, matched in the lower-cased text.
  "pad dict": ("special_tokens_map.json", lambda m: m.update(pad_token=_A)),
  # added_tokens_decoder's flags apply to the string tokens: "<|ENDOFTEXT|>" is text.
  "declared unnormalized": (
    "tokenizer_config.json",
    lambda c: [entry.update(normalized=False) for entry in c["added_tokens_decoder"].values()],
  ),
  # Plain strings only (no flags anywhere): all matched in the raw text.
  "strings only": ("tokenizer_config.json", lambda c: c.pop("added_tokens_decoder")),
}
FLAG_PROMPTS = ["A cat a cAt", "a <|ENDOFTEXT|> b <|endoftext|>", "Aa", "x<|ENDOFTEXT|>>"]


def _flag_case_folder(tmp_path, case):
  if case == "toy":
    return _copy_toy(tmp_path)
  if case == "sd1":
    return _sd1_style(tmp_path)
  if case == "sd2":
    return _sd2_style(tmp_path)
  folder = _sd2_style(tmp_path) if case.startswith("pad") else _copy_toy(tmp_path)
  if case == "strings only":
    os.remove(os.path.join(folder, "special_tokens_map.json"))
  name, edit = FLAG_CASES[case]
  _edit_json(os.path.join(folder, name), edit)
  return folder


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_special_token_flags_match_transformers(tmp_path, case):
  """Whether a special token is matched in the raw or in the normalized text."""
  folder = _flag_case_folder(tmp_path, case)
  ours, reference = clip_tokenizer.CLIPTokenizer.from_folder(folder), _reference(folder)
  assert {t.content: t.normalized for t in reference.added_tokens_decoder.values()} == {
    t.content: t.normalized for t in ours._tokenizer.get_added_tokens_decoder().values()
  }
  for prompt in FLAG_PROMPTS:
    assert ours.tokenize(prompt) == reference.tokenize(prompt), prompt
  np.testing.assert_array_equal(ours(FLAG_PROMPTS), _reference_call(reference, FLAG_PROMPTS, ours.model_max_length))


@pytest.mark.parametrize("name", ["vocab.json", "merges.txt", "tokenizer_config.json"])
def test_missing_file_is_named(tmp_path, name):
  folder = _copy_toy(tmp_path)
  os.remove(os.path.join(folder, name))
  needs = "needs tokenizer_config.json, and either vocab.json and merges.txt or tokenizer.json"
  with pytest.raises(ValueError, match=f"{folder}/{name} is missing.*{needs}"):
    clip_tokenizer.CLIPTokenizer.from_folder(folder)


def test_tokenizer_json_stands_in_for_vocab_and_merges(tmp_path):
  resaved = _resaved_by_transformers(TOY_TOKENIZER, str(tmp_path / "resaved"))
  os.remove(os.path.join(resaved, "tokenizer.json"))
  with pytest.raises(ValueError, match="vocab.json is missing, and there is no tokenizer.json"):
    clip_tokenizer.CLIPTokenizer.from_folder(resaved)
  os.remove(os.path.join(resaved, "tokenizer_config.json"))
  with pytest.raises(ValueError, match="tokenizer_config.json is missing"):
    clip_tokenizer.CLIPTokenizer.from_folder(resaved)


def test_folder_without_special_tokens_map_loads(tmp_path):
  folder = _copy_toy(tmp_path)
  os.remove(os.path.join(folder, "special_tokens_map.json"))
  ours = clip_tokenizer.CLIPTokenizer.from_folder(folder)
  np.testing.assert_array_equal(ours(PROMPTS), clip_tokenizer.CLIPTokenizer.from_folder(TOY_TOKENIZER)(PROMPTS))


@pytest.mark.parametrize("layout", ["vocab.json", "tokenizer.json"])
def test_special_token_missing_from_vocab(tmp_path, layout):
  folder = _copy_toy(tmp_path)
  if layout == "tokenizer.json":
    folder = _resaved_by_transformers(folder, str(tmp_path / "resaved"))
    _edit_json(os.path.join(folder, "tokenizer_config.json"), lambda c: c.update(pad_token="<pad>"))
  else:
    _edit_json(os.path.join(folder, "special_tokens_map.json"), lambda m: m.update(pad_token="<pad>"))
    _edit_json(
      os.path.join(folder, "tokenizer_config.json"), lambda c: (c.pop("added_tokens_decoder"), c.pop("pad_token"))
    )
  with pytest.raises(ValueError, match=rf"\['<pad>'\].*{layout}"):
    clip_tokenizer.CLIPTokenizer.from_folder(folder)


_ENDOFTEXT_VALUES = {
  "string": "<|endoftext|>",
  "normalized": {
    "content": "<|endoftext|>",
    "lstrip": False,
    "normalized": True,
    "rstrip": False,
    "single_word": False,
  },
  "unnormalized": {
    "content": "<|endoftext|>",
    "lstrip": False,
    "normalized": False,
    "rstrip": False,
    "single_word": False,
  },
}


@pytest.mark.parametrize("values", list(itertools.product(sorted(_ENDOFTEXT_VALUES), repeat=3)), ids="-".join)
def test_shared_special_token_flags_match_transformers(tmp_path, values):
  """eos, unk and pad all <|endoftext|>, each a string or an AddedToken dict
  in special_tokens_map.json: transformers 5 adds their distinct values in
  turn, and the last one sets whether <|endoftext|> is matched in the
  lower-cased text (SD v1's files, normalized, normalized, string: it is not)."""
  folder = _sd2_style(tmp_path)
  special_map = {"bos_token": "<|startoftext|>"}
  special_map.update({key: _ENDOFTEXT_VALUES[v] for key, v in zip(("eos_token", "unk_token", "pad_token"), values)})
  with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
    json.dump(special_map, f)
  ours, reference = clip_tokenizer.CLIPTokenizer.from_folder(folder), _reference(folder)
  eos = reference.eos_token_id
  expected = reference.added_tokens_decoder[eos].normalized
  assert ours._tokenizer.get_added_tokens_decoder()[eos].normalized == expected
  assert ours.tokenize("a <|ENDOFTEXT|>") == reference.tokenize("a <|ENDOFTEXT|>")
  assert (ours.tokenize("a <|ENDOFTEXT|>")[-1] == "<|endoftext|>") == expected
