"""Blocked softmax attention with a hand-written backward pass, for the CPU.

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

import jax
import jax.numpy as jnp


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
