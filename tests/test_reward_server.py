"""The prompt-alignment reward server and its client, on loopback.

One real server subprocess of tiny random models serves the module (started
as the reward's launch_server does: port 0, --port_fd); the retry and limit
tests use in-process servers with fake scorers. The last test trains one
epoch of the tiny preset against the live server (~40 s of compilation).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from ddpo_jax import config_utils
from ddpo_jax import rewards
from ddpo_jax.reward_server import protocol
from ddpo_jax.reward_server import server as server_lib
from ddpo_jax.rewards import prompt_alignment as client

MAX_REQUEST_BYTES = 1_000_000


@pytest.fixture(scope="module")
def live_server():
  """(url, LaunchedServer) of one tiny-random server subprocess."""
  launched = client.LaunchedServer(
    f"--model=tiny-random --torch_threads=1 --max_request_bytes={MAX_REQUEST_BYTES}", startup_timeout_seconds=120
  )
  launched.start()
  try:
    yield launched.wait(), launched
  finally:
    launched.stop()
  assert launched.process.poll() is not None


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _post(url: str, body: bytes, path: str = "/score") -> tuple[int, dict]:
  """(status, JSON body) of a raw POST."""
  request = urllib.request.Request(url + path, data=body, method="POST")
  try:
    with urllib.request.urlopen(request, timeout=30) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _assert_healthy(url: str) -> None:
  health = client.get_health(url)
  assert health["status"] == "ok" and health["model"] == "tiny-random"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# --- The live server ---------------------------------------------------------


def test_round_trip(live_server):
  url, _ = live_server
  images = _images(5)
  prompts = ["a cat riding a bike", "a dog playing chess", "", "a red circle on a plain orange background", "x"]
  status, data = _post(url, protocol.encode_request(images, prompts))
  assert status == 200
  assert len(data["rewards"]) == 5 and all(isinstance(c, str) for c in data["captions"])
  assert all(np.isfinite(data["rewards"]))
  # The registered reward splits the batch into requests of batch_size.
  reward = rewards.make("prompt_alignment", url=url, batch_size=2)
  values = reward(images, prompts)
  assert values.dtype == np.float32 and values.shape == (5,)
  # Greedy decoding: the same images score the same, however they are batched.
  np.testing.assert_allclose(values, data["rewards"], atol=1e-5)


def test_health(live_server):
  url, _ = live_server
  health = client.get_health(url)
  assert health["bert_model"] == "tiny-random" and "What is happening in this image?" in health["chat_prompt"]
  assert health["max_request_bytes"] == MAX_REQUEST_BYTES
  assert health["max_request_pixels"] == server_lib.DEFAULT_MAX_REQUEST_PIXELS
  assert client.get_limits(url) == {
    "max_request_bytes": MAX_REQUEST_BYTES,
    "max_request_pixels": server_lib.DEFAULT_MAX_REQUEST_PIXELS,
  }


def _png(size: int = 8, width: int | None = None) -> str:
  return protocol.encode_image(np.zeros((size, size if width is None else width, 3), np.uint8))


def _request(*images: str) -> bytes:
  return json.dumps({"images": list(images), "prompts": ["a"] * len(images)}).encode()


@pytest.mark.parametrize(
  "body, message",
  [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"prompts": ["a"]}).encode(), "no field 'images'"),
    (json.dumps({"images": [_png()]}).encode(), "no field 'prompts'"),
    (json.dumps({"images": _png(), "prompts": ["a"]}).encode(), "must be a list"),
    (json.dumps({"images": [_png(), _png()], "prompts": ["a"]}).encode(), "2 images but 1 prompts"),
    (json.dumps({"images": [_png()], "prompts": [3]}).encode(), "prompts[0] must be a string"),
    (json.dumps({"images": [], "prompts": []}).encode(), "empty"),
    (json.dumps({"images": ["not base64!"], "prompts": ["a"]}).encode(), "not valid base64"),
    (json.dumps({"images": ["aGVsbG8="], "prompts": ["a"]}).encode(), "not a decodable PNG or JPEG"),
    (json.dumps({"images": [_png()[:40]], "prompts": ["a"]}).encode(), "images[0]"),
    (json.dumps({"images": [7], "prompts": ["a"]}).encode(), "base64 string"),
    # No answer at all before: RecursionError and ValueError escaped the handler.
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON: RecursionError"),
    (b'{"images": [], "prompts": [], "n": ' + b"7" * 5000 + b"}", "not valid JSON: ValueError"),
    # Refused before the captioner upscales a sliver (HTTP 500, or 43 s and 11 GB at 1 x 1M px).
    (_request(_png(1, 32)), "images[0] is 32x1, under the smallest side of 8 pixels"),
    (_request(_png(16), _png(32, 1)), "images[1] is 1x32, under the smallest side"),
    (_request(_png(1, 1)), "under the smallest side"),
    (_request(_png(8, 33)), "images[0] is 33x8, its long side over 4 times its short side"),
  ],
)
def test_bad_requests_get_400(live_server, body, message):
  url, _ = live_server
  status, data = _post(url, body)
  assert status == 400 and message in data["error"], data
  _assert_healthy(url)


def test_smallest_and_thinnest_images_are_scored(live_server):
  url, _ = live_server
  status, data = _post(url, _request(_png(8), _png(8, 32), _png(32, 8)))
  assert status == 200 and len(data["rewards"]) == 3


def test_oversized_request_gets_413(live_server):
  url, _ = live_server
  status, data = _post(url, b" " * (MAX_REQUEST_BYTES + 1))
  assert status == 413 and "max_request_bytes" in data["error"] and "batch_size" in data["error"]
  # A huge Content-Length is refused before any body is sent.
  host, port = url.removeprefix("http://").split(":")
  connection = http.client.HTTPConnection(host, int(port), timeout=10)
  connection.putrequest("POST", "/score")
  connection.putheader("Content-Length", str(10**12))
  connection.endheaders()
  response = connection.getresponse()
  assert response.status == 413
  connection.close()
  _assert_healthy(url)
  # The client says what to change, without sending or retrying.
  reward = rewards.make("prompt_alignment", url=url, batch_size=64, max_retries=3, backoff_seconds=10)
  start = time.time()
  with pytest.raises(client.RewardServerError, match=f"max_request_bytes={MAX_REQUEST_BYTES}.*batch_size to "):
    reward(_images(64, 64), ["a"] * 64)
  assert time.time() - start < 5


def test_unknown_path_gets_404(live_server):
  url, _ = live_server
  with pytest.raises(urllib.error.HTTPError) as info:
    urllib.request.urlopen(url + "/nope", timeout=10)
  assert info.value.code == 404
  status, data = _post(url, b"{}", path="/predict")
  assert status == 404 and "/score" in data["error"]
  _assert_healthy(url)


def test_launched_server_runs(live_server):
  url, launched = live_server
  assert launched.process.poll() is None
  assert url == f"http://127.0.0.1:{launched.port}"


TRAINER = """
import sys, time
from ddpo_jax.rewards import prompt_alignment
reward = prompt_alignment.prompt_alignment(launch_server=True, server_args=sys.argv[1], startup_timeout_seconds=60)
print("launched", reward.server.process.pid, reward.server.wait(), flush=True)
time.sleep(60)
"""


def _running(pid: int) -> bool:
  """Whether process `pid` runs (a zombie, exited but not reaped by its new parent, does not)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def test_launched_server_leaves_nothing_when_the_trainer_is_killed(tmp_path):
  """SIGKILL runs no clean-up in the trainer: the server must notice and leave no process nor folder."""
  tmp = tmp_path / "tmp"
  tmp.mkdir()
  args = "--model=tiny-random --torch_threads=1"
  trainer = subprocess.Popen(
    [sys.executable, "-c", TRAINER, args], env=dict(os.environ, TMPDIR=str(tmp)), stdout=subprocess.PIPE, text=True
  )
  try:
    line = ""
    while not line.startswith("launched "):  # the server's own lines come here too
      line = trainer.stdout.readline()
      assert line, "the trainer exited"
    _, pid, url = line.split()
    _assert_healthy(url)
  finally:
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    trainer.stdout.close()
  deadline = time.time() + 5
  while time.time() < deadline and (_running(int(pid)) or any(n.startswith("ddpo_") for n in os.listdir(tmp))):
    time.sleep(0.1)
  assert not _running(int(pid)), "the server outlived its trainer"
  # torch's own compile cache (torchinductor_USER) is meant to stay, as it would in /tmp.
  assert [name for name in os.listdir(tmp) if not name.startswith("torchinductor_")] == [], "files left behind"


