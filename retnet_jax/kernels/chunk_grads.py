"""Pallas kernels for the per-chunk part of chunkwise retention's backward pass.

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
matrices and every partial gradient to memory. `chunk_grads` computes them on chip: each
program loads one chunk's q, k, v, do straight from [B, Tp, H, D] activations, with its
decays, S and dU, and writes only dq, dk, dv (in the same layout) and db. For heads of up to
one tile it is one kernel, one program per chunk; for wider heads (the presets' Dk 256,
Dv 432) two, one program per chunk and group of key columns (dq, dk, db) and one per chunk
and group of value columns (dv), which gives the GPU more programs (`default_blocks`). The
states S and their gradients dU are chunk recurrences (`chunk_states`);
`chunkwise_retention_pallas` (chunk_output.py) wires them up.

Written for the Pallas Triton backend (GPU) and run with `interpret=True` elsewhere (tests
on CPU): every loaded tile is a power of two wide (`common.pieces`), matmuls are 2-D
`jnp.dot`/`lax.dot_general` with each dimension >= 16 and float32 accumulation, shapes are
static.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from retnet_jax.kernels.common import (
    MAX_BLOCK, MIN_DOT_DIM, check_block_arg, check_time_major, column_group, decay_index,
    default_num_warps, pieces)

Array = jax.Array

__all__ = ["chunk_grads", "default_blocks"]

# `chunk_grads`' two-kernel layout for heads wider than one group: groups of up to 128 key
# and 256 value columns. Timed on an H200 at C = 128, 8 warps (BENCHMARKS.md, run 20): at
# Dk 256 / Dv 432 (2 key groups, 3 value groups of 144) 1.82 ms against the fused kernel's
# 2.12; at Dk = Dv = 128 (one group each, so nothing gained in parallelism and both [C, C]
# products computed twice) 1.20 ms against the fused 1.01.
WIDE_HEAD_BLOCKS = (MAX_BLOCK, 2 * MAX_BLOCK)



# --------------------------------------------------------------------------- kernel


def _dot(a, b, contract_a: int, contract_b: int):
    """2-D matmul contracting a's axis `contract_a` with b's `contract_b`, float32 result."""
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                           preferred_element_type=jnp.float32)


class _Decays(NamedTuple):
    """One chunk's decay factors, from b float32 [C] (the within-chunk cumulative log decay)."""
    causal: Array       # bool [C, C], j <= i
    decay: Array        # [C, C], exp(b_i - b_j) on and below the diagonal, 1 above
    end_decay: Array    # [C, 1], exp(g - b_j): key j's decay to the chunk end
    start_decay: Array  # [C, 1], exp(b_i): the entering state's decay to position i
    g: Array            # [], the chunk total b_{C-1}
    last: Array         # bool [C], the chunk's last position


def _decays(b) -> _Decays:
    chunk = b.shape[0]
    positions = jnp.arange(chunk)
    last = positions == chunk - 1
    g = jnp.sum(jnp.where(last, b, 0.0))                               # b_{C-1}, exactly
    causal = positions[:, None] >= positions[None, :]
    # Above the diagonal b_i - b_j >= 0 can be large: zero it before exp, mask after.
    decay = jnp.exp(jnp.where(causal, b[:, None] - b[None, :], 0.0))
    return _Decays(causal, decay, jnp.exp(g - b)[:, None], jnp.exp(b)[:, None], g, last)


# The forward's weights and their cotangent are cast to the compute dtype before their
# matmuls exactly as retention.py does (so bf16 runs the same bf16 products). Partial
# products stay float32 on chip and are summed in float32. Each gradient piece is stored
# before the next is formed, so few tiles are live at once in registers.


def _value_grads(q_ref, k_ref, do_ref, du_ref, d: _Decays, dv_ref) -> None:
    """dv = (M * (q k^T))^T do + (exp(g - b) k) dU for the value columns of do, dU and dv.

    Refs: q, k [C, Dk]; do [C, W]; du [Dk, W]; out dv [C, W] (W value columns)."""
    dtype = q_ref.dtype
    keys = pieces(q_ref.shape[1])
    scores = functools.reduce(jnp.add, (_dot(q_ref[:, c], k_ref[:, c], 1, 1) for c in keys))
    weights = jnp.where(d.causal, scores * d.decay, 0.0).astype(dtype)         # [C, C]
    for vcols in pieces(do_ref.shape[1]):
        dv = _dot(weights, do_ref[:, vcols], 0, 0)                              # [C, bv]
        for kcols in keys:
            k_to_end = (k_ref[:, kcols] * d.end_decay).astype(dtype)            # [C, bk]
            dv += _dot(k_to_end, du_ref[kcols, vcols], 1, 0)
        dv_ref[:, vcols] = dv.astype(dv_ref.dtype)


