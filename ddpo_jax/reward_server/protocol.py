"""The reward server's wire format, shared by the server and its client.

Plain JSON over HTTP, never pickle (a pickle from the network runs code):

  POST /score  {"images": [str, ...], "prompts": [str, ...]}
           ->  {"rewards": [float | null, ...], "captions": [str, ...]}
  GET /health  -> {"status": "ok", "model": str, ...}
  any error    -> {"error": str} with a 4xx or 5xx status

Each image is the base64 (standard alphabet, padded) of a PNG or JPEG file.
A reward that is not finite travels as null and comes back as NaN, so the
trainer's `check_rewards` names the prompt concerned.

This module needs numpy and PIL only, not torch.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from typing import Any
from typing import Sequence

import numpy as np
from PIL import Image

# Decoded images larger than this are refused (decompression bombs): 16 Mpx.
MAX_IMAGE_PIXELS = 4096 * 4096
# Thinner or smaller images are refused. The captioner's preprocessing scales an
# image's short side up to its crop (336 px for LLaVA-1.5) before cropping, so
# a thin image grows by long/short: one of 1 x 1,048,576 px (3 MB decoded) took
# the tiny server 43 s and 10.9 GB. Within these bounds the resized image is at
# most MAX_ASPECT_RATIO crops, and never an upscaling of a few stray pixels.
MIN_IMAGE_SIDE = 8
MAX_ASPECT_RATIO = 4
IMAGE_FORMATS = ("PNG", "JPEG")


class ProtocolError(ValueError):
  """A request or response that does not follow the format above."""


def encode_image(image: np.ndarray, image_format: str = "PNG") -> str:
  """Base64 text of one uint8 [H, W, 3] image saved as PNG (lossless) or JPEG (quality 95)."""
  buffer = io.BytesIO()
  if image_format == "PNG":
    # Level 1: lossless all the same, and several times faster than the default 6.
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
  elif image_format == "JPEG":
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
  else:
    raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
  return base64.b64encode(buffer.getvalue()).decode("ascii")


def check_image_size(width: int, height: int, index: int = 0) -> None:
  """Raises ProtocolError naming `index` unless a width x height image (pixels)
  is within MIN_IMAGE_SIDE, MAX_ASPECT_RATIO and MAX_IMAGE_PIXELS."""
  size = f"images[{index}] is {width}x{height}"
  if width * height > MAX_IMAGE_PIXELS:
    raise ProtocolError(f"{size}, over the limit of {MAX_IMAGE_PIXELS} pixels")
  if min(width, height) < MIN_IMAGE_SIDE:
    raise ProtocolError(f"{size}, under the smallest side of {MIN_IMAGE_SIDE} pixels")
  if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
    raise ProtocolError(f"{size}, its long side over {MAX_ASPECT_RATIO} times its short side")


def open_image(data: Any, index: int = 0) -> Image.Image:
  """The PIL image of one base64 PNG or JPEG, its header read and its size
  checked (`check_image_size`) but no pixel decoded; ProtocolError otherwise."""
  if not isinstance(data, str):
    raise ProtocolError(f"images[{index}] must be a base64 string, got {type(data).__name__}")
  try:
    raw = base64.b64decode(data, validate=True)
  except (binascii.Error, ValueError) as e:
    raise ProtocolError(f"images[{index}] is not valid base64: {e}") from e
  try:
    image = Image.open(io.BytesIO(raw), formats=list(IMAGE_FORMATS))
  except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, EOFError, ...) on bad bytes
    raise ProtocolError(f"images[{index}] is not a decodable PNG or JPEG image: {e}") from e
  check_image_size(*image.size, index)
  return image


def load_image(image: Image.Image, index: int = 0) -> Image.Image:
  """The decoded RGB pixels of an `open_image`; ProtocolError naming `index` if they do not decode."""
  try:
    return image.convert("RGB")
  except Exception as e:  # truncated or corrupt pixel data behind a sound header
    raise ProtocolError(f"images[{index}] is not a decodable PNG or JPEG image: {e}") from e


def decode_image(data: Any, index: int = 0) -> Image.Image:
  """The RGB PIL image of one base64 PNG or JPEG; ProtocolError naming `index` otherwise."""
  return load_image(open_image(data, index), index)


def num_pixels(images: Sequence[Image.Image]) -> int:
  """Pixels the images hold once decoded, from their headers."""
  return sum(image.size[0] * image.size[1] for image in images)


def _loads(body: bytes, what: str) -> dict:
  try:
    data = json.loads(body)
  except (ValueError, RecursionError) as e:
    # ValueError: also bad UTF-8, and integers of over 4300 digits; RecursionError: nesting too deep.
    raise ProtocolError(f"{what} is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from e
  if not isinstance(data, dict):
    raise ProtocolError(f"{what} must be a JSON object, got {type(data).__name__}")
  return data


def _list_field(data: dict, name: str, what: str) -> list:
  if name not in data:
    raise ProtocolError(f"{what} has no field {name!r}")
  value = data[name]
  if not isinstance(value, list):
    raise ProtocolError(f"{what} field {name!r} must be a list, got {type(value).__name__}")
  return value


def encode_request(images: np.ndarray, prompts: Sequence[str], image_format: str = "PNG") -> bytes:
  """The JSON body scoring uint8 images [B, H, W, 3] against B prompts."""
  return json.dumps({"images": [encode_image(im, image_format) for im in images], "prompts": list(prompts)}).encode()


def open_request(body: bytes) -> tuple[list[Image.Image], list[str]]:
  """(B images, B prompts) of a request body, the images' headers read and
  checked (`open_image`) but no pixel decoded; ProtocolError if malformed."""
  data = _loads(body, "request")
  images = _list_field(data, "images", "request")
  prompts = _list_field(data, "prompts", "request")
  if not images:
    raise ProtocolError("request field 'images' is empty")
  if len(images) != len(prompts):
    raise ProtocolError(f"request has {len(images)} images but {len(prompts)} prompts")
  for i, prompt in enumerate(prompts):
    if not isinstance(prompt, str):
      raise ProtocolError(f"prompts[{i}] must be a string, got {type(prompt).__name__}")
  return [open_image(data, i) for i, data in enumerate(images)], prompts


def decode_request(body: bytes) -> tuple[list[Image.Image], list[str]]:
  """(B RGB images, B prompts) of a request body; ProtocolError if malformed."""
  images, prompts = open_request(body)
  return [load_image(image, i) for i, image in enumerate(images)], prompts


def encode_response(rewards: Sequence[float], captions: Sequence[str]) -> bytes:
  """The JSON body of a scored batch; non-finite rewards become null."""
  values = [float(r) if math.isfinite(float(r)) else None for r in rewards]
  return json.dumps({"rewards": values, "captions": [str(c) for c in captions]}).encode()


def decode_response(body: bytes, batch: int) -> tuple[np.ndarray, list[str]]:
  """(float32 rewards [B], B captions) of a response to a request of `batch` images."""
  data = _loads(body, "response")
  rewards = _list_field(data, "rewards", "response")
  captions = _list_field(data, "captions", "response")
  if len(rewards) != batch or len(captions) != batch:
    raise ProtocolError(f"response has {len(rewards)} rewards and {len(captions)} captions for {batch} images")
  try:
    values = np.array([np.nan if r is None else r for r in rewards], np.float32)
  except (TypeError, ValueError) as e:
    raise ProtocolError(f"response rewards are not numbers: {e}") from e
  return values, [str(c) for c in captions]


def encode_json(data: dict) -> bytes:
  """Any other JSON body: /health's answer, or {"error": message}."""
  return json.dumps(data).encode()


def decode_error(body: bytes) -> str:
  """The message of an error body, or the body itself when it is not one."""
  try:
    return str(json.loads(body)["error"])
  except (ValueError, KeyError, TypeError):
    return body.decode("utf-8", "replace")[:500]
