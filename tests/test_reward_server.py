"""The prompt-alignment reward server and its client, on loopback.

One real server subprocess of tiny random models serves the module (started
as the reward's launch_server does: port 0, --port_file); the retry tests use
in-process servers with fake scorers. The last test trains one epoch of the
tiny preset against the live server (~40 s of compilation).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
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
  assert launched.process.poll() is not None and not os.path.exists(launched.directory)


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


def _png(size: int = 8) -> str:
  return protocol.encode_image(np.zeros((size, size, 3), np.uint8))


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
  ],
)
def test_bad_requests_get_400(live_server, body, message):
  url, _ = live_server
  status, data = _post(url, body)
  assert status == 400 and message in data["error"], data
  _assert_healthy(url)


def test_oversized_request_gets_413(live_server):
  url, _ = live_server
  status, data = _post(url, b" " * (MAX_REQUEST_BYTES + 1))
  assert status == 413 and "max_request_bytes" in data["error"]
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
  # The client says what to change, without retrying.
  reward = rewards.make("prompt_alignment", url=url, batch_size=64, max_retries=3, backoff_seconds=10)
  start = time.time()
  with pytest.raises(client.RewardServerError, match="413.*batch_size"):
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
  _, launched = live_server
  assert launched.process.poll() is None
  assert os.path.exists(launched.port_file)


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


def _serve(scorer, port: int = 0) -> server_lib.RewardServer:
  httpd = server_lib.RewardServer(("127.0.0.1", port), scorer)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  return httpd


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
