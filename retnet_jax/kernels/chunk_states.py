"""A Pallas kernel for the chunk recurrence of retention's states (forward) and of their
gradients (backward).

With b_n the within-chunk inclusive cumulative log decays of chunk n [C] and g_n = b_n[C-1]
its total, chunkwise retention's state entering chunk n + 1 is

    S_{n+1} = exp(g_n) S_n + (k_n * exp(g_n - b_n)[:, None])^T v_n       (forward),

and the gradient of the state leaving chunk m - 1 (`d_kv` in `retention._chunkwise_backward`)
runs the same recurrence from the end with queries and output cotangents,

    dU_{m-1} = exp(g_m) dU_m + (q_m * exp(b_m)[:, None])^T do_m          (reverse).

`retention._chunk_states` computes these as batched matmuls over chunked [B, H, N, C, D]
copies. `chunk_states` reads [B, Tp, H, D] activations where they lie: each program owns one
(batch, head, key group, value group), keeps its [BK, BV] slice of the state in float32
registers (as power-of-two tiles) and loops over the chunks in order, loading one chunk's
[C, BK] and [C, BV] columns per step; it writes the state at every chunk boundary (in the
compute dtype, for the output and gradient kernels' matmuls) and the float32 state past the
last chunk.

Written for the Pallas Triton backend (GPU) and run with `interpret=True` elsewhere (tests
on CPU): every loaded tile is a power of two wide, the matmul is a 2-D `lax.dot_general`
with each dimension >= 16 and float32 accumulation, the loop is a `lax.fori_loop` (an
scf.for), shapes are static.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from retnet_jax.kernels.common import (
    MIN_DOT_DIM, check_block_arg, check_time_major, column_group, decay_index, pieces)

Array = jax.Array

__all__ = ["SegmentedStates", "chunk_state_segments", "chunk_states", "join_segments",
           "state_segments"]

# `state_segments`: split the chunk loop until the grid has about this many programs (~1 per
# SM of a 132-SM H100/H200), keeping each segment at least MIN_SEGMENT_CHUNKS chunks long.
# With 3 pipelining stages a long loop costs less than a join (BENCHMARKS.md, session 12:
# at [4, 8192, 16, 128] one loop of 64 chunks beat two of 32 plus their join).
SEGMENT_PROGRAMS = 128
MIN_SEGMENT_CHUNKS = 16
# Default Triton warps per program and software-pipelining stages of the chunk loop: 3
# stages made the forward 1.01-1.24x and the forward+backward 1.00-1.13x faster than 2 at the
# issue's shapes on an H200, 8 warps slowed the reverse loop (BENCHMARKS.md, session 12).
STATE_NUM_WARPS = 4
STATE_NUM_STAGES = 3


def _chunk_states_kernel(x_ref, y_ref, b_ref, x0_ref, out_ref, final_ref, *, reverse: bool):
    """One (batch, head, key group, value group) program.

    Refs: x [Tp, BK]; y [Tp, BV] (compute dtype); b float32 [N, C]; x0 float32 [BK, BV].
    Outputs: out [N, BK, BV] (compute dtype), out[n] the carry just before chunk n is folded
    in; final float32 [BK, BV], the carry after the loop's last chunk (N-1, or 0 in reverse).
    The carry is held as power-of-two tiles (`pieces`: one tile for groups of up to 128
    columns that are powers of two).
    """
    chunks, chunk = b_ref.shape
    dtype = x_ref.dtype
    last = jnp.arange(chunk) == chunk - 1
    key_pieces, value_pieces = pieces(x_ref.shape[1]), pieces(y_ref.shape[1])
    tiles = [(i, j) for i in range(len(key_pieces)) for j in range(len(value_pieces))]

    def step(i, carry):
        n = chunks - 1 - i if reverse else i
        rows = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
        b = b_ref[n]                                                    # [C]
        g = jnp.sum(jnp.where(last, b, 0.0))                            # b[C-1], exactly
        # Decays to the chunk's end (forward) or from its start (reverse): exponents <= 0.
        decay = (jnp.exp(b) if reverse else jnp.exp(g - b))[:, None]    # [C, 1]
        xs = [(x_ref[rows, kc] * decay).astype(dtype) for kc in key_pieces]   # [C, bk] each
        ys = [y_ref[rows, vc] for vc in value_pieces]                         # [C, bv] each
        updated = []
        for (i, j), tile in zip(tiles, carry, strict=True):
            out_ref[n, key_pieces[i], value_pieces[j]] = tile.astype(out_ref.dtype)
            update = lax.dot_general(xs[i], ys[j], (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)  # [bk, bv]
            updated.append(jnp.exp(g) * tile + update)
        return tuple(updated)

    final = lax.fori_loop(0, chunks, step,
                          tuple(x0_ref[key_pieces[i], value_pieces[j]] for i, j in tiles))
    for (i, j), tile in zip(tiles, final, strict=True):
        final_ref[key_pieces[i], value_pieces[j]] = tile


def chunk_states(x: Array, y: Array, b: Array, x0: Array, *, reverse: bool,
                 block_k: int = 64, block_v: int = 64, segments: int = 1,
                 num_warps: int = STATE_NUM_WARPS, num_stages: int = STATE_NUM_STAGES,
                 interpret: bool = False) -> tuple[Array, Array]:
    """The chunk recurrence S <- exp(g_n) S + (x_n * decay_n[:, None])^T y_n, one kernel.

    Forward (reverse=False, x = k, y = v): decay_n = exp(g_n - b_n), chunks n = 0 .. N-1;
    out[n] is the state entering chunk n and final the state after chunk N-1.
    Reverse (reverse=True, x = q, y = do, x0 = the final state's cotangent): decay_n =
    exp(b_n), chunks n = N-1 .. 0; out[n] is d_kv[n], the gradient of the state leaving chunk
    n, and final the gradient of the initial state. The decayed x tile is cast to the compute
    dtype before its matmul (as retention.py does); the carry stays float32.

    Args:
      x: [B, Tp, H, Dk], Tp = N * C; Dk a multiple of 16.
      y: [B, Tp, H, Dv], x's dtype (the compute dtype); Dv a multiple of 16.
      b: float32 [G, H, N, C], G in {1, B}: within-chunk inclusive cumulative log decay
        (G = 1: fixed per-head decay shared by the batch), entries <= 0; C a power of two
        >= 16.
      x0: float32 [B, H, Dk, Dv], the carry before the first step (the initial state
        forward, the final state's cotangent in reverse).
      reverse: run the recurrence from the last chunk to the first, with the reverse decays.
      block_k, block_v: the most key / value columns per program (powers of two >= 16): each
        program takes the widest multiple of 16 dividing Dk / Dv up to these (`column_group`;
        Dv = 432 at 64 -> 48 columns, held as tiles of 32 and 16).
      segments: split the N chunks into this many runs of N / segments (it must divide N),
        each looped over by its own programs from a zero carry, then joined in XLA
        (`join_segments`): the kernel's sequential loop is N / segments steps long, for
        long sequences with few (batch, head) pairs (`state_segments` picks it).
      num_warps, num_stages: Triton warps per program and software-pipelining stages of the
        chunk loop's loads.
      interpret: run the kernel in Pallas interpret mode (any backend, e.g. CPU tests).
    Returns:
      (out [B, H, N, Dk, Dv] in x's dtype, final float32 [B, H, Dk, Dv]). Matmuls use the
      default matmul precision (on GPU float32 inputs default to TF32).
    """
    run = _checked_recurrence(x, y, b, x0, reverse=reverse, block_k=block_k, block_v=block_v,
                              segments=segments, num_warps=num_warps, num_stages=num_stages,
                              interpret=interpret)
    if segments == 1:
        return run(x, y, b, x0)
    parts = _segmented(run, x, y, b, x0, int(segments), bool(reverse))
    return join_segments(parts), parts.final


class SegmentedStates(NamedTuple):
    """A chunk recurrence run in S segments of L = N / S chunks, before they are joined: the
    carry at chunk n = s * L + l is local[:, s, :, l] + exp(offsets[:, :, n]) * entering[:, s]
    (`join_segments`)."""
    local: Array     # [B, S, H, L, Dk, Dv] compute dtype: carries from a zero start at the
                     # segment's first chunk (its last in reverse)
    entering: Array  # float32 [B, S, H, Dk, Dv]: the whole recurrence's carry entering
                     # segment s (from the right in reverse)
    offsets: Array   # float32 [G, H, N], G as b's: log decay from that entering carry to
                     # chunk n's (<= 0)
    final: Array     # float32 [B, H, Dk, Dv]: the carry after the last step


def chunk_state_segments(x: Array, y: Array, b: Array, x0: Array, *, reverse: bool,
                         segments: int, block_k: int = 64, block_v: int = 64,
                         num_warps: int = STATE_NUM_WARPS,
                         num_stages: int = STATE_NUM_STAGES,
                         interpret: bool = False) -> SegmentedStates:
    """`chunk_states` in segments, returned before the join, for a consumer that reads each
    chunk's carry once and can join it as it reads (`chunk_output`): the joined [B, H, N, Dk,
    Dv] states are then never written. Arguments as `chunk_states`' (segments may be 1: one
    segment from a zero carry, x0 entering it); `join_segments` of the result is its `out`."""
    run = _checked_recurrence(x, y, b, x0, reverse=reverse, block_k=block_k, block_v=block_v,
                              segments=segments, num_warps=num_warps, num_stages=num_stages,
                              interpret=interpret)
    return _segmented(run, x, y, b, x0, int(segments), bool(reverse))


def _checked_recurrence(x, y, b, x0, *, reverse, block_k, block_v, segments, num_warps,
                        num_stages, interpret):
    """`chunk_states`' argument checks (ValueError naming the bad one); returns the kernel
    call, `_recurrence` with its column groups and compiler settings bound."""
    batch, padded, heads, chunks, chunk, key_dim, value_dim = check_time_major(
        b, keys={"x": x}, values={"y": y}, matrices={})
    if x0.shape != (batch, heads, key_dim, value_dim) or x0.dtype != jnp.float32:
        raise ValueError(f"x0 must be float32 {(batch, heads, key_dim, value_dim)} "
                         f"[B, H, Dk, Dv], got {x0.dtype} {x0.shape}")
    bk = column_group(key_dim, check_block_arg("block_k", block_k))
    bv = column_group(value_dim, check_block_arg("block_v", block_v))
    for what, dim, most, block in (("key dim Dk (x.shape[3])", key_dim, block_k, bk),
                                   ("value dim Dv (y.shape[3])", value_dim, block_v, bv)):
        if block is None:
            raise ValueError(f"the {what} = {dim} has no divisor that is a multiple of "
                             f"{MIN_DOT_DIM} and <= {most}")
    if not isinstance(segments, (int, np.integer)) or segments < 1 or chunks % segments:
        raise ValueError(f"segments must be a positive divisor of the number of chunks "
                         f"N = {chunks}, got {segments!r}")
    return functools.partial(_recurrence, reverse=bool(reverse), block_k=bk, block_v=bv,
                             num_warps=num_warps, num_stages=num_stages, interpret=interpret)


def state_segments(batch: int, heads: int, key_dim: int, value_dim: int, chunks: int, *,
                   block_k: int = 64, block_v: int = 64) -> int:
    """How many segments `chunk_states` should split N chunks into: the largest power of two
    S dividing N that keeps S x (its programs without segments) <= SEGMENT_PROGRAMS and each
    segment >= MIN_SEGMENT_CHUNKS long (1 when the grid is already that large). E.g. the
    issue's [1, 32768, 16, 128] at C = 128 (N = 256): 64 programs at block_v 64 -> 2, 32 at
    block_v 256 (`chunkwise_retention_pallas`' default) -> 4; [4, 8192, 16, 128]: 256 or
    128 programs -> 1."""
    programs = (batch * heads * (key_dim // (column_group(key_dim, block_k) or key_dim))
                * (value_dim // (column_group(value_dim, block_v) or value_dim)))
    segments = 1
    while (chunks % (2 * segments) == 0 and chunks // (2 * segments) >= MIN_SEGMENT_CHUNKS
           and programs * 2 * segments <= SEGMENT_PROGRAMS):
        segments *= 2
    return segments


def _segmented(run, x: Array, y: Array, b: Array, x0: Array, segments: int,
               reverse: bool) -> SegmentedStates:
    """`run` (the kernel) on `segments` runs of chunks folded into the batch axis, each from
    a zero carry, and the carries entering the runs, in XLA (a loop over the S segments on
    float32 [B, H, Dk, Dv] carries). Shapes as `chunk_states`'."""
    batch, padded, heads, _ = x.shape
    chunks, chunk = b.shape[2:]
    length = chunks // segments

    def fold(a):   # [B, S * L * C, H, D] -> [B * S, L * C, H, D], no copy
        return a.reshape(batch * segments, padded // segments, *a.shape[2:])

    local_b = jnp.broadcast_to(b, (batch, *b.shape[1:])).reshape(
        batch, heads, segments, length, chunk)
    local_b = jnp.swapaxes(local_b, 1, 2).reshape(batch * segments, heads, length, chunk)
    zeros = jnp.zeros((batch * segments, *x0.shape[1:]), jnp.float32)
    local, local_final = run(fold(x), fold(y), local_b, zeros)
    local_final = local_final.reshape(batch, segments, *x0.shape[1:])

    g = b[..., -1].reshape(b.shape[0], heads, segments, length)  # [G, H, S, L] chunk totals
    # Decay from a segment's entering carry to each chunk's: the sum of the g's folded in
    # between (an exclusive cumsum from the segment's start, or its end in reverse; <= 0).
    offsets = (_exclusive_cumsum(g[..., ::-1])[..., ::-1] if reverse
               else _exclusive_cumsum(g))
    totals = jnp.exp(jnp.sum(g, axis=-1))[..., None, None]     # [G, H, S, 1, 1]
    entering, carry = [None] * segments, x0
    for s in (reversed(range(segments)) if reverse else range(segments)):
        entering[s] = carry
        carry = totals[:, :, s] * carry + local_final[:, s]
    return SegmentedStates(
        local=local.reshape(batch, segments, *local.shape[1:]),
        entering=jnp.stack(entering, axis=1), offsets=offsets.reshape(*b.shape[:3]),
        final=carry)


def join_segments(parts: SegmentedStates) -> Array:
    """The carry at every chunk, [B, H, N, Dk, Dv] in the local carries' dtype, from its
    segments' parts: local + exp(offsets) * entering in float32, in XLA (one pass over the
    states)."""
    batch, segments, heads, length = parts.local.shape[:4]
    offsets = parts.offsets.reshape(-1, heads, segments, length)
    scale = jnp.exp(jnp.swapaxes(offsets, 1, 2))[..., None, None]      # [G, S, H, L, 1, 1]
    out = parts.local.astype(jnp.float32) + scale * parts.entering[:, :, :, None]
    out = jnp.swapaxes(out, 1, 2)                                       # [B, H, S, L, Dk, Dv]
    return out.reshape(batch, heads, segments * length,
                       *out.shape[4:]).astype(parts.local.dtype)


def _exclusive_cumsum(a: Array) -> Array:
    """[..., L] -> [..., L]: sums of the entries before each position (0 first)."""
    return jnp.cumsum(jnp.pad(a[..., :-1], [(0, 0)] * (a.ndim - 1) + [(1, 0)]), axis=-1)


def _recurrence(x, y, b, x0, *, reverse: bool, block_k: int, block_v: int, num_warps: int,
                num_stages: int, interpret: bool) -> tuple[Array, Array]:
    """The pallas_call of `chunk_states` (arguments checked there; block_k / block_v are the
    column groups)."""
    batch, padded, heads, key_dim = x.shape
    value_dim = y.shape[-1]
    chunks, chunk = b.shape[2:]
    bk, bv = block_k, block_v
    shared = b.shape[0] == 1

    return pl.pallas_call(
        functools.partial(_chunk_states_kernel, reverse=reverse),
        grid=(batch, heads, key_dim // bk, value_dim // bv),
        in_specs=[
            pl.BlockSpec((None, padded, None, bk), lambda i, h, p, j: (i, 0, h, p)),
            pl.BlockSpec((None, padded, None, bv), lambda i, h, p, j: (i, 0, h, j)),
            pl.BlockSpec((None, None, chunks, chunk),
                         lambda i, h, p, j: (decay_index(shared, i), h, 0, 0)),
            pl.BlockSpec((None, None, bk, bv), lambda i, h, p, j: (i, h, p, j)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, chunks, bk, bv), lambda i, h, p, j: (i, h, 0, p, j)),
            pl.BlockSpec((None, None, bk, bv), lambda i, h, p, j: (i, h, p, j)),
        ],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, chunks, key_dim, value_dim), x.dtype),
                   jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="retention_chunk_states_reverse" if reverse else "retention_chunk_states",
    )(x, y, b, x0)
