r"""The reward server: HTTP on the standard library, one model shared by all requests.

    python -m ddpo_jax.reward_server --model=llava-hf/llava-1.5-7b-hf --port=8765
    python -m ddpo_jax.reward_server --model=tiny-random --port=0 --port_file=/tmp/port

Endpoints (bodies in `protocol`): POST /score, GET /health. A request's images
are captioned as one batch, and requests take turns on the model (a lock), so
concurrent clients queue rather than share the GPU. Bad requests get a JSON
error and the server goes on serving; every answer's body is JSON:

  400  malformed JSON (also nested too deep, or an integer of over 4300
       digits), missing or mistyped fields, lengths that differ, images that
       are not base64 PNG or JPEG, or have a side under 8 px or one over 4
       times the other (`protocol.check_image_size`), a bad Content-Length,
       a garbled request line
  404  any other path
  408  the request (line, headers and body) not received within
       --request_timeout_seconds of connecting
  411  no Content-Length (chunked bodies are not accepted)
  413  Content-Length over --max_request_bytes (refused before reading), or
       images of more than --max_request_pixels in all (refused from their
       headers, before decoding)
  414, 431  a request line or header lines too long
  500  the model failed (the client retries these)
  501  a method other than GET and POST
  503  --max_connections connections open already (answered at once, without
       a thread; the client retries these)

Memory: at most --max_connections request bodies of --max_request_bytes
(each also parsed, about as large again), and at most
--max_concurrent_decodes requests holding decoded images (from decoding them
until they are scored), so decoded pixels take at most
max_concurrent_decodes x max_request_pixels x 3 bytes. GET /health reports
max_request_bytes and max_request_pixels, so that a client can size its
requests before sending them (a body over the limit gets its 413 only when
the server can drain it, up to DRAIN_LIMIT_BYTES; past that the client sees
a connection reset).

Bound to 127.0.0.1 by default: the server has no authentication, so expose it
beyond the machine only behind something that has.
"""

from __future__ import annotations

import argparse
import collections
import http.server
import io
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
DEFAULT_MAX_REQUEST_PIXELS = 64 * 1024 * 1024  # 64 images of 1024 x 1024: 192 MB decoded
DEFAULT_MAX_CONCURRENT_DECODES = 2  # one request scored while the next one decodes
DEFAULT_MAX_CONNECTIONS = 32
DEFAULT_REQUEST_TIMEOUT_SECONDS = 60.0
# After a refused body, at most this much of it is read and discarded, so the
# client can read the error instead of a connection reset. A client that sends
# more gets a reset all the same: the client checks /health's limits first.
DRAIN_LIMIT_BYTES = 64 << 20
# Seconds the drain waits for each next piece of a refused body.
DRAIN_IDLE_SECONDS = 5.0
# A connection over --max_connections is answered 503 and half-closed at once,
# and closed this many seconds later, so its client reads the 503 rather than
# a reset; at most MAX_REFUSED_OPEN of them wait so.
REFUSED_LINGER_SECONDS = 1.0
MAX_REFUSED_OPEN = 64
BATCH_HINT = "send fewer images per request (the trainer's config.reward.kwargs.batch_size)"


class Scorer(Protocol):
  """What the server serves (`scorers.AlignmentScorer`, or a fake in tests)."""

  def info(self) -> dict: ...

  def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> tuple[np.ndarray, list[str]]: ...


class HttpError(Exception):
  """An error answered with `status` and a JSON {"error": message}."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


def check_request_pixels(sizes: Sequence[tuple[int, int]], limit: int) -> None:
  """Raises HttpError 413 when images of these (width, height) sizes hold more
  than `limit` pixels in all, saying how many of the largest would fit."""
  total = sum(width * height for width, height in sizes)
  if total <= limit:
    return
  width, height = max(sizes, key=lambda size: size[0] * size[1])
  fit = limit // (width * height)
  advice = f"at most {fit} images of {width}x{height} fit" if fit else f"one image of {width}x{height} alone is over it"
  raise HttpError(
    413,
    f"request of {len(sizes)} images holds {total} pixels once decoded, over the server's "
    f"--max_request_pixels={limit} ({advice}); {BATCH_HINT}",
  )


class RequestTimeout(Exception):
  """A request that did not arrive in time. Not a TimeoutError, which the
  standard library's handler swallows, closing the connection unanswered."""


