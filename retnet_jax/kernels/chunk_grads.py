"""A fused Pallas kernel for the per-chunk part of chunkwise retention's backward pass.

Inside chunk n, with b_i the within-chunk inclusive cumulative log decay, g = b_{C-1} the
chunk's total, S the state entering the chunk and dU the gradient of the state leaving it
(`d_kv` in `retention._chunkwise_backward`), the forward

    o_i = sum_{j <= i} exp(b_i - b_j) (q_i . k_j) v_j + exp(b_i) q_i S,
    U   = exp(g) S + sum_j exp(g - b_j) k_j^T v_j

has, with M_ij = exp(b_i - b_j) [j <= i] and do the output cotangent,

    dq = (M * (do v^T)) k + (exp(b) do) S^T
    dk = (M * (do v^T))^T q + exp(g - b) * (v dU^T)
    dv = (M * (q k^T))^T do + (exp(g - b) k) dU
    db_i = q_i . dq_i - k_i . dk_i + [i = C-1] (sum_j k_j . (exp(g - b_j) v_j dU^T)
                                                + exp(g) <S, dU>).

`retention._chunkwise_backward` computes these with XLA einsums that write the [C, C]
matrices and every partial gradient to memory. `chunk_grads` computes them in one kernel:
each program loads one chunk's q, k, v, do straight from [B, Tp, H, D] activations, with its
decays, S and dU, and writes only dq, dk, dv (in the same layout) and db. The states S and
their gradients dU are chunk recurrences (`chunk_states`); `chunkwise_retention_pallas`
(chunk_output.py) wires them up.

Written for the Pallas Triton backend (GPU) and run with `interpret=True` elsewhere (tests
on CPU): every loaded tile is a power of two wide (`common.pieces`), matmuls are 2-D
`jnp.dot`/`lax.dot_general` with each dimension >= 16 and float32 accumulation, shapes are
static.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from retnet_jax.kernels.common import (
    MIN_DOT_DIM, check_time_major, decay_index, default_num_warps, pieces)

Array = jax.Array

__all__ = ["chunk_grads"]



# --------------------------------------------------------------------------- kernel


def _dot(a, b, contract_a: int, contract_b: int):
    """2-D matmul contracting a's axis `contract_a` with b's `contract_b`, float32 result."""
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                           preferred_element_type=jnp.float32)


def _chunk_grads_kernel(q_ref, k_ref, v_ref, do_ref, b_ref, s_ref, du_ref,
                        dq_ref, dk_ref, dv_ref, db_ref):
    """One (batch, head, chunk) tile.

    Refs: q, k [C, Dk]; v, do [C, Dv]; b float32 [C]; s, du [Dk, Dv] (all but b in the compute
    dtype). Outputs: dq, dk [C, Dk]; dv [C, Dv] (compute dtype); db float32 [C]. Heads are
    walked in power-of-two pieces (`pieces`; one piece for heads of up to 128 that are powers
    of two): the [C, C] products sum over pieces, and each gradient is formed and stored one
    piece of its columns at a time.
    """
    b = b_ref[...]
    dtype = q_ref.dtype
    f32 = jnp.float32
    chunk = b.shape[0]
    keys, values = pieces(q_ref.shape[1]), pieces(v_ref.shape[1])
    positions = jnp.arange(chunk)
    last = positions == chunk - 1
    g = jnp.sum(jnp.where(last, b, 0.0))                               # b_{C-1}, exactly
    causal = positions[:, None] >= positions[None, :]
    # Above the diagonal b_i - b_j >= 0 can be large: zero it before exp, mask after.
    decay = jnp.exp(jnp.where(causal, b[:, None] - b[None, :], 0.0))   # [C, C]
    end_decay = jnp.exp(g - b)[:, None]                                # [C, 1]
    start_decay = jnp.exp(b)[:, None]                                  # [C, 1]

    # The forward's weights and their cotangent are cast to the compute dtype before their
    # matmuls exactly as retention.py does (so bf16 runs the same bf16 products). Partial
    # products stay float32 on chip and are summed in float32. dv is stored before the
    # weights' cotangent is formed, and each gradient piece before the next, so few tiles
    # are live at once in registers.
    scores = functools.reduce(jnp.add, (_dot(q_ref[:, c], k_ref[:, c], 1, 1) for c in keys))
    weights = jnp.where(causal, scores * decay, 0.0).astype(dtype)              # [C, C]
    for vcols in values:
        dv = _dot(weights, do_ref[:, vcols], 0, 0)                              # [C, bv]
        for kcols in keys:
            k_to_end = (k_ref[:, kcols] * end_decay).astype(dtype)              # [C, bk]
            dv += _dot(k_to_end, du_ref[kcols, vcols], 1, 0)
        dv_ref[:, vcols] = dv.astype(dv_ref.dtype)

    d_weights = functools.reduce(jnp.add,
                                 (_dot(do_ref[:, c], v_ref[:, c], 1, 1) for c in values))
    d_scores = jnp.where(causal, d_weights * decay, 0.0).astype(dtype)          # [C, C]

    # dL/db: q.dq - k.dk per position; the chunk total g = b_{C-1} adds the entering state's
    # path through the chunk and the keys' path to the chunk end.
    db = jnp.zeros((chunk,), f32)
    chunk_end = jnp.zeros((), f32)
    for kcols in keys:
        q, k = q_ref[:, kcols], k_ref[:, kcols]
        dq = _dot(d_scores, k, 1, 0)                                            # [C, bk]
        for vcols in values:
            do_decayed = (do_ref[:, vcols] * start_decay).astype(dtype)         # [C, bv]
            dq += _dot(do_decayed, s_ref[kcols, vcols], 1, 1)
        dq_ref[:, kcols] = dq.astype(dq_ref.dtype)
        db += jnp.sum(q.astype(f32) * dq, axis=1)

        dk_inter = jnp.zeros(dq.shape, f32)                                     # [C, bk]
        for vcols in values:
            du = du_ref[kcols, vcols]
            dk_inter += _dot(v_ref[:, vcols], du, 1, 1)
            chunk_end += jnp.exp(g) * jnp.sum(s_ref[kcols, vcols].astype(f32) * du.astype(f32))
        dk_inter = end_decay * dk_inter
        dk = _dot(d_scores, q, 0, 0) + dk_inter                                 # [C, bk]
        dk_ref[:, kcols] = dk.astype(dk_ref.dtype)
        kf = k.astype(f32)
        db -= jnp.sum(kf * dk, axis=1)
        chunk_end += jnp.sum(kf * dk_inter)
    db_ref[...] = db + jnp.where(last, chunk_end, 0.0)


def _check_chunk_grads_args(q, k, v, do, b, states, d_kv) -> tuple[int, ...]:
    """Raises ValueError naming the bad argument; returns (B, Tp, H, N, C, Dk, Dv)."""
    dims = check_time_major(b, keys={"q": q, "k": k}, values={"v": v, "do": do},
                            matrices={"states": states, "d_kv": d_kv})
    *_, key_dim, value_dim = dims
    for what, dim in (("key dim Dk (q.shape[3])", key_dim),
                      ("value dim Dv (v.shape[3])", value_dim)):
        if dim % MIN_DOT_DIM:
            raise ValueError(f"the {what} = {dim} is not a multiple of {MIN_DOT_DIM}")
    return dims


def chunk_grads(q: Array, k: Array, v: Array, do: Array, b: Array, states: Array,
                d_kv: Array, *, num_warps: int | None = None,
                interpret: bool = False) -> tuple[Array, Array, Array, Array]:
    """The per-chunk gradients of chunkwise retention, in one kernel.

    What `retention._chunkwise_backward` computes from its residuals, the output cotangent
    and d_kv (see the module docstring for the formulas), reading and writing activations in
    their [B, Tp, H, D] layout: the [C, C] weights and score cotangents are cast to the
    compute dtype before their matmuls, as there; every matmul accumulates in float32 and
    partial gradients are summed in float32 (retention.py rounds them to the compute dtype
    first when the decay is fixed; here they stay float32).

    Args:
      q, k: [B, Tp, H, Dk] queries and keys, Tp = N * C (time padded to whole chunks).
      v, do: [B, Tp, H, Dv] values and output cotangents.
      b: float32 [G, H, N, C], G in {1, B}: within-chunk inclusive cumulative log decay
        (G = 1: fixed per-head decay shared by the batch), entries <= 0; C a power of two
        >= 16.
      states: [B, H, N, Dk, Dv] state entering each chunk.
      d_kv: [B, H, N, Dk, Dv] gradient of the state leaving each chunk (`chunk_states` with
        reverse=True).
      All but b share one floating dtype (the compute dtype); Dk and Dv are multiples of 16
      (each program walks them in power-of-two pieces of at most 128 columns, `pieces`:
      256 -> 128 + 128, 432 -> 3 x 128 + 32 + 16).
      num_warps: Triton warps per program; None picks 4 for small tiles, 8 otherwise.
      interpret: run the kernel in Pallas interpret mode (any backend, e.g. CPU tests).
    Returns:
      (dq [B, Tp, H, Dk], dk [B, Tp, H, Dk], dv [B, Tp, H, Dv] in the compute dtype,
       db float32 [B, H, N, C]): db is dL/db, the gradient with respect to the cumulative log
      decays (its last position carries the chunk-total terms); the gradient of the per-token
      log decays is its transpose through the within-chunk cumsum. Matmuls use the default
      matmul precision (`jax.default_matmul_precision` applies; on GPU float32 inputs default
      to TF32).
    """
    batch, _, heads, chunks, chunk, key_dim, value_dim = _check_chunk_grads_args(
        q, k, v, do, b, states, d_kv)
    shared = b.shape[0] == 1
    if num_warps is None:
        num_warps = default_num_warps(chunk, key_dim, value_dim)

    def chunk_block(dim):  # chunk n of head h: rows n*C .. n*C + C-1 of the time axis
        return pl.BlockSpec((None, chunk, None, dim), lambda i, h, n: (i, n, h, 0))

    state_block = pl.BlockSpec((None, None, None, key_dim, value_dim),
                               lambda i, h, n: (i, h, n, 0, 0))
    decay_block = pl.BlockSpec((None, None, None, chunk),
                               lambda i, h, n: (decay_index(shared, i), h, n, 0))
    return pl.pallas_call(
        _chunk_grads_kernel,
        grid=(batch, heads, chunks),
        in_specs=[chunk_block(key_dim), chunk_block(key_dim), chunk_block(value_dim),
                  chunk_block(value_dim), decay_block, state_block, state_block],
        out_specs=[chunk_block(key_dim), chunk_block(key_dim), chunk_block(value_dim),
                   pl.BlockSpec((None, None, None, chunk), lambda i, h, n: (i, h, n, 0))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct(v.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, chunks, chunk), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="retention_chunk_grads",
    )(q, k, v, do, b, states, d_kv)
