"""What the retention kernels share: Triton's tile limits and the checks of chunked inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

MIN_DOT_DIM = 16  # Triton's smallest matmul tile dimension


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_chunked(qc: Array, kc: Array, b: Array, *, values: dict[str, Array],
                  matrices: dict[str, Array]) -> tuple[int, ...]:
    """Raises ValueError naming the bad argument unless the chunked inputs agree.

    Args:
      qc, kc: [B, H, N, C, Dk] with C a power of two >= MIN_DOT_DIM.
      b: float32 [G, H, N, C], G in {1, B}.
      values: name -> [B, H, N, C, Dv] arrays (the first one fixes Dv).
      matrices: name -> [B, H, N, Dk, Dv] arrays (per-chunk states or their gradients).
    Every array but b must have qc's floating dtype.
    Returns:
      (B, H, N, C, Dk, Dv).
    """
    arrays = {"qc": qc, "kc": kc, **values, **matrices}
    for name, x in arrays.items():
        if x.ndim != 5:
            raise ValueError(f"{name} must have rank 5, got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
        if x.dtype != qc.dtype:
            raise ValueError(f"{name} must have qc's dtype {qc.dtype}, got {x.dtype}")
    if kc.shape != qc.shape:
        raise ValueError(f"kc must have qc's shape {qc.shape} [B, H, N, C, Dk], got {kc.shape}")
    batch, heads, chunks, chunk, key_dim = qc.shape
    value_dim = next(iter(values.values())).shape[-1]
    for name, x in values.items():
        if x.shape != (batch, heads, chunks, chunk, value_dim):
            raise ValueError(f"{name} must have shape {qc.shape[:4] + (value_dim,)} "
                             f"[B, H, N, C, Dv], got {x.shape}")
    for name, x in matrices.items():
        if x.shape != (batch, heads, chunks, key_dim, value_dim):
            raise ValueError(f"{name} must have shape {(batch, heads, chunks, key_dim, value_dim)}"
                             f" [B, H, N, Dk, Dv], got {x.shape}")
    if b.ndim != 4 or b.shape[0] not in (1, batch) or b.shape[1:] != (heads, chunks, chunk):
        raise ValueError(f"b must have shape (1 or {batch}, {heads}, {chunks}, {chunk}) "
                         f"[G, H, N, C], got {b.shape}")
    if b.dtype != jnp.float32:
        raise ValueError(f"b must be float32, got dtype {b.dtype}")
    if not is_power_of_two(chunk) or chunk < MIN_DOT_DIM:
        raise ValueError(f"the chunk size C (qc.shape[3]) must be a power of two >= "
                         f"{MIN_DOT_DIM}, got {chunk}")
    return batch, heads, chunks, chunk, key_dim, value_dim