class _DeadlineSocketIO(socket.SocketIO):
  """A socket's reading side that keeps a deadline (time.monotonic() seconds):
  each read waits at most until then, and at most `idle_timeout_seconds`;
  RequestTimeout once either has passed."""

  def __init__(self, sock: socket.socket, deadline: float, idle_timeout_seconds: float):
    super().__init__(sock, "rb")
    self.deadline = deadline
    self.idle_timeout_seconds = idle_timeout_seconds

  def readinto(self, buffer) -> int | None:
    remaining = self.deadline - time.monotonic()
    if remaining <= 0:
      raise RequestTimeout("the request deadline has passed")
    self._sock.settimeout(min(remaining, self.idle_timeout_seconds))
    try:
      return super().readinto(buffer)
    except TimeoutError as e:
      raise RequestTimeout(str(e)) from e


class Handler(http.server.BaseHTTPRequestHandler):
  server: RewardServer
  # What answers a garbled request line: 0.9 (the standard library's) would mean a bare body, no status line.
  default_request_version = "HTTP/1.0"
  # Seconds a connection may stay silent before it is dropped (also bounded by
  # the request deadline while the request is read).
  timeout = 120

  def setup(self):
    super().setup()
    # The standard library's reader, replaced by one that keeps the request
    # deadline: without it a client sending a byte a minute holds a thread.
    self.rfile.close()
    deadline = time.monotonic() + self.server.request_timeout_seconds
    self.rfile = io.BufferedReader(_DeadlineSocketIO(self.connection, deadline, self.timeout))
    self._answered = False

  def handle(self):
    try:
      super().handle()
    except RequestTimeout:
      self._send_error_json(
        HttpError(
          408,
          f"the request did not arrive within the server's --request_timeout_seconds="
          f"{self.server.request_timeout_seconds:g} of connecting",
        )
      )
    except OSError as e:  # the client went away mid-answer
      logger.debug("connection from %s failed: %s", self.address_string(), e)
    except Exception:
      logger.exception("request from %s failed", self.address_string())
      self._send_error_json(HttpError(500, "the reward server failed on this request (its log says why)"))

  def log_message(self, format, *args):
    logger.debug("%s %s", self.address_string(), format % args)

  def send_error(self, code, message=None, explain=None):
    """The standard library's own refusals (unknown methods, garbled request
    lines, oversized headers), in JSON like every other answer."""
    text = message or self.responses.get(code, ("error",))[0]
    if explain and message:
      text = f"{text}: {explain}"
    if code == 501:
      text += "; the endpoints are GET /health, POST /score"
    self._send_error_json(HttpError(code, text))

  def _send_json(self, status: int, body: bytes) -> None:
    if self._answered:  # a failure after the answer began: nothing more can be said
      return
    self._answered = True
    self.connection.settimeout(self.timeout)  # not what the request deadline left
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Connection", "close")
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  def _send_error_json(self, error: HttpError) -> None:
    logger.info("HTTP %d to %s: %s", error.status, self.address_string(), error)
    try:
      self._send_json(error.status, protocol.encode_json({"error": str(error)}))
    except OSError:  # the client is gone
      pass

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
    self.rfile.raw.idle_timeout_seconds = DRAIN_IDLE_SECONDS
    try:
      while remaining > 0:
        chunk = self.rfile.read(min(remaining, 1 << 16))
        if not chunk:
          break
        remaining -= len(chunk)
    except (OSError, RequestTimeout):
      pass

  def do_GET(self):
    if self._path() == "/health":
      health = {"status": "ok", **self.server.scorer.info(), **self.server.limits()}
      self._send_json(200, protocol.encode_json(health))
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
        message = f"request of {unread} bytes is over the server's --max_request_bytes={limit}; {BATCH_HINT}"
        raise HttpError(413, message)
      body = self.rfile.read(unread)
      expected, unread = unread, 0
      if len(body) < expected:
        raise HttpError(400, f"request body of {len(body)} bytes, shorter than its Content-Length {expected}")
      response = self._score_body(body)
    except HttpError as e:
      self._send_error_json(e)
      if unread:
        self._drain(unread)
      return
    self._send_json(200, response)

  def _score_body(self, body: bytes) -> bytes:
    """The response to a /score body that has arrived whole."""
    try:
      images, prompts = protocol.open_request(body)  # headers only: no pixel decoded yet
    except protocol.ProtocolError as e:
      raise HttpError(400, str(e)) from e
    check_request_pixels([image.size for image in images], self.server.max_request_pixels)
    # Held until scored: it bounds the decoded images in memory, not just the decoding.
    with self.server.decode_slots:
      try:
        decoded = [protocol.load_image(image, i) for i, image in enumerate(images)]
      except protocol.ProtocolError as e:
        raise HttpError(400, str(e)) from e
      return self._score(decoded, prompts)

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