# --- Retries, with in-process servers ----------------------------------------


class FakeScorer:
  """Rewards = mean pixel / 255; fails its first `failures` calls."""

  def __init__(self, failures: int = 0):
    self.failures = failures
    self.calls = 0

  def info(self) -> dict:
    return {"model": "fake"}

  def score(self, images, prompts):
    self.calls += 1
    if self.calls <= self.failures:
      raise RuntimeError("flaky")
    return np.array([np.asarray(im).mean() / 255 for im in images], np.float32), ["a caption"] * len(images)


def _serve(scorer, port: int = 0, *args, **kwargs) -> server_lib.RewardServer:
  httpd = server_lib.RewardServer(("127.0.0.1", port), scorer, *args, **kwargs)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  return httpd


@pytest.fixture
def serve():
  """`_serve`, each server shut down after the test."""
  servers = []

  def start(scorer=None, *args, **kwargs):
    servers.append(_serve(scorer or FakeScorer(), 0, *args, **kwargs))
    return servers[-1], f"http://127.0.0.1:{servers[-1].port}"

  yield start
  for httpd in servers:
    httpd.shutdown()
    httpd.server_close()


def _exchange(port: int, data: bytes, timeout_seconds: float = 5) -> tuple[int, dict, bytes]:
  """(status, headers, body) of the answer to raw bytes sent on a new connection."""
  with socket.create_connection(("127.0.0.1", port), timeout=timeout_seconds) as s:
    try:
      s.sendall(data)
    except OSError:  # the server answered and closed before reading it all
      pass
    answer = b""
    while chunk := s.recv(1 << 16):
      answer += chunk
  head, _, body = answer.partition(b"\r\n\r\n")
  status_line, *header_lines = head.decode("latin-1").split("\r\n")
  headers = dict(line.split(": ", 1) for line in header_lines)
  return int(status_line.split()[1]), headers, body


