"""ddpo_jax/models/attention.py: each implementation against softmax(q kᵀ · scale) v in NumPy."""

import importlib.util

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from ddpo_jax.models import attention
from ddpo_jax.models import layers


def _numpy_attention(q, k, v, scale, mask=None):
  """(out [B, T, H, D], probs [B, H, T, S]) in float64; mask broadcastable to [B, H, T, S], True: attend."""
  scores = np.einsum("bqhd,bshd->bhqs", q, k) * scale
  if mask is not None:
    scores = np.where(mask, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhqs,bshd->bqhd", probs, v), probs


def _numpy_grads(q, k, v, d_out, scale, mask=None):
  """dq, dk, dv of sum(out * d_out) by the chain rule through the softmax (masked probabilities are 0)."""
  _, probs = _numpy_attention(q, k, v, scale, mask)
  dv = np.einsum("bhqs,bqhd->bshd", probs, d_out)
  d_probs = np.einsum("bqhd,bshd->bhqs", d_out, v)
  d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdims=True)) * scale
  return np.einsum("bhqs,bshd->bqhd", d_scores, k), np.einsum("bhqs,bqhd->bshd", d_scores, q), dv


def _inputs(batch, length, num_keys, heads, depth, seed=0):
  """float64 q [B, T, H, D], k, v [B, S, H, D] and an output cotangent [B, T, H, D]."""
  rng = np.random.default_rng(seed)
  q, d_out = rng.standard_normal((2, batch, length, heads, depth))
  k, v = rng.standard_normal((2, batch, num_keys, heads, depth))
  return q, k, v, d_out


def _check_values_and_grads(fn, shape, scale=0.5, mask=None, rtol=1e-4, atol=2e-5):
  q, k, v, d_out = _inputs(*shape)
  f32 = [x.astype(np.float32) for x in (q, k, v)]
  out = jax.jit(lambda q, k, v: fn(q, k, v, mask=mask, scale=scale))(*f32)
  np.testing.assert_allclose(out, _numpy_attention(q, k, v, scale, mask)[0], rtol=1e-5, atol=1e-5)
  loss = lambda q, k, v: (fn(q, k, v, mask=mask, scale=scale) * d_out.astype(np.float32)).sum()
  for got, want in zip(jax.jit(jax.grad(loss, (0, 1, 2)))(*f32), _numpy_grads(q, k, v, d_out, scale, mask)):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


# [B, T, S, H, D]: self-attention, and cross-attention on 77 text tokens.
SHAPES = [(2, 64, 64, 3, 8), (2, 16, 77, 2, 4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name, block_bytes", [("xla", 0), ("blocked", 0), ("blocked", 1024), ("cudnn", 0)])
def test_cpu_implementations_and_gradients_match_numpy(name, block_bytes, shape):
  """ "cudnn" on the CPU is the reference (see test_cudnn_*)."""
  _check_values_and_grads(attention.make_attention(name, block_bytes), shape)


def test_flash_in_interpret_mode_matches_numpy():
  """The TPU kernel, run by Pallas' TPU interpreter on the CPU: lengths padded to 128 (64 queries,
  77 keys masked by segment ids) and heads over 128 padded to a multiple of 128 (136 -> 256)."""
  with pltpu.force_tpu_interpret_mode():
    _check_values_and_grads(attention.flash_attention, (1, 64, 77, 2, 8))
    _check_values_and_grads(attention.flash_attention, (1, 20, 128, 1, 136), scale=0.1)


def test_flash_splits_the_batch_over_the_mesh():
  """On several devices the kernel runs in a shard_map over the batch (XLA cannot partition it)."""
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
  assert attention._batch_axes(mesh, 8) == ("data", "fsdp")
  assert attention._batch_axes(mesh, 6) == ("data",)
  assert attention._batch_axes(mesh, 1) == ()
  q, k, v, _ = (x.astype(np.float32) for x in _inputs(8, 16, 24, 1, 8))
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  fn = attention.make_attention("flash", mesh=mesh)
  with pltpu.force_tpu_interpret_mode():
    out = jax.jit(lambda q, k, v: fn(q, k, v, scale=0.5), in_shardings=batch, out_shardings=batch)(q, k, v)
    replicated = jax.jit(lambda q, k, v: fn(q[:1], k[:1], v[:1], scale=0.5))(q, k, v)  # 1 example: no split
  expected = _numpy_attention(q, k, v, 0.5)[0]
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(replicated, expected[:1], rtol=1e-5, atol=1e-5)


def _masks(batch, length, num_keys):
  """Key padding [B, 1, 1, S] (example b keeps its first S - 3b keys), causal [T, S], both."""
  padding = (np.arange(num_keys) < num_keys - 3 * np.arange(batch)[:, None])[:, None, None, :]
  causal = np.tril(np.ones((length, num_keys), bool))
  return {"padding": padding, "causal": causal, "both": padding & causal}


@pytest.mark.parametrize("kind", ["padding", "causal", "both"])
def test_reference_takes_masks(kind):
  mask = _masks(2, 12, 12)[kind]
  _check_values_and_grads(attention.dot_product_attention, (2, 12, 12, 2, 4), mask=mask)


@pytest.mark.parametrize("name", ["blocked", "cudnn", "flash"])
def test_masked_calls_run_the_reference(name, monkeypatch):
  mask = _masks(2, 12, 12)["both"]
  calls = []
  reference = attention.dot_product_attention
  monkeypatch.setattr(attention, "dot_product_attention", lambda *args: calls.append(args) or reference(*args))
  fn = attention.make_attention(name, 1024)
  q, k, v, _ = (x.astype(np.float32) for x in _inputs(2, 12, 12, 2, 4))
  np.testing.assert_allclose(fn(q, k, v, mask=mask, scale=0.5), _numpy_attention(q, k, v, 0.5, mask)[0], atol=1e-5)
  assert len(calls) == 1 and calls[0][3] is mask


@pytest.mark.parametrize("name", ["xla", "blocked", "cudnn"])
def test_default_scale_and_dtype(name):
  """scale None is 1/√D; the output has the query's dtype (bfloat16 in, bfloat16 out)."""
  q, k, v, _ = _inputs(2, 16, 16, 2, 16)
  fn = attention.make_attention(name)
  out = fn(*(x.astype(np.float32) for x in (q, k, v)))
  np.testing.assert_allclose(out, _numpy_attention(q, k, v, 16**-0.5)[0], rtol=1e-5, atol=1e-5)
  half = fn(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)))
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(half.astype(np.float32), out, atol=5e-2)