def _raw_json_response(status: int, reason: str, message: str) -> bytes:
  """A whole HTTP response with a JSON {"error": message} body, as bytes."""
  body = protocol.encode_json({"error": message})
  head = (
    f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    "Connection: close\r\nRetry-After: 1\r\n\r\n"
  )
  return head.encode("ascii") + body


class RewardServer(http.server.ThreadingHTTPServer):
  """A threading HTTP server holding one scorer, used under `lock`.

  max_request_bytes: the largest body read. max_request_pixels: decoded
  pixels of a request's images in all. max_concurrent_decodes: requests
  holding decoded images at once. max_connections: connections served at
  once (a thread each); more are answered 503. request_timeout_seconds: from
  connecting until the body has arrived; later, 408.
  """

  daemon_threads = True

  def __init__(
    self,
    address: tuple[str, int],
    scorer: Scorer | None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    *,
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
    max_concurrent_decodes: int = DEFAULT_MAX_CONCURRENT_DECODES,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    request_timeout_seconds: float = DEFAULT_REQUEST_TIMEOUT_SECONDS,
  ):
    limits = {
      "max_request_bytes": max_request_bytes,
      "max_request_pixels": max_request_pixels,
      "max_concurrent_decodes": max_concurrent_decodes,
      "max_connections": max_connections,
      "request_timeout_seconds": request_timeout_seconds,
    }
    for name, value in limits.items():
      if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    self.scorer = scorer  # may be set after binding, before serving
    self.max_request_bytes = max_request_bytes
    self.max_request_pixels = max_request_pixels
    self.max_connections = max_connections
    self.request_timeout_seconds = request_timeout_seconds
    self.lock = threading.Lock()
    self.decode_slots = threading.BoundedSemaphore(max_concurrent_decodes)
    self._connection_slots = threading.BoundedSemaphore(max_connections)
    self._refused = collections.deque()  # (time.monotonic() refused, socket), oldest first
    self._busy_response = _raw_json_response(
      503, "Service Unavailable", f"the reward server is serving its --max_connections={max_connections}; try again"
    )
    if ":" in address[0]:
      self.address_family = socket.AF_INET6
    super().__init__(address, Handler)

  def limits(self) -> dict:
    """What /health reports of the limits, for clients to size their requests."""
    return {"max_request_bytes": self.max_request_bytes, "max_request_pixels": self.max_request_pixels}

  def server_bind(self):
    # HTTPServer.server_bind looks up the host's FQDN, which can hang on DNS.
    socketserver.TCPServer.server_bind(self)
    self.server_name, self.server_port = self.server_address[:2]

  def process_request(self, request, client_address):
    if not self._connection_slots.acquire(blocking=False):
      self._refuse(request)
      return
    try:
      super().process_request(request, client_address)  # starts the connection's thread
    except BaseException:
      self._connection_slots.release()
      raise

  def process_request_thread(self, request, client_address):
    try:
      super().process_request_thread(request, client_address)
    finally:
      self._connection_slots.release()

  def _refuse(self, request: socket.socket) -> None:
    """Answers 503 from the serving thread, without reading the request; the
    socket is closed later by `service_actions`."""
    try:
      request.setblocking(False)
      request.send(self._busy_response)  # a few hundred bytes: a fresh socket's buffer takes them
      request.shutdown(socket.SHUT_WR)
    except OSError:
      request.close()
      return
    self._refused.append((time.monotonic(), request))
    while len(self._refused) > MAX_REFUSED_OPEN:
      _close_refused(self._refused.popleft()[1])

  def service_actions(self):
    # serve_forever calls this at least every poll interval (0.5 s).
    while self._refused and time.monotonic() - self._refused[0][0] > REFUSED_LINGER_SECONDS:
      _close_refused(self._refused.popleft()[1])

  def server_close(self):
    while self._refused:
      _close_refused(self._refused.popleft()[1])
    super().server_close()

  @property
  def port(self) -> int:
    return self.server_address[1]


