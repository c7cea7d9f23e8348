r"""Prompt-image alignment (DDPO's VLM task), scored by a reward server.

The reward of an image is the BERTScore recall of LLaVA's answer to "What is
happening in this image?" against "The image contains {prompt}", in [-1, 1]
and in practice about [0.5, 1]. The models run in `ddpo_jax.reward_server`, a
separate process (torch, its own GPU); this client posts each batch to it as
PNGs in JSON (`ddpo_jax.reward_server.protocol`) with urllib:

    python -m ddpo_jax.reward_server --model=llava-hf/llava-1.5-7b-hf --port=8765

With `launch_server=True` the client starts the server itself, with
`server_args`, on a free loopback port, and stops it when Python exits; it
learns the port through a pipe, so nothing is left on disk, and the server
exits by itself when the trainer dies, even by SIGKILL.

Before sending, the client checks each request against the limits the server
reports on /health (max_request_bytes, max_request_pixels), and fails at once
with the batch size that fits: a body over the limit could not be refused
with an answer the client reads, only with a connection reset.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import select
import shlex
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np

from ddpo_jax.reward_server import protocol
from ddpo_jax.rewards.base import RewardFn
from ddpo_jax.rewards.base import check_images
from ddpo_jax.rewards.base import register

DEFAULT_URL = "http://127.0.0.1:8765"
START_HINT = (
  "start it with `python -m ddpo_jax.reward_server --model=llava-hf/llava-1.5-7b-hf --port=8765` "
  "(or --model=tiny-random to try things out) and point config.reward.kwargs.url at it, "
  "or set config.reward.kwargs.launch_server=True"
)
# Failures worth another try: the server is down, restarting, busy or slow.
RETRYABLE = (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException)
# What a sender sees when the server closes before reading all it sent.
RESETS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
# The request limits /health reports (server.RewardServer.limits).
LIMITS = ("max_request_bytes", "max_request_pixels")
# Direct connections: an http_proxy meant for the internet must not carry the
# loopback traffic. Shared by all threads, as urlopen's own opener is.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class RewardServerError(RuntimeError):
  """The reward server refused a request, or could not be reached."""


def post_score(url: str, body: bytes, timeout_seconds: float) -> bytes:
  """POSTs a /score body to the server at `url`; the response body.

  Raises urllib.error.HTTPError on an error status and RETRYABLE on transport failures.
  """
  request = urllib.request.Request(
    url.rstrip("/") + "/score", data=body, headers={"Content-Type": "application/json"}, method="POST"
  )
  with _OPENER.open(request, timeout=timeout_seconds) as response:
    return response.read()


def score_with_retries(
  url: str,
  body: bytes,
  timeout_seconds: float,
  max_retries: int,
  backoff_seconds: float,
  num_images: int | None = None,
) -> bytes:
  """`post_score`, tried again after backoff_seconds * 2**k (k = 0, 1, ...) on
  transport failures and 5xx, at most `max_retries` more times.

  Raises RewardServerError at once on 4xx (retrying the same request cannot
  help), and on a connection reset when the body is over the server's
  max_request_bytes (`check_request`; num_images, the images in the body,
  for its advice); after the last try otherwise, naming the URL and how to
  start the server.
  """
  last = None
  for attempt in range(max_retries + 1):
    if attempt:
      time.sleep(backoff_seconds * 2 ** (attempt - 1))
    try:
      return post_score(url, body, timeout_seconds)
    except urllib.error.HTTPError as e:
      message = protocol.decode_error(e.read())
      if e.code < 500:
        hint = " (lower config.reward.kwargs.batch_size, or raise that limit of the server)" if e.code == 413 else ""
        raise RewardServerError(f"reward server at {url} refused the request: HTTP {e.code}: {message}{hint}") from e
      last = f"HTTP {e.code}: {message}"
    except RETRYABLE as e:
      reason = getattr(e, "reason", e)
      if isinstance(reason, RESETS):
        check_request(url, get_limits(url, min(timeout_seconds, 5.0)), num_images, len(body))
      last = f"{type(e).__name__}: {reason}"
  raise RewardServerError(
    f"reward server at {url} did not answer after {max_retries + 1} tries (last: {last}); {START_HINT}."
  )


def check_request(url: str, limits: dict, num_images: int | None, num_bytes: int, num_pixels: int = 0) -> None:
  """Raises RewardServerError when a request of `num_images` images (None:
  not known), `num_bytes` bytes of body and `num_pixels` decoded pixels is
  over one of the `limits` the server at `url` reported, with the batch size
  that would fit."""
  for name, value, unit in (("max_request_bytes", num_bytes, "bytes"), ("max_request_pixels", num_pixels, "pixels")):
    limit = limits.get(name)
    if limit is None or value <= limit:
      continue
    what = f"a request of {num_images} images" if num_images else "a request"
    fit = num_images * limit // value if num_images else None
    if fit is None:
      advice = "lower config.reward.kwargs.batch_size"
    elif fit:
      advice = f"lower config.reward.kwargs.batch_size to {fit} or less"
    else:
      advice = "even one image is over it: send smaller images"
    raise RewardServerError(
      f"{what} is {value} {unit}, over the --{name}={limit} of the reward server at {url}; "
      f"{advice}, or raise the server's --{name}"
    )


def get_health(url: str, timeout_seconds: float = 5.0) -> dict:
  """The /health answer of the server at `url`; raises RETRYABLE or HTTPError if none."""
  with _OPENER.open(url.rstrip("/") + "/health", timeout=timeout_seconds) as response:
    return json.loads(response.read())


def get_limits(url: str, timeout_seconds: float = 5.0) -> dict[str, int]:
  """The request limits (LIMITS) the server at `url` reports on /health; {}
  when it does not answer, or does not report them."""
  try:
    health = get_health(url, timeout_seconds)
  except (*RETRYABLE, ValueError):
    return {}
  if not isinstance(health, dict):
    return {}
  return {name: health[name] for name in LIMITS if isinstance(health.get(name), int)}


class LaunchedServer:
  """A reward server subprocess on a free loopback port, stopped at exit.

  `start` returns at once; `wait` blocks until /health answers (so the
  models load while the trainer compiles). Thread-safe. The server writes its
  port to a pipe (--port_fd) rather than to a file, and watches our pid
  (--parent_pid), so that a trainer killed without any clean-up (SIGKILL)
  leaves neither a process nor a file behind.
  """

  def __init__(self, server_args: str, startup_timeout_seconds: float):
    self.startup_timeout_seconds = startup_timeout_seconds
    self.server_args = server_args
    self.command = self._command(port_fd=-1)  # its real --port_fd once started
    self.url: str | None = None
    self._lock = threading.Lock()
    self.process: subprocess.Popen | None = None
    self._port_pipe: int | None = None  # the reading end, until the port is read from it
    self._port_text = b""
    self.port: int | None = None

  def _command(self, port_fd: int) -> list[str]:
    return [
      sys.executable,
      "-m",
      "ddpo_jax.reward_server",
      "--host=127.0.0.1",
      "--port=0",
      f"--port_fd={port_fd}",
      f"--parent_pid={os.getpid()}",
      "--log_level=WARNING",  # no line per request amid the trainer's output
      *shlex.split(self.server_args),
    ]

  def start(self) -> None:
    # The child finds ddpo_jax where we did, whatever its working directory.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    read_fd, write_fd = os.pipe()
    self.command = self._command(write_fd)
    try:
      self.process = subprocess.Popen(self.command, env=env, pass_fds=(write_fd,))
    except BaseException:
      os.close(read_fd)
      raise
    finally:
      os.close(write_fd)  # the child's copy is the only one: EOF once it exits
    self._port_pipe = read_fd
    atexit.register(self.stop)

  def _read_port(self, timeout_seconds: float) -> int | None:
    """The port the server wrote to its pipe, waiting up to timeout_seconds for it; None until then."""
    if self._port_pipe is None:
      if self.port is None:
        time.sleep(timeout_seconds)  # the pipe closed without a port: the process is exiting
      return self.port
    ready, _, _ = select.select([self._port_pipe], [], [], timeout_seconds)
    if ready:
      chunk = os.read(self._port_pipe, 64)
      self._port_text += chunk
      if not chunk or b"\n" in self._port_text:
        os.close(self._port_pipe)
        self._port_pipe = None
        if b"\n" in self._port_text:
          self.port = int(self._port_text.split(b"\n")[0])
    return self.port

  def wait(self) -> str:
    """The server's URL once /health answers; RewardServerError if it exits or times out."""
    with self._lock:
      if self.url:
        return self.url
      deadline = time.time() + self.startup_timeout_seconds
      while time.time() < deadline:
        code = self.process.poll()
        if code is not None:
          raise RewardServerError(
            f"the reward server launched by prompt_alignment exited with code {code} before it was ready "
            f"(its errors are above); command: {shlex.join(self.command)}"
          )
        port = self._read_port(0.2)
        if port is None:
          continue
        url = f"http://127.0.0.1:{port}"
        try:
          get_health(url)
          self.url = url
          return url
        except RETRYABLE:
          time.sleep(0.2)
      raise RewardServerError(
        f"the reward server launched by prompt_alignment was not ready after {self.startup_timeout_seconds} s; "
        f"command: {shlex.join(self.command)}"
      )

  def stop(self) -> None:
    if self.process is not None and self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(10)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    # A `wait` in progress (it holds the lock) closes the pipe itself, seeing the process gone.
    if self._lock.acquire(blocking=False):
      try:
        if self._port_pipe is not None:
          os.close(self._port_pipe)
          self._port_pipe = None
      finally:
        self._lock.release()


