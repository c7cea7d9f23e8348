"""CLIP's byte-level BPE tokenizer (Stable Diffusion's), without transformers.

Built on Hugging Face's `tokenizers` with the pipeline of transformers 5's
CLIPTokenizer (transformers/models/clip/tokenization_clip.py): NFC, whitespace
runs to one space and lower case; CLIP's regex split; GPT-2's byte-level split
and symbols; BPE with the word-final suffix "</w>". It reads the tokenizer/
folder of a diffusers model in either layout: vocab.json + merges.txt (Stable
Diffusion's checkpoints on the Hub, transformers 4's save_pretrained) or
tokenizer.json (transformers 5's save_pretrained, fast tokenizers), with
tokenizer_config.json (and special_tokens_map.json when present). It writes
both layouts, and that folder loads with transformers' CLIPTokenizer, 4 or 5.

transformers 5 has a single CLIPTokenizer (4's slow, pure-Python one is gone;
CLIPTokenizerFast is another name for it); this follows it. Where it differs
from transformers 4's CLIPTokenizerFast, so does this:
- every merge of merges.txt is read (4 stopped after CLIP's 48894);
- a special token given as a plain string, with no flags declared for it in
  added_tokens_decoder or tokenizer.json, is matched in the raw text only (4:
  in the lower-cased text, but for the pad token); where eos, unk and pad share
  a text, the last distinct value sets it, so SD v1's files (eos and unk
  normalized, pad the string "<|endoftext|>", no added_tokens_decoder) match
  <|endoftext|> in the raw text only: "<|ENDOFTEXT|>" in a prompt is text;
- "<|startoftext|>" / "<|endoftext|>" text that is not matched as a special
  token is cut into "<|", the word and "|>" even when more punctuation follows
  (4: "|>>" stays one word).
As 4's fast tokenizer did (and unlike 4's slow one without ftfy), CJK
ideographs are not split into one word each, control and format characters
are kept, U+000B, U+000C and U+0085 are whitespace, and a word-final "Σ"
lower-cases to "σ".
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import json
import os
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders
from tokenizers import models as bpe_models
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import processors

# transformers 5's split: OpenAI CLIP's word pattern, its special tokens first.
# (ByteLevel's GPT-2 split then cuts those into "<|", the word and "|>"; it
# changes no other word of this split.)
_WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_END_OF_WORD = "</w>"
_MERGES_HEADER = "#version: 0.2\n"
# The special tokens of the files, in the order transformers registers them.
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_DEFAULT_SPECIALS = {
  "bos_token": "<|startoftext|>",
  "eos_token": "<|endoftext|>",
  "unk_token": "<|endoftext|>",
  "pad_token": "<|endoftext|>",
}
_FILES_NEEDED = (
  "a CLIP tokenizer folder needs tokenizer_config.json, and either vocab.json and merges.txt or tokenizer.json"
)

TokenSpec = str | tokenizers.AddedToken


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's table from the 256 byte values to printable unicode characters.

  Printable Latin-1 bytes map to themselves; the others (control characters,
  space, soft hyphen) to U+0100 onwards, in byte order, so that BPE symbols
  never contain whitespace.

  Returns:
    {byte: character}, the printable bytes first, then the others (the order
    of CLIP's vocabulary).
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  table = {b: chr(b) for b in printable}
  others = [b for b in range(256) if b not in table]
  table.update({b: chr(256 + i) for i, b in enumerate(others)})
  return table


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write_json(path: str, value: Any) -> None:
  """As transformers' save_pretrained writes its JSON files."""
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _merge_pair(merge: Any, where: str) -> tuple[str, str]:
  """A merge of merges.txt or tokenizer.json ("a b" or ["a", "b"]) as a pair."""
  pair = tuple(merge.split()) if isinstance(merge, str) else tuple(merge) if isinstance(merge, list) else ()
  if len(pair) != 2 or not all(isinstance(symbol, str) for symbol in pair):
    raise ValueError(f"{where}: a merge is two symbols, got {merge!r}.")
  return pair


