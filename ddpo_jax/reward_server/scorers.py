"""The models behind the reward server: a LLaVA captioner and BERTScore recall.

The DDPO paper's prompt-alignment reward: LLaVA answers QUESTION about the
image, and the answer is scored by BERTScore recall against the reference
REFERENCE_TEMPLATE.format(prompt=prompt) ("The image contains a cat riding a
bike").

BERTScore recall (Zhang et al., 2020) is computed here rather than through the
bert_score package: contextual embeddings of the candidate (the caption) and
of the reference from one layer of an encoder, special tokens excluded,
L2-normalised; recall = mean over reference tokens of the largest cosine
similarity with any candidate token. No idf weighting and no baseline
rescaling (bert_score's defaults), so recall lies in [-1, 1] and is near 1 for
close paraphrases. The layer is bert_score's default for the models it knows
(BERT_LAYERS), else the last. Tokenisation details differ slightly from
bert_score's (e.g. RoBERTa's prefix space), so scores match it closely, not
bit for bit.

"tiny-random" in place of either model builds a tiny randomly initialised one
with a fixed seed (`build_tiny_models`), so the whole path runs offline in
seconds on a CPU; its captions are word salad and its rewards mean nothing.

The only module of ddpo_jax's server importing torch.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Sequence

import numpy as np
from PIL import Image
import torch

TINY = "tiny-random"
QUESTION = "What is happening in this image?"
REFERENCE_TEMPLATE = "The image contains {prompt}"
DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
DEFAULT_BERT_MODEL = "roberta-large"
# bert_score's default layer (hidden_states index; 0 = the embeddings) per model.
BERT_LAYERS = {
  "roberta-large": 17,
  "roberta-base": 10,
  "bert-base-uncased": 9,
  "microsoft/deberta-xlarge-mnli": 40,
}
# LLaVA-1.5's conversation format, for processors saved without a chat template.
LLAVA_CHAT_TEMPLATE = (
  "{% for message in messages %}"
  "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
  "{% for item in message['content'] %}"
  "{% if item['type'] == 'text' %}{{ item['text'] }}{% elif item['type'] == 'image' %}<image>\n{% endif %}"
  "{% endfor %}"
  "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}"
  "{% endfor %}"
  "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def resolve_device(device: str) -> torch.device:
  """The torch device named `device`; "auto" is cuda when available, else cpu."""
  if device == "auto":
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
  return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
  """The torch dtype named `dtype`; "auto" is float16 on a GPU, float32 on a CPU."""
  if dtype == "auto":
    return torch.float16 if device.type == "cuda" else torch.float32
  return getattr(torch, dtype)


# --- BERTScore ---------------------------------------------------------------


def recall_from_embeddings(
  candidate: torch.Tensor, candidate_mask: torch.Tensor, reference: torch.Tensor, reference_mask: torch.Tensor
) -> torch.Tensor:
  """BERTScore recall of each pair of a batch, float32 [B].

  candidate [B, N, D] and reference [B, M, D]: token embeddings (any scale,
  normalised here); the masks [B, N] and [B, M] are true at the tokens that
  count (not padding, not special tokens). A pair whose candidate has no token
  scores 0; a reference with no token scores 0.
  """
  candidate = torch.nn.functional.normalize(candidate.float(), dim=-1)
  reference = torch.nn.functional.normalize(reference.float(), dim=-1)
  similarity = torch.einsum("bmd,bnd->bmn", reference, candidate)  # [B, M, N]
  similarity = similarity.masked_fill(~candidate_mask[:, None, :].bool(), -2.0)  # below any cosine
  best = similarity.max(dim=-1).values  # [B, M]
  has_candidate = candidate_mask.bool().any(dim=-1)
  weights = reference_mask.float()
  recall = (best * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)
  return torch.where(has_candidate, recall, torch.zeros_like(recall))


class BertScorer:
  """BERTScore recall with the encoder `model` (a HF id or folder)."""

  def __init__(self, model: str, layer: int | None = None, device: str = "auto", max_length: int = 512):
    from transformers import AutoModel
    from transformers import AutoTokenizer

    self.name = model
    self.device = resolve_device(device)
    self.tokenizer = AutoTokenizer.from_pretrained(model)
    self.model = AutoModel.from_pretrained(model).to(self.device).eval()
    num_layers = self.model.config.num_hidden_layers
    self.layer = layer if layer is not None else BERT_LAYERS.get(model, num_layers)
    if not 0 <= self.layer <= num_layers:
      raise ValueError(f"bert layer {self.layer} out of range for {model!r}, which has {num_layers} layers")
    self.max_length = min(max_length, self.tokenizer.model_max_length)

  @torch.no_grad()
  def embed(self, sentences: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings [B, L, D] of layer `self.layer`, mask [B, L] of the non-special, non-pad tokens)."""
    batch = self.tokenizer(
      list(sentences),
      padding=True,
      truncation=True,
      max_length=self.max_length,
      return_tensors="pt",
      return_special_tokens_mask=True,
    )
    special = batch.pop("special_tokens_mask").bool()
    batch = {k: v.to(self.device) for k, v in batch.items()}
    outputs = self.model(**batch, output_hidden_states=True)
    mask = batch["attention_mask"].bool() & ~special.to(self.device)
    return outputs.hidden_states[self.layer], mask

  def recall(self, candidates: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """float32 [B] BERTScore recall of each candidate against its reference."""
    candidate, candidate_mask = self.embed(candidates)
    reference, reference_mask = self.embed(references)
    return recall_from_embeddings(candidate, candidate_mask, reference, reference_mask).cpu().numpy()


# --- LLaVA captioner -----------------------------------------------------------


class LlavaCaptioner:
  """Answers `question` about images with a LLaVA model (a HF id or folder), greedily."""

  def __init__(
    self,
    model: str,
    question: str = QUESTION,
    max_new_tokens: int = 64,
    device: str = "auto",
    dtype: str = "auto",
  ):
    from transformers import AutoProcessor
    from transformers import LlavaForConditionalGeneration

    self.name = model
    self.device = resolve_device(device)
    self.processor = AutoProcessor.from_pretrained(model)
    # Batched generation with a decoder-only model pads on the left.
    self.processor.tokenizer.padding_side = "left"
    self.model = LlavaForConditionalGeneration.from_pretrained(model, dtype=resolve_dtype(dtype, self.device)).to(
      self.device
    )
    self.model.eval()
    self.max_new_tokens = max_new_tokens
    self.prompt = self.format_prompt(question)

  def format_prompt(self, question: str) -> str:
    """The model's chat prompt asking `question` about one image."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    template = getattr(self.processor, "chat_template", None) or LLAVA_CHAT_TEMPLATE
    return self.processor.apply_chat_template(messages, chat_template=template, add_generation_prompt=True)

  @torch.no_grad()
  def caption(self, images: Sequence[Image.Image]) -> list[str]:
    """The model's answer for each RGB image, generated as one batch."""
    inputs = self.processor(images=list(images), text=[self.prompt] * len(images), return_tensors="pt", padding=True)
    inputs = {k: v.to(self.device) for k, v in inputs.items() if k != "token_type_ids"}
    inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
    tokenizer = self.processor.tokenizer
    output = self.model.generate(
      **inputs,
      max_new_tokens=self.max_new_tokens,
      do_sample=False,
      pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    answers = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


class AlignmentScorer:
  """Caption with LLaVA, then BERTScore recall against the prompt's reference."""

  def __init__(self, captioner: LlavaCaptioner, bert: BertScorer, reference_template: str = REFERENCE_TEMPLATE):
    self.captioner = captioner
    self.bert = bert
    self.reference_template = reference_template

  def info(self) -> dict:
    """What /health reports."""
    return {
      "model": self.captioner.name,
      "bert_model": self.bert.name,
      "bert_layer": self.bert.layer,
      "chat_prompt": self.captioner.prompt,
      "reference_template": self.reference_template,
      "max_new_tokens": self.captioner.max_new_tokens,
      "device": str(self.captioner.device),
    }

  def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """(float32 rewards [B], B captions) of B RGB images and their prompts."""
    captions = self.captioner.caption(images)
    references = [self.reference_template.format(prompt=p) for p in prompts]
    return self.bert.recall(captions, references), captions


# --- Tiny random models -------------------------------------------------------

_WORD_RE = re.compile(r"\w+|[^\w\s]+")


def tiny_vocabulary() -> list[str]:
  """Lower-case words and punctuation of the packaged prompts, the toy captions,
  the question and the reference template, sorted."""
  from ddpo_jax import prompts
  from ddpo_jax.toy import shapes

  texts = [QUESTION, REFERENCE_TEMPLATE, "USER: ASSISTANT:"]
  texts += [scene.caption for scene in shapes.all_scenes()]
  for filename in sorted(os.listdir(prompts.DATA_DIR)):
    if filename.endswith(".txt"):
      texts += prompts.load_list(filename)
  return sorted({word for text in texts for word in _WORD_RE.findall(text.lower())})


def build_word_tokenizer(words: Sequence[str], specials: Sequence[str], prefix: str, suffix: str | None, **kwargs):
  """A lower-casing word-level fast tokenizer; `specials` take ids 0.. and
  every sequence becomes "`prefix` words [`suffix`]"."""
  from tokenizers import Tokenizer
  from tokenizers import decoders
  from tokenizers import models
  from tokenizers import normalizers
  from tokenizers import pre_tokenizers
  from tokenizers import processors
  from transformers import PreTrainedTokenizerFast

  vocab = {token: i for i, token in enumerate(list(specials) + list(words))}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=kwargs["unk_token"]))
  tokenizer.normalizer = normalizers.Lowercase()
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
  single = f"{prefix} $A" + (f" {suffix}" if suffix else "")
  used = [prefix] + ([suffix] if suffix else [])
  tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=[(t, vocab[t]) for t in used])
  return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=256, **kwargs)


