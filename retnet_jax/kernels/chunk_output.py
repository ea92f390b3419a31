"""A fused Pallas kernel for the output of chunkwise retention (forward).

Inside chunk n, with b_i the within-chunk inclusive cumulative log decay and S the state
entering the chunk, retention's output is

    o_i = sum_{j <= i} exp(b_i - b_j) (q_i . k_j) v_j  +  exp(b_i) q_i S.

`retention._chunkwise_forward` computes this with XLA einsums that write the [C, C] weights
and two partial outputs to memory. `chunk_output` computes it in one kernel: each program
loads one chunk's q, k, a block of v's columns, the chunk's decays and the matching block of
S, and writes only o. `chunkwise_retention_pallas` is `retention.chunkwise_retention` with
the output taken from this kernel and the per-chunk gradients from `chunk_grads` (chunking,
decays, states and state gradients are retention.py's).

Written for the Pallas Triton backend (GPU) and run with `interpret=True` elsewhere (tests on
CPU): every block dimension is a power of two, matmuls are 2-D `jnp.dot`/`lax.dot_general`
with each dimension >= 16 and float32 accumulation, shapes are static.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from retnet_jax import retention
from retnet_jax.kernels.chunk_grads import chunk_grads
from retnet_jax.kernels.chunk_grads import unsupported_reason as grads_unsupported_reason
from retnet_jax.kernels.common import MIN_DOT_DIM, check_chunked, is_power_of_two

Array = jax.Array

__all__ = ["chunk_output", "chunkwise_retention_pallas", "unsupported_reason"]

# --------------------------------------------------------------------------- kernel


def _chunk_output_kernel(q_ref, k_ref, v_ref, b_ref, s_ref, o_ref):
    """One (batch, head, chunk, value block) tile.

    Refs: q, k [C, Dk]; v [C, BV]; b float32 [C]; s [Dk, BV]; o [C, BV].
    """
    q = q_ref[...]
    b = b_ref[...]
    chunk = q.shape[0]
    f32 = jnp.float32
    # scores[i, j] = q_i . k_j (contracting both on Dk: k is used transposed).
    scores = lax.dot_general(q, k_ref[...], (((1,), (1,)), ((), ())),
                             preferred_element_type=f32)               # [C, C]
    positions = jnp.arange(chunk)
    causal = positions[:, None] >= positions[None, :]
    # Above the diagonal b_i - b_j >= 0 can be large: zero it before exp, mask after.
    decay = jnp.exp(jnp.where(causal, b[:, None] - b[None, :], 0.0))
    weights = jnp.where(causal, scores * decay, 0.0).astype(q.dtype)
    o = jnp.dot(weights, v_ref[...], preferred_element_type=f32)       # [C, BV]
    o += jnp.exp(b)[:, None] * jnp.dot(q, s_ref[...], preferred_element_type=f32)
    o_ref[...] = o.astype(o_ref.dtype)


def value_block(value_dim: int, block_v: int = 64) -> int | None:
    """Value columns per program: the largest power of two <= block_v that divides value_dim,
    or None if that is below MIN_DOT_DIM (e.g. Dv = 432 -> 16; Dv = 24 -> None)."""
    block = 1 << (max(1, min(block_v, value_dim)).bit_length() - 1)
    while block >= MIN_DOT_DIM and value_dim % block:
        block //= 2
    return block if block >= MIN_DOT_DIM else None


def _check_chunk_output_args(qc, kc, vc, b, states, block_v) -> int:
    """Raises ValueError naming the bad argument; returns the value block size."""
    *_, key_dim, value_dim = check_chunked(qc, kc, b, values={"vc": vc},
                                           matrices={"states": states})
    if not isinstance(block_v, (int, np.integer)) or not is_power_of_two(int(block_v)):
        raise ValueError(f"block_v must be a power of two, got {block_v!r}")
    reason = unsupported_reason(key_dim, value_dim, qc.shape[3], block_v=int(block_v))
    if reason:
        raise ValueError(reason)
    return value_block(value_dim, int(block_v))


def chunk_output(qc: Array, kc: Array, vc: Array, b: Array, states: Array, *,
                 block_v: int = 64, num_warps: int | None = None,
                 interpret: bool = False) -> Array:
    """Chunkwise retention's output, intra-chunk and inter-chunk terms, in one kernel.

    o[b, h, n, i] = sum_{j <= i} exp(b_i - b_j) (q_i . k_j) v_j + exp(b_i) q_i S[b, h, n],
    with the [C, C] weights cast to the compute dtype before multiplying v (as in
    `retention._chunkwise_forward`), both matmuls accumulated in float32 and summed in float32.

    Args:
      qc, kc: [B, H, N, C, Dk] chunked queries and keys; C and Dk powers of two >= 16.
      vc: [B, H, N, C, Dv] chunked values, same dtype as qc.
      b: float32 [G, H, N, C], G in {1, B}: within-chunk inclusive cumulative log decay
        (G = 1: fixed per-head decay shared by the batch), entries <= 0.
      states: [B, H, N, Dk, Dv] state entering each chunk, same dtype as qc.
      block_v: the most value columns per program (a power of two): each program takes the
        largest power of two <= block_v dividing Dv (`value_block`), which must be >= 16.
        Fewer columns per program means the chunk's q k^T is recomputed more often.
      num_warps: Triton warps per program; None picks 4 for small tiles, 8 otherwise.
      interpret: run the kernel in Pallas interpret mode (any backend, e.g. CPU tests).
    Returns:
      o: [B, H, N, C, Dv] in vc's dtype. Matmuls use the default matmul precision (so
      `jax.default_matmul_precision` applies; on GPU float32 inputs default to TF32).
    """
    block = _check_chunk_output_args(qc, kc, vc, b, states, block_v)
    batch, heads, chunks, chunk, key_dim = qc.shape
    value_dim = vc.shape[-1]
    shared_decay = b.shape[0] == 1
    if num_warps is None:
        num_warps = 4 if chunk * max(chunk, key_dim, block) <= 64 * 64 else 8

    def decay_index(i, h, n, j):
        del j
        return (0 if shared_decay else i, h, n, 0)

    grid = (batch, heads, chunks, value_dim // block)
    return pl.pallas_call(
        _chunk_output_kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, None, None, chunk, key_dim), lambda i, h, n, j: (i, h, n, 0, 0)),
            pl.BlockSpec((None, None, None, chunk, key_dim), lambda i, h, n, j: (i, h, n, 0, 0)),
            pl.BlockSpec((None, None, None, chunk, block), lambda i, h, n, j: (i, h, n, 0, j)),
            pl.BlockSpec((None, None, None, chunk), decay_index),
            pl.BlockSpec((None, None, None, key_dim, block), lambda i, h, n, j: (i, h, n, 0, j)),
        ],
        out_specs=pl.BlockSpec((None, None, None, chunk, block),
                               lambda i, h, n, j: (i, h, n, 0, j)),
        out_shape=jax.ShapeDtypeStruct(vc.shape, vc.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="retention_chunk_output",
    )(qc, kc, vc, b, states)


def unsupported_reason(key_dim: int, value_dim: int, chunk_size: int, *,
                       block_v: int = 64) -> str | None:
    """Why `chunk_output` / `chunkwise_retention_pallas` cannot take these sizes, or None."""
    if not is_power_of_two(key_dim) or key_dim < MIN_DOT_DIM:
        return f"key head dim {key_dim} is not a power of two >= {MIN_DOT_DIM}"
    if value_block(value_dim, block_v) is None:
        return (f"value head dim {value_dim} has no power-of-two divisor in "
                f"[{MIN_DOT_DIM}, block_v={block_v}]")
    if not is_power_of_two(chunk_size) or chunk_size < MIN_DOT_DIM:
        return f"chunk_size {chunk_size} is not a power of two >= {MIN_DOT_DIM}"
    return None


# --------------------------------------------------------------------------- full retention


@functools.partial(jax.jit, static_argnums=(5, 6))
def _states_and_residuals(q, k, v, log_decay, initial_state, chunk_size, has_state):
    """retention._chunkwise_forward without its output: (final_state, residuals).

    The XLA output and the [C, C] weights are dropped here, inside one jit, so XLA removes
    their computation as dead code; what is kept (chunked inputs, the states entering each
    chunk, cumulative decays) is what the `chunk_output` and `chunk_grads` kernels take.
    """
    _, final_state, (qc, kc, vc, _, _, states, b) = retention._chunkwise_forward(
        q, k, v, log_decay, initial_state, chunk_size, has_state)
    return final_state, (qc, kc, vc, states, b)


def _forward(q, k, v, log_decay, initial_state, chunk_size, has_state, block_v, interpret):
    final_state, residuals = _states_and_residuals(q, k, v, log_decay, initial_state,
                                                   chunk_size, has_state)
    qc, kc, vc, states, b = residuals
    o = chunk_output(qc, kc, vc, b, states, block_v=block_v, interpret=interpret)
    o = retention._from_chunks(o, q.shape[1]).astype(v.dtype)
    return (o, final_state), residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _chunkwise_pallas(q, k, v, log_decay, initial_state, chunk_size, has_state, block_v,
                      interpret):
    outputs, _ = _forward(q, k, v, log_decay, initial_state, chunk_size, has_state, block_v,
                          interpret)
    return outputs


def _chunkwise_pallas_fwd(q, k, v, log_decay, initial_state, chunk_size, has_state, block_v,
                          interpret):
    outputs, residuals = _forward(q, k, v, log_decay, initial_state, chunk_size, has_state,
                                  block_v, interpret)
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype)
                   for x in (q, k, v, log_decay, initial_state))
    return outputs, residuals + (shapes,)


def _chunkwise_pallas_bwd(chunk_size, has_state, block_v, interpret, residuals, cotangents):
    """retention._chunkwise_backward with its per-chunk part from the `chunk_grads` kernel.

    XLA keeps the chunk recurrence of the state gradients (d_kv, d_initial); the kernel
    recomputes the [C, C] weights and score cotangents on chip and writes dq, dk, dv and the
    gradient of the within-chunk cumulative log decays, which XLA takes back to log_decay.
    """
    del block_v
    qc, kc, vc, states, b, shapes = residuals
    q_aval, k_aval, v_aval, decay_aval, state_aval = shapes
    do, d_final = cotangents
    heads, key_dim, value_dim = qc.shape[1], qc.shape[-1], vc.shape[-1]
    time = q_aval.shape[1]
    if grads_unsupported_reason(key_dim, value_dim) is not None:
        # Head dims the backward kernel cannot hold in one tile: retention.py's einsums, with
        # the [C, C] weights and k_to_end recomputed as _chunkwise_forward makes them.
        weights, k_to_end = retention._chunk_weights(qc, kc, b)
        return retention._chunkwise_backward(
            chunk_size, has_state, (qc, kc, vc, weights, k_to_end, states, b, shapes), cotangents)

    doc, _, d_kv, d_initial = retention._state_gradients(qc, b, do, d_final, chunk_size)

    dq, dk, dv, db = chunk_grads(qc, kc, vc, doc, b, states, d_kv, interpret=interpret)

    # b = within-chunk cumsum of log_decay (shared by the batch when fixed): the transpose of
    # that linear map takes dL/db to dL/d log_decay (reverse cumsum inside each chunk, padding
    # dropped, summed over batch and time for a fixed decay).
    if b.shape[0] == 1:
        db = jnp.sum(db, axis=0, keepdims=True)
    cumulative = functools.partial(retention._chunk_cumulative_log_decay, time=time,
                                   heads=heads, chunk_size=chunk_size)
    (d_log_decay,) = jax.linear_transpose(cumulative, decay_aval)(db)

    return (retention._from_chunks(dq, time).astype(q_aval.dtype),
            retention._from_chunks(dk, time).astype(k_aval.dtype),
            retention._from_chunks(dv, time).astype(v_aval.dtype),
            d_log_decay.astype(decay_aval.dtype),
            d_initial.reshape(state_aval.shape).astype(state_aval.dtype))


_chunkwise_pallas.defvjp(_chunkwise_pallas_fwd, _chunkwise_pallas_bwd)


def chunkwise_retention_pallas(q: Array, k: Array, v: Array, log_decay: Array, *,
                               chunk_size: int = 64, initial_state: Array | None = None,
                               interpret: bool = False,
                               block_v: int = 64) -> tuple[Array, Array]:
    """`retention.chunkwise_retention` with the output computed by the `chunk_output` kernel.

    Same maths, arguments and results; chunking, decays, the states entering each chunk and
    the state gradients are retention.py's. The backward pass (`jax.custom_vjp`, reverse mode
    only) takes dq, dk, dv and the log-decay gradient from the `chunk_grads` kernel when Dk
    and Dv are powers of two <= 128, else from retention.py's einsums. The chunk length used
    is min(chunk_size, max(16, next power of two >= T)): the kernels need a power of two
    >= 16, and T is zero-padded up to a multiple of it (outputs are unchanged).

    Args:
      q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; any float dtype (computed in their common
        dtype, accumulated in float32). Dk a power of two >= 16; Dv with a power-of-two
        divisor in [16, block_v] (`value_block`).
      log_decay: float [H] (fixed) or [B, T, H] (gated), entries <= 0.
      chunk_size: tokens per chunk, a power of two >= 16.
      initial_state: optional float32 [B, H, Dk, Dv]; zeros when None.
      interpret: run the kernel in Pallas interpret mode (CPU tests).
      block_v: value columns per kernel program (see `chunk_output`).
    Returns:
      (o [B, T, H, Dv] in v's dtype, final state float32 [B, H, Dk, Dv]).
    """
    retention._check_qkv(q, k, v, time_axis=True)
    batch, time, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    retention._check_log_decay(log_decay, batch, time, heads)
    if (not isinstance(chunk_size, (int, np.integer)) or not is_power_of_two(int(chunk_size))
            or chunk_size < MIN_DOT_DIM):
        raise ValueError(f"chunk_size must be a power of two >= {MIN_DOT_DIM}, "
                         f"got {chunk_size!r}")
    chunk = min(int(chunk_size), max(MIN_DOT_DIM, pl.next_power_of_2(time)))
    has_state = initial_state is not None
    if initial_state is None:
        initial_state = retention.zero_state(batch, heads, key_dim, value_dim)
    retention._check_state(initial_state, q, v)
    return _chunkwise_pallas(q, k, v, log_decay, initial_state.astype(jnp.float32), chunk,
                             has_state, block_v, bool(interpret))