def test_resolve_per_backend():
  table = {
    ("auto", "cpu"): "blocked",
    ("auto", "gpu"): "cudnn",
    ("auto", "cuda"): "cudnn",
    ("auto", "tpu"): "flash",
    ("auto", "TPU"): "flash",
    ("auto", "rocm"): "xla",
    ("xla", "tpu"): "xla",
    ("blocked", "gpu"): "blocked",
    ("cudnn", "gpu"): "cudnn",
    ("cudnn", "cuda"): "cudnn",
    ("flash", "tpu"): "flash",
  }
  for (name, backend), want in table.items():
    assert attention.resolve(name, backend) == want, (name, backend)


@pytest.mark.parametrize(
  "name, backend, choices",
  [
    ("flash", "cpu", "('auto', 'xla', 'blocked')"),
    ("flash", "gpu", "('auto', 'xla', 'blocked', 'cudnn')"),
    ("cudnn", "cpu", "('auto', 'xla', 'blocked')"),
    ("cudnn", "tpu", "('auto', 'xla', 'blocked', 'flash')"),
    ("splash", "tpu", "('auto', 'xla', 'blocked', 'flash')"),
  ],
)
def test_resolve_refuses_what_the_backend_cannot_run(name, backend, choices):
  with pytest.raises(ValueError) as error:
    attention.resolve(name, backend)
  message = str(error.value)
  assert f"config.model.attention={name!r}" in message and choices in message and backend in message
  if name != "splash":
    assert "--config.model.attention=auto" in message


def test_make_attention_names():
  assert attention.make_attention("xla") is attention.dot_product_attention
  assert attention.make_attention("blocked", 1024) is attention.make_attention("blocked", 1024)
  assert attention.make_attention("blocked", 1024) is not attention.make_attention("blocked", 2048)
  assert attention.make_attention("auto", 1024) is attention.make_attention("blocked", 1024)  # the CPU's
  with pytest.raises(ValueError, match="choose one of"):
    attention.make_attention("sdpa")


def test_cudnn_on_the_cpu_is_the_reference(monkeypatch):
  """Off CUDA GPUs (here) "cudnn" never reaches cuDNN; resolve() refuses it on the CPU anyway."""
  kernel_calls = []
  monkeypatch.setattr(attention, "_cudnn_kernel", lambda *args: kernel_calls.append(args))
  assert attention._cudnn_head_dim_limit() == 0
  q, k, v, _ = (jnp.asarray(x, jnp.bfloat16) for x in _inputs(2, 16, 16, 2, 8))
  np.testing.assert_array_equal(attention.cudnn_attention(q, k, v), attention.dot_product_attention(q, k, v))
  assert not kernel_calls
  with pytest.raises(ValueError, match="cudnn"):
    attention.resolve("cudnn", jax.default_backend())


