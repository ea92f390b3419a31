"""A Pallas kernel for decoding's projections: x [M, K] times weights [K, N], M <= 8 rows.

At batch 1-8 a decoded token's time is mostly the blocks' weight reads (BENCHMARKS.md,
"Decoding"), and XLA's GEMMs stream weights at 0.49-0.64 of the copy bandwidth there
(session 14's profile). Models use it at batch 1 (`layers.PROJECTION_KERNEL_BATCHES`:
1.18x faster a token at the 1.3B preset on an H200, 1.14x on an H100, where it streams
at 0.69-0.81 of the copy bandwidth; a model at batch 8 decodes 2.6x slower with it than
with XLA's GEMMs, not profiled, the 8 rows summed one by one on the CUDA cores being the
likely cause: BENCHMARKS.md, "Decoding", session 18).

The kernel (`projection_splits`; `projections_pallas` adds its partials) streams the
weights as a GEMV does: one program per (group of `block_n` output columns, split of K),
each summing x[m, k] * W[k, cols] over its rows in float32 on the CUDA cores (no
tensor-core tile to fill at M = 1), the M rows sharing every weight tile it loads. Several weights that read the same x (a block's q, k, v and
gate; the FFN's fc1 and gate) are one call and one kernel: each column group's programs
read only their own weight (`lax.switch`), so the weights need not be concatenated.

With `norm_scale`, x first goes through the blocks' RMSNorm (`layers.RMSNorm`: x / rms(x)
rounded to x's dtype, times the scale in x's dtype), inside the kernel: each program
computes its rows' 1 / rms from all of x (a few KB from L2) and scales x as it streams,
so the norm costs no kernel of its own. Its first weight tile's load is issued before
those sums (sm_90 SASS: the tile's eight 128-bit loads precede the sums' barrier), where
it used to wait for them (on an H100, beyond their bytes' time at the copy bandwidth, the
two GEMVs behind the norm took 3.8 µs each, out_proj and fc2 2.3: BENCHMARKS.md,
"Decoding", session 19). Timed in session 20, the change is no slower and not measurably
faster (1.564 against 1.572 ms a token at the 1.3B preset, inside one tree's spread).

The splits' partial sums come back float32 [splits, M, C] over all the weights' (padded)
columns (`projection_splits`: one `SplitSums` per weight). `projections_pallas` returns
them added by XLA as a chain of elementwise adds, which XLA can fuse with an elementwise
reader (at the 1.3B preset a reduction over the split axis was a kernel of its own for
out_proj and fc2, ~1.4 µs each, and the residual adds after them others, session 16; since
session 17 each sum and its residual add are one loop fusion, session 18). The retention
step reads q, k and v from the partials itself (`kernels.retention_step_from_splits`), so
no fusion of XLA's adds them between the two kernels. Building out_proj's and fc2's
inputs from the partials inside this kernel was slower (each column group re-reads its
rows' partials from L2: out_proj 17.3 µs against 7.1, fc2 12.5: BENCHMARKS.md, "Decoding",
session 21).
Weights are read in their stored dtype and rounded to x's dtype before the product, as
`nnx.Linear` does.

Forward only (decoding); written for the Pallas Triton backend (GPU) and run with
`interpret=True` elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from retnet_jax.kernels.common import check_block_arg, is_power_of_two, pieces, round_up

Array = jax.Array

__all__ = ["MAX_ROWS", "SplitSums", "projections_pallas", "projection_splits",
           "default_block_k", "default_block_n", "default_splits"]

MAX_ROWS = 8          # rows of x (decoded sequences) a call takes: powers of two up to this
MIN_PROGRAMS = 512    # default grid size: ~4 programs per SM of an H100/H200 keep loads in flight
MAX_BLOCK_K = 64      # weight rows per loop step: [64, block_n] tiles, as timed by bench_gemv.py
MAX_SPLITS = 32       # more K splits than this at 128 columns: try 64 (default_block_n)


def default_block_k(k: int) -> int:
    """The largest power of two <= MAX_BLOCK_K dividing K (2048 -> 64, 3456 -> 64, 48 -> 16)."""
    return math.gcd(k, MAX_BLOCK_K)


def default_splits(k: int, columns: int, *, block_n: int, block_k: int,
                   min_programs: int = MIN_PROGRAMS) -> int:
    """The fewest K splits (each a whole number of block_k rows) that give at least
    min_programs programs over `columns` output columns (the most splits if none does).
    E.g. 1.3B's q|k|v|gate, K 2048 and 11,008 columns at 128 and 64: 8 splits, 688 programs."""
    steps = k // block_k
    groups = columns // block_n
    options = [s for s in range(1, steps + 1) if steps % s == 0]
    return next((s for s in options if groups * s >= min_programs), options[-1])