def _expected(images: np.ndarray) -> np.ndarray:
  return images.reshape(len(images), -1).mean(-1) / 255


def test_client_retries_until_the_server_is_up():
  port = _free_port()
  started = []
  timer = threading.Timer(0.5, lambda: started.append(_serve(FakeScorer(), port)))
  timer.start()
  try:
    reward = rewards.make("prompt_alignment", url=f"http://127.0.0.1:{port}", max_retries=8, backoff_seconds=0.05)
    images = _images(3)
    np.testing.assert_allclose(reward(images, ["a", "b", "c"]), _expected(images), rtol=1e-6)
  finally:
    timer.join()
    for httpd in started:
      httpd.shutdown()
      httpd.server_close()


def test_client_retries_server_errors():
  scorer = FakeScorer(failures=2)
  httpd = _serve(scorer)
  try:
    url = f"http://127.0.0.1:{httpd.port}"
    images = _images(2)
    values = rewards.make("prompt_alignment", url=url, max_retries=3, backoff_seconds=0.01)(images, ["a", "b"])
    np.testing.assert_allclose(values, _expected(images), rtol=1e-6)
    assert scorer.calls == 3
    scorer.failures, scorer.calls = 10, 0
    with pytest.raises(client.RewardServerError, match="HTTP 500.*flaky"):
      rewards.make("prompt_alignment", url=url, max_retries=1, backoff_seconds=0.01)(images, ["a", "b"])
  finally:
    httpd.shutdown()
    httpd.server_close()


def test_client_is_thread_safe():
  httpd = _serve(FakeScorer())
  try:
    reward = rewards.make("prompt_alignment", url=f"http://127.0.0.1:{httpd.port}", batch_size=3)
    batches = [_images(7, seed=s) for s in range(8)]
    results = [None] * len(batches)

    def run(i):
      results[i] = reward(batches[i], ["p"] * 7)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batches))]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    for images, values in zip(batches, results):
      np.testing.assert_allclose(values, _expected(images), rtol=1e-6)
  finally:
    httpd.shutdown()
    httpd.server_close()


def test_client_dead_port_raises_clear_error_quickly():
  url = f"http://127.0.0.1:{_free_port()}"
  reward = rewards.make("prompt_alignment", url=url, max_retries=2, backoff_seconds=0.01, timeout_seconds=1)
  start = time.time()
  with pytest.raises(client.RewardServerError) as info:
    reward(_images(1), ["a"])
  assert time.time() - start < 5
  message = str(info.value)
  assert url in message and "python -m ddpo_jax.reward_server" in message and "3 tries" in message


