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
XLA's time at batch 32 with the default tiles (groups of 144 value columns, 4 warps), but
1.08-1.35x it at batch 8 and 1.09-1.49x at batch 1, where the state is small. It is used only with
`retention_kernel='pallas'`.

Elementwise work only (an outer product and a column sum per tile), so no dot-tile limits
beyond Triton's power-of-two loads; Dk and Dv multiples of 16 as the other kernels.
Written for the Pallas Triton backend (GPU) and run with `interpret=True` elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from retnet_jax import retention
from retnet_jax.kernels.common import MIN_DOT_DIM, check_block_arg, column_group, pieces

Array = jax.Array

__all__ = ["retention_step_pallas"]

# The decay is passed as [G, H, DECAY_LANES] copies of one value: Triton loads power-of-two
# vectors, and 16 lanes is the smallest width every kernel here already uses.
DECAY_LANES = MIN_DOT_DIM


def _decode_step_kernel(q_ref, k_ref, v_ref, decay_ref, state_ref, o_ref, new_state_ref):
    """One (batch, head, value group) program.

    Refs: q, k [Dk]; v [BV]; decay float32 [DECAY_LANES] (copies of exp(log_decay)); state
    [Dk, BV]. Outputs: o [BV] (v's dtype); new_state [Dk, BV] (state's dtype). Computed in
    float32.
    """
    key_pieces, value_pieces = pieces(q_ref.shape[0]), pieces(v_ref.shape[0])
    decay = jnp.max(decay_ref[...])                          # all lanes hold the same value
    qs = [q_ref[kc].astype(jnp.float32) for kc in key_pieces]
    ks = [k_ref[kc].astype(jnp.float32) for kc in key_pieces]
    for vc in value_pieces:
        v = v_ref[vc].astype(jnp.float32)
        o = jnp.zeros(v.shape, jnp.float32)
        for kc, q, k in zip(key_pieces, qs, ks, strict=True):
            tile = (decay * state_ref[kc, vc].astype(jnp.float32)
                    + k[:, None] * v[None, :])                              # [bk, bv]
            new_state_ref[kc, vc] = tile.astype(new_state_ref.dtype)
            o = o + jnp.sum(q[:, None] * tile, axis=0)
        o_ref[vc] = o.astype(o_ref.dtype)


def retention_step_pallas(q: Array, k: Array, v: Array, log_decay: Array, state: Array, *,
                          block_v: int = 256, num_warps: int = 4,
                          interpret: bool = False) -> tuple[Array, Array]:
    """`retention.retention_step` as one kernel; same arguments and results. Forward only,
    for decoding: differentiating it raises (JAX's NotImplementedError); gradients come from
    the chunkwise form.

    Args:
      q, k: [B, H, Dk], Dk a multiple of 16.
      v: [B, H, Dv], Dv a multiple of 16.
      log_decay: float [H] (fixed) or [B, H] (gated), entries <= 0.
      state: [B, H, Dk, Dv], the state after the previous token, float32 or bfloat16 (a
        half-size cache: read and written as bfloat16, updated in float32).
      block_v: the most value columns per program (a power of two >= 16): each program takes
        the widest multiple of 16 dividing Dv up to it (Dv = 432 at 256 -> 144 columns, at
        64 -> 48).
      num_warps: Triton warps per program.
      interpret: run in Pallas interpret mode (any backend, e.g. CPU tests).
    Returns:
      (o [B, H, Dv] in v's dtype, new state [B, H, Dk, Dv] in state's dtype).
    Raises:
      ValueError naming the argument whose shape or dtype does not fit.
    """
    retention._check_step_inputs(q, k, v, log_decay, state)
    batch, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    for what, dim in (("key dim Dk (q.shape[2])", key_dim), ("value dim Dv (v.shape[2])",
                                                                value_dim)):
        if dim % MIN_DOT_DIM:
            raise ValueError(f"the {what} = {dim} must be a multiple of {MIN_DOT_DIM}")
    bv = column_group(value_dim, check_block_arg("block_v", block_v))
    decay = jnp.exp(log_decay.astype(jnp.float32))
    decay = jnp.broadcast_to(decay.reshape(-1, heads, 1),
                             (decay.reshape(-1, heads).shape[0], heads, DECAY_LANES))
    shared = decay.shape[0] == 1

    return pl.pallas_call(
        _decode_step_kernel,
        grid=(batch, heads, value_dim // bv),
        in_specs=[
            pl.BlockSpec((None, None, key_dim), lambda b, h, j: (b, h, 0)),
            pl.BlockSpec((None, None, key_dim), lambda b, h, j: (b, h, 0)),
            pl.BlockSpec((None, None, bv), lambda b, h, j: (b, h, j)),
            pl.BlockSpec((None, None, DECAY_LANES),
                         lambda b, h, j: (0 if shared else b, h, 0)),
            pl.BlockSpec((None, None, key_dim, bv), lambda b, h, j: (b, h, 0, j)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bv), lambda b, h, j: (b, h, j)),
            pl.BlockSpec((None, None, key_dim, bv), lambda b, h, j: (b, h, 0, j)),
        ],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, value_dim), v.dtype),
                   jax.ShapeDtypeStruct(state.shape, state.dtype)],
        input_output_aliases={4: 1},          # the new state overwrites the old one
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="retention_decode_step",
    )(q, k, v, decay, state)
