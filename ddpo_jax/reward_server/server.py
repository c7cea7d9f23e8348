r"""The reward server: HTTP on the standard library, one model shared by all requests.

    python -m ddpo_jax.reward_server --model=llava-hf/llava-1.5-7b-hf --port=8765
    python -m ddpo_jax.reward_server --model=tiny-random --port=0 --port_file=/tmp/port

Endpoints (bodies in `protocol`): POST /score, GET /health. A request's images
are captioned as one batch, and requests take turns on the model (a lock), so
concurrent clients queue rather than share the GPU. Bad requests get a JSON
error and the server goes on serving:

  400  malformed JSON, missing or mistyped fields, lengths that differ,
       images that are not base64 PNG or JPEG, a bad Content-Length
  404  any other path
  411  no Content-Length (chunked bodies are not accepted)
  413  Content-Length over --max_request_bytes (refused before reading)
  500  the model failed (the client retries these)

Bound to 127.0.0.1 by default: the server has no authentication, so expose it
beyond the machine only behind something that has.
"""

from __future__ import annotations

import argparse
import http.server
import logging
import os
import signal
import socket
import socketserver
import sys
import tempfile
import threading
import time
from typing import Protocol
from typing import Sequence
import urllib.parse

import numpy as np
from PIL import Image

from ddpo_jax.reward_server import protocol

logger = logging.getLogger("ddpo_jax.reward_server")

DEFAULT_PORT = 8765
DEFAULT_MAX_REQUEST_BYTES = 64 << 20  # 16 PNGs of 512 px are about 17 MB
# After a refused body, at most this much of it is read and discarded, so the
# client can read the error instead of a connection reset.
DRAIN_LIMIT_BYTES = 64 << 20


class Scorer(Protocol):
  """What the server serves (`scorers.AlignmentScorer`, or a fake in tests)."""

  def info(self) -> dict: ...

  def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> tuple[np.ndarray, list[str]]: ...