def default_block_n(k: int, widths: Sequence[int], *, block_k: int) -> int:
    """128 output columns a program, or 64 where 128 would take more than MAX_SPLITS K
    splits to fill the grid (`default_splits`) and 64 takes fewer: the partials XLA adds
    afterwards are splits x N floats. The 1.3B presets: q|k|v|gate (K 2048) 128 columns, 8
    splits; fc1|gate 128, 16; out_proj and fc2 (K 3456, N 2048) 64 columns, 18 splits
    instead of 54 (on an H100, 8.3 against 9.2 µs a product with the sums: BENCHMARKS.md,
    "Decoding", session 18). The Transformer baseline's fc2 (K 5504) keeps 128: 43 splits
    either way."""
    def splits(block_n: int) -> int:
        columns = sum(round_up(n, block_n) for n in widths)
        return default_splits(k, columns, block_n=block_n, block_k=block_k)

    wide = splits(128)
    return 64 if wide > MAX_SPLITS and splits(64) < wide else 128


@dataclasses.dataclass(frozen=True)
class SplitSums:
    """One weight's product left as its K splits' partial sums (`projection_splits`):
    `partials` float32 [splits, M, C] holds the call's C columns (all its weights), this
    weight's are [start, start + width). `total()` adds the splits; a kernel reading the
    product may add them itself (`kernels.retention_step_from_splits`)."""
    partials: Array
    start: int
    width: int

    @property
    def splits(self) -> int:
        return self.partials.shape[0]

    def total(self) -> Array:
        """float32 [M, width]: the splits added one by one, in split order: elementwise adds,
        not a reduction over the split axis, so XLA can fuse them with an elementwise reader
        (session 16's profile had out_proj's and fc2's reductions as kernels of their own, 48
        a token at the 1.3B preset, beside 47 residual adds)."""
        columns = self.partials[:, :, self.start:self.start + self.width]
        return functools.reduce(jnp.add, [columns[s] for s in range(self.splits)])