def build_tiny_models(directory: str, seed: int = 0) -> tuple[str, str]:
  """Saves a tiny random LLaVA (CLIP vision tower, Llama text model, 32 px
  images in 8 px patches) and a tiny random BERT into `directory`; returns
  their folders (captioner, bert). Same seed, same weights."""
  from transformers import BertConfig
  from transformers import BertModel
  from transformers import CLIPImageProcessor
  from transformers import CLIPVisionConfig
  from transformers import LlamaConfig
  from transformers import LlavaConfig
  from transformers import LlavaForConditionalGeneration
  from transformers import LlavaProcessor

  words = tiny_vocabulary()
  llava_dir, bert_dir = os.path.join(directory, "llava"), os.path.join(directory, "bert")

  specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
  tokenizer = build_word_tokenizer(
    words,
    specials,
    "<s>",
    None,
    unk_token="<unk>",
    bos_token="<s>",
    eos_token="</s>",
    pad_token="<pad>",
    additional_special_tokens=["<image>"],
  )
  image_size, patch_size = 32, 8
  image_processor = CLIPImageProcessor(
    size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
  )
  processor = LlavaProcessor(
    image_processor=image_processor,
    tokenizer=tokenizer,
    patch_size=patch_size,
    vision_feature_select_strategy="default",
    num_additional_image_tokens=1,  # CLIP's class token
    chat_template=LLAVA_CHAT_TEMPLATE,
  )
  vision = CLIPVisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=image_size,
    patch_size=patch_size,
    projection_dim=32,
  )
  text = LlamaConfig(
    vocab_size=len(tokenizer),
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id,
    pad_token_id=tokenizer.pad_token_id,
  )
  config = LlavaConfig(
    vision_config=vision,
    text_config=text,
    image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    vision_feature_select_strategy="default",
    vision_feature_layer=-2,
  )
  torch.manual_seed(seed)
  model = LlavaForConditionalGeneration(config).eval()
  model.generation_config.pad_token_id = tokenizer.pad_token_id
  model.save_pretrained(llava_dir)
  processor.save_pretrained(llava_dir)

  bert_specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  bert_tokenizer = build_word_tokenizer(
    words,
    bert_specials,
    "[CLS]",
    "[SEP]",
    unk_token="[UNK]",
    pad_token="[PAD]",
    cls_token="[CLS]",
    sep_token="[SEP]",
    mask_token="[MASK]",
  )
  bert_config = BertConfig(
    vocab_size=len(bert_tokenizer),
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
  )
  torch.manual_seed(seed + 1)
  BertModel(bert_config).eval().save_pretrained(bert_dir)
  bert_tokenizer.save_pretrained(bert_dir)
  return llava_dir, bert_dir


