"""A fused Pallas kernel for the output of chunkwise retention (forward).

Inside chunk n, with b_i the within-chunk inclusive cumulative log decay and S the state
entering the chunk, retention's output is

    o_i = sum_{j <= i} exp(b_i - b_j) (q_i . k_j) v_j  +  exp(b_i) q_i S.

`retention._chunkwise_forward` computes this with XLA einsums that write the [C, C] weights
and two partial outputs to memory. `chunk_output` computes it in one kernel: each program
loads one chunk's q, k and a block of v's columns straight from [B, Tp, H, D] activations,
with the chunk's decays and the matching block of S, and writes only its block of o, in
the same layout.

`chunkwise_retention_pallas` is `retention.chunkwise_retention` from three kernels and no
relayout of any activation: `chunk_states` runs the state recurrence, `chunk_output` the
output; its backward pass runs `chunk_states` in reverse for the state gradients and
`chunk_grads` for dq, dk, dv and the decay gradient. Only the (small) decays go through XLA.

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
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from retnet_jax import retention
from retnet_jax.kernels.chunk_grads import chunk_grads, default_blocks
from retnet_jax.kernels.chunk_states import (
    STATE_NUM_STAGES, STATE_NUM_WARPS, SegmentedStates, chunk_state_segments, chunk_states,
    state_segments)
from retnet_jax.kernels.common import (
    MAX_BLOCK, MIN_DOT_DIM, check_block_arg, check_time_major, column_group, decay_index,
    default_num_warps, is_power_of_two, pieces)

Array = jax.Array

__all__ = ["chunk_output", "chunkwise_retention_pallas", "unsupported_reason"]

# --------------------------------------------------------------------------- kernel


def _chunk_output_kernel(q_ref, k_ref, v_ref, b_ref, *refs):
    """One (batch, head, chunk, value group) tile.

    Refs: q, k [C, Dk]; v [C, BV]; b float32 [C]; then the chunk's state, either s [Dk, BV]
    or its segment parts (`_segment_state`); last o [C, BV]. Columns are walked in
    power-of-two pieces (`pieces`; one piece for heads and groups of up to 128 that are
    powers of two): q k^T sums over key pieces, and o is formed one value piece at a time.
    """
    *state_refs, o_ref = refs
    state = (_segment_state(*state_refs, q_ref.dtype) if len(state_refs) > 1
             else lambda kc, vc: state_refs[0][kc, vc])
    b = b_ref[...]
    chunk = b.shape[0]
    f32 = jnp.float32
    key_pieces = pieces(q_ref.shape[1])
    # scores[i, j] = q_i . k_j (contracting both on Dk: k is used transposed).
    scores = functools.reduce(jnp.add, (
        lax.dot_general(q_ref[:, kc], k_ref[:, kc], (((1,), (1,)), ((), ())),
                        preferred_element_type=f32) for kc in key_pieces))          # [C, C]
    positions = jnp.arange(chunk)
    causal = positions[:, None] >= positions[None, :]
    # Above the diagonal b_i - b_j >= 0 can be large: zero it before exp, mask after.
    decay = jnp.exp(jnp.where(causal, b[:, None] - b[None, :], 0.0))
    weights = jnp.where(causal, scores * decay, 0.0).astype(q_ref.dtype)
    start_decay = jnp.exp(b)[:, None]                                  # [C, 1]
    for vc in pieces(o_ref.shape[1]):
        inter = functools.reduce(jnp.add, (
            jnp.dot(q_ref[:, kc], state(kc, vc), preferred_element_type=f32)
            for kc in key_pieces))                                                  # [C, bv]
        o = jnp.dot(weights, v_ref[:, vc], preferred_element_type=f32) + start_decay * inter
        o_ref[:, vc] = o.astype(o_ref.dtype)


def _segment_state(local_ref, entering_ref, offsets_ref, dtype):
    """The chunk's state from its segment's parts (`chunk_states.join_segments`' sum, as it
    is read): local [Dk, BV] + exp(offset) * entering float32 [Dk, BV], in float32, cast to
    the compute dtype. offsets float32 [N]: this head's offsets; the chunk is grid axis 2."""
    scale = jnp.exp(offsets_ref[pl.program_id(2)])
    return lambda kc, vc: (local_ref[kc, vc].astype(jnp.float32)
                           + scale * entering_ref[kc, vc]).astype(dtype)