def _read_merges(path: str) -> list[tuple[str, str]]:
  """The merges of merges.txt, as transformers 5 (the `tokenizers` library)
  reads them: every line but the "#version" header, each "left right"."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  return [
    _merge_pair(line, f"{path}, line {number}")
    for number, line in enumerate(lines, start=1)
    if line.strip() and not line.startswith("#version")
  ]


def _read_tokenizer_json(path: str) -> tuple[dict[str, int], list[tuple[str, str]], list[dict]]:
  """(vocab, merges, added_tokens) of a `tokenizers` tokenizer.json: its BPE
  model's vocabulary and merges (as strings "a b" or lists ["a", "b"]), and its
  added tokens ({"content", "normalized", ...} dicts). Its normalizer,
  pre-tokenizer and post-processor are not read: as transformers 5's
  CLIPTokenizer, this keeps CLIP's own."""
  data = _read_json(path)
  model = data.get("model") if isinstance(data, dict) else None
  if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
    kind = model.get("type") if isinstance(model, dict) else model
    raise ValueError(f"{path}: a CLIP tokenizer.json has a BPE model, got {kind!r}.")
  vocab = model.get("vocab")
  if not isinstance(vocab, dict) or not isinstance(model.get("merges"), list):
    raise ValueError(f"{path}: the BPE model has no vocab {{symbol: id}} or no merges list.")
  merges = [_merge_pair(merge, f"{path}, merge {i}") for i, merge in enumerate(model["merges"])]
  added_tokens = [token for token in data.get("added_tokens") or () if isinstance(token, dict) and "content" in token]
  return vocab, merges, added_tokens


def _token_content(value: TokenSpec | dict) -> str:
  """The text of a special token: a string, an AddedToken or an AddedToken dict."""
  if isinstance(value, tokenizers.AddedToken):
    return value.content
  return value["content"] if isinstance(value, dict) else str(value)


def _special_tokens(
  config: dict, special_tokens_map: dict | None, json_added_tokens: list[dict] | None
) -> dict[str, TokenSpec]:
  """{"bos_token", ...: str or tokenizers.AddedToken} as transformers 5's
  from_pretrained passes them to its CLIPTokenizer.

  The tokens: tokenizer_config.json's, else CLIP's defaults; in the layout
  without "added_tokens_decoder" (SD's checkpoints, transformers 5's
  save_pretrained), special_tokens_map.json's override them (SD 2's pad token
  "!" is written only there). A token declared with flags (by content: in
  added_tokens_decoder when the config has one, else in tokenizer.json's
  added_tokens) is that AddedToken; else an AddedToken dict is an AddedToken,
  a string stays a string.
  """
  values = {key: config[key] for key in _SPECIAL_KEYS if config.get(key) is not None}
  if "added_tokens_decoder" in config:
    declared = list(config["added_tokens_decoder"].values())
  else:
    if special_tokens_map:
      values.update({key: special_tokens_map[key] for key in _SPECIAL_KEYS if special_tokens_map.get(key) is not None})
    declared = json_added_tokens or []
  by_content = {entry["content"]: entry for entry in declared if isinstance(entry, dict) and "content" in entry}
  values = dict(_DEFAULT_SPECIALS, **values)
  specs = {}
  for key in _SPECIAL_KEYS:
    value = values[key]
    entry = by_content.get(_token_content(value))
    specs[key] = _from_dict(entry) if entry is not None else _from_dict(value) if isinstance(value, dict) else value
  return specs


def _from_dict(entry: dict) -> tokenizers.AddedToken:
  """An AddedToken dict ({"content", "normalized", "lstrip", ...}) as a special AddedToken."""
  flags = {name: bool(entry[name]) for name in ("single_word", "lstrip", "rstrip", "normalized") if name in entry}
  return tokenizers.AddedToken(entry["content"], **{"normalized": False, **flags}, special=True)


def _resolved_specials(specs: dict[str, TokenSpec]) -> dict[str, tokenizers.AddedToken]:
  """The special tokens with the `normalized` flags transformers 5 gives them.

  A string is not normalized (matched in the raw text only); an AddedToken
  keeps its flag. Where keys share a text (SD's eos, unk and pad
  <|endoftext|>), transformers 5 adds their distinct values (a string and an
  AddedToken always differ; AddedTokens differ by any flag) in key order, and
  the last one added sets the flag: SD v1's files (eos and unk normalized
  AddedTokens, pad the string "<|endoftext|>") give an unnormalized
  <|endoftext|>.
  """
  distinct = []
  for spec in specs.values():
    if spec not in distinct:
      distinct.append(spec)
  normalized = {}
  for spec in distinct:
    normalized[_token_content(spec)] = isinstance(spec, tokenizers.AddedToken) and bool(spec.normalized)
  contents = {key: _token_content(spec) for key, spec in specs.items()}
  return {key: tokenizers.AddedToken(c, normalized=normalized[c], special=True) for key, c in contents.items()}


