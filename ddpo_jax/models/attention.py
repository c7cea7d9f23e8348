"""Attention, chosen by name: `make_attention(name)` returns one function of the convention

    fn(query, key, value, mask=None, scale=None) -> out
    query [B, T, H, D], key, value [B, S, H, D] -> out [B, T, H, D] in query's dtype,

mask boolean, broadcastable to [B, H, T, S] (True: the query attends to the key)
or None, scale 1/√D when None, that of `jax.nn.dot_product_attention`. Every
attention layer (layers.py's UNet and VAE blocks, clip_towers.py) calls it so.

  "xla"      `dot_product_attention`, the plain reference: float32 scores and softmax.
  "blocked"  `blocked_attention` below (the CPU's; blocks of `block_bytes` of scores).
  "cudnn"    cuDNN's fused attention on CUDA GPUs (jax.nn.dot_product_attention).
  "flash"    Pallas' TPU flash attention kernel.

`resolve(name, backend)` picks one for "auto" and checks an explicit name
against the backend. Only "xla" takes masks: the others hand masked calls (CLIP's
causal and padding masks, 77 tokens) to it; `make_attention` documents what
each does with shapes its kernel cannot take.

The blocked attention (CPU):

    out = softmax(q kᵀ · scale) v,   q [B, T, H, D], k, v [B, S, H, D] -> [B, T, H, D]

computed one block of (examples, queries) at a time, each block's scores
[b, H, c, S] small enough to stay in cache (`attention_blocks`). The
backward pass is written out (`jax.custom_vjp`): it keeps q, k, v, the output
and the log-sum-exp of each row (not the scores), recomputes a block's
probabilities P = exp(q kᵀ · scale - lse), and uses the row identity
Σ_s dP ∘ P = Σ_d dO ∘ O, so no reduction runs over the keys; every matmul is
laid out as [M, K] x [K, N] or [M, K] x [N, K] (never contracting the left
operand's major axis, which XLA's CPU backend hands to a slow generic kernel).
docs/speed.md has the measurements against diffusers' attention, autodiff of
the same blocks and PyTorch's scaled_dot_product_attention.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

# fn(query [B, T, H, D], key [B, S, H, D], value [B, S, H, D], mask=None, scale=None) -> [B, T, H, D].
AttentionFn = Callable[..., jax.Array]

IMPLEMENTATIONS = ("xla", "blocked", "cudnn", "flash")
# What "auto" picks per backend (jax.default_backend()); any other backend gets "xla".
_AUTO = {"cpu": "blocked", "gpu": "cudnn", "cuda": "cudnn", "tpu": "flash"}
# The backends a kernel runs on; "xla" and "blocked" are plain XLA ops and run on any.
_KERNEL_BACKENDS = {"cudnn": ("gpu", "cuda"), "flash": ("tpu",)}


def resolve(name: str, backend: str) -> str:
  """config.model.attention for `backend` ("cpu", "gpu", "cuda", "tpu", ...): one of IMPLEMENTATIONS.

  "auto" is "flash" on TPUs, "cudnn" on GPUs, "blocked" on the CPU (and "xla" on
  other backends); an explicit name is returned if it runs on the backend, and
  refused with a ValueError saying what does otherwise.
  """
  backend = backend.lower()
  choices = ("auto",) + tuple(n for n in IMPLEMENTATIONS if backend in _KERNEL_BACKENDS.get(n, (backend,)))
  if name == "auto":
    return _AUTO.get(backend, "xla")
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"config.model.attention={name!r} is not an attention; choose one of {choices} on {backend!r}.")
  if name not in choices:
    needs = " or ".join(repr(b) for b in _KERNEL_BACKENDS[name])
    raise ValueError(
      f"config.model.attention={name!r} runs only on a {needs} backend, not on {backend!r}; "
      f"choose one of {choices} here (--config.model.attention=auto picks {_AUTO.get(backend, 'xla')!r})."
    )
  return name


def dot_product_attention(
  query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None = None, scale: float | None = None
) -> jax.Array:
  """softmax(q kᵀ · scale) v [B, T, H, D] in query's dtype from query [B, T, H, D], key, value [B, S, H, D].

  The plain XLA reference ("xla"): the scores [B, H, T, S] and the softmax are
  float32 whatever the inputs' dtype. mask: boolean, broadcastable to
  [B, H, T, S], True where a query attends to a key; None attends everywhere.
  scale: 1/√D when None.
  """
  scale = query.shape[-1] ** -0.5 if scale is None else scale
  scores = jnp.einsum("bthd,bshd->bhts", query, key, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bhts,bshd->bthd", weights.astype(value.dtype), value).astype(query.dtype)


def _largest_divisor(n: int, limit: int) -> int:
  """The largest divisor of n that is at most max(1, limit)."""
  return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def attention_blocks(shape: tuple[int, ...], num_keys: int, block_bytes: int) -> tuple[int, int]:
  """(examples, queries) per block for queries of `shape` [B, T, H, D] and `num_keys` keys.

  A block's float32 scores [b, H, c, S] take at most `block_bytes` (or one
  query's [H, S], if that is more): whole examples when one example's scores
  fit, else chunks of one example's queries. b divides B and c divides T.
  """
  batch, length, heads = shape[:3]
  queries = max(1, block_bytes // (heads * num_keys * 4))
  if queries >= length:
    return _largest_divisor(batch, queries // length), length
  return 1, _largest_divisor(length, queries)


def _heads_first(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, 1, 2)  # [b, n, H, D] <-> [b, H, n, D]


def _scores(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
  """float32 q kᵀ · scale [b, H, c, S] of heads-first q [b, H, c, D], k [b, H, S, D]."""
  return jnp.einsum("bhqd,bhsd->bhqs", q, k, preferred_element_type=jnp.float32) * scale


def _block_forward(q, k, v, scale):
  """One block: q [b, c, H, D], k, v [b, S, H, D] -> (out [b, c, H, D], lse float32 [b, H, c])."""
  q, k, v = (_heads_first(x) for x in (q, k, v))
  scores = _scores(q, k, scale)
  row_max = scores.max(axis=-1, keepdims=True)
  weights = jnp.exp(scores - row_max)
  total = weights.sum(axis=-1, keepdims=True)
  out = jnp.einsum("bhqs,bhsd->bhqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32) / total
  return _heads_first(out).astype(q.dtype), (row_max + jnp.log(total))[..., 0]


def _block_backward(q, k, v, out, lse, d_out, scale):
  """Gradients (dq, dk, dv) of one block from its inputs, output, log-sum-exp and the output's cotangent."""
  dtype = q.dtype
  q, k, v, out, d_out = (_heads_first(x) for x in (q, k, v, out, d_out))
  probs = jnp.exp(_scores(q, k, scale) - lse[..., None])  # [b, H, c, S]
  transposed = lambda x: jnp.swapaxes(x, 2, 3)
  # dV = Pᵀ dO and dK = dSᵀ Q, each computed as (Xᵀ Y)ᵀ with the small operand transposed.
  dv = transposed(jnp.einsum("bhdq,bhqs->bhds", transposed(d_out), probs.astype(dtype)))
  d_probs = jnp.einsum("bhqd,bhsd->bhqs", d_out, v, preferred_element_type=jnp.float32)
  row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_scores = (probs * (d_probs - row_dot) * scale).astype(dtype)
  dq = jnp.einsum("bhqs,bhsd->bhqd", d_scores, k)
  dk = transposed(jnp.einsum("bhdq,bhqs->bhds", transposed(q), d_scores))
  return tuple(_heads_first(x).astype(dtype) for x in (dq, dk, dv))