def _split_products(x_ref, w_ref, *, start, rows: int, block_k: int, norm_eps: float | None,
                    scale_ref, compute_dtype) -> list[Array]:
    """For each of x's M rows, sum over this split's `rows` rows of K (from `start`, in
    block_k steps) of x[m, k] * w[k, :]: a list of M float32 [BN]. With norm_eps and
    scale_ref [K], x's rows are first RMS-normalised as `layers.RMSNorm` does.

    The first weight tile is loaded before the norm's 1 / rms, so its load is in flight
    while the norm's sums run (every program starts with them). Triton does not pipeline
    the later loads (no dot); loading each tile a step ahead by hand was no faster
    (BENCHMARKS.md, "Decoding", session 18), so each step loads, then sums its tile's
    rows. Adding each step's [block_k, BN] products elementwise and summing the rows once
    at the end instead was no faster (0.6-1.7 µs slower behind the norm, out_proj's tile
    within 1 %: session 20)."""
    count = x_ref.shape[0]
    first_tile = w_ref[pl.ds(0, block_k), :]
    inv_rms = None if norm_eps is None else _inverse_rms(x_ref, eps=norm_eps)

    def accumulate(first, w, accs):
        w = w.astype(compute_dtype).astype(jnp.float32)
        ks = pl.ds(pl.multiple_of(start + first, block_k), block_k)
        if inv_rms is not None:
            scale = scale_ref[ks].astype(compute_dtype)
        out = []
        for m in range(count):
            x = x_ref[m, ks]
            if inv_rms is not None:
                x = (x.astype(jnp.float32) * inv_rms[m]).astype(compute_dtype) * scale
            products = x.astype(jnp.float32)[:, None] * w
            out.append(accs[m] + jnp.sum(products, axis=0))
        return tuple(out)

    def step(i, accs):
        first = pl.multiple_of(i * block_k, block_k)
        return accumulate(first, w_ref[pl.ds(first, block_k), :], accs)

    width = w_ref.shape[1]
    zero = (jnp.zeros((width,), jnp.float32),) * count
    return list(jax.lax.fori_loop(1, rows // block_k, step, accumulate(0, first_tile, zero)))


def _inverse_rms(x_ref, *, eps: float) -> list[Array]:
    """1 / sqrt(mean(x[m]^2) + eps) for each row of x_ref [M, K], float32 scalars. The row
    is read in a few independent power-of-two loads (`common.pieces`: 3456 -> 2048, 1024,
    256, 128; from L2, as every program reads it), not a loop whose steps wait for each
    other."""
    count, k = x_ref.shape
    sums = [sum(jnp.sum(jnp.square(x_ref[m, piece].astype(jnp.float32)))
                for piece in pieces(k, most=k)) for m in range(count)]
    return [jax.lax.rsqrt(total / k + eps) for total in sums]


def _projections_kernel(x_ref, *refs, block_k: int, group_starts: tuple[int, ...],
                        norm_eps: float | None):
    """One (column group j, K split s) program; norm_eps None: no norm.

    Refs: x [M, K] (all of it); with the norm, the scale [K]; one weight tile
    [K / splits, BN] per weight, or [K / splits, N] for a weight narrower than BN (only the
    one column group j belongs to is read); out: float32 [M, BN], the split's partial sums
    (a narrow weight's group writes its first N columns only).
    """
    scale_ref = None
    if norm_eps is not None:
        scale_ref, *refs = refs
    *w_refs, o_ref = refs
    j, s = pl.program_id(0), pl.program_id(1)
    rows = w_refs[0].shape[0]
    which = sum((j >= start).astype(jnp.int32) for start in group_starts[1:])
    kw = dict(start=s * rows, rows=rows, block_k=block_k, norm_eps=norm_eps,
              scale_ref=scale_ref, compute_dtype=x_ref.dtype)

    def products(w_ref):
        columns = pl.ds(0, w_ref.shape[1])
        for m, acc in enumerate(_split_products(x_ref, w_ref, **kw)):
            o_ref[m, columns] = acc

    jax.lax.switch(which, [functools.partial(products, w) for w in w_refs])


def _check(x: Array, weights: Sequence[Array], norm_scale: Array | None) -> None:
    """Raises ValueError naming the argument whose shape or dtype does not fit."""
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K], got shape {x.shape}")
    rows, k = x.shape
    if rows > MAX_ROWS or rows & (rows - 1):
        raise ValueError(f"x must have a power of two <= {MAX_ROWS} rows (decoded "
                         f"sequences), got {rows}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be floating point, got dtype {x.dtype}")
    if not weights:
        raise ValueError("weights must hold at least one [K, N] array")
    for i, w in enumerate(weights):
        if w.ndim != 2 or w.shape[0] != k:
            raise ValueError(f"weights[{i}] must be [K={k}, N], got shape {w.shape}")
        if not jnp.issubdtype(w.dtype, jnp.floating):
            raise ValueError(f"weights[{i}] must be floating point, got dtype {w.dtype}")
    if norm_scale is not None and norm_scale.shape != (k,):
        raise ValueError(f"norm_scale must be [K={k}], got shape {norm_scale.shape}")


def projections_pallas(x: Array, weights: Sequence[Array], **kwargs) -> list[Array]:
    """x @ w for each w of weights, in one kernel (`projection_splits`, same arguments), the
    K splits' partials added by XLA (`SplitSums.total`): float32 [M, N_i] each."""
    return [sums.total() for sums in projection_splits(x, weights, **kwargs)]


def projection_splits(x: Array, weights: Sequence[Array], *, norm_scale: Array | None = None,
                      norm_eps: float = 1e-6, block_n: int | None = None,
                      block_k: int | None = None,
                      splits: int | None = None,
                      num_warps: int = 4, num_stages: int = 3,
                      interpret: bool = False) -> list[SplitSums]:
    """x @ w for each w of weights, in one kernel, optionally behind an RMSNorm of x, left
    as K-split partial sums.

    Args:
      x: [M, K], M a power of two <= MAX_ROWS, the compute dtype (the products round x and
        the weights to it and sum in float32).
      weights: [K, N_i] arrays of any float dtype. N_i below block_n and a power of two (a
        gated block's decay gate: N = heads) is read as it is; another N_i that is not a
        multiple of block_n gets zero columns (a copy every call) outside its SplitSums.
      norm_scale: None, or [K]: x becomes `layers.RMSNorm`'s output with this scale first.
      norm_eps: the norm's eps.
      block_n: output columns per program (a power of two); None: `default_block_n`.
      block_k: rows of K per loop step (a power of two dividing K); None:
        `default_block_k`.
      splits: programs per column group, each summing K / splits rows (a divisor of
        K / block_k); None: `default_splits`.
      num_warps, num_stages: Triton's, per program and for the K loop.
      interpret: run in Pallas interpret mode (any backend, e.g. CPU tests).
    Returns:
      one `SplitSums` [M, N_i] per weight, all over one float32 [splits, M, C] array (C:
      the weights' columns, each padded to a multiple of block_n unless read as it is).
    Raises:
      ValueError naming the argument whose shape, dtype or size does not fit.
    """
    _check(x, weights, norm_scale)
    rows, k = x.shape
    block_k = check_block_arg("block_k", default_block_k(k) if block_k is None else block_k)
    if k % block_k:
        raise ValueError(f"block_k = {block_k} must divide K = {k} (x.shape[1])")
    widths = [w.shape[1] for w in weights]
    block_n = check_block_arg("block_n", default_block_n(k, widths, block_k=block_k)
                              if block_n is None else block_n)
    padded = [round_up(n, block_n) for n in widths]
    narrow = [n < block_n and is_power_of_two(n) for n in widths]
    weights = [w if p == n or thin else jnp.pad(w, ((0, 0), (0, p - n)))
               for w, n, p, thin in zip(weights, widths, padded, narrow)]
    if splits is None:
        splits = default_splits(k, sum(padded), block_n=block_n, block_k=block_k)
    if not isinstance(splits, (int, np.integer)) or splits < 1 or (k // block_k) % splits:
        raise ValueError(f"splits must divide K / block_k = {k // block_k}, got {splits!r}")
    part = k // splits
    groups = [p // block_n for p in padded]
    starts = tuple(int(s) for s in np.cumsum([0] + groups[:-1]))

    def weight_spec(start: int, count: int, width: int) -> pl.BlockSpec:
        # Programs of other weights point at a valid tile of this one and never read it.
        return pl.BlockSpec((part, width), lambda j, s: (s, jnp.clip(j - start, 0, count - 1)))

    norm = norm_scale is not None
    in_specs = [pl.BlockSpec((rows, k), lambda j, s: (0, 0))]
    args = [x]
    if norm:
        in_specs.append(pl.BlockSpec((k,), lambda j, s: (0,)))
        args.append(norm_scale)
    partial = pl.pallas_call(
        functools.partial(_projections_kernel, block_k=block_k, group_starts=starts,
                          norm_eps=float(norm_eps) if norm else None),
        grid=(sum(groups), splits),
        in_specs=in_specs + [weight_spec(st, g, n if thin else block_n)
                             for st, g, n, thin in zip(starts, groups, widths, narrow)],
        out_specs=pl.BlockSpec((None, rows, block_n), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((splits, rows, sum(padded)), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="decode_projections",
    )(*args, *weights)
    bounds = np.cumsum([0] + padded)
    return [SplitSums(partial, int(a), n) for a, n in zip(bounds[:-1], widths)]
