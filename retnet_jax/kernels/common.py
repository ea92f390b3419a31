"""What the retention kernels share: Triton's tile limits, column groups and pieces,
argument checks.

The kernels take activations as they come, [B, Tp, H, D] (Tp = N * C: the time axis padded to
whole chunks of C tokens), and index one chunk by its BlockSpec or a `pl.ds` slice of the time
axis; per-chunk quantities (states, their gradients, cumulative decays) are [B, H, N, ...].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

Array = jax.Array

MIN_DOT_DIM = 16  # Triton's smallest matmul tile dimension
# The widest tile of a head's columns a program works on at once ([C, 128] operands and
# float32 accumulators: the size compiled and timed on an H100). Wider or odd widths (the
# presets' Dk 256, Dv 432) are walked in power-of-two pieces up to this (`pieces`).
MAX_BLOCK = 128


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` >= n."""
    return -(-n // multiple) * multiple


def column_group(dim: int, most: int) -> int | None:
    """Columns per program when a grid axis splits a head of dim columns: the largest divisor
    of dim that is a multiple of MIN_DOT_DIM and <= most, or None if there is none (dim not a
    multiple of 16). E.g. (128, 64) -> 64; (432, 64) -> 48; (432, 256) -> 144; (24, 64) -> None."""
    if dim % MIN_DOT_DIM:
        return None
    for width in range(min(most, dim) // MIN_DOT_DIM * MIN_DOT_DIM, 0, -MIN_DOT_DIM):
        if dim % width == 0:
            return width
    return None


def pieces(width: int, most: int = MAX_BLOCK) -> list[pl.Slice]:
    """Static slices covering `width` columns in power-of-two tiles Triton can load, largest
    first, each <= most (and >= 16, a size it can multiply, when width is a multiple of
    MIN_DOT_DIM): 128 -> [128]; 48 -> [32, 16]; 432 -> [128, 128, 128, 32, 16];
    216 at most 216 -> [128, 64, 16, 8]."""
    slices, start = [], 0
    while start < width:
        size = min(most, 1 << ((width - start).bit_length() - 1))
        slices.append(pl.ds(start, size))
        start += size
    return slices


def check_block_arg(name: str, block: object) -> int:
    """Raises ValueError unless block (a most-columns-per-program argument) is a power of two."""
    if not isinstance(block, (int, np.integer)) or not is_power_of_two(int(block)):
        raise ValueError(f"{name} must be a power of two, got {block!r}")
    return int(block)


def check_time_major(b: Array, *, keys: dict[str, Array], values: dict[str, Array],
                     matrices: dict[str, Array]) -> tuple[int, ...]:
    """Raises ValueError naming the bad argument unless the kernel inputs agree.

    Args:
      b: float32 [G, H, N, C], G in {1, B}, C a power of two >= MIN_DOT_DIM.
      keys: name -> [B, Tp, H, Dk] arrays, Tp = N * C (the first fixes the shape and the
        compute dtype).
      values: name -> [B, Tp, H, Dv] arrays (the first fixes Dv).
      matrices: name -> [B, H, N, Dk, Dv] arrays (per-chunk states or their gradients).
    Every array but b must have the compute dtype.
    Returns:
      (B, Tp, H, N, C, Dk, Dv).
    """
    first, x = next(iter(keys.items()))
    arrays = {**keys, **values, **matrices}
    for name, a in arrays.items():
        rank = 5 if name in matrices else 4
        if a.ndim != rank:
            raise ValueError(f"{name} must have rank {rank}, got shape {a.shape}")
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got dtype {a.dtype}")
        if a.dtype != x.dtype:
            raise ValueError(f"{name} must have {first}'s dtype {x.dtype}, got {a.dtype}")
    for name, a in keys.items():
        if a.shape != x.shape:
            raise ValueError(f"{name} must have {first}'s shape {x.shape} [B, Tp, H, Dk], "
                             f"got {a.shape}")
    batch, padded, heads, key_dim = x.shape
    value_dim = next(iter(values.values())).shape[-1]
    for name, a in values.items():
        if a.shape != (batch, padded, heads, value_dim):
            raise ValueError(f"{name} must have shape {(batch, padded, heads, value_dim)} "
                             f"[B, Tp, H, Dv], got {a.shape}")
    if b.ndim != 4 or b.shape[0] not in (1, batch) or b.shape[1] != heads:
        raise ValueError(f"b must have shape (1 or {batch}, {heads}, N, C) [G, H, N, C], "
                         f"got {b.shape}")
    if b.dtype != jnp.float32:
        raise ValueError(f"b must be float32, got dtype {b.dtype}")
    chunks, chunk = b.shape[2:]
    if not is_power_of_two(chunk) or chunk < MIN_DOT_DIM:
        raise ValueError(f"the chunk size C (b.shape[3]) must be a power of two >= "
                         f"{MIN_DOT_DIM}, got {chunk}")
    if chunks * chunk != padded:
        raise ValueError(f"b's N * C = {chunks} * {chunk} must equal the padded time length "
                         f"Tp ({first}.shape[1]) = {padded}")
    for name, a in matrices.items():
        if a.shape != (batch, heads, chunks, key_dim, value_dim):
            raise ValueError(f"{name} must have shape {(batch, heads, chunks, key_dim, value_dim)}"
                             f" [B, H, N, Dk, Dv], got {a.shape}")
    return batch, padded, heads, chunks, chunk, key_dim, value_dim


def decay_index(shared: bool, batch_index):
    """The G index of b [G, H, N, C]: 0 when the decay is shared by the batch (G = 1)."""
    return 0 if shared else batch_index


def default_num_warps(chunk: int, *widths: int) -> int:
    """Triton warps per program for [chunk, max(chunk, min(width, MAX_BLOCK))] tiles over the
    given widths: 4 up to 64 x 64, else 8."""
    widest = max(min(width, MAX_BLOCK) for width in widths)
    return 4 if chunk * max(chunk, widest) <= 64 * 64 else 8
