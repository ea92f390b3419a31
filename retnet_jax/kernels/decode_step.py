"""A Pallas kernel for one decoding step of retention: the state read once and written once.

`retention.retention_step` computes, per (batch, head),

    S' = exp(log_decay) S + k^T v,        o = q S'                  (S [Dk, Dv])

`retention_step_pallas` does both in one kernel: each program owns one (batch, head, value
group), loads its [Dk, BV] columns of S as power-of-two tiles, updates them in registers
(float32), accumulates o from the updated tiles and writes them back in the state's dtype
(float32, or bfloat16 for a half-size decoding cache): one read and one write of the
state. Inside a model at batch 8-32, XLA already fuses the update and the read-out into
one kernel per block that reads and writes the state once (at batch 1 it makes a third
pass, over a small state). At the 1.3B preset's heads on an H200, the step alone
(`experiments/bench_decode_step.py`, BENCHMARKS.md "Decoding", session 11) takes 0.83-0.87x
XLA's time at batch 32 with 144-column groups and 4 warps, but 1.08-1.35x it at batch 8 and
1.09-1.49x at batch 1, where the state is small (a call alone: launch-bound). Inside the
1.3B model on an H100 a token takes 0.4-10 % less time with it than with XLA's step at
batches 1-64 (session 19). Models use it with `decode_kernel` 'pallas' (or
`retention_kernel` 'pallas' and no decode_kernel).

With `rotate_at`, q and k arrive unrotated and the kernel applies the xPos rotation
(`positions.rotate`) itself: each program rotates its head's q and k at the sequence's
position, where XLA ran the rotations as fusions of their own in every block (what is left
outside is the positions' broadcast to the kernel's lanes). The rotation pairs
features (2i, 2i + 1), so the kernel then walks the state's even and odd rows as two
strided sets of tiles, each multiplied by the matching half of the rotated q and k.

`retention_step_pallas`'s q, k and v reach the kernel as one array, [B, H Dk | H Dk |
zeros | H Dv] a row (`_pack`), each program reading its head's q and k and its value
columns as blocks of it: inside a model XLA writes them in fewer fusions (with XLA's GEMMs
two kernels a block fewer; on an H100 0.6-2.7 % less time a token at batches 1, 8 and 64:
BENCHMARKS.md, "Decoding", session 19). The models' batch-1 decoding with the GEMV
projections uses `retention_step_from_splits` instead (since session 21): the kernel reads
q, k and v straight from the projection kernel's K-split partials (one block of each
split's row, summed in split order, rounded, k scaled), so no fusion of XLA's adds them
between the two kernels.

Elementwise work only (an outer product and a column sum per tile), so no dot-tile limits
beyond Triton's power-of-two loads; Dk and Dv multiples of 16 as the other kernels.
Written for the Pallas Triton backend (GPU) and run with `interpret=True` elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from retnet_jax import positions, retention
from retnet_jax.kernels.common import (MIN_DOT_DIM, check_block_arg, column_group, pieces,
                                       round_up)
from retnet_jax.kernels.projections import SplitSums

Array = jax.Array

__all__ = ["retention_step_pallas", "retention_step_from_splits", "default_block_v",
           "step_unsupported_reason", "splits_layout_reason"]

# Per-program scalars (the decay, the position) are passed as [..., LANES] copies of one
# value: Triton loads power-of-two vectors, and 16 lanes is the smallest width every kernel
# here already uses.
LANES = MIN_DOT_DIM
STEP_MIN_PROGRAMS = 128   # default grid size: about one program per SM of an H100/H200
WIDEST_BLOCK_V = 256  # the default's widest groups (144 of the presets' 432 columns)


def step_unsupported_reason(key_dim: int, value_dim: int) -> str | None:
    """Why `retention_step_pallas` cannot take these head dims, or None: each must be a
    multiple of 16 (any chunk size: the step has no chunks)."""
    for what, dim in (("key head dim Dk (q.shape[2])", key_dim),
                      ("value head dim Dv (v.shape[2])", value_dim)):
        if dim % MIN_DOT_DIM:
            return f"{what} = {dim} is not a multiple of {MIN_DOT_DIM}"
    return None


def default_block_v(batch: int, heads: int, value_dim: int, *,
                    min_programs: int = STEP_MIN_PROGRAMS) -> int:
    """The largest power of two <= WIDEST_BLOCK_V whose value groups (`column_group`) give
    at least min_programs programs (batch x heads x groups), else the smallest, 16. The 1.3B
    heads (8, Dv 432): batch 1 -> 32 (27 groups of 16, 216 programs), batch 2-5 -> 128 (9
    groups of 48), batch >= 6 -> 256 (3 groups of 144, the width timed at batch 8-64).
    Raises ValueError unless value_dim is a multiple of 16."""
    if value_dim % MIN_DOT_DIM:
        raise ValueError(f"value_dim must be a multiple of {MIN_DOT_DIM}, got {value_dim}")
    most = WIDEST_BLOCK_V
    while most > MIN_DOT_DIM and batch * heads * (value_dim // column_group(value_dim, most)
                                                  ) < min_programs:
        most //= 2
    return most


def _key_rows(key_dim: int, rotate: bool) -> list[list[pl.Slice]]:
    """Groups of row slices covering Dk: power-of-two pieces, or with rotation pairs of
    strided pieces (even rows, odd rows) that `_load_keys` rotates together."""
    if not rotate:
        return [[piece] for piece in pieces(key_dim)]
    return [[pl.ds(2 * half.start + parity, half.size, stride=2) for parity in (0, 1)]
            for half in pieces(key_dim // 2)]


def _load(refs: list, columns: pl.Slice, dtype, scale: float | None = None) -> Array:
    """The columns of refs (one [C] block per split) summed over the splits in split order
    (as `SplitSums.total`), rounded to dtype, then (scale given) multiplied by scale and
    rounded again, as float32: q, k or v as the block computes them (k scaled by
    key_dim^-0.5 in the compute dtype). One 1-D ref per split, as Triton's lowering takes
    strided slices (the rotation's even and odd rows) of 1-D blocks only."""
    total = functools.reduce(jnp.add, [ref[columns].astype(jnp.float32) for ref in refs])
    total = total.astype(dtype).astype(jnp.float32)
    if scale is not None:
        total = (total * jnp.asarray(scale, dtype).astype(jnp.float32)).astype(dtype)
        total = total.astype(jnp.float32)
    return total


def _load_keys(refs: list, groups: list[list[pl.Slice]],
               rotation: list[tuple[Array, Array]] | None, dtype,
               scale: float | None = None) -> list[Array]:
    """q's or k's pieces (one per slice of `groups`, `_load`ed from the splits' refs:
    summed, rounded to dtype, scaled) as float32 vectors; with rotation (cos and sin of the
    angles, float32 vectors, one pair per group) each (even, odd) pair rotated as
    `positions.rotate` does: (x_e cos - x_o sin, x_o cos + x_e sin), rounded to dtype (the
    caller's q or k dtype; a packed array's refs may be wider)."""
    loaded = []
    for i, group in enumerate(groups):
        xs = [_load(refs, rows, dtype, scale) for rows in group]
        if rotation is not None:
            even, odd = xs
            cos, sin = rotation[i]
            xs = [(even * cos - odd * sin).astype(dtype).astype(jnp.float32),
                  (odd * cos + even * sin).astype(dtype).astype(jnp.float32)]
        loaded.extend(xs)
    return loaded


def _decode_step_kernel(*refs, splits: int, rotate: bool, dtypes, key_scale: float | None):
    """One (batch, head, value group) program; dtypes: q's, k's and v's (what their sums
    and rotated values round to); key_scale: None, or what k is multiplied by first.

    Refs: `splits` each of q [Dk], of k [Dk] and of v [BV] (blocks of the q|k|v rows of
    each split, summed: one for the packed array, the K splits for a projection's
    partials); decay float32 [LANES]
    (copies of exp(log_decay)); with rotate, the position int32 [LANES] (copies) and theta
    float32 [Dk / 2] (one frequency per pair of features); state [Dk, BV]. Outputs: o [BV]
    (v's dtype); new_state [Dk, BV] (state's dtype). Computed in float32.
    """
    q_refs, k_refs, v_refs = (refs[i * splits:(i + 1) * splits] for i in range(3))
    decay_ref, *refs = refs[3 * splits:]
    if rotate:
        position_ref, theta_ref, state_ref, o_ref, new_state_ref = refs
    else:
        state_ref, o_ref, new_state_ref = refs
    key_dim = q_refs[0].shape[0]
    groups = _key_rows(key_dim, rotate)
    rotation = None
    if rotate:
        position = jnp.max(position_ref[...]).astype(jnp.float32)   # all lanes hold it
        angles = [position * theta_ref[half] for half in pieces(key_dim // 2)]
        rotation = [(jnp.cos(angle), jnp.sin(angle)) for angle in angles]
    rows = [piece for group in groups for piece in group]
    qs = _load_keys(q_refs, groups, rotation, dtypes[0])
    ks = _load_keys(k_refs, groups, rotation, dtypes[1], key_scale)
    decay = jnp.max(decay_ref[...])                          # all lanes hold the same value
    for vc in pieces(v_refs[0].shape[0]):
        v = _load(v_refs, vc, dtypes[2])
        o = jnp.zeros(v.shape, jnp.float32)
        for kc, q, k in zip(rows, qs, ks, strict=True):
            tile = (decay * state_ref[kc, vc].astype(jnp.float32)
                    + k[:, None] * v[None, :])                              # [bk, bv]
            new_state_ref[kc, vc] = tile.astype(new_state_ref.dtype)
            o = o + jnp.sum(q[:, None] * tile, axis=0)
        o_ref[vc] = o.astype(o_ref.dtype)


def _lanes(x: Array, rows: int, heads: int | None) -> Array:
    """x [rows] (heads None) or [rows, heads] (a fixed decay's [heads]: rows 1) as
    [rows(, heads), LANES] copies of each entry."""
    shape = (rows,) if heads is None else (rows, heads)
    return jnp.broadcast_to(x.reshape(*shape, 1), (*shape, LANES))


def _pack(q: Array, k: Array, v: Array, columns: int) -> tuple[Array, int]:
    """q, k [B, H, Dk] and v [B, H, Dv] as one [B, C] array, rows q | k | zeros | v in the
    wider of their dtypes (weak types ignored: every value is kept exactly), v starting at
    a multiple of `columns` (a program's value columns, so value groups are whole blocks of
    it, as q's and k's heads are Dk-blocks); returns (packed, v's first column)."""
    batch, heads, key_dim = q.shape
    v_at = round_up(2 * heads * key_dim, columns)
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    parts = [q.reshape(batch, -1), k.reshape(batch, -1),
             jnp.zeros((batch, v_at - 2 * heads * key_dim), dtype), v.reshape(batch, -1)]
    return jnp.concatenate([x.astype(dtype) for x in parts], axis=1), v_at


def _check_rotate_at(rotate_at, batch: int) -> Array:
    """rotate_at as an int array, or a ValueError unless it is an int scalar or int [batch]."""
    rotate_at = jnp.asarray(rotate_at)
    if not jnp.issubdtype(rotate_at.dtype, jnp.integer) or rotate_at.shape not in ((), (batch,)):
        raise ValueError(f"rotate_at must be an int scalar or int [batch={batch}], got "
                         f"{rotate_at.dtype} {rotate_at.shape}")
    return rotate_at


def _step_call(rows: Array, starts: tuple[int, int, int], log_decay: Array, state: Array, *,
               dtypes: tuple, key_scale: float | None, rotate_at: Array | None, bv: int,
               num_warps: int, interpret: bool) -> tuple[Array, Array]:
    """The step kernel over rows [S, B, C] (S arrays of q|k|v columns the kernel adds), q,
    k and v starting at `starts` (multiples of Dk, Dk and bv); state [B, H, Dk, Dv]."""
    batch, heads, key_dim, value_dim = state.shape
    q_at, k_at, v_at = starts
    decay = jnp.exp(log_decay.astype(jnp.float32))
    shared = decay.ndim == 1
    decay = _lanes(decay, 1 if shared else batch, heads)
    splits = rows.shape[0]
    groups = value_dim // bv

    def split_specs(width: int, first: int, grouped: bool) -> list[pl.BlockSpec]:
        # per split s, row b's block of `width` columns: head h's (first + h), or with
        # grouped its value group j's (first + h * groups + j)
        return [pl.BlockSpec((None, None, width), lambda b, h, j, s=s: (
                    s, b, first + (h * groups + j if grouped else h)))
                for s in range(splits)]

    in_specs = (split_specs(key_dim, q_at // key_dim, False)
                + split_specs(key_dim, k_at // key_dim, False)
                + split_specs(bv, v_at // bv, True)
                + [pl.BlockSpec((None, None, LANES), lambda b, h, j: (0 if shared else b, h, 0))])
    args = [rows] * (3 * splits) + [decay]
    rotate = rotate_at is not None
    if rotate:
        theta = jnp.asarray(positions.rotation_frequencies(key_dim)[::2], jnp.float32)
        in_specs += [pl.BlockSpec((None, LANES), lambda b, h, j: (b, 0)),
                     pl.BlockSpec((key_dim // 2,), lambda b, h, j: (0,))]
        args += [_lanes(jnp.broadcast_to(rotate_at.astype(jnp.int32), (batch,)), batch, None),
                 theta]
    in_specs.append(pl.BlockSpec((None, None, key_dim, bv), lambda b, h, j: (b, h, 0, j)))
    args.append(state)

    return pl.pallas_call(
        functools.partial(_decode_step_kernel, splits=splits, rotate=rotate, dtypes=dtypes,
                          key_scale=key_scale),
        grid=(batch, heads, groups),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bv), lambda b, h, j: (b, h, j)),
            pl.BlockSpec((None, None, key_dim, bv), lambda b, h, j: (b, h, 0, j)),
        ],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, value_dim), dtypes[2]),
                   jax.ShapeDtypeStruct(state.shape, state.dtype)],
        input_output_aliases={len(args) - 1: 1},   # the new state overwrites the old one
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="retention_decode_step",
    )(*args)


def _value_columns(batch: int, heads: int, key_dim: int, value_dim: int,
                   block_v: int | None) -> int:
    """A program's value columns (`column_group` of block_v, default `default_block_v`),
    after checking the head dims (ValueError naming the one that does not fit)."""
    reason = step_unsupported_reason(key_dim, value_dim)
    if reason:
        raise ValueError(reason)
    if block_v is None:
        block_v = default_block_v(batch, heads, value_dim)
    return column_group(value_dim, check_block_arg("block_v", block_v))


def retention_step_pallas(q: Array, k: Array, v: Array, log_decay: Array, state: Array, *,
                          rotate_at: Array | int | None = None, block_v: int | None = None,
                          num_warps: int = 4, interpret: bool = False) -> tuple[Array, Array]:
    """`retention.retention_step` as one kernel; same arguments and results, plus an
    optional rotation of q and k. Forward only, for decoding: differentiating it raises
    (JAX's NotImplementedError); gradients come from the chunkwise form.

    Args:
      q, k: [B, H, Dk], Dk a multiple of 16.
      v: [B, H, Dv], Dv a multiple of 16.
      log_decay: float [H] (fixed) or [B, H] (gated), entries <= 0.
      state: [B, H, Dk, Dv], the state after the previous token, float32 or bfloat16 (a
        half-size cache: read and written as bfloat16, updated in float32).
      rotate_at: None, or an int scalar or int [B]: the absolute position of each
        sequence's token; q and k are then rotated by `positions.rotate` at it inside the
        kernel (the step sees rotate(q), rotate(k)).
      block_v: the most value columns per program (a power of two >= 16): each program takes
        the widest multiple of 16 dividing Dv up to it (Dv = 432 at 256 -> 144 columns, at
        64 -> 48); None: `default_block_v`.
      num_warps: Triton warps per program.
      interpret: run in Pallas interpret mode (any backend, e.g. CPU tests).
    Returns:
      (o [B, H, Dv] in v's dtype, new state [B, H, Dk, Dv] in state's dtype).
    Raises:
      ValueError naming the argument whose shape or dtype does not fit.
    """
    retention._check_step_inputs(q, k, v, log_decay, state)
    batch, heads, key_dim = q.shape
    bv = _value_columns(batch, heads, key_dim, v.shape[-1], block_v)
    packed, v_at = _pack(q, k, v, bv)
    return _step_call(packed[None], (0, heads * key_dim, v_at), log_decay, state,
                      dtypes=(q.dtype, k.dtype, v.dtype), key_scale=None,
                      rotate_at=None if rotate_at is None else _check_rotate_at(rotate_at,
                                                                                  batch),
                      bv=bv, num_warps=num_warps, interpret=interpret)


def splits_layout_reason(q: SplitSums, k: SplitSums, v: SplitSums, *, heads: int,
                         block_v: int | None = None) -> str | None:
    """Why `retention_step_from_splits` cannot read q, k and v from these split sums as
    they lie (then add them and use `retention_step_pallas`), or None: one partials array
    [S, B, C] for all three, q's and k's columns starting at multiples of Dk and v's at a
    multiple of the programs' value columns, head dims the step takes."""
    return _splits_layout(q, k, v, heads, block_v)[0]


def _splits_layout(q: SplitSums, k: SplitSums, v: SplitSums, heads: int,
                   block_v: int | None) -> tuple[str | None, int | None]:
    """(`splits_layout_reason`'s reason, the programs' value columns where it is None)."""
    if not (q.partials is k.partials is v.partials):
        return "q, k and v are not columns of one partials array", None
    batch = q.partials.shape[1]
    if q.width != k.width or q.width % heads or v.width % heads:
        return (f"q ({q.width}), k ({k.width}) and v ({v.width}) columns do not split into "
                f"{heads} heads"), None
    key_dim, value_dim = q.width // heads, v.width // heads
    reason = step_unsupported_reason(key_dim, value_dim)
    if reason:
        return reason, None
    bv = _value_columns(batch, heads, key_dim, value_dim, block_v)
    for name, sums, multiple in (("q", q, key_dim), ("k", k, key_dim), ("v", v, bv)):
        if sums.start % multiple:
            return (f"{name} starts at column {sums.start}, not a multiple of {multiple} "
                    f"(its blocks' width)"), None
    return None, bv


def retention_step_from_splits(q: SplitSums, k: SplitSums, v: SplitSums, log_decay: Array,
                               state: Array, *, dtype, key_scale: float | None = None,
                               rotate_at: Array | int | None = None,
                               block_v: int | None = None, num_warps: int = 4,
                               interpret: bool = False) -> tuple[Array, Array]:
    """`retention_step_pallas` reading q, k and v straight from a projection's K-split
    partials (`kernels.projections.projection_splits`): each program adds its head's
    columns over the splits, so no kernel of XLA's adds them first.

    q = sum(q's splits), k = sum(k's splits) * key_scale and v = sum(v's splits), each
    rounded to `dtype` as the block's projections and scaling round (`layers.project`);
    then the step as `retention_step_pallas` computes it (rotation included).

    Args:
      q, k: SplitSums of H Dk columns; v: of H Dv columns; all over one float32
        [S, B, C] partials array, laid out as `splits_layout_reason` requires.
      log_decay, state, rotate_at, block_v, num_warps, interpret: as
        `retention_step_pallas`' (state's heads and dims give H, Dk and Dv).
      dtype: the compute dtype q, k, v round to (o's dtype).
      key_scale: None, or the factor k is multiplied by (in dtype) after its sum.
    Returns:
      (o [B, H, Dv] in dtype, new state [B, H, Dk, Dv] in state's dtype).
    Raises:
      ValueError naming what does not fit.
    """
    batch, heads, key_dim, value_dim = state.shape
    for name, sums, dim in (("q", q, key_dim), ("k", k, key_dim), ("v", v, value_dim)):
        if sums.width != heads * dim:
            raise ValueError(f"retention_step_from_splits: {name} has {sums.width} columns, "
                             f"the state's {heads} heads x {dim} need {heads * dim}")
    reason, bv = _splits_layout(q, k, v, heads, block_v)
    if reason:
        raise ValueError(f"retention_step_from_splits: {reason}")

    def struct(dim):
        return jax.ShapeDtypeStruct((q.partials.shape[1], heads, dim), dtype)
    retention._check_step_inputs(struct(key_dim), struct(key_dim), struct(value_dim),
                                 log_decay, state)
    return _step_call(q.partials, (q.start, k.start, v.start), log_decay, state,
                      dtypes=(dtype,) * 3, key_scale=key_scale,
                      rotate_at=None if rotate_at is None else _check_rotate_at(rotate_at,
                                                                                  batch),
                      bv=bv, num_warps=num_warps, interpret=interpret)
