"""CLIP's byte-level BPE tokenizer (Stable Diffusion's), without transformers.

Built on Hugging Face's `tokenizers` with the pipeline of transformers'
CLIPTokenizerFast (transformers.convert_slow_tokenizer.CLIPConverter): NFC,
whitespace runs to one space and lower case; CLIP's regex split; byte-level
symbols; BPE with the word-final suffix "</w>". It reads and writes the
tokenizer/ folder of a diffusers model (vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json), and that folder still loads
with transformers' CLIPTokenizer.

Where transformers' slow CLIPTokenizer (without ftfy) differs from its fast one,
this follows the fast one: the slow one splits CJK ideographs into one word
each (OpenAI's CLIP does not), deletes control and format characters (U+0000,
U+FFFD, the U+200D of emoji sequences), deletes U+000B, U+000C and U+0085
where the fast one sees whitespace, lower-cases a word-final "Σ" to "ς" (the
fast one: "σ"), and ignores the `normalized` flag of special tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import json
import os
from typing import Any

import numpy as np
import tokenizers
from tokenizers import models as bpe_models
from tokenizers import normalizers
from tokenizers import pre_tokenizers

# OpenAI CLIP's word pattern; the fast tokenizer splits on it before BPE.
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_END_OF_WORD = "</w>"
# transformers' CLIPTokenizer reads at most this many merges (CLIP's 49152
# tokens less the 256 byte symbols and the 2 specials), ignoring the rest.
_MAX_MERGES = 49152 - 256 - 2
_MERGES_HEADER = "#version: 0.2\n"
# The special tokens of the files, in the order transformers registers them.
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_DEFAULT_SPECIALS = {
  "bos_token": "<|startoftext|>",
  "eos_token": "<|endoftext|>",
  "unk_token": "<|endoftext|>",
  "pad_token": "<|endoftext|>",
}

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


def _read_merges(path: str) -> list[tuple[str, str]]:
  """The merges of merges.txt, as transformers' CLIPTokenizer reads them: the
  first line is the version header, and only the first _MAX_MERGES count."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().strip().split("\n")[1 : _MAX_MERGES + 1]
  merges = []
  for number, line in enumerate(lines, start=2):
    pair = tuple(line.split())
    if len(pair) != 2:
      raise ValueError(f"{path}, line {number}: a merge is two symbols separated by a space, got {line!r}.")
    merges.append(pair)
  return merges


def _token_content(value: str | dict) -> str:
  """The text of a special token written as a string or as an AddedToken dict."""
  return value["content"] if isinstance(value, dict) else value


def _special_token_values(config: dict, special_tokens_map: dict | None) -> dict[str, str | dict]:
  """{"bos_token", ...: str or AddedToken dict} as transformers resolves them:
  tokenizer_config.json's, overridden by special_tokens_map.json's only in the
  older layout, the one without "added_tokens_decoder" (SD 2's pad token "!" is
  written only in its special_tokens_map.json)."""
  values = {key: config[key] for key in _SPECIAL_KEYS if config.get(key) is not None}
  if special_tokens_map and "added_tokens_decoder" not in config:
    values.update({key: special_tokens_map[key] for key in _SPECIAL_KEYS if special_tokens_map.get(key) is not None})
  return values


def _added_token(key: str, value: TokenSpec | dict, declared: dict[str, dict]) -> tokenizers.AddedToken:
  """The special token `key` ("bos_token", ...) with transformers' matching flags.

  `normalized` says whether the token is matched in the normalized (lower-cased)
  text or in the raw text. transformers takes it from the token's entry in
  added_tokens_decoder (`declared`, by content), else from an AddedToken dict,
  else True for bos/eos/unk strings and False for a pad string.
  """
  if isinstance(value, tokenizers.AddedToken):
    return tokenizers.AddedToken(value.content, normalized=value.normalized, special=True)
  content = _token_content(value)
  flags = declared.get(content) or (value if isinstance(value, dict) else {})
  normalized = bool(flags.get("normalized", key != "pad_token"))
  return tokenizers.AddedToken(content, normalized=normalized, special=True)


class CLIPTokenizer:
  """CLIP's BPE tokenizer, matching transformers' CLIPTokenizerFast.

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
        or as `tokenizers.AddedToken` (whose `normalized` flag is kept).
    """
    if int(model_max_length) < 2:
      raise ValueError(f"model_max_length must be at least 2 (the bos and eos tokens), got {model_max_length}.")
    specials = {
      key: _added_token(key, value, {})
      for key, value in zip(_SPECIAL_KEYS, (bos_token, eos_token, unk_token, pad_token), strict=True)
    }
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
    """The tokenizer of a diffusers tokenizer/ folder, as transformers'
    CLIPTokenizer.from_pretrained reads it.

    Needs vocab.json, merges.txt and tokenizer_config.json (with
    model_max_length); special_tokens_map.json is read when present. A
    tokenizer.json is ignored: SD folders do not have one.
    """
    files = {name: os.path.join(path, name) for name in ("vocab.json", "merges.txt", "tokenizer_config.json")}
    for file in files.values():
      if not os.path.isfile(file):
        raise ValueError(
          f"{file} is missing: a CLIP tokenizer folder needs vocab.json, merges.txt and tokenizer_config.json."
        )
    config = _read_json(files["tokenizer_config.json"])
    if "model_max_length" not in config:
      raise ValueError(f"{files['tokenizer_config.json']} has no model_max_length.")
    map_file = os.path.join(path, "special_tokens_map.json")
    special_tokens_map = _read_json(map_file) if os.path.isfile(map_file) else None
    values = dict(_DEFAULT_SPECIALS, **_special_token_values(config, special_tokens_map))
    declared = {entry["content"]: entry for entry in config.get("added_tokens_decoder", {}).values()}
    vocab = _read_json(files["vocab.json"])
    specials = {key: _added_token(key, values[key], declared) for key in _SPECIAL_KEYS}
    missing = sorted({t.content for t in specials.values() if t.content not in vocab})
    if missing:
      raise ValueError(f"the special tokens {missing} of {path} are not in {files['vocab.json']}.")
    return cls(vocab, _read_merges(files["merges.txt"]), int(config["model_max_length"]), **specials)

  def save(self, folder: str) -> None:
    """Writes vocab.json, merges.txt, tokenizer_config.json and
    special_tokens_map.json into `folder` (created if needed), in the layout
    of transformers' CLIPTokenizer.save_pretrained."""
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


def _write_merges(path: str, merges: Sequence[tuple[str, str]]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(_MERGES_HEADER + "".join(f"{a} {b}\n" for a, b in merges))


def _backend(
  vocab: dict[str, int], merges: list[tuple[str, str]], specials: dict[str, tokenizers.AddedToken]
) -> tokenizers.Tokenizer:
  """The `tokenizers.Tokenizer` of transformers' CLIPConverter, without its
  post-processor (encode adds bos and eos itself)."""
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
  # The split leaves words without whitespace, so ByteLevel's own GPT-2 split
  # (the converter leaves it on) would change nothing.
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(tokenizers.Regex(_WORD_PATTERN), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  )
  # Every special token is matched in the text, as in transformers (so SD 2's
  # pad token "!" becomes id 0, not the word-final "!</w>").
  # A text shared by two keys (SD v1's eos and pad) keeps the first one's flags.
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