def test_client_checks_its_inputs():
  reward = rewards.make("prompt_alignment")
  with pytest.raises(ValueError, match="uint8"):
    reward(np.zeros((1, 8, 8, 3), np.float32), ["a"])
  with pytest.raises(ValueError, match="2 images but 1 prompts"):
    reward(_images(2), ["a"])


# --- Limits, with in-process servers ------------------------------------------


def test_request_pixels_are_capped_before_decoding(serve, monkeypatch):
  """24 black 4096 x 4096 PNGs: 1.6 MB of body, 1.2 GB of pixels once decoded."""
  scorer = FakeScorer()
  httpd, url = serve(scorer)
  decoded = []
  convert = protocol.Image.Image.convert
  monkeypatch.setattr(protocol.Image.Image, "convert", lambda *a, **k: decoded.append(1) or convert(*a, **k))
  status, data = _post(url, _request(*[_png(4096)] * 24))
  assert status == 413, data
  assert f"--max_request_pixels={server_lib.DEFAULT_MAX_REQUEST_PIXELS}" in data["error"]
  assert "at most 4 images of 4096x4096 fit" in data["error"] and "batch_size" in data["error"]
  assert decoded == [] and scorer.calls == 0
  assert client.get_limits(url)["max_request_pixels"] == server_lib.DEFAULT_MAX_REQUEST_PIXELS


def test_request_pixels_limit_is_a_setting(serve):
  _, url = serve(max_request_pixels=3 * 32 * 32)
  assert _post(url, _request(*[_png(32)] * 3))[0] == 200
  status, data = _post(url, _request(*[_png(32)] * 4))
  assert status == 413 and "--max_request_pixels=3072 (at most 3 images of 32x32 fit)" in data["error"]
  # The client knows the limit from /health and says so before sending.
  reward = rewards.make("prompt_alignment", url=url, batch_size=4, max_retries=3, backoff_seconds=10)
  with pytest.raises(
    client.RewardServerError, match="4096 pixels, over the --max_request_pixels=3072.*batch_size to 3"
  ):
    reward(_images(4), ["a"] * 4)


class BlockingScorer(FakeScorer):
  """A FakeScorer whose first call waits for `release`."""

  def __init__(self):
    super().__init__()
    self.entered, self.release = threading.Event(), threading.Event()

  def score(self, images, prompts):
    if self.calls == 0:
      self.entered.set()
      self.release.wait(10)
    return super().score(images, prompts)


def test_decodes_wait_for_a_slot(serve, monkeypatch):
  """With one slot, a request's images are decoded only once the one before is scored."""
  scorer = BlockingScorer()
  _, url = serve(scorer, max_concurrent_decodes=1)
  decoded = []
  load_image = protocol.load_image
  monkeypatch.setattr(protocol, "load_image", lambda image, i=0: decoded.append(i) or load_image(image, i))
  results = []
  post = lambda n: results.append(_post(url, _request(*[_png(8)] * n)))
  threads = [threading.Thread(target=post, args=(n,)) for n in (2, 3)]
  threads[0].start()
  assert scorer.entered.wait(10)
  threads[1].start()
  time.sleep(0.5)
  assert decoded == [0, 1]  # the second request waits, undecoded
  scorer.release.set()
  for t in threads:
    t.join(10)
  assert decoded == [0, 1, 0, 1, 2] and sorted(status for status, _ in results) == [200, 200]


def test_client_refuses_an_over_limit_body_at_once(serve, monkeypatch):
  """The server reads at most DRAIN_LIMIT_BYTES of a refused body, then resets the connection: the
  client, which would see the reset rather than the 413, checks the limit it learnt from /health."""
  monkeypatch.setattr(server_lib, "DRAIN_LIMIT_BYTES", 1_000_000)  # as with the defaults: drain = limit
  _, url = serve(None, 1_000_000)
  images = _images(32, 256)  # 11 MB of PNGs: more than the socket buffers take before the reset
  reward = rewards.make("prompt_alignment", url=url, batch_size=32, max_retries=2, backoff_seconds=2)
  start = time.time()
  with pytest.raises(client.RewardServerError) as info:
    reward(images, ["a"] * 32)
  message = str(info.value)
  assert "did not answer" not in message
  assert re.search(r"over the --max_request_bytes=1000000 .*batch_size to 3 or less", message), message
  assert time.time() - start < 3  # retries would take 2 + 4 s