def _close_refused(sock: socket.socket) -> None:
  """Closes a refused socket, first reading what it has received (at most 1 MB,
  without waiting), since closing with unread data sends a reset."""
  try:
    for _ in range(16):
      if not sock.recv(1 << 16):
        break
  except OSError:  # BlockingIOError: nothing more to read now
    pass
  sock.close()


def write_port_file(path: str, port: int) -> None:
  """Writes `port` to `path` atomically: a reader sees all of it or no file."""
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    f.write(f"{port}\n")
  os.replace(tmp, path)


def write_port_fd(fd: int, port: int) -> None:
  """Writes `port` to the pipe `fd` and closes it: its reader sees the line, or EOF."""
  with os.fdopen(fd, "w") as f:
    f.write(f"{port}\n")


def watch_parent(parent_pid: int, interval_seconds: float = 1.0) -> None:
  """Sends ourselves SIGTERM once the process `parent_pid` is no longer our
  parent (it died, even by SIGKILL, and we were re-parented)."""

  def loop():
    while os.getppid() == parent_pid:
      time.sleep(interval_seconds)
    logger.warning("parent process %d is gone; shutting down", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=loop, daemon=True).start()


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
  return value


def _positive_float(text: str) -> float:
  value = float(text)
  if not value > 0 or value == float("inf"):
    raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
  return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  from ddpo_jax.reward_server import scorers as d  # its defaults; imports torch

  parser = argparse.ArgumentParser(
    prog="python -m ddpo_jax.reward_server",
    description="Serves DDPO's prompt-alignment reward: a LLaVA caption scored by BERTScore recall.",
  )
  parser.add_argument("--host", default="127.0.0.1", help="address to bind (no authentication: keep it local)")
  parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
  parser.add_argument("--port_file", default="", help="file to write the bound port to, once ready")
  parser.add_argument(
    "--port_fd", type=int, default=-1, help="pipe to write the bound port to, once ready, then close (-1: none)"
  )
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
  parser.add_argument(
    "--max_request_bytes", type=_positive_int, default=DEFAULT_MAX_REQUEST_BYTES, help="largest request body read"
  )
  parser.add_argument(
    "--max_request_pixels",
    type=_positive_int,
    default=DEFAULT_MAX_REQUEST_PIXELS,
    help="decoded pixels of a request's images in all, checked from their headers (default: 64 of 1024 x 1024)",
  )
  parser.add_argument(
    "--max_concurrent_decodes",
    type=_positive_int,
    default=DEFAULT_MAX_CONCURRENT_DECODES,
    help="requests holding decoded images at once, from decoding until scored; the others wait before decoding",
  )
  parser.add_argument(
    "--max_connections",
    type=_positive_int,
    default=DEFAULT_MAX_CONNECTIONS,
    help="connections served at once, a thread each; more are answered 503 at once",
  )
  parser.add_argument(
    "--request_timeout_seconds",
    type=_positive_float,
    default=DEFAULT_REQUEST_TIMEOUT_SECONDS,
    help="from connecting until the request body has arrived; slower requests get 408",
  )
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
    server = RewardServer(
      (args.host, args.port),
      None,
      args.max_request_bytes,
      max_request_pixels=args.max_request_pixels,
      max_concurrent_decodes=args.max_concurrent_decodes,
      max_connections=args.max_connections,
      request_timeout_seconds=args.request_timeout_seconds,
    )
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
      if args.port_fd >= 0:
        try:
          write_port_fd(args.port_fd, server.port)
        except BrokenPipeError:
          sys.exit("reward server: nobody reads --port_fd any more (the launcher is gone); exiting")
      print(f"reward server: {args.model} on http://{args.host}:{server.port}", flush=True)
      server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


if __name__ == "__main__":
  sys.exit(main())