def test_cudnn_pads_casts_and_falls_back_where_cudnn_cannot(monkeypatch):
  """As on a pre-Hopper GPU (heads up to 128), with XLA's attention standing in for cuDNN's."""
  calls = []

  def kernel(q, k, v, scale):
    calls.append((q.shape, q.dtype, k.dtype, v.dtype, scale))
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")

  monkeypatch.setattr(attention, "_cudnn_head_dim_limit", lambda: 128)
  monkeypatch.setattr(attention, "_cudnn_kernel", kernel)
  q, k, v, _ = _inputs(2, 16, 77, 2, 12)
  half = lambda x: jnp.asarray(x, jnp.bfloat16)
  out = attention.cudnn_attention(half(q), jnp.asarray(k, jnp.float16), half(v))
  assert calls == [((2, 16, 2, 16), jnp.bfloat16, jnp.bfloat16, jnp.bfloat16, 12**-0.5)]  # heads 12 -> 16
  assert out.shape == q.shape and out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), _numpy_attention(q, k, v, 12**-0.5)[0], atol=5e-2)
  grads = jax.grad(lambda q: attention.cudnn_attention(q, half(k), half(v)).astype(jnp.float32).sum())(half(q))
  assert grads.shape == q.shape
  calls.clear()
  for args in [
    tuple(x.astype(np.float32) for x in (q, k, v)),  # float32: cuDNN would round it to 16 bits
    tuple(half(x) for x in _inputs(1, 8, 8, 1, 136)[:3]),  # heads over 128
  ]:
    np.testing.assert_array_equal(attention.cudnn_attention(*args), attention.dot_product_attention(*args))
  assert not calls


@pytest.mark.parametrize("name", ["xla", "blocked", "cudnn"])
def test_layers_call_the_convention(name):
  """The UNet's and VAE's attention layers with each implementation equal the default."""
  x = np.random.default_rng(0).standard_normal((2, 4, 4, 8)).astype(np.float32)
  context = np.random.default_rng(1).standard_normal((2, 5, 6)).astype(np.float32)
  fn = attention.make_attention(name, 256)
  for default, module, args in [
    (layers.Attention(2, 4), layers.Attention(2, 4, fn), (x.reshape(2, 16, 8), context)),
    (layers.VAEAttentionBlock(4), layers.VAEAttentionBlock(4, fn), (x,)),
  ]:
    params = default.init(jax.random.key(0), *args)
    np.testing.assert_allclose(module.apply(params, *args), default.apply(params, *args), rtol=1e-5, atol=1e-5)


def test_flash_block_sizes_divide_the_padded_lengths():
  for length in (128, 256, 384, 1024, 4096):
    for depth in (8, 40, 128, 256, 512):
      block = attention.flash_block(length, depth)
      assert length % block == 0 and block % 128 == 0 and block * max(depth, 128) <= 512 * 128
  assert attention.flash_block(4096, 40) == 512 and attention.flash_block(384, 40) == 128
  assert attention.flash_block(4096, 256) == 256 and attention.flash_block(4096, 512) == 128


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (compiles for a TPU topology)")
def test_flash_compiles_for_tpu_with_far_fewer_temporaries():
  """Compiled ahead of time for a v5e 2x2 (no TPU needed), the batch split over its 4 chips:
  the flash kernel's temporaries are far below the plain einsum's [B, H, T, S] scores
  (8 examples, 8 heads, 4096 tokens of 40 dims: 2 x 8 x 4096² float32 scores per chip)."""
  from jax.experimental import topologies

  topology = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
  mesh = Mesh(np.asarray(topology.devices), ("data",))
  spec = jax.ShapeDtypeStruct((8, 4096, 8, 40), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
  flash = attention.make_attention("flash", mesh=mesh)

  def compiled(fn, grad):
    if grad:
      fn = jax.grad(lambda q, k, v, f=fn: f(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))
    return jax.jit(fn).lower(spec, spec, spec).compile()

  for grad in (False, True):
    plain, kernel = compiled(attention.dot_product_attention, grad), compiled(flash, grad)
    assert "tpu_custom_call" in kernel.as_text() and "tpu_custom_call" not in plain.as_text()
    plain, kernel = (c.memory_analysis().temp_size_in_bytes for c in (plain, kernel))
    assert plain >= 2 * 8 * 4096**2 * 4
    assert kernel * 5 < plain, (grad, kernel, plain)