class CLIPTokenizer:
  """CLIP's BPE tokenizer, matching transformers' CLIPTokenizer (5's; 4's CLIPTokenizerFast).

  Attributes:
    model_max_length: the length of every row `__call__` returns (77 for SD).
    bos_token, eos_token, pad_token, unk_token: the special tokens' text.
    bos_token_id, eos_token_id, pad_token_id: their ids (SD v1 pads with
      <|endoftext|>, SD 2 with "!").
    vocab_size: the number of ids, specials included (they are in the vocabulary).
  """

  def __init__(
    self,
    vocab: dict[str, int],
    merges: Sequence[tuple[str, str]],
    model_max_length: int,
    bos_token: TokenSpec = _DEFAULT_SPECIALS["bos_token"],
    eos_token: TokenSpec = _DEFAULT_SPECIALS["eos_token"],
    unk_token: TokenSpec = _DEFAULT_SPECIALS["unk_token"],
    pad_token: TokenSpec = _DEFAULT_SPECIALS["pad_token"],
  ):
    """
    Args:
      vocab: {BPE symbol: id}, the special tokens included.
      merges: the BPE merges (left symbol, right symbol), highest priority first.
      model_max_length: tokens per row, <|startoftext|> and <|endoftext|> included.
      bos_token, eos_token, unk_token, pad_token: the special tokens, as text
        (matched in the raw text, as transformers 5 does) or as
        `tokenizers.AddedToken` (whose `normalized` flag is kept: True matches
        the token in the lower-cased text).
    """
    if int(model_max_length) < 2:
      raise ValueError(f"model_max_length must be at least 2 (the bos and eos tokens), got {model_max_length}.")
    specials = _resolved_specials(dict(zip(_SPECIAL_KEYS, (bos_token, eos_token, unk_token, pad_token), strict=True)))
    missing = sorted({t.content for t in specials.values() if t.content not in vocab})
    if missing:
      raise ValueError(f"the special tokens {missing} are not in the vocabulary.")
    self._vocab = dict(vocab)
    self._merges = [tuple(pair) for pair in merges]
    self._specials = specials
    self.model_max_length = int(model_max_length)
    self._tokenizer = _backend(self._vocab, self._merges, specials)

  # --------------------------------------------------------------------------
  # Special tokens and vocabulary.
  # --------------------------------------------------------------------------

  @property
  def bos_token(self) -> str:
    return self._specials["bos_token"].content

  @property
  def eos_token(self) -> str:
    return self._specials["eos_token"].content

  @property
  def unk_token(self) -> str:
    return self._specials["unk_token"].content

  @property
  def pad_token(self) -> str:
    return self._specials["pad_token"].content

  @property
  def bos_token_id(self) -> int:
    return self._vocab[self.bos_token]

  @property
  def eos_token_id(self) -> int:
    return self._vocab[self.eos_token]

  @property
  def pad_token_id(self) -> int:
    return self._vocab[self.pad_token]

  @property
  def vocab_size(self) -> int:
    return len(self._vocab)

  def __len__(self) -> int:
    return self.vocab_size

  def get_vocab(self) -> dict[str, int]:
    """A copy of {BPE symbol: id}."""
    return dict(self._vocab)

  @property
  def merges(self) -> list[tuple[str, str]]:
    """A copy of the BPE merges, highest priority first."""
    return list(self._merges)

  # --------------------------------------------------------------------------
  # Tokenizing.
  # --------------------------------------------------------------------------

  def tokenize(self, text: str) -> list[str]:
    """The BPE pieces of `text`, without specials or truncation ("red</w>", ...)."""
    return self._tokenizer.encode(text, add_special_tokens=False).tokens

  def encode(self, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
    """Token ids as Stable Diffusion feeds them to CLIP.

    Each row is <|startoftext|>, the prompt's first max_length - 2 tokens and
    <|endoftext|>, then pad_token_id up to max_length: transformers'
    `tokenizer(prompts, padding="max_length", max_length=max_length,
    truncation=True).input_ids`.

    Args:
      prompts: B prompts (one string: B = 1).
      max_length: the row length; model_max_length when None.

    Returns:
      int32 [B, max_length].
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    max_length = self.model_max_length if max_length is None else int(max_length)
    if max_length < 2:
      raise ValueError(f"max_length must be at least 2 (the bos and eos tokens), got {max_length}.")
    ids = np.full((len(prompts), max_length), self.pad_token_id, np.int32)
    for row, prompt in enumerate(prompts):
      # One prompt at a time: encode_batch would start tokenizers' thread pool,
      # which then warns (and turns itself off) when the process forks.
      tokens = self._tokenizer.encode(prompt, add_special_tokens=False).ids[: max_length - 2]
      ids[row, : len(tokens) + 2] = [self.bos_token_id, *tokens, self.eos_token_id]
    return ids

  def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
    """`encode(prompts)`: int32 [B, model_max_length]."""
    return self.encode(prompts)

  # --------------------------------------------------------------------------
  # Files.
  # --------------------------------------------------------------------------

  @classmethod
  def from_folder(cls, path: str) -> CLIPTokenizer:
    """The tokenizer of a diffusers tokenizer/ folder, as transformers 5's
    CLIPTokenizer.from_pretrained reads it.

    Needs tokenizer_config.json (with model_max_length) and the BPE model:
    tokenizer.json's when there is one (as in transformers 5, it wins over
    vocab.json and merges.txt), else vocab.json and merges.txt. Either way
    the pipeline is CLIP's own, built from the vocabulary and merges (a
    tokenizer.json's normalizer and pre-tokenizer are not read).
    special_tokens_map.json is read when present.
    """
    config_file = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(config_file):
      raise ValueError(f"{config_file} is missing: {_FILES_NEEDED}.")
    config = _read_json(config_file)
    if "model_max_length" not in config:
      raise ValueError(f"{config_file} has no model_max_length.")
    json_file = os.path.join(path, "tokenizer.json")
    json_added_tokens = None
    if os.path.isfile(json_file):
      vocab, merges, json_added_tokens = _read_tokenizer_json(json_file)
      vocab_source = json_file
    else:
      vocab_source, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
      for file in (vocab_source, merges_file):
        if not os.path.isfile(file):
          raise ValueError(f"{file} is missing, and there is no tokenizer.json: {_FILES_NEEDED}.")
      vocab, merges = _read_json(vocab_source), _read_merges(merges_file)
    map_file = os.path.join(path, "special_tokens_map.json")
    special_tokens_map = _read_json(map_file) if os.path.isfile(map_file) else None
    specials = _special_tokens(config, special_tokens_map, json_added_tokens)
    missing = sorted({_token_content(t) for t in specials.values() if _token_content(t) not in vocab})
    if missing:
      raise ValueError(f"the special tokens {missing} of {path} are not in {vocab_source}.")
    return cls(vocab, merges, int(config["model_max_length"]), **specials)

  def save(self, folder: str) -> None:
    """Writes vocab.json, merges.txt, tokenizer_config.json and
    special_tokens_map.json (transformers 4's save_pretrained layout, SD's on
    the Hub) and tokenizer.json (transformers 5's, the pipeline of its
    CLIPTokenizer) into `folder`, created if needed.

    transformers 5 loads the folder from either; tokenizer.json is written so
    that it is never a stale one, which both transformers 5 and `from_folder`
    would prefer to vocab.json and merges.txt.
    """
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "vocab.json"), self._vocab)
    _write_merges(os.path.join(folder, "merges.txt"), self._merges)
    added_tokens = {}
    for token in self._specials.values():
      added_tokens.setdefault(
        str(self._vocab[token.content]),
        {
          "content": token.content,
          "lstrip": False,
          "normalized": token.normalized,
          "rstrip": False,
          "single_word": False,
          "special": True,
        },
      )
    specials = {key: token.content for key, token in self._specials.items()}
    config = {
      "added_tokens_decoder": dict(sorted(added_tokens.items(), key=lambda item: int(item[0]))),
      "clean_up_tokenization_spaces": False,
      "errors": "replace",
      "model_max_length": self.model_max_length,
      "tokenizer_class": "CLIPTokenizer",
      **specials,
    }
    _write_json(os.path.join(folder, "tokenizer_config.json"), config)
    _write_json(os.path.join(folder, "special_tokens_map.json"), specials)
    # As transformers 5 writes it (backend_tokenizer.save: pretty JSON).
    self._tokenizer.save(os.path.join(folder, "tokenizer.json"))


def _write_merges(path: str, merges: Sequence[tuple[str, str]]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(_MERGES_HEADER + "".join(f"{a} {b}\n" for a, b in merges))


def _backend(
  vocab: dict[str, int], merges: list[tuple[str, str]], specials: dict[str, tokenizers.AddedToken]
) -> tokenizers.Tokenizer:
  """The `tokenizers.Tokenizer` of transformers 5's CLIPTokenizer.

  Its post-processor (bos + text + eos) and decoder are there for the
  tokenizer.json that `save` writes; `encode` adds bos and eos itself.
  """
  model = bpe_models.BPE(
    vocab=vocab,
    merges=merges,
    dropout=None,
    continuing_subword_prefix="",
    end_of_word_suffix=_END_OF_WORD,
    fuse_unk=False,
    unk_token=specials["unk_token"].content,
  )
  tokenizer = tokenizers.Tokenizer(model)
  tokenizer.normalizer = normalizers.Sequence(
    [normalizers.NFC(), normalizers.Replace(tokenizers.Regex(r"\s+"), " "), normalizers.Lowercase()]
  )
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(tokenizers.Regex(_WORD_PATTERN), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
    ]
  )
  tokenizer.decoder = decoders.ByteLevel()
  bos, eos = specials["bos_token"].content, specials["eos_token"].content
  tokenizer.post_processor = processors.RobertaProcessing(
    (eos, vocab[eos]), (bos, vocab[bos]), trim_offsets=False, add_prefix_space=False
  )
  # Every special token is matched in the text, as in transformers (so SD 2's
  # pad token "!" becomes id 0, not the word-final "!</w>"); keys that share a
  # text (SD v1's eos and pad) have the same flags (_resolved_specials).
  unique = {}
  for token in specials.values():
    unique.setdefault(token.content, token)
  tokenizer.add_special_tokens(list(unique.values()))
  return tokenizer


def build_tokenizer(words: Sequence[str], directory: str, max_length: int) -> CLIPTokenizer:
  """Builds a CLIP BPE tokenizer from the words of a closed vocabulary.

  CLIP's byte-level BPE needs every byte symbol (alone and word-final) in the
  vocabulary; each word adds the merges that spell it left to right. Merges
  are tried lowest rank first, so a few words end up as two or three pieces
  ("purple" -> "pur", "pl", "e</w>", since "pl" of "plain" ranks earlier), as
  in CLIP's own vocabulary; the pieces are the same for every caption.

  Args:
    words: the vocabulary's words: lower case, each one word of CLIP's split
      (letters only, or one digit, or punctuation only).
    directory: where vocab.json and merges.txt are written (created if needed).
    max_length: the tokenizer's model_max_length.

  Returns:
    The tokenizer of those files, padding with <|endoftext|>.
  """
  byte_symbols = bytes_to_unicode()
  symbols = list(byte_symbols.values())
  vocab = {token: None for token in symbols + [s + _END_OF_WORD for s in symbols]}
  merges = {}
  for word in sorted(set(words)):
    # BPE sees the symbols of the word's UTF-8 bytes (for ASCII, its letters).
    word = "".join(byte_symbols[b] for b in word.encode("utf-8"))
    pieces = list(word[:-1]) + [word[-1] + _END_OF_WORD]
    current = pieces[0]
    for piece in pieces[1:]:
      merges.setdefault((current, piece), None)
      current += piece
      vocab.setdefault(current, None)
  vocab.update({"<|startoftext|>": None, "<|endoftext|>": None})
  vocab = {token: i for i, token in enumerate(vocab)}
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  _write_merges(os.path.join(directory, "merges.txt"), list(merges))
  return CLIPTokenizer(vocab, list(merges), model_max_length=max_length)