def _key_grads(q_ref, k_ref, v_ref, do_ref, s_ref, du_ref, d: _Decays,
               dq_ref, dk_ref, db_ref) -> None:
    """dq, dk and these key columns' part of dL/db.

    Refs: q, k [C, W]; v, do [C, Dv]; s, du [W, Dv]; out dq, dk [C, W], db float32 [C]
    (W key columns). dL/db is q.dq - k.dk per position; the chunk total g = b_{C-1} adds the
    entering state's path through the chunk and the keys' path to the chunk end."""
    dtype, f32 = q_ref.dtype, jnp.float32
    values = pieces(v_ref.shape[1])
    d_weights = functools.reduce(jnp.add,
                                 (_dot(do_ref[:, c], v_ref[:, c], 1, 1) for c in values))
    d_scores = jnp.where(d.causal, d_weights * d.decay, 0.0).astype(dtype)     # [C, C]
    db = jnp.zeros(d.last.shape, f32)
    chunk_end = jnp.zeros((), f32)
    for kcols in pieces(q_ref.shape[1]):
        q, k = q_ref[:, kcols], k_ref[:, kcols]
        dq = _dot(d_scores, k, 1, 0)                                            # [C, bk]
        for vcols in values:
            do_decayed = (do_ref[:, vcols] * d.start_decay).astype(dtype)       # [C, bv]
            dq += _dot(do_decayed, s_ref[kcols, vcols], 1, 1)
        dq_ref[:, kcols] = dq.astype(dq_ref.dtype)
        db += jnp.sum(q.astype(f32) * dq, axis=1)

        dk_inter = jnp.zeros(dq.shape, f32)                                     # [C, bk]
        for vcols in values:
            du = du_ref[kcols, vcols]
            dk_inter += _dot(v_ref[:, vcols], du, 1, 1)
            chunk_end += jnp.exp(d.g) * jnp.sum(s_ref[kcols, vcols].astype(f32)
                                                * du.astype(f32))
        dk_inter = d.end_decay * dk_inter
        dk = _dot(d_scores, q, 0, 0) + dk_inter                                 # [C, bk]
        dk_ref[:, kcols] = dk.astype(dk_ref.dtype)
        kf = k.astype(f32)
        db -= jnp.sum(kf * dk, axis=1)
        chunk_end += jnp.sum(kf * dk_inter)
    db_ref[...] = db + jnp.where(d.last, chunk_end, 0.0)


def _chunk_grads_kernel(q_ref, k_ref, v_ref, do_ref, b_ref, s_ref, du_ref,
                        dq_ref, dk_ref, dv_ref, db_ref):
    """One (batch, head, chunk) tile, every gradient: dv first, then dq, dk and db.

    Refs: q, k [C, Dk]; v, do [C, Dv]; b float32 [C]; s, du [Dk, Dv] (all but b in the compute
    dtype). Outputs: dq, dk [C, Dk]; dv [C, Dv] (compute dtype); db float32 [C]. Heads are
    walked in power-of-two pieces (`pieces`; one piece for heads of up to 128 that are powers
    of two): the [C, C] products sum over pieces, and each gradient is formed and stored one
    piece of its columns at a time.
    """
    d = _decays(b_ref[...])
    _value_grads(q_ref, k_ref, do_ref, du_ref, d, dv_ref)
    _key_grads(q_ref, k_ref, v_ref, do_ref, s_ref, du_ref, d, dq_ref, dk_ref, db_ref)


def _value_grads_kernel(q_ref, k_ref, do_ref, b_ref, du_ref, dv_ref):
    """One (batch, head, chunk, value group) tile: dv's columns of the group (`_value_grads`)."""
    _value_grads(q_ref, k_ref, do_ref, du_ref, _decays(b_ref[...]), dv_ref)


def _key_grads_kernel(q_ref, k_ref, v_ref, do_ref, b_ref, s_ref, du_ref,
                      dq_ref, dk_ref, db_ref):
    """One (batch, head, chunk, key group) tile: dq's and dk's columns of the group and the
    group's part of db (`_key_grads`)."""
    _key_grads(q_ref, k_ref, v_ref, do_ref, s_ref, du_ref, _decays(b_ref[...]),
               dq_ref, dk_ref, db_ref)


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


def default_blocks(key_dim: int, value_dim: int) -> tuple[int, int] | None:
    """`chunk_grads`' blocks for heads of Dk x Dv: two kernels (`WIDE_HEAD_BLOCKS`) when that
    splits a head into more than one group, else None (the fused kernel)."""
    block_k, block_v = WIDE_HEAD_BLOCKS
    return WIDE_HEAD_BLOCKS if key_dim > block_k or value_dim > block_v else None