def _by_examples(x: jax.Array, examples: int) -> jax.Array:
  """[B, ...] -> [B // b, b, ...]: block j holds examples j, j + B // b, ... (strided, so that a
  batch sharded over devices stays sharded within each block)."""
  return jnp.swapaxes(x.reshape((examples, x.shape[0] // examples) + x.shape[1:]), 0, 1)


def _from_examples(x: jax.Array) -> jax.Array:
  """Inverse of `_by_examples`."""
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape((-1,) + x.shape[2:])


def _forward(q, k, v, scale, examples, queries):
  """(out [B, T, H, D], lse in the blocks' layout)."""
  batch, length, heads, depth = q.shape
  if queries == length:
    split = functools.partial(_by_examples, examples=examples)
    out, lse = jax.lax.map(lambda a: _block_forward(*a, scale), (split(q), split(k), split(v)))
    return _from_examples(out), lse
  chunks = q.reshape((batch, length // queries, queries, heads, depth))

  def per_example(a):  # [n, c, H, D], [S, H, D], [S, H, D]
    q_chunks, k_example, v_example = a
    return jax.lax.map(lambda c: _block_forward(c[None], k_example[None], v_example[None], scale), q_chunks)

  out, lse = jax.lax.map(per_example, (chunks, k, v))
  return out.reshape(q.shape), lse


def _backward(q, k, v, out, lse, d_out, scale, examples, queries):
  batch, length, heads, depth = q.shape
  if queries == length:
    split = functools.partial(_by_examples, examples=examples)
    grads = jax.lax.map(
      lambda a: _block_backward(*a, scale), (split(q), split(k), split(v), split(out), lse, split(d_out))
    )
    return tuple(_from_examples(g) for g in grads)
  chunk = lambda x: x.reshape((batch, length // queries, queries, heads, depth))

  def per_example(a):  # an example's chunks; its keys' gradients summed over them
    q_chunks, k_example, v_example, out_chunks, lse_chunks, d_out_chunks = a

    def step(key_grads, c):
      q_c, out_c, lse_c, d_out_c = c
      dq, dk, dv = _block_backward(
        q_c[None], k_example[None], v_example[None], out_c[None], lse_c, d_out_c[None], scale
      )
      return (key_grads[0] + dk[0], key_grads[1] + dv[0]), dq[0]

    zeros = (jnp.zeros_like(k_example), jnp.zeros_like(v_example))
    (dk, dv), dq = jax.lax.scan(step, zeros, (q_chunks, out_chunks, lse_chunks, d_out_chunks))
    return dq, dk, dv

  dq, dk, dv = jax.lax.map(per_example, (chunk(q), k, v, chunk(out), lse, chunk(d_out)))
  return dq.reshape(q.shape), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q, k, v, scale, examples, queries):
  return _forward(q, k, v, scale, examples, queries)[0]


def _attention_fwd(q, k, v, scale, examples, queries):
  out, lse = _forward(q, k, v, scale, examples, queries)
  return out, (q, k, v, out, lse)


def _attention_bwd(scale, examples, queries, residuals, d_out):
  return _backward(*residuals, d_out, scale, examples, queries)


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocked_attention(query: jax.Array, key: jax.Array, value: jax.Array, scale: float, block_bytes: int) -> jax.Array:
  """softmax(q kᵀ · scale) v [B, T, H, D] from q [B, T, H, D], k, v [B, S, H, D], in blocks of
  about `block_bytes` of scores (see the module docstring); block_bytes=0: one block."""
  if block_bytes:
    examples, queries = attention_blocks(query.shape, key.shape[1], block_bytes)
  else:
    examples, queries = query.shape[0], query.shape[1]
  return _attention(query, key, value, float(scale), examples, queries)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  """x zero-padded at the end of `axis` to `size`."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def _blocked(block_bytes: int) -> AttentionFn:
  """The "blocked" attention: `blocked_attention` in blocks of `block_bytes` of scores (0: one block).
  It takes no mask: masked calls run the reference (`dot_product_attention`)."""

  def attend(query, key, value, mask=None, scale=None):
    if mask is not None:
      return dot_product_attention(query, key, value, mask, scale)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return blocked_attention(query, key, value, scale, block_bytes)

  return attend


def _cudnn_head_dim_limit() -> int:
  """The largest head dim cuDNN's fused attention takes on the default device: 256 from
  Hopper (compute capability 9.0) on, 128 before; 0 where that is no CUDA GPU."""
  capability = getattr(jax.devices()[0], "compute_capability", None)
  if jax.default_backend() != "gpu" or capability is None:
    return 0
  try:
    version = tuple(int(x) for x in str(capability).split(".")[:2])
  except ValueError:  # a ROCm gfx name
    return 0
  return 256 if version >= (9, 0) else 128


def _cudnn_kernel(query, key, value, scale):
  return jax.nn.dot_product_attention(query, key, value, scale=scale, implementation="cudnn")


def cudnn_attention(
  query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None = None, scale: float | None = None
) -> jax.Array:
  """The "cudnn" attention: cuDNN's fused (flash) attention, [B, T, H, D] as `dot_product_attention`.

  cuDNN takes float16 or bfloat16 inputs of one dtype with head dims a multiple
  of 8 up to 128 (256 from Hopper on). Heads are zero-padded to a multiple of 8
  (zeros change no score and give output columns that are dropped) and key and
  value cast to query's dtype. The reference (`dot_product_attention`) runs
  instead for masked calls, float32 queries (cuDNN would drop them to 16 bits),
  wider heads (the VAE's single head of 512) and off CUDA GPUs.
  """
  depth = query.shape[-1]
  padded = _round_up(depth, 8)
  if mask is not None or query.dtype not in (jnp.float16, jnp.bfloat16) or padded > _cudnn_head_dim_limit():
    return dot_product_attention(query, key, value, mask, scale)
  scale = depth**-0.5 if scale is None else scale
  pad = lambda x: _pad_axis(x.astype(query.dtype), 3, padded)
  return _cudnn_kernel(pad(query), pad(key), pad(value), scale)[..., :depth]


_FLASH_LANES = 128  # the TPU kernel's key blocks are multiples of 128; lengths are padded to them


def flash_block(length: int, depth: int) -> int:
  """Queries (or keys) per block of the TPU flash kernel for a `length` that is a multiple of 128.

  The largest of 512, 256, 128 that divides length and keeps a block's tile of
  max(depth, 128) lanes within 512 x 128 elements (256 kB of float32), so that the
  backward kernels' dozen double-buffered tiles fit a core's scoped VMEM.
  """
  fits = [b for b in (512, 256) if length % b == 0 and b * max(depth, _FLASH_LANES) <= 512 * _FLASH_LANES]
  return (fits or [_FLASH_LANES])[0]


def _flash_kernel(query: jax.Array, key: jax.Array, value: jax.Array, scale: float) -> jax.Array:
  """The TPU flash kernel on one device's q [b, T, H, D], k, v [b, S, H, D] -> [b, T, H, D] (padded as
  `flash_attention` says)."""
  from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

  batch, length, _, depth = query.shape
  num_keys = key.shape[1]
  padded_length, padded_keys = _round_up(length, _FLASH_LANES), _round_up(num_keys, _FLASH_LANES)
  padded_depth = depth if depth <= _FLASH_LANES else _round_up(depth, _FLASH_LANES)
  heads_first = lambda x, n: jnp.swapaxes(_pad_axis(_pad_axis(x.astype(query.dtype), 1, n), 3, padded_depth), 1, 2)
  segment_ids = None
  if padded_keys != num_keys:
    real_keys = jnp.broadcast_to(jnp.arange(padded_keys) < num_keys, (batch, padded_keys)).astype(jnp.int32)
    segment_ids = pallas_flash.SegmentIds(q=jnp.ones((batch, padded_length), jnp.int32), kv=real_keys)
  block_q, block_k = flash_block(padded_length, padded_depth), flash_block(padded_keys, padded_depth)
  blocks = pallas_flash.BlockSizes(
    block_q=block_q,
    block_k_major=block_k,
    block_k=block_k,
    block_b=1,
    block_q_major_dkv=block_q,
    block_k_major_dkv=block_k,
    block_k_dkv=block_k,
    block_q_dkv=block_q,
    block_k_major_dq=block_k,
    block_k_dq=block_k,
    block_q_dq=block_q,
  )
  out = pallas_flash.flash_attention(
    heads_first(query, padded_length),
    heads_first(key, padded_keys),
    heads_first(value, padded_keys),
    segment_ids=segment_ids,
    sm_scale=float(scale),
    block_sizes=blocks,
  )
  return jnp.swapaxes(out, 1, 2)[:, :length, :, :depth]


def _batch_axes(mesh, batch: int) -> tuple[str, ...]:
  """The mesh's axes (not already manual, in order) that a batch of `batch` is split over:
  each taken while the product of their sizes still divides it."""
  axes, size = [], 1
  for name in mesh.axis_names:
    if name not in mesh.manual_axes and batch % (size * mesh.shape[name]) == 0:
      axes.append(name)
      size *= mesh.shape[name]
  return tuple(axes)


def flash_attention(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  mask: jax.Array | None = None,
  scale: float | None = None,
  *,
  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
) -> jax.Array:
  """The "flash" attention: Pallas' TPU flash attention kernel, [B, T, H, D] as `dot_product_attention`.

  jax.experimental.pallas.ops.tpu.flash_attention (heads-first [B, H, T, D]),
  whose blocks must divide the lengths, whose key blocks are multiples of 128 and
  whose heads over 128 must be a multiple of 128. So queries and keys are
  zero-padded to multiples of 128 (64 latent pixels, 77 text tokens -> 128) and
  padded keys masked out by segment ids (queries 1, real keys 1, padding 0);
  padded query rows and head columns (heads over 128 padded to a multiple of 128:
  SD 1's 160 -> 256) are computed and dropped. Masked calls run the reference.
  Runs on TPUs (or in Pallas' TPU interpret mode); resolve() refuses it elsewhere.

  XLA cannot partition a Pallas kernel, so on a mesh of several devices (`mesh`,
  else the one jax.set_mesh holds) the kernel runs in a shard_map with the batch
  split over the mesh's axes (as many as divide it; ddpo_jax splits batches over
  all of them). Under jit on several devices without a mesh, XLA refuses it.

  Flash rather than splash attention: splash's gain is skipping the blocks a
  sparse (causal, local) mask empties, and the UNet's and VAE's attention is dense.
  """
  if mask is not None:
    return dot_product_attention(query, key, value, mask, scale)
  scale = query.shape[-1] ** -0.5 if scale is None else scale
  kernel = functools.partial(_flash_kernel, scale=scale)
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty or mesh.size == 1:
    return kernel(query, key, value)
  axes = _batch_axes(mesh, query.shape[0])
  spec = jax.sharding.PartitionSpec(axes or None)
  free = {name for name in mesh.axis_names if name not in mesh.manual_axes}
  sharded = jax.shard_map(kernel, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, axis_names=free, check_vma=False)
  return sharded(query, key, value)


def make_attention(name: str, block_bytes: int = 0, mesh: jax.sharding.Mesh | None = None) -> AttentionFn:
  """The attention `name` (one of IMPLEMENTATIONS, or "auto" for jax.default_backend()'s) as
  fn(query, key, value, mask=None, scale=None) (the module docstring's convention).

  block_bytes: "blocked"'s bytes of float32 scores per block (0: one block); the
  others ignore it. mesh: the devices "flash" splits the batch over (None: the
  mesh of jax.set_mesh, if any; see `flash_attention`). Equal arguments give the
  same function, so modules holding it compare equal (and jit caches hit).
  """
  if name == "auto":
    name = resolve(name, jax.default_backend())
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"attention {name!r}: choose one of {('auto',) + IMPLEMENTATIONS}.")
  return _make_attention(name, int(block_bytes) if name == "blocked" else 0, mesh if name == "flash" else None)


@functools.cache
def _make_attention(name: str, block_bytes: int, mesh: jax.sharding.Mesh | None) -> AttentionFn:
  if name == "blocked":
    return _blocked(block_bytes)
  if name == "flash" and mesh is not None:
    return functools.partial(flash_attention, mesh=mesh)
  return {"xla": dot_product_attention, "cudnn": cudnn_attention, "flash": flash_attention}[name]