class HttpError(Exception):
  """An error answered with `status` and a JSON {"error": message}."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


class Handler(http.server.BaseHTTPRequestHandler):
  server: RewardServer
  # Seconds a connection may stay silent before it is dropped.
  timeout = 120

  def log_message(self, format, *args):
    logger.debug("%s %s", self.address_string(), format % args)

  def _send_json(self, status: int, body: bytes) -> None:
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Connection", "close")
    self.end_headers()
    self.wfile.write(body)

  def _send_error_json(self, error: HttpError) -> None:
    logger.info("HTTP %d to %s: %s", error.status, self.address_string(), error)
    self._send_json(error.status, protocol.encode_json({"error": str(error)}))

  def _path(self) -> str:
    return urllib.parse.urlsplit(self.path).path

  def _content_length(self) -> int:
    if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
      raise HttpError(411, "chunked bodies are not accepted; send a Content-Length")
    value = self.headers.get("Content-Length")
    if value is None:
      raise HttpError(411, "a Content-Length header is required")
    try:
      length = int(value)
    except ValueError:
      length = -1
    if length < 0:
      raise HttpError(400, f"bad Content-Length {value!r}")
    return length

  def _drain(self, length: int) -> None:
    """Reads and drops up to `length` bytes of an unread body (bounded)."""
    remaining = min(length, DRAIN_LIMIT_BYTES)
    try:
      self.connection.settimeout(5)
      while remaining > 0:
        chunk = self.rfile.read(min(remaining, 1 << 16))
        if not chunk:
          break
        remaining -= len(chunk)
    except OSError:
      pass

  def do_GET(self):
    if self._path() == "/health":
      self._send_json(200, protocol.encode_json({"status": "ok", **self.server.scorer.info()}))
    else:
      self._send_error_json(HttpError(404, f"no such path {self._path()!r}; the paths are GET /health, POST /score"))

  def do_POST(self):
    unread = 0  # bytes of the body not read yet
    try:
      unread = self._content_length()
      if self._path() != "/score":
        raise HttpError(404, f"no such path {self._path()!r}; the paths are GET /health, POST /score")
      limit = self.server.max_request_bytes
      if unread > limit:
        raise HttpError(413, f"request of {unread} bytes is over the server's --max_request_bytes={limit}")
      body = self.rfile.read(unread)
      expected, unread = unread, 0
      if len(body) < expected:
        raise HttpError(400, f"request body of {len(body)} bytes, shorter than its Content-Length {expected}")
      try:
        images, prompts = protocol.decode_request(body)
      except protocol.ProtocolError as e:
        raise HttpError(400, str(e)) from e
      response = self._score(images, prompts)
    except HttpError as e:
      self._send_error_json(e)
      if unread:
        self._drain(unread)
      return
    self._send_json(200, response)

  def _score(self, images: list[Image.Image], prompts: list[str]) -> bytes:
    start = time.time()
    try:
      with self.server.lock:
        rewards, captions = self.server.scorer.score(images, prompts)
    except Exception as e:  # the model's failure is the server's (500), not the client's
      logger.exception("scoring %d images failed", len(images))
      raise HttpError(500, f"scoring failed: {type(e).__name__}: {e}") from e
    logger.info("scored %d images in %.2f s, mean reward %.4f", len(images), time.time() - start, np.mean(rewards))
    return protocol.encode_response(rewards, captions)


class RewardServer(http.server.ThreadingHTTPServer):
  """A threading HTTP server holding one scorer, used under `lock`."""

  daemon_threads = True

  def __init__(
    self, address: tuple[str, int], scorer: Scorer | None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
  ):
    self.scorer = scorer  # may be set after binding, before serving
    self.max_request_bytes = max_request_bytes
    self.lock = threading.Lock()
    if ":" in address[0]:
      self.address_family = socket.AF_INET6
    super().__init__(address, Handler)

  def server_bind(self):
    # HTTPServer.server_bind looks up the host's FQDN, which can hang on DNS.
    socketserver.TCPServer.server_bind(self)
    self.server_name, self.server_port = self.server_address[:2]

  @property
  def port(self) -> int:
    return self.server_address[1]


def write_port_file(path: str, port: int) -> None:
  """Writes `port` to `path` atomically: a reader sees all of it or no file."""
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    f.write(f"{port}\n")
  os.replace(tmp, path)


def watch_parent(parent_pid: int, interval_seconds: float = 1.0) -> None:
  """Sends ourselves SIGTERM once the process `parent_pid` is no longer our
  parent (it died, even by SIGKILL, and we were re-parented)."""

  def loop():
    while os.getppid() == parent_pid:
      time.sleep(interval_seconds)
    logger.warning("parent process %d is gone; shutting down", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=loop, daemon=True).start()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  from ddpo_jax.reward_server import scorers as d  # its defaults; imports torch

  parser = argparse.ArgumentParser(
    prog="python -m ddpo_jax.reward_server",
    description="Serves DDPO's prompt-alignment reward: a LLaVA caption scored by BERTScore recall.",
  )
  parser.add_argument("--host", default="127.0.0.1", help="address to bind (no authentication: keep it local)")
  parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
  parser.add_argument("--port_file", default="", help="file to write the bound port to, once ready")
  parser.add_argument("--model", default=d.DEFAULT_MODEL, help=f"LLaVA HF id or folder, or {d.TINY!r}")
  parser.add_argument(
    "--bert_model",
    default=None,
    help=f"BERTScore encoder HF id or folder, or {d.TINY!r} (default: {d.TINY} with a {d.TINY} --model, "
    f"else {d.DEFAULT_BERT_MODEL})",
  )
  parser.add_argument("--bert_layer", type=int, default=None, help="hidden-state index (default: bert_score's)")
  parser.add_argument("--question", default=d.QUESTION, help="what LLaVA is asked about each image")
  parser.add_argument("--reference_template", default=d.REFERENCE_TEMPLATE, help="the reference, with {prompt}")
  parser.add_argument("--max_new_tokens", type=int, default=None, help=f"default: 8 for {d.TINY}, else 64")
  parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
  parser.add_argument("--dtype", default="auto", help="captioner dtype: auto (float16 on GPU), float32, bfloat16")
  parser.add_argument("--torch_threads", type=int, default=0, help="CPU threads of torch (0: torch's default)")
  parser.add_argument("--max_request_bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES)
  parser.add_argument("--parent_pid", type=int, default=0, help="exit once this process is gone (0: never)")
  parser.add_argument("--log_level", default="INFO", help="DEBUG logs every request")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  logging.basicConfig(level=args.log_level.upper(), format="reward_server %(levelname)s %(message)s")
  from ddpo_jax.reward_server import scorers

  if args.torch_threads:
    scorers.torch.set_num_threads(args.torch_threads)
  # SIGTERM (how the client, or watch_parent, stops a server) unwinds like
  # Ctrl-C, so the temporary folder of the tiny models is removed.
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
  if args.parent_pid:
    watch_parent(args.parent_pid)
  try:
    # Bound before the models load, so a port in use fails at once; early
    # connections wait in the listen backlog until the server serves.
    server = RewardServer((args.host, args.port), None, args.max_request_bytes)
  except OSError as e:
    sys.exit(f"reward server: cannot listen on {args.host}:{args.port}: {e}; choose another --port (0: any free one)")
  try:
    with tempfile.TemporaryDirectory(prefix="ddpo_tiny_models_") as tiny_dir:
      server.scorer = scorers.make_scorer(
        model=args.model,
        bert_model=args.bert_model,
        bert_layer=args.bert_layer,
        question=args.question,
        reference_template=args.reference_template,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        dtype=args.dtype,
        tiny_dir=tiny_dir,
      )
      if args.port_file:
        write_port_file(args.port_file, server.port)
      print(f"reward server: {args.model} on http://{args.host}:{server.port}", flush=True)
      server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


if __name__ == "__main__":
  sys.exit(main())