def chunk_grads(q: Array, k: Array, v: Array, do: Array, b: Array, states: Array,
                d_kv: Array, *, blocks: tuple[int, int] | None = None,
                num_warps: int | None = None,
                interpret: bool = False) -> tuple[Array, Array, Array, Array]:
    """The per-chunk gradients of chunkwise retention, in one kernel or two.

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
      blocks: None: one kernel, one program per (batch, head, chunk) forming every
        gradient. (block_k, block_v), powers of two >= 16: two kernels, one program per
        (batch, head, chunk, group of key columns) for dq, dk and db, one per (batch, head,
        chunk, group of value columns) for dv, each group the widest multiple of 16 dividing
        the head dim up to its block (more programs; each recomputes its chunk's [C, C]
        scores or score cotangents, and XLA sums the key groups' parts of db).
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
    call = functools.partial(pl.pallas_call, interpret=interpret, compiler_params=(
        plgpu.CompilerParams(num_warps=num_warps, num_stages=1)))

    def chunk_block(dim, group=False):  # chunk n of head h: rows n*C .. n*C + C-1 of time
        return pl.BlockSpec((None, chunk, None, dim),
                            lambda i, h, n, *j: (i, n, h, j[0] if group else 0))

    def state_block(rows, columns, group_axis=None):
        return pl.BlockSpec((None, None, None, rows, columns), lambda i, h, n, *j: (
            i, h, n, j[0] if group_axis == 0 else 0, j[0] if group_axis == 1 else 0))

    decay_block = pl.BlockSpec((None, None, None, chunk),
                               lambda i, h, n, *j: (decay_index(shared, i), h, n, 0))
    activation = jax.ShapeDtypeStruct(q.shape, q.dtype)
    value_activation = jax.ShapeDtypeStruct(v.shape, q.dtype)
    if blocks is None:
        return call(
            _chunk_grads_kernel, grid=(batch, heads, chunks),
            in_specs=[chunk_block(key_dim), chunk_block(key_dim), chunk_block(value_dim),
                      chunk_block(value_dim), decay_block, state_block(key_dim, value_dim),
                      state_block(key_dim, value_dim)],
            out_specs=[chunk_block(key_dim), chunk_block(key_dim), chunk_block(value_dim),
                       pl.BlockSpec((None, None, None, chunk), lambda i, h, n: (i, h, n, 0))],
            out_shape=[activation, activation, value_activation,
                       jax.ShapeDtypeStruct((batch, heads, chunks, chunk), jnp.float32)],
            name="retention_chunk_grads",
        )(q, k, v, do, b, states, d_kv)

    if len(blocks) != 2:
        raise ValueError(f"blocks must be None or (block_k, block_v), got {blocks!r}")
    block_k, block_v = (check_block_arg(name, block) for name, block
                        in zip(("blocks[0] (block_k)", "blocks[1] (block_v)"), blocks))
    if min(block_k, block_v) < MIN_DOT_DIM:
        raise ValueError(f"blocks must be >= {MIN_DOT_DIM} (Triton's smallest dot tile), "
                         f"got {blocks!r}")
    bk, bv = column_group(key_dim, block_k), column_group(value_dim, block_v)
    key_groups = key_dim // bk
    dv = call(
        _value_grads_kernel, grid=(batch, heads, chunks, value_dim // bv),
        in_specs=[chunk_block(key_dim), chunk_block(key_dim), chunk_block(bv, group=True),
                  decay_block, state_block(key_dim, bv, group_axis=1)],
        out_specs=chunk_block(bv, group=True),
        out_shape=value_activation,
        name="retention_chunk_value_grads",
    )(q, k, do, b, d_kv)
    dq, dk, db_parts = call(
        _key_grads_kernel, grid=(batch, heads, chunks, key_groups),
        in_specs=[chunk_block(bk, group=True), chunk_block(bk, group=True),
                  chunk_block(value_dim), chunk_block(value_dim), decay_block,
                  state_block(bk, value_dim, group_axis=0),
                  state_block(bk, value_dim, group_axis=0)],
        out_specs=[chunk_block(bk, group=True), chunk_block(bk, group=True),
                   pl.BlockSpec((None, None, None, None, chunk),
                                lambda i, h, n, j: (i, h, n, j, 0))],
        out_shape=[activation, activation,
                   jax.ShapeDtypeStruct((batch, heads, chunks, key_groups, chunk),
                                        jnp.float32)],
        name="retention_chunk_key_grads",
    )(q, k, v, do, b, states, d_kv)
    return dq, dk, dv, jnp.sum(db_parts, axis=3)