def make_scorer(
  model: str = DEFAULT_MODEL,
  bert_model: str | None = None,
  bert_layer: int | None = None,
  question: str = QUESTION,
  reference_template: str = REFERENCE_TEMPLATE,
  max_new_tokens: int | None = None,
  device: str = "auto",
  dtype: str = "auto",
  tiny_dir: str | None = None,
) -> AlignmentScorer:
  """The server's scorer. `model` or `bert_model` "tiny-random" builds the tiny
  random ones into `tiny_dir` (a fresh temporary folder when None); `bert_model`
  None means tiny-random with a tiny-random captioner, else DEFAULT_BERT_MODEL;
  `max_new_tokens` None means 8 with a tiny-random captioner, else 64."""
  if bert_model is None:
    bert_model = TINY if model == TINY else DEFAULT_BERT_MODEL
  if max_new_tokens is None:
    max_new_tokens = 8 if model == TINY else 64
  tiny = None
  if TINY in (model, bert_model):
    tiny = build_tiny_models(tiny_dir or tempfile.mkdtemp(prefix="ddpo_tiny_scorers_"))
  llava_path = tiny[0] if model == TINY else model
  bert_path = tiny[1] if bert_model == TINY else bert_model
  captioner = LlavaCaptioner(llava_path, question, max_new_tokens, device=device, dtype=dtype)
  bert = BertScorer(bert_path, layer=bert_layer, device=device)
  captioner.name, bert.name = model, bert_model  # "tiny-random", not a temporary folder
  return AlignmentScorer(captioner, bert, reference_template)
