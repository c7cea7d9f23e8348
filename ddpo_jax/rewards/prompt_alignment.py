r"""Prompt-image alignment (DDPO's VLM task), scored by a reward server.

The reward of an image is the BERTScore recall of LLaVA's answer to "What is
happening in this image?" against "The image contains {prompt}", in [-1, 1]
and in practice about [0.5, 1]. The models run in `ddpo_jax.reward_server`, a
separate process (torch, its own GPU); this client posts each batch to it as
PNGs in JSON (`ddpo_jax.reward_server.protocol`) with urllib:

    python -m ddpo_jax.reward_server --model=llava-hf/llava-1.5-7b-hf --port=8765

With `launch_server=True` the client starts the server itself, with
`server_args`, on a free loopback port, and stops it when Python exits.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
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
) -> bytes:
  """`post_score`, tried again after backoff_seconds * 2**k (k = 0, 1, ...) on
  transport failures and 5xx, at most `max_retries` more times.

  Raises RewardServerError at once on 4xx (retrying the same request cannot
  help) and after the last try otherwise, naming the URL and how to start it.
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
        hint = " (lower config.reward.kwargs.batch_size or raise --max_request_bytes)" if e.code == 413 else ""
        raise RewardServerError(f"reward server at {url} refused the request: HTTP {e.code}: {message}{hint}") from e
      last = f"HTTP {e.code}: {message}"
    except RETRYABLE as e:
      last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
  raise RewardServerError(
    f"reward server at {url} did not answer after {max_retries + 1} tries (last: {last}); {START_HINT}."
  )


def get_health(url: str, timeout_seconds: float = 5.0) -> dict:
  """The /health answer of the server at `url`; raises RETRYABLE or HTTPError if none."""
  with _OPENER.open(url.rstrip("/") + "/health", timeout=timeout_seconds) as response:
    return json.loads(response.read())


class LaunchedServer:
  """A reward server subprocess on a free loopback port, stopped at exit.

  `start` returns at once; `wait` blocks until /health answers (so the
  models load while the trainer compiles). Thread-safe.
  """

  def __init__(self, server_args: str, startup_timeout_seconds: float):
    self.startup_timeout_seconds = startup_timeout_seconds
    self.directory = tempfile.mkdtemp(prefix="ddpo_reward_server_")
    self.port_file = os.path.join(self.directory, "port")
    self.command = [
      sys.executable,
      "-m",
      "ddpo_jax.reward_server",
      "--host=127.0.0.1",
      "--port=0",
      f"--port_file={self.port_file}",
      f"--parent_pid={os.getpid()}",
      "--log_level=WARNING",  # no line per request amid the trainer's output
      *shlex.split(server_args),
    ]
    self.url: str | None = None
    self._lock = threading.Lock()
    self.process: subprocess.Popen | None = None

  def start(self) -> None:
    # The child finds ddpo_jax where we did, whatever its working directory.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    self.process = subprocess.Popen(self.command, env=env)
    atexit.register(self.stop)

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
        if os.path.exists(self.port_file):
          with open(self.port_file) as f:
            url = f"http://127.0.0.1:{int(f.read())}"
          try:
            get_health(url)
            self.url = url
            return url
          except RETRYABLE:
            pass
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
    shutil.rmtree(self.directory, ignore_errors=True)


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

  def reward(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    images = check_images(images)
    if len(prompts) != len(images):
      raise ValueError(f"prompt_alignment got {len(images)} images but {len(prompts)} prompts")
    target = server.wait() if server else url
    rewards = []
    for start in range(0, len(images), batch_size):
      chunk = slice(start, start + batch_size)
      body = protocol.encode_request(images[chunk], prompts[chunk], image_format)
      response = score_with_retries(target, body, timeout_seconds, max_retries, backoff_seconds)
      try:
        values, _ = protocol.decode_response(response, len(images[chunk]))
      except protocol.ProtocolError as e:
        raise RewardServerError(f"reward server at {target} answered out of protocol: {e}") from e
      rewards.append(values)
    return np.concatenate(rewards) if rewards else np.zeros([0], np.float32)

  reward.server = server  # the launched server (or None), for tests and clean-up
  return reward