@register("prompt_alignment")
def prompt_alignment(
  url: str = DEFAULT_URL,
  timeout_seconds: float = 120.0,
  max_retries: int = 5,
  backoff_seconds: float = 1.0,
  batch_size: int = 16,
  image_format: str = "PNG",
  launch_server: bool = False,
  server_args: str = "--model=tiny-random",
  startup_timeout_seconds: float = 600.0,
) -> RewardFn:
  """Reward = BERTScore recall of the served captioner's answer, float32 [B].

  url: the server (ignored with launch_server). timeout_seconds: per request.
  max_retries, backoff_seconds: on transport failures and 5xx, retries after
  1, 2, 4, ... x backoff_seconds; then a RewardServerError. batch_size: images
  per request (a batch is split into requests of this many, sent one after
  the other). image_format: "PNG" (lossless) or "JPEG" (quality 95, smaller).
  launch_server: start `python -m ddpo_jax.reward_server {server_args}` here,
  waiting up to startup_timeout_seconds for it at the first call.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if image_format not in protocol.IMAGE_FORMATS:
    raise ValueError(f"image_format must be one of {protocol.IMAGE_FORMATS}, got {image_format!r}")
  server = None
  if launch_server:
    server = LaunchedServer(server_args, startup_timeout_seconds)
    server.start()

  limits_by_url = {}  # what each server reported on /health, once it did

  def reward(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    images = check_images(images)
    if len(prompts) != len(images):
      raise ValueError(f"prompt_alignment got {len(images)} images but {len(prompts)} prompts")
    target = server.wait() if server else url
    if target not in limits_by_url:
      limits = get_limits(target, min(timeout_seconds, 5.0))  # {}: not up yet; the retries below wait for it
      if limits:
        limits_by_url[target] = limits
    rewards = []
    for start in range(0, len(images), batch_size):
      chunk = slice(start, start + batch_size)
      body = protocol.encode_request(images[chunk], prompts[chunk], image_format)
      num_images = len(images[chunk])
      num_pixels = num_images * images.shape[1] * images.shape[2]
      check_request(target, limits_by_url.get(target, {}), num_images, len(body), num_pixels)
      response = score_with_retries(target, body, timeout_seconds, max_retries, backoff_seconds, num_images)
      try:
        values, _ = protocol.decode_response(response, len(images[chunk]))
      except protocol.ProtocolError as e:
        raise RewardServerError(f"reward server at {target} answered out of protocol: {e}") from e
      rewards.append(values)
    return np.concatenate(rewards) if rewards else np.zeros([0], np.float32)

  reward.server = server  # the launched server (or None), for tests and clean-up
  return reward