def test_a_reset_while_sending_an_over_limit_body_is_final(serve, monkeypatch):
  """Without the check before sending (limits not known then): the reset is not retried."""
  monkeypatch.setattr(server_lib, "DRAIN_LIMIT_BYTES", 1_000_000)
  _, url = serve(None, 1_000_000)
  body = b" " * (32 << 20)
  start = time.time()
  with pytest.raises(client.RewardServerError) as info:
    client.score_with_retries(url, body, 10, 2, 2)
  message = str(info.value)
  assert "did not answer" not in message and "over the --max_request_bytes=1000000" in message, message
  assert time.time() - start < 3  # retries would take 2 + 4 s


@pytest.mark.parametrize(
  "request_bytes, status, message",
  [
    (b"PUT /score HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 501, "Unsupported method ('PUT')"),
    (b"DELETE /score HTTP/1.1\r\n\r\n", 501, "the endpoints are GET /health, POST /score"),
    (b"PATCH /health HTTP/1.1\r\n\r\n", 501, "PATCH"),
    (b"HEAD /health HTTP/1.1\r\n\r\n", 501, None),  # no body for HEAD
    (b"garbage\r\n\r\n", 400, "Bad request syntax"),
    (b"GET /health HTTP/9.x\r\n\r\n", 400, "Bad request version"),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414, "URI Too Long"),
    (b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, "Line too long"),
    (b"GET /health HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431, "Too many headers"),
  ],
)
def test_every_error_is_json(serve, request_bytes, status, message):
  httpd, url = serve()
  got, headers, body = _exchange(httpd.port, request_bytes)
  assert got == status and headers["Content-Type"] == "application/json", (got, headers, body[:200])
  if message is None:
    assert body == b""
  else:
    assert message in json.loads(body)["error"]
  _assert_fake_healthy(url)


def _assert_fake_healthy(url: str) -> None:
  assert client.get_health(url)["model"] == "fake"


def test_slow_requests_get_408_at_their_deadline(serve):
  httpd, url = serve(request_timeout_seconds=0.5)
  partial = [
    b"POST /score HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + b"x" * 10,  # a body that stops
    b"POST /score HTTP/1.1\r\nHost: x\r\n",  # headers that stop
  ]
  for data in partial:
    start = time.time()
    status, headers, body = _exchange(httpd.port, data, timeout_seconds=3)
    assert status == 408 and "--request_timeout_seconds=0.5" in json.loads(body)["error"]
    assert 0.4 < time.time() - start < 1.5
  # Trickling keeps each recv short but not the whole request.
  with socket.create_connection(("127.0.0.1", httpd.port), timeout=3) as s:
    start = time.time()
    s.sendall(b"POST /score HTTP/1.1\r\n")
    with pytest.raises(OSError):  # the server answers and closes, then resets what comes after
      while time.time() - start < 3:
        s.sendall(b"X: y\r\n")
        time.sleep(0.05)
    assert time.time() - start < 1.5
  _assert_fake_healthy(url)


def test_connections_over_the_cap_get_503_at_once(serve):
  httpd, url = serve(max_connections=2)
  idle = [socket.create_connection(("127.0.0.1", httpd.port)) for _ in range(2)]
  try:
    time.sleep(0.3)  # both accepted, each holding a thread
    start = time.time()
    status, headers, body = _exchange(httpd.port, b"GET /health HTTP/1.1\r\n\r\n")
    assert status == 503 and headers["Content-Type"] == "application/json"
    assert "--max_connections=2" in json.loads(body)["error"] and time.time() - start < 1
    # The client treats a 503 as a busy server: it retries.
    with pytest.raises(client.RewardServerError, match="2 tries.*HTTP 503"):
      client.score_with_retries(url, _request(_png(8)), 5, max_retries=1, backoff_seconds=0.01)
  finally:
    for s in idle:
      s.close()
  deadline = time.time() + 3
  while time.time() < deadline:
    try:
      _assert_fake_healthy(url)
      break
    except urllib.error.HTTPError:
      time.sleep(0.1)
  _assert_fake_healthy(url)


def test_server_settings_must_be_positive():
  with pytest.raises(ValueError, match="max_connections must be positive"):
    server_lib.RewardServer(("127.0.0.1", 0), None, max_connections=0)
  with pytest.raises(SystemExit):
    server_lib.parse_args(["--max_request_pixels=0"])


# --- Protocol and BERTScore ---------------------------------------------------


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_image_encoding(image_format):
  images = _images(2, 16)
  decoded = [np.asarray(protocol.decode_image(protocol.encode_image(im, image_format))) for im in images]
  assert all(d.shape == (16, 16, 3) and d.dtype == np.uint8 for d in decoded)
  if image_format == "PNG":
    np.testing.assert_array_equal(np.stack(decoded), images)


def test_response_carries_non_finite_as_nan():
  body = protocol.encode_response(np.array([0.5, np.nan, np.inf]), ["a", "b", "c"])
  assert json.loads(body)["rewards"] == [0.5, None, None]
  values, captions = protocol.decode_response(body, 3)
  assert values.dtype == np.float32 and values[0] == 0.5 and np.isnan(values[1:]).all()
  assert captions == ["a", "b", "c"]
  with pytest.raises(protocol.ProtocolError, match="for 2 images"):
    protocol.decode_response(body, 2)


def _numpy_recall(candidate, candidate_mask, reference, reference_mask):
  """BERTScore recall by hand: per reference token the best cosine over candidate tokens, averaged."""
  out = []
  for c, cm, r, rm in zip(candidate, candidate_mask, reference, reference_mask):
    c = c[cm] / np.linalg.norm(c[cm], axis=-1, keepdims=True)
    r = r[rm] / np.linalg.norm(r[rm], axis=-1, keepdims=True)
    out.append((r @ c.T).max(axis=1).mean())
  return np.array(out)


def test_recall_matches_numpy():
  import torch

  from ddpo_jax.reward_server import scorers

  rng = np.random.default_rng(0)
  candidate, reference = rng.normal(size=(3, 5, 8)), rng.normal(size=(3, 4, 8))
  candidate_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]], bool)
  reference_mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]], bool)
  got = scorers.recall_from_embeddings(*map(torch.tensor, (candidate, candidate_mask, reference, reference_mask)))
  np.testing.assert_allclose(got.numpy(), _numpy_recall(candidate, candidate_mask, reference, reference_mask), 1e-5)
  # A sentence against itself: every token finds itself, recall 1.
  same = scorers.recall_from_embeddings(*map(torch.tensor, (reference, reference_mask, reference, reference_mask)))
  np.testing.assert_allclose(same.numpy(), 1.0, rtol=1e-5)
  # No candidate token: 0.
  no_tokens = np.zeros_like(candidate_mask)
  empty = scorers.recall_from_embeddings(*map(torch.tensor, (candidate, no_tokens, reference, reference_mask)))
  np.testing.assert_array_equal(empty.numpy(), 0.0)