def _check_chunk_output_args(q, k, v, b, states, block_v) -> tuple[int, ...]:
    """Raises ValueError naming the bad argument; returns (B, Tp, H, N, C, Dk, Dv, value
    group size)."""
    segmented = isinstance(states, SegmentedStates)
    dims = check_time_major(b, keys={"q": q, "k": k}, values={"v": v},
                            matrices={} if segmented else {"states": states})
    if segmented:
        _check_segments(states, q.dtype, b.shape[0], *dims)
    *_, chunk, key_dim, value_dim = dims
    block_v = check_block_arg("block_v", block_v)
    reason = unsupported_reason(key_dim, value_dim, chunk, block_v=block_v)
    if reason:
        raise ValueError(reason)
    return (*dims, column_group(value_dim, block_v))


def _check_segments(parts: SegmentedStates, dtype, groups: int, batch, padded, heads, chunks,
                    chunk, key_dim, value_dim) -> None:
    """Raises ValueError unless `parts` has the shapes and dtypes `SegmentedStates` names."""
    segments = parts.local.shape[1] if parts.local.ndim == 6 else 0
    if not segments or chunks % segments:
        raise ValueError(f"states.local must be [B, S, H, L, Dk, Dv] with S * L = N = "
                         f"{chunks}, got shape {parts.local.shape}")
    expected = {
        "local": (parts.local, (batch, segments, heads, chunks // segments, key_dim,
                                value_dim), dtype),
        "entering": (parts.entering, (batch, segments, heads, key_dim, value_dim),
                     jnp.float32),
        "offsets": (parts.offsets, (groups, heads, chunks), jnp.float32),
    }
    for name, (a, shape, want) in expected.items():
        if a.shape != shape or a.dtype != want:
            raise ValueError(f"states.{name} must be {jnp.dtype(want).name} {shape}, got "
                             f"{a.dtype} {a.shape}")


