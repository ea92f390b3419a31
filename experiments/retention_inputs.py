"""Shapes, random inputs and kernel-layout flags of the retention benchmarks (bench_retention,
bench_kernel_parts, kernel_resources) and the decoding GEMV's weight shapes (bench_gemv,
kernel_resources).

Imported by the bench_* scripts (they run with experiments/ on sys.path).
"""

import jax
import jax.numpy as jnp
from absl import app

from retnet_jax import positions
from retnet_jax.kernels.chunk_grads import default_blocks
from retnet_jax.kernels.common import is_power_of_two


def parse_shape(text: str, flag: str = "shapes") -> tuple[int, int, int, int, int]:
    """'BxTxHxD' or 'BxTxHxDkxDv' -> (B, T, H, Dk, Dv); a UsageError naming --flag if
    `text` is neither."""
    parts = text.strip().lower().split("x")
    if len(parts) not in (4, 5) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise app.UsageError(
            f"--{flag}: {text!r} is not BxTxHxD (Dk = Dv = D) or BxTxHxDkxDv, positive "
            "integers joined by 'x', e.g. 8x2048x16x128 or 2x8192x8x256x512")
    dims = [int(p) for p in parts]
    return tuple(dims if len(dims) == 5 else dims + dims[3:])


def parse_weight_shape(text: str, flag: str = "shapes") -> tuple[int, list[int]]:
    """'KxN' or 'KxN1+N2+...' (weights kept apart, one input) -> (K, [N_i]); a UsageError
    naming --flag if `text` is neither or has a size below 1."""
    k, _, ns = text.partition("x")
    try:
        out = int(k), [int(n) for n in ns.split("+")]
    except ValueError:
        raise app.UsageError(f"--{flag}: {text!r} is not KxN or KxN1+N2+...") from None
    if min(out[0], *out[1]) < 1:
        raise app.UsageError(f"--{flag}: {text!r} has a size below 1")
    return out


def parse_grads_blocks(text: str, flag: str = "grads_blocks"):
    """A `chunk_grads` layout flag value: 'auto' (kept as 'auto', `grads_blocks_for` resolves
    it per head size), 'fused' -> None, 'KxV' (powers of two) -> (K, V); a UsageError naming
    --flag otherwise."""
    if text in ("auto", "fused"):
        return None if text == "fused" else text
    parts = text.split("x")
    if not (len(parts) == 2 and all(p.isdigit() and is_power_of_two(int(p)) for p in parts)):
        raise app.UsageError(f"--{flag}: {text!r} is not 'auto', 'fused' or KxV with K and V "
                             "powers of two")
    return tuple(int(p) for p in parts)


def grads_blocks_for(layout, key_dim: int, value_dim: int) -> tuple[int, int] | None:
    """`chunk_grads`' blocks argument for heads of Dk x Dv from a `parse_grads_blocks` value
    ('auto': the layout training takes, `default_blocks`)."""
    return default_blocks(key_dim, value_dim) if layout == "auto" else layout


def blocks_name(blocks: tuple[int, int] | None) -> str:
    """'fused' or 'KxV': how the benchmarks' rows name a `chunk_grads` layout."""
    return "fused" if blocks is None else "x".join(map(str, blocks))


def make_inputs(seed: int, shape, gated: bool, dtype=jnp.bfloat16):
    """For shape (B, T, H, Dk, Dv): q (scaled by Dk^-0.5), k [B, T, H, Dk] and v, do
    [B, T, H, Dv] in dtype; log_decay float32 [H] (fixed) or [B, T, H] (gated)."""
    b, t, h, dk, dv = shape
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = (jax.random.normal(ks[0], (b, t, h, dk)) * dk ** -0.5).astype(dtype)
    k = jax.random.normal(ks[1], (b, t, h, dk)).astype(dtype)
    v = jax.random.normal(ks[2], (b, t, h, dv)).astype(dtype)
    do = jax.random.normal(ks[3], (b, t, h, dv)).astype(dtype)
    if gated:  # log-sigmoid gates, mostly near 0 with a tail down to ~ -5
        log_decay = jax.nn.log_sigmoid(jax.random.normal(ks[4], (b, t, h)) + 3.0)
    else:
        log_decay = positions.decay_log_gammas(h)  # = fla's chunk_retention decays
    return q, k, v, log_decay, do