def test_bert_scorer_on_tiny_bert(tmp_path):
  from ddpo_jax.reward_server import scorers

  _, bert_dir = scorers.build_tiny_models(str(tmp_path))
  bert = scorers.BertScorer(bert_dir, device="cpu")
  assert bert.layer == 2  # the last, for a model bert_score does not know
  reference = "The image contains a cat riding a bike"
  values = bert.recall([reference, "a dog playing chess", "cat"], [reference] * 3)
  assert values.dtype == np.float32
  np.testing.assert_allclose(values[0], 1.0, rtol=1e-5)
  assert (values[1:] < 0.999).all()
  # Special tokens do not count: the mask covers the 8 words only.
  _, mask = bert.embed([reference])
  assert int(mask.sum()) == 8


# --- Training against the live server ----------------------------------------


def test_tiny_preset_trains_an_epoch_against_the_server(live_server, tmp_path):
  from ddpo_jax import train

  url, _ = live_server
  config = config_utils.get_config("configs/prompt_alignment.py:tiny")
  assert config.reward.kwargs.launch_server and config.prompt.name == "toy_scenes"
  config.num_epochs = 1
  # 2 DDIM steps (128 transitions, one step of 2 x 64) instead of 10: the path
  # under test is the reward's, and the training pass compiles 5x faster.
  config.sample.num_steps = 2
  config.train.gradient_accumulation_steps = 2
  config.reward.kwargs.url = url
  config.reward.kwargs.launch_server = False
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["epoch"] == 0 and summary["samples"] == 64
  assert 0 < summary["reward_mean"] <= 1 and np.isfinite(summary["loss"])