def chunk_output(q: Array, k: Array, v: Array, b: Array,
                 states: Array | SegmentedStates, *, block_v: int = 256,
                 num_warps: int | None = None, interpret: bool = False) -> Array:
    """Chunkwise retention's output, intra-chunk and inter-chunk terms, in one kernel.

    For position i of chunk n: o_i = sum_{j <= i} exp(b_i - b_j) (q_i . k_j) v_j
    + exp(b_i) q_i S[b, h, n], with the [C, C] weights cast to the compute dtype before
    multiplying v (as in `retention._chunkwise_forward`), both matmuls accumulated in float32
    and summed in float32.

    Args:
      q, k: [B, Tp, H, Dk] queries and keys, Tp = N * C (time padded to whole chunks); Dk a
        multiple of 16 (products over Dk are summed over power-of-two pieces, `pieces`).
      v: [B, Tp, H, Dv] values, same dtype as q.
      b: float32 [G, H, N, C], G in {1, B}: within-chunk inclusive cumulative log decay
        (G = 1: fixed per-head decay shared by the batch), entries <= 0; C a power of two
        >= 16.
      states: [B, H, N, Dk, Dv] state entering each chunk, same dtype as q; or those states
        in segments (`chunk_states.SegmentedStates`, from `chunk_state_segments`), which the
        kernel joins as it reads them (`join_segments`' float32 sum, cast once), so that the
        joined states are never written.
      block_v: the most value columns per program (a power of two >= 16): each program
        takes the widest multiple of 16 <= block_v dividing Dv (`column_group`: Dv 128 at 64
        -> 2 programs of 64; Dv 432 at 64 -> 9 of 48, at 512 -> 1 of 432). Fewer columns per
        program means the chunk's q k^T is recomputed more often.
      num_warps: Triton warps per program; None: `_default_output_warps` (4 for single
        tiles of up to 128 columns, 8 for wider heads).
      interpret: run the kernel in Pallas interpret mode (any backend, e.g. CPU tests).
    Returns:
      o: [B, Tp, H, Dv] in v's dtype. Matmuls use the default matmul precision (so
      `jax.default_matmul_precision` applies; on GPU float32 inputs default to TF32).
    """
    batch, _, heads, chunks, chunk, key_dim, value_dim, block = _check_chunk_output_args(
        q, k, v, b, states, block_v)
    shared = b.shape[0] == 1
    if num_warps is None:
        num_warps = _default_output_warps(chunk, key_dim, block)

    # Chunk n of head h is rows n*C .. n*C + C-1 of the time axis; j picks value columns.
    qk_block = pl.BlockSpec((None, chunk, None, key_dim), lambda i, h, n, j: (i, n, h, 0))
    v_block = pl.BlockSpec((None, chunk, None, block), lambda i, h, n, j: (i, n, h, j))
    decay_block = pl.BlockSpec((None, None, None, chunk),
                               lambda i, h, n, j: (decay_index(shared, i), h, n, 0))
    if isinstance(states, SegmentedStates):   # chunk n is chunk n % L of segment n // L
        length = chunks // states.local.shape[1]
        state_specs = [
            pl.BlockSpec((None, None, None, None, key_dim, block),
                         lambda i, h, n, j: (i, n // length, h, n % length, 0, j)),
            pl.BlockSpec((None, None, None, key_dim, block),
                         lambda i, h, n, j: (i, n // length, h, 0, j)),
            pl.BlockSpec((None, None, chunks),
                         lambda i, h, n, j: (decay_index(shared, i), h, 0)),
        ]
        state_args = (states.local, states.entering, states.offsets)
    else:
        state_specs = [pl.BlockSpec((None, None, None, key_dim, block),
                                    lambda i, h, n, j: (i, h, n, 0, j))]
        state_args = (states,)
    return pl.pallas_call(
        _chunk_output_kernel,
        grid=(batch, heads, chunks, value_dim // block),
        in_specs=[qk_block, qk_block, v_block, decay_block, *state_specs],
        out_specs=v_block,
        out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="retention_chunk_output",
    )(q, k, v, b, *state_args)


def _default_output_warps(chunk: int, key_dim: int, block: int) -> int:
    """`chunk_output`'s Triton warps per program: 4 when q, k and the value group are single
    tiles (Dk and the group <= 128: at C = 128, Dk = Dv = 128 4 warps took 0.87-0.94x the
    time of 8 on an H200), else `default_num_warps` (8 for the presets' Dk 256 / groups of
    144, where 4 took 1.5x the time of 8; BENCHMARKS.md, session 12)."""
    if key_dim <= MAX_BLOCK and block <= MAX_BLOCK:
        return 4
    return default_num_warps(chunk, key_dim, block)


def unsupported_reason(key_dim: int, value_dim: int, chunk_size: int, *,
                       block_v: int = 64) -> str | None:
    """Why the kernels (`chunk_output`, `chunk_grads`, `chunkwise_retention_pallas`) cannot
    take these sizes, or None. Head dims must be multiples of 16 (Triton's smallest dot tile;
    wider ones are walked in power-of-two pieces up to 128), and chunk_output splits Dv over
    programs in groups of a multiple of 16 columns dividing Dv, at most block_v."""
    if key_dim % MIN_DOT_DIM:
        return f"key head dim {key_dim} is not a multiple of {MIN_DOT_DIM}"
    if column_group(value_dim, block_v) is None:
        return (f"value head dim {value_dim} has no divisor that is a multiple of "
                f"{MIN_DOT_DIM} and <= block_v={block_v}")
    if not is_power_of_two(chunk_size) or chunk_size < MIN_DOT_DIM:
        return f"chunk_size {chunk_size} is not a power of two >= {MIN_DOT_DIM}"
    return None


# --------------------------------------------------------------------------- full retention


class _Tiling(NamedTuple):
    """Static kernel settings of one `chunkwise_retention_pallas` call."""
    block_v: int          # most value columns per `chunk_output` program
    state_block_v: int    # most value columns per `chunk_states` program
    segments: int         # `chunk_states`' segments (a divisor of the number of chunks)
    num_warps: int | None  # Triton warps per `chunk_output` program (None: its default)
    state_num_warps: int    # Triton warps per `chunk_states` program
    state_num_stages: int   # software-pipelining stages of `chunk_states`' chunk loop
    interpret: bool


def _run_states(x, y, b, x0, tiling: _Tiling, reverse: bool):
    return chunk_states(x, y, b, x0, reverse=reverse, **_state_kwargs(tiling),
                        segments=tiling.segments)


def _state_kwargs(tiling: _Tiling) -> dict:
    """`tiling`'s settings of the state kernel (`chunk_states`, `chunk_state_segments`)."""
    return dict(block_v=tiling.state_block_v, num_warps=tiling.state_num_warps,
                num_stages=tiling.state_num_stages, interpret=tiling.interpret)


def _forward(q, k, v, log_decay, initial_state, chunk_size, tiling, *, keep_states: bool):
    """Outputs (o, final_state) and, with keep_states, the backward's residuals (q, k, v
    padded to whole chunks in the compute dtype, the states entering each chunk, the
    cumulative decays). Without keep_states the states of a segmented recurrence are joined
    inside the output kernel and never written."""
    _, time, heads, _ = q.shape
    out_dtype = v.dtype
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    padding = -time % chunk_size
    q, k, v = (retention._pad_time(x.astype(dtype), padding) for x in (q, k, v))
    b = retention._chunk_cumulative_log_decay(log_decay, time, heads, chunk_size)
    if keep_states or tiling.segments == 1:
        states, final_state = _run_states(k, v, b, initial_state, tiling, reverse=False)
    else:
        states = chunk_state_segments(k, v, b, initial_state, reverse=False,
                                      segments=tiling.segments, **_state_kwargs(tiling))
        final_state = states.final
    o = chunk_output(q, k, v, b, states, block_v=tiling.block_v, num_warps=tiling.num_warps,
                     interpret=tiling.interpret)
    return (o[:, :time].astype(out_dtype), final_state), (q, k, v, states, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _chunkwise_pallas(q, k, v, log_decay, initial_state, chunk_size, tiling):
    outputs, _ = _forward(q, k, v, log_decay, initial_state, chunk_size, tiling,
                          keep_states=False)
    return outputs


def _chunkwise_pallas_fwd(q, k, v, log_decay, initial_state, chunk_size, tiling):
    outputs, residuals = _forward(q, k, v, log_decay, initial_state, chunk_size, tiling,
                                  keep_states=True)
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype)
                   for x in (q, k, v, log_decay, initial_state))
    return outputs, residuals + (shapes,)


def _chunkwise_pallas_bwd(chunk_size, tiling, residuals, cotangents):
    """The backward pass: state gradients from `chunk_states` run in reverse, per-chunk
    gradients from `chunk_grads`, the log-decay gradient through the within-chunk cumsum."""
    q, k, v, states, b, shapes = residuals
    q_aval, k_aval, v_aval, decay_aval, state_aval = shapes
    do, d_final = cotangents
    _, padded, heads, _ = q.shape
    time = q_aval.shape[1]
    do = retention._pad_time(do.astype(q.dtype), padded - time)
    d_kv, d_initial = _run_states(q, do, b, d_final.astype(jnp.float32), tiling, reverse=True)
    dq, dk, dv, db = chunk_grads(q, k, v, do, b, states, d_kv,
                                 blocks=default_blocks(q.shape[-1], v.shape[-1]),
                                 interpret=tiling.interpret)

    # b = within-chunk cumsum of log_decay (shared by the batch when fixed): the transpose of
    # that linear map takes dL/db to dL/d log_decay (reverse cumsum inside each chunk, padding
    # dropped, summed over batch and time for a fixed decay).
    if b.shape[0] == 1:
        db = jnp.sum(db, axis=0, keepdims=True)
    cumulative = functools.partial(retention._chunk_cumulative_log_decay, time=time,
                                   heads=heads, chunk_size=chunk_size)
    (d_log_decay,) = jax.linear_transpose(cumulative, decay_aval)(db)

    return (dq[:, :time].astype(q_aval.dtype),
            dk[:, :time].astype(k_aval.dtype),
            dv[:, :time].astype(v_aval.dtype),
            d_log_decay.astype(decay_aval.dtype),
            d_initial.astype(state_aval.dtype))


_chunkwise_pallas.defvjp(_chunkwise_pallas_fwd, _chunkwise_pallas_bwd)


def chunkwise_retention_pallas(q: Array, k: Array, v: Array, log_decay: Array, *,
                               chunk_size: int = 64, initial_state: Array | None = None,
                               interpret: bool = False, block_v: int = 256,
                               state_block_v: int = 256, segments: int | None = None,
                               num_warps: int | None = None,
                               state_num_warps: int = STATE_NUM_WARPS,
                               state_num_stages: int = STATE_NUM_STAGES
                               ) -> tuple[Array, Array]:
    """`retention.chunkwise_retention` from the `chunk_states` and `chunk_output` kernels.

    Same maths, arguments and results. Activations stay in their [B, T, H, D] layout
    throughout (zero-padded along time to whole chunks only when T is not a multiple of
    the chunk length). The backward pass (`jax.custom_vjp`, reverse mode only) takes the
    state gradients from `chunk_states` run in reverse and dq, dk, dv and the log-decay
    gradient from `chunk_grads`. The chunk length used is min(chunk_size, max(16, next power of
    two >= T)): the kernels need a power of two >= 16 (outputs are unchanged by padding).

    Args:
      q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; any float dtype (computed in their common
        dtype, accumulated in float32; the states entering each chunk are kept in that
        dtype, as in retention.py). Dk and Dv multiples of 16: e.g. the presets' Dk 256,
        Dv 432.
      log_decay: float [H] (fixed) or [B, T, H] (gated), entries <= 0.
      chunk_size: tokens per chunk, a power of two >= 16.
      initial_state: optional [B, H, Dk, Dv], any float dtype (used as float32); zeros
        when None.
      interpret: run the kernels in Pallas interpret mode (CPU tests).
      block_v: the most value columns per `chunk_output` program (a power of two; the
        default 256 gives Dv 128 one program of 128 and Dv 432 three of 144: forwards up
        to 1.5x (Dv 128) and 2.1x (Dv 432) faster than at 64 on an H200, BENCHMARKS.md
        runs 7 and 9).
      state_block_v: the most value columns per `chunk_states` program (a power of two;
        at Dv 128 the widths 64 to 256 are within 8 % of each other on an H200, at Dv 432
        256 makes the forward 1.4x faster than 64).
      segments: `chunk_states`' segments (a divisor of the number of chunks); None picks
        `state_segments` (more than 1 only for long sequences with few batch x heads).
      num_warps: Triton warps per `chunk_output` program; None: its default (4 for heads of
        up to 128 columns, 8 for the presets' wider ones).
      state_num_warps, state_num_stages: Triton warps per `chunk_states` program and
        software-pipelining stages of its chunk loop (forward and reverse).
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
    block_v = check_block_arg("block_v", block_v)
    state_block_v = check_block_arg("state_block_v", state_block_v)
    chunk = min(int(chunk_size), max(MIN_DOT_DIM, pl.next_power_of_2(time)))
    reason = unsupported_reason(key_dim, value_dim, chunk, block_v=block_v)
    if reason:
        raise ValueError(reason)
    for name, warps in (("num_warps", num_warps), ("state_num_warps", state_num_warps)):
        if warps is not None and not (isinstance(warps, (int, np.integer))
                                      and is_power_of_two(int(warps))):
            raise ValueError(f"{name} must be a power of two, got {warps!r}")
    if not isinstance(state_num_stages, (int, np.integer)) or state_num_stages < 1:
        raise ValueError(f"state_num_stages must be a positive integer, got "
                         f"{state_num_stages!r}")
    if segments is None:   # an explicit count is checked by chunk_states
        segments = state_segments(batch, heads, key_dim, value_dim, -(-time // chunk),
                                  block_v=state_block_v)
    if initial_state is None:
        initial_state = retention.zero_state(batch, heads, key_dim, value_dim)
    retention._check_state(initial_state, q, v)
    tiling = _Tiling(block_v, state_block_v, segments,
                     None if num_warps is None else int(num_warps), int(state_num_warps),
                     int(state_num_stages), bool(interpret))
    return _chunkwise_pallas(q, k, v, log_decay, initial_state.astype(jnp.float32), chunk,
                             tiling)
