"""The Pallas kernels compute what retention.py's XLA path computes.

Kernels run in Pallas interpret mode (CPU). The reference is retention.py's chunkwise form at
float32 'highest' matmul precision; errors are max |kernel - reference| / max |reference|.
Shapes are small: interpret mode runs the grid as a loop.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprs import equations, lower_for_cuda
from retnet_jax import positions, retention
from retnet_jax.kernels import (
    chunk_grads, chunk_output, chunk_states, chunkwise_retention_pallas, retention_step_pallas)
from retnet_jax.kernels.chunk_states import (
    SegmentedStates, chunk_state_segments, join_segments, state_segments)
from retnet_jax.kernels.chunk_grads import default_blocks
from retnet_jax.kernels.common import column_group, pieces
from retnet_jax.kernels.decode_step import default_block_v

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def rel_err(x, ref):
    x, ref = (np.asarray(jnp.asarray(a, jnp.float32)) for a in (x, ref))
    return np.abs(x - ref).max() / np.abs(ref).max()


def random_inputs(seed, batch=2, time=37, heads=2, key_dim=16, value_dim=32, gated=True,
                  dtype=jnp.float32, min_log_decay=-3.0):
    """Random q, k, v (normal, in dtype), log decays in [min_log_decay, 0), float32 state."""
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (batch, time, heads, key_dim)).astype(dtype)
    k = jax.random.normal(ks[1], (batch, time, heads, key_dim)).astype(dtype)
    v = jax.random.normal(ks[2], (batch, time, heads, value_dim)).astype(dtype)
    shape = (batch, time, heads) if gated else (heads,)
    log_decay = jax.random.uniform(ks[3], shape, minval=min_log_decay, maxval=-1e-3)
    initial_state = jax.random.normal(ks[4], (batch, heads, key_dim, value_dim))
    return q, k, v, log_decay, initial_state


def xla_retention(q, k, v, log_decay, chunk_size, initial_state):
    """retention.chunkwise_retention at float32 'highest' matmul precision."""
    fn = functools.partial(retention.chunkwise_retention, chunk_size=chunk_size)
    with jax.default_matmul_precision("highest"):
        return jax.jit(fn)(q, k, v, log_decay, initial_state=initial_state)


def pad_to_chunks(x, chunk_size):
    """[B, T, ...] -> [B, Tp, ...], zero-padded along time to whole chunks."""
    return retention._pad_time(x, -x.shape[1] % chunk_size)


@functools.partial(jax.jit, static_argnames=("chunk_size", "block_v"))
def kernel_from_xla_residuals(q, k, v, log_decay, initial_state, chunk_size, block_v):
    """chunk_output on the padded inputs with retention.py's decays and entering states."""
    _, _, (_, _, _, _, _, states, b) = retention._chunkwise_forward(
        q, k, v, log_decay, initial_state, chunk_size, True)
    q, k, v = (pad_to_chunks(x, chunk_size) for x in (q, k, v))
    return chunk_output(q, k, v, b, states, block_v=block_v, interpret=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("gated, chunk_size, key_dim, value_dim, block_v", [
    (True, 16, 16, 32, 16),     # two value blocks, Dk != Dv
    (False, 16, 16, 32, 16),
    (True, 32, 32, 16, 64),     # block_v > Dv: one block of Dv
    (False, 64, 16, 16, 64),    # one chunk longer than T (T padded)
    (True, 16, 48, 432, 64),    # 9 groups of 48 value columns (pieces 32 + 16), 2 key pieces
])
def test_chunk_output_matches_xla(dtype, gated, chunk_size, key_dim, value_dim, block_v):
    q, k, v, log_decay, s0 = random_inputs(0, time=37, key_dim=key_dim, value_dim=value_dim,
                                           gated=gated, dtype=dtype)
    o = kernel_from_xla_residuals(q, k, v, log_decay, s0, chunk_size, block_v)
    ref, _ = xla_retention(q, k, v, log_decay, chunk_size, s0)
    assert o.dtype == dtype
    assert o.shape == (2, -(-37 // chunk_size) * chunk_size, 2, value_dim)
    # Padded tail positions have zero queries, hence zero output, as the padded reference.
    assert rel_err(o, pad_to_chunks(ref, chunk_size)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype, gated, time, chunk_size, with_state, segments", [
    (jnp.float32, True, 50, 16, True, 1),
    (jnp.float32, False, 64, 32, False, 1),
    (jnp.bfloat16, True, 64, 32, False, 1),
    (jnp.bfloat16, False, 50, 16, True, 1),
    (jnp.float32, True, 64, 16, True, 2),    # segments joined inside the output kernel
    (jnp.float32, False, 64, 16, True, 4),
    (jnp.bfloat16, True, 50, 16, True, 4),
])
def test_chunkwise_retention_pallas_matches_xla(dtype, gated, time, chunk_size, with_state,
                                                segments):
    q, k, v, log_decay, s0 = random_inputs(1, time=time, gated=gated, dtype=dtype,
                                           min_log_decay=-0.2)
    s0 = s0 if with_state else None
    o, state = jax.jit(functools.partial(chunkwise_retention_pallas, chunk_size=chunk_size,
                                         interpret=True, block_v=16, segments=segments))(
        q, k, v, log_decay, initial_state=s0)
    ref_o, ref_state = xla_retention(q, k, v, log_decay, chunk_size, s0)
    assert o.dtype == dtype and o.shape == ref_o.shape
    assert state.dtype == jnp.float32 and state.shape == ref_state.shape
    assert rel_err(o, ref_o) <= TOLERANCE[dtype]
    assert rel_err(state, ref_state) <= TOLERANCE[dtype]


def test_short_sequence_uses_a_power_of_two_chunk():
    # T = 5 < chunk_size: the chunk shrinks to 16 (not 5, which the kernel cannot tile).
    q, k, v, log_decay, s0 = random_inputs(2, time=5)
    o, state = chunkwise_retention_pallas(q, k, v, log_decay, initial_state=s0, interpret=True)
    ref_o, ref_state = xla_retention(q, k, v, log_decay, 64, s0)
    assert rel_err(o, ref_o) <= 1e-5 and rel_err(state, ref_state) <= 1e-5


# Mostly weak decays (log decay in [-0.2, 0)): with strong ones a state barely survives a
# chunk, and errors in the terms that carry it (through the chunk, to its end) would not show.
@pytest.mark.parametrize(
    "dtype, gated, time, chunk_size, with_state, key_dim, value_dim, min_log_decay, segments", [
        (jnp.float32, True, 40, 16, True, 16, 32, -0.2, 1),
        (jnp.float32, False, 50, 32, False, 16, 32, -0.2, 1),
        (jnp.bfloat16, True, 50, 16, False, 16, 32, -3.0, 1),
        (jnp.bfloat16, False, 40, 16, True, 16, 32, -0.2, 1),
        (jnp.float32, True, 20, 16, True, 16, 48, -0.2, 1),   # Dv = 48: pieces of 32 and 16
        (jnp.bfloat16, False, 40, 16, True, 256, 432, -0.2, 1),   # the presets' head dims
        (jnp.float32, True, 60, 16, True, 16, 32, -0.2, 2),   # state loops in 2 segments
        (jnp.float32, False, 64, 16, True, 16, 32, -0.2, 4),   # ... and in 4 of one chunk
    ])
def test_gradients_match_xla(dtype, gated, time, chunk_size, with_state, key_dim, value_dim,
                             min_log_decay, segments):
    q, k, v, log_decay, s0 = random_inputs(3, time=time, gated=gated, key_dim=key_dim,
                                           value_dim=value_dim, dtype=dtype,
                                           min_log_decay=min_log_decay)
    ks = jax.random.split(jax.random.key(4), 2)
    do = jax.random.normal(ks[0], v.shape)
    d_state = jax.random.normal(ks[1], s0.shape)
    args, argnums = ((q, k, v, log_decay, s0), (0, 1, 2, 3, 4)) if with_state else (
        (q, k, v, log_decay), (0, 1, 2, 3))

    def loss(fn, q, k, v, log_decay, initial_state=None):
        o, state = fn(q, k, v, log_decay, chunk_size=chunk_size, initial_state=initial_state)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(state * d_state)

    pallas = functools.partial(chunkwise_retention_pallas, interpret=True, block_v=16,
                               segments=segments)
    with jax.default_matmul_precision("highest"):
        grads, ref = (jax.jit(jax.grad(functools.partial(loss, fn), argnums=argnums))(*args)
                      for fn in (pallas, retention.chunkwise_retention))
    for name, g, r in zip(("q", "k", "v", "log_decay", "initial_state"), grads, ref):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert np.abs(np.asarray(r, np.float32)).max() > 0, name
        assert rel_err(g, r) <= TOLERANCE[dtype], name


def summed_outputs(fn, q, k, v, log_decay, initial_state):
    """A scalar of everything `fn` (a chunkwise retention, chunk 16) returns."""
    o, state = fn(q, k, v, log_decay, chunk_size=16, initial_state=initial_state)
    return jnp.sum(o) + jnp.sum(state)


def test_training_step_never_materialises_chunk_weights():
    # Forward and backward: the [B, H, N, C, C] weights and their cotangents live only inside
    # the kernels (chunk_output, chunk_grads); XLA drops or never builds the einsum path.
    # (Interpret mode lowers each kernel to a loop over [C, C] tiles, so the check holds on CPU.)
    q, k, v, log_decay, s0 = random_inputs(5, batch=3, time=48, heads=5, key_dim=32,
                                           value_dim=64)

    def compiled_hlo(fn):
        step = jax.value_and_grad(functools.partial(summed_outputs, fn), argnums=(0, 1, 2, 3, 4))
        return jax.jit(step).lower(q, k, v, log_decay, s0).compile().as_text()

    assert "[3,5,3,16,16]" not in compiled_hlo(
        functools.partial(chunkwise_retention_pallas, interpret=True))
    # ... while the XLA path does build them (so the check above can fail).
    assert "[3,5,3,16,16]" in compiled_hlo(retention.chunkwise_retention)


def random_chunk_grads_args(seed, batch, heads, chunks, chunk, key_dim, value_dim,
                           shared_decay, dtype):
    """Random chunk_grads arguments: normal q, k, v, do [B, N * C, H, D], states, d_kv
    [B, H, N, Dk, Dv] in dtype; b float32 [G, H, N, C] (weak decays)."""
    ks = jax.random.split(jax.random.key(seed), 7)
    time = chunks * chunk
    q, k = (jax.random.normal(x, (batch, time, heads, key_dim)).astype(dtype) for x in ks[:2])
    v, do = (jax.random.normal(x, (batch, time, heads, value_dim)).astype(dtype)
             for x in ks[2:4])
    states, d_kv = (jax.random.normal(x, (batch, heads, chunks, key_dim, value_dim))
                    .astype(dtype) for x in ks[4:6])
    # Weak decays: exp(chunk total) stays well above 0, so the chunk-end terms of db count.
    log_decay = jax.random.uniform(ks[6], (1 if shared_decay else batch, heads, chunks, chunk),
                                   minval=-0.1, maxval=-1e-3)
    return q, k, v, do, jnp.cumsum(log_decay, axis=-1), states, d_kv


@jax.jit
def chunk_grads_reference(q, k, v, do, b, states, d_kv):
    """chunk_grads' results from XLA einsums (retention._chunkwise_backward's per-chunk part)
    on chunked copies [B, H, N, C, D]."""
    chunk = b.shape[-1]
    qc, kc, vc, doc = (retention._to_chunks(x, chunk) for x in (q, k, v, do))
    f32, dtype = jnp.float32, qc.dtype
    g = b[..., -1:]
    mask = retention._decay_mask(b)
    weights = (jnp.einsum("bhnid,bhnjd->bhnij", qc, kc, preferred_element_type=f32)
               * mask).astype(dtype)
    d_scores = (jnp.einsum("bhnie,bhnje->bhnij", doc, vc, preferred_element_type=f32)
                * mask).astype(dtype)
    do_decayed = (doc * jnp.exp(b)[..., None]).astype(dtype)
    k_to_end = (kc * jnp.exp(g - b)[..., None]).astype(dtype)
    dq = (jnp.einsum("bhnij,bhnjd->bhnid", d_scores, kc, preferred_element_type=f32)
          + jnp.einsum("bhnie,bhnde->bhnid", do_decayed, states, preferred_element_type=f32))
    dk_inter = jnp.exp(g - b)[..., None] * jnp.einsum("bhnje,bhnde->bhnjd", vc, d_kv,
                                                      preferred_element_type=f32)
    dk = jnp.einsum("bhnij,bhnid->bhnjd", d_scores, qc, preferred_element_type=f32) + dk_inter
    dv = (jnp.einsum("bhnij,bhnie->bhnje", weights, doc, preferred_element_type=f32)
          + jnp.einsum("bhnjd,bhnde->bhnje", k_to_end, d_kv, preferred_element_type=f32))
    db = jnp.sum(qc.astype(f32) * dq, axis=-1) - jnp.sum(kc.astype(f32) * dk, axis=-1)
    chunk_end = (jnp.exp(g[..., 0]) * jnp.sum(states.astype(f32) * d_kv.astype(f32), (-2, -1))
                 + jnp.sum(kc.astype(f32) * dk_inter, axis=(-2, -1)))
    time = q.shape[1]
    return (retention._from_chunks(dq, time), retention._from_chunks(dk, time),
            retention._from_chunks(dv, time), db.at[..., -1].add(chunk_end))


@pytest.mark.parametrize("dtype, shared_decay, chunk, key_dim, value_dim, blocks", [
    (jnp.float32, False, 16, 16, 32, None),
    (jnp.float32, True, 32, 32, 16, None),
    (jnp.bfloat16, False, 16, 32, 16, None),
    (jnp.float32, False, 16, 48, 80, None),    # key pieces 32 + 16, value pieces 64 + 16
    (jnp.bfloat16, True, 16, 256, 432, None),  # the presets' heads: 2 x 128; 3 x 128 + 32 + 16
    # Two kernels: 3 key groups of 16 (db summed over them), 5 value groups of 16.
    (jnp.float32, False, 16, 48, 80, (16, 16)),
    (jnp.bfloat16, True, 32, 32, 16, (64, 64)),   # one group each
    (jnp.bfloat16, False, 16, 256, 432, (128, 256)),   # 2 groups of 128; 3 of 144
])
def test_chunk_grads_matches_xla_einsums(dtype, shared_decay, chunk, key_dim, value_dim,
                                         blocks):
    args = random_chunk_grads_args(7, 2, 2, 3, chunk, key_dim, value_dim, shared_decay, dtype)
    with jax.default_matmul_precision("highest"):
        out = jax.jit(functools.partial(chunk_grads, blocks=blocks, interpret=True))(*args)
        ref = chunk_grads_reference(*args)
    for name, x, r in zip(("dq", "dk", "dv", "db"), out, ref):
        assert x.shape == r.shape, name
        assert x.dtype == (jnp.float32 if name == "db" else dtype), name
        # The kernel rounds its float32 results once, to the compute dtype.
        assert rel_err(x, r) <= TOLERANCE[dtype] / 4, name


def chunk_states_reference(x, y, b, x0, reverse):
    """chunk_states' results from retention.py: the chunk recurrence over chunked copies
    (`_chunk_states` forward, `_state_gradients` reverse)."""
    batch, _, heads, _ = x.shape
    chunk = b.shape[-1]
    xc = retention._to_chunks(x, chunk)
    if reverse:
        _, _, d_kv, d_initial = retention._state_gradients(xc, b, y, x0, chunk)
        return d_kv, d_initial.reshape(x0.shape)
    _, x_to_end = retention._chunk_weights(xc, xc, b)
    updates = jnp.einsum("bhncd,bhnce->bhnde", x_to_end, retention._to_chunks(y, chunk),
                         preferred_element_type=jnp.float32)
    chunks = updates.shape[2]
    states, final = retention._chunk_states(
        updates.reshape(batch, heads, chunks, -1), b[..., -1], x0.reshape(batch, heads, -1),
        reverse=False)
    return states.reshape(updates.shape), final.reshape(x0.shape)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype, gated, time, chunk, key_dim, value_dim, block_k, block_v", [
    (jnp.float32, True, 80, 16, 32, 48, 16, 64),    # 2 key blocks x 3 value blocks of 16
    (jnp.float32, False, 64, 32, 16, 32, 64, 64),   # one block each
    (jnp.bfloat16, True, 48, 16, 32, 32, 32, 16),
    (jnp.float32, True, 32, 16, 48, 432, 64, 64),   # groups of 48 columns: 2 x 2 pieces
])
def test_chunk_states_matches_retention(reverse, dtype, gated, time, chunk, key_dim, value_dim,
                                        block_k, block_v):
    q, k, v, log_decay, x0 = random_inputs(8, time=time, key_dim=key_dim, value_dim=value_dim,
                                           gated=gated, dtype=dtype, min_log_decay=-0.2)
    x, y = (q, jax.random.normal(jax.random.key(9), v.shape).astype(dtype)) if reverse else (
        k, v)
    b = retention._chunk_cumulative_log_decay(log_decay, time, 2, chunk)
    run = functools.partial(chunk_states, reverse=reverse, block_k=block_k, block_v=block_v,
                            interpret=True)
    with jax.default_matmul_precision("highest"):
        out, final = jax.jit(run)(x, y, b, x0)
        ref_out, ref_final = jax.jit(chunk_states_reference, static_argnums=4)(
            x, y, b, x0, reverse)
    assert out.shape == (2, 2, time // chunk, key_dim, value_dim) and out.dtype == dtype
    assert final.shape == x0.shape and final.dtype == jnp.float32
    # The entering states of the first (last, reverse) chunk are the initial carry itself.
    first = -1 if reverse else 0
    np.testing.assert_allclose(np.asarray(out[:, :, first], np.float32),
                               np.asarray(x0.astype(dtype), np.float32))
    # retention.py rounds each chunk's update to the compute dtype; the kernel does not.
    assert rel_err(out, ref_out) <= TOLERANCE[dtype]
    assert rel_err(final, ref_final) <= TOLERANCE[dtype]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("gated, segments", [(True, 2), (False, 3), (True, 6)])
def test_chunk_states_in_segments_match_one_loop(reverse, gated, segments):
    # 6 chunks looped over in `segments` runs from zero carries, joined in XLA: the same
    # states and final carry as one loop, from a random (nonzero) initial carry.
    q, k, v, log_decay, x0 = random_inputs(10, time=96, key_dim=16, value_dim=32, gated=gated,
                                           min_log_decay=-0.2)
    b = retention._chunk_cumulative_log_decay(log_decay, 96, 2, 16)
    x, y = (q, v) if reverse else (k, v)
    with jax.default_matmul_precision("highest"):
        one = chunk_states(x, y, b, x0, reverse=reverse, interpret=True)
        split = jax.jit(functools.partial(chunk_states, reverse=reverse, segments=segments,
                                          interpret=True))(x, y, b, x0)
        ref = jax.jit(chunk_states_reference, static_argnums=4)(x, y, b, x0, reverse)
    for got, single, want in zip(split, one, ref):
        assert got.shape == single.shape and got.dtype == single.dtype
        assert rel_err(got, single) <= 1e-5 and rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("gated, segments", [(True, 1), (False, 2), (True, 4)])
def test_chunk_output_joins_segments_as_it_reads(gated, segments):
    # The output kernel given a recurrence's segments (local carries, entering carries,
    # offsets) computes what it computes from the joined states, and those are the one-loop
    # states: the join inside the kernel is join_segments' sum.
    q, k, v, log_decay, x0 = random_inputs(11, time=64, key_dim=16, value_dim=32, gated=gated,
                                           min_log_decay=-0.2)
    b = retention._chunk_cumulative_log_decay(log_decay, 64, 2, 16)
    with jax.default_matmul_precision("highest"):
        parts = jax.jit(functools.partial(chunk_state_segments, reverse=False,
                                          segments=segments, interpret=True))(k, v, b, x0)
        states, final = chunk_states(k, v, b, x0, reverse=False, interpret=True)
        output = jax.jit(functools.partial(chunk_output, block_v=16, interpret=True))
        fused, joined = output(q, k, v, b, parts), output(q, k, v, b, join_segments(parts))
        ref, _ = xla_retention(q, k, v, log_decay, 16, x0)
    assert parts.local.shape == (2, segments, 2, 4 // segments, 16, 32)
    assert parts.offsets.shape == (1 if not gated else 2, 2, 4)
    assert rel_err(join_segments(parts), states) <= 1e-5
    assert rel_err(parts.final, final) <= 1e-5
    assert rel_err(fused, joined) <= 1e-6
    assert rel_err(fused, ref) <= 1e-5


@pytest.mark.parametrize("batch, heads, chunks, block_v, segments", [
    (1, 16, 256, 64, 2),    # the issue's [1, 32768, 16, 128] at C = 128: 64 programs -> 128
    (1, 16, 256, 256, 4),   # ... 32 programs with one value group per head -> 128
    (4, 16, 64, 64, 1),     # [4, 8192, 16, 128]: 256 programs already
    (4, 16, 64, 256, 1),    # ... or 128
    (1, 16, 64, 64, 2),     # [1, 8192, 16, 128]: segments of 32 chunks
    (1, 8, 64, 64, 4),      # 8 heads: segments of 16 chunks
    (1, 8, 48, 64, 2),      # 4 segments would be 12 chunks long, under 16
    (1, 2, 1024, 64, 16),   # 8 programs: 16 segments fill 128, 32 would be 256
    (1, 16, 255, 64, 1),    # an odd number of chunks cannot be split evenly
])
def test_state_segments_fill_the_grid(batch, heads, chunks, block_v, segments):
    # Dk = Dv = 128, keys in blocks of 64: 2 x (128 / block_v) programs per (batch, head).
    assert state_segments(batch, heads, 128, 128, chunks, block_v=block_v) == segments


@pytest.mark.parametrize("chunk", [64, 128])
@pytest.mark.parametrize("dtype, batch_decay", [(jnp.bfloat16, 1), (jnp.float32, 2)])
def test_kernels_lower_for_the_triton_gpu_backend(chunk, dtype, batch_decay):
    # The largest tiles (C = 64 and 128, Dk = Dv = 128) through Pallas' Triton lowering rules,
    # no GPU needed on jax 0.10 (Triton compiles to PTX later, at XLA's GPU compile: not
    # checked). Activations [B, Tp, H, D] with 3 chunks; per-chunk tensors [B, H, N, ...].
    batch, heads, chunks = 2, 2, 3

    def act(dim):
        return jax.ShapeDtypeStruct((batch, chunks * chunk, heads, dim), dtype)

    matrix = jax.ShapeDtypeStruct((batch, heads, chunks, 128, 128), dtype)
    carry = jax.ShapeDtypeStruct((batch, heads, 128, 128), jnp.float32)
    b = jax.ShapeDtypeStruct((batch_decay, heads, chunks, chunk), jnp.float32)
    calls = [(functools.partial(chunk_states, reverse=False), (act(128), act(128), b, carry)),
             (functools.partial(chunk_states, reverse=True), (act(128), act(128), b, carry)),
             (chunk_output, (act(128), act(128), act(128), b, matrix)),
             (chunk_output, (act(128), act(128), act(128), b, SegmentedStates(
                 local=jax.ShapeDtypeStruct((batch, chunks, heads, 1, 128, 128), dtype),
                 entering=jax.ShapeDtypeStruct((batch, chunks, heads, 128, 128), jnp.float32),
                 offsets=jax.ShapeDtypeStruct(b.shape[:3], jnp.float32), final=carry))),
             (chunk_grads, (act(128), act(128), act(128), act(128), b, matrix, matrix))]
    # The presets' heads (Dk 256, Dv 432): the kernels walk them in pieces of up to 128.
    wide = jax.ShapeDtypeStruct((batch, heads, chunks, 256, 432), dtype)
    calls += [(chunk_output, (act(256), act(256), act(432), b, wide)),
              (chunk_grads, (act(256), act(256), act(432), act(432), b, wide, wide)),
              (functools.partial(chunk_grads, blocks=(128, 256)),
               (act(256), act(256), act(432), act(432), b, wide, wide)),
              (functools.partial(chunk_states, reverse=False),
               (act(256), act(432), b, jax.ShapeDtypeStruct((batch, heads, 256, 432),
                                                            jnp.float32)))]
    # The decoding step at Dk = Dv = 128 and at the presets' heads.
    for key_dim, value_dim in ((128, 128), (256, 432)):
        qk = jax.ShapeDtypeStruct((batch, heads, key_dim), dtype)
        decay = jax.ShapeDtypeStruct((batch, heads) if batch_decay > 1 else (heads,), jnp.float32)
        step_args = (qk, qk, jax.ShapeDtypeStruct((batch, heads, value_dim), dtype), decay,
                     jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32))
        calls.append((retention_step_pallas, step_args))
        calls.append((lambda *a: retention_step_pallas(*a[:5], rotate_at=a[5]),
                      step_args + (jax.ShapeDtypeStruct((batch,), jnp.int32),)))
    for kernel, args in calls:
        text = lower_for_cuda(kernel, *args)
        assert "triton" in text.lower()


def step_inputs(seed, batch, heads, key_dim, value_dim, gated, dtype):
    """Random q, k [B, H, Dk], v [B, H, Dv] (in dtype), log decays in [-3, 0) ([B, H] gated,
    [H] fixed) and a float32 state [B, H, Dk, Dv]."""
    ks = jax.random.split(jax.random.key(seed), 5)
    q, k = (jax.random.normal(key, (batch, heads, key_dim)).astype(dtype) for key in ks[:2])
    v = jax.random.normal(ks[2], (batch, heads, value_dim)).astype(dtype)
    log_decay = jax.random.uniform(ks[3], (batch, heads) if gated else (heads,), minval=-3.0,
                                   maxval=-1e-3)
    state = jax.random.normal(ks[4], (batch, heads, key_dim, value_dim))
    return q, k, v, log_decay, state


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("state_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("key_dim, value_dim, block_v", [
    (16, 32, 64), (48, 80, 32),        # pieces of 32 + 16 keys; 80 -> 5 groups of 16
    (256, 432, 64),                    # the presets' heads: 9 groups of 48 (tiles 32 + 16)
    (256, 432, 256),                   # ... 3 groups of 144 (batch >= 6's default)
])
def test_retention_step_pallas_matches_float64(dtype, state_dtype, gated, key_dim, value_dim,
                                               block_v):
    """S' = exp(log_decay) S + k^T v and o = q S', against float64 numpy and retention.py;
    a bfloat16 state is read and written as bfloat16, o uses the float32 update."""
    q, k, v, log_decay, state = step_inputs(7, 3, 2, key_dim, value_dim, gated, dtype)
    state = state.astype(state_dtype)
    o, new_state = retention_step_pallas(q, k, v, log_decay, state, block_v=block_v,
                                         interpret=True)
    assert o.dtype == v.dtype and o.shape == v.shape
    assert new_state.dtype == state_dtype and new_state.shape == state.shape
    q64, k64, v64, state64 = (np.asarray(jnp.asarray(x, jnp.float32), np.float64)
                              for x in (q, k, v, state))
    decay = np.exp(np.broadcast_to(np.asarray(log_decay, np.float64), (3, 2)))[..., None, None]
    ref_state = decay * state64 + k64[..., :, None] * v64[..., None, :]
    ref_o = np.einsum("bhd,bhde->bhe", q64, ref_state)
    # float32 arithmetic on either dtype, then one rounding to a bfloat16 state
    state_tolerance = 1e-6 if state_dtype == jnp.float32 else 2.0**-8
    assert rel_err(new_state, ref_state) <= state_tolerance
    assert rel_err(o, ref_o) <= TOLERANCE[dtype]           # o rounded to v's dtype
    with jax.default_matmul_precision("highest"):
        xla_o, xla_state = retention.retention_step(q, k, v, log_decay, state)
    assert xla_state.dtype == state_dtype
    if state_dtype == jnp.float32:
        assert rel_err(new_state, xla_state) <= 1e-6
    else:   # both round float32 sums to bfloat16: equal, or one bfloat16 ulp apart
        got, want = (np.asarray(x, np.float32) for x in (new_state, xla_state))
        ulp = np.exp2(np.floor(np.log2(np.maximum(np.abs(want), 1e-30))) - 7)
        assert np.all(np.abs(got - want) <= ulp)
    assert rel_err(o, xla_o) <= TOLERANCE[dtype]


def rotated_float64(x, rotate_at):
    """positions.rotate of x [B, H, D] in float64, at angles position * theta rounded to
    float32 as the library computes them (an angle near 7e4 radians carries up to ~4e-3
    radians of float32 rounding in every implementation)."""
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    theta = positions.rotation_frequencies(x.shape[-1]).astype(np.float32)
    at = np.broadcast_to(np.asarray(rotate_at), (x.shape[0],)).astype(np.float32)
    angle = (at[:, None] * theta[None, :]).astype(np.float64)[:, None, :]     # [B, 1, D]
    swapped = np.stack((-x[..., 1::2], x[..., 0::2]), axis=-1).reshape(x.shape)
    return x * np.cos(angle) + swapped * np.sin(angle)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("key_dim, value_dim, block_v", [
    (16, 32, 64),                      # one even and one odd row piece of 8
    (48, 80, None),                    # halves of 24 -> strided pieces of 16 + 8
    (256, 432, None),                  # the presets' heads (default: groups of 16 at batch 3)
])
@pytest.mark.parametrize("rotate_at", [np.array([0, 5, 70_001]), 9])
def test_retention_step_pallas_rotates_q_and_k(dtype, gated, key_dim, value_dim, block_v,
                                               rotate_at):
    """With rotate_at the kernel computes retention_step(rotate(q), rotate(k), ...) at each
    sequence's position (or one shared position): against float64 numpy and against
    positions.rotate followed by retention.py's step."""
    q, k, v, log_decay, state = step_inputs(8, 3, 2, key_dim, value_dim, gated, dtype)
    o, new_state = retention_step_pallas(q, k, v, log_decay, state, rotate_at=rotate_at,
                                         block_v=block_v, interpret=True)
    q64, k64 = rotated_float64(q, rotate_at), rotated_float64(k, rotate_at)
    v64, state64 = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (v, state))
    decay = np.exp(np.broadcast_to(np.asarray(log_decay, np.float64), (3, 2)))[..., None, None]
    ref_state = decay * state64 + k64[..., :, None] * v64[..., None, :]
    ref_o = np.einsum("bhd,bhde->bhe", q64, ref_state)
    # the kernel rounds rotated q and k to their dtype (as positions.rotate does), the
    # float64 reference does not
    assert rel_err(new_state, ref_state) <= TOLERANCE[dtype]
    assert rel_err(o, ref_o) <= TOLERANCE[dtype]
    at = jnp.asarray(rotate_at)
    rq, rk = (positions.rotate(x[:, None], at)[:, 0] for x in (q, k))
    with jax.default_matmul_precision("highest"):
        xla_o, xla_state = retention.retention_step(rq, rk, v, log_decay, state)
    assert rel_err(new_state, xla_state) <= 1e-5
    assert rel_err(o, xla_o) <= TOLERANCE[dtype]


def test_retention_step_pallas_rounds_rotations_to_q_and_k_dtypes():
    """q in bfloat16 and k in float16 beside a float32 v travel to the kernel in one float32
    array; the rotated q and k still round to their own dtypes, as positions.rotate does."""
    q, k, v, log_decay, state = step_inputs(9, 2, 2, 48, 80, True, jnp.bfloat16)
    k = k.astype(jnp.float16)
    v = v.astype(jnp.float32) * 1.1               # values no bfloat16 holds
    o, new_state = retention_step_pallas(q, k, v, log_decay, state, rotate_at=70_001,
                                         interpret=True)
    assert o.dtype == jnp.float32
    rq, rk = (positions.rotate(x[:, None], jnp.asarray(70_001))[:, 0] for x in (q, k))
    assert (rq.dtype, rk.dtype) == (jnp.bfloat16, jnp.float16)
    with jax.default_matmul_precision("highest"):
        xla_o, xla_state = retention.retention_step(rq, rk, v, log_decay, state)
    # A float16 ulp flipped here and there by the two float32 rotations' own rounding: ~3e-6;
    # rotations rounded to float32, or q's and k's dtypes swapped: ~1e-3.
    assert rel_err(new_state, xla_state) <= 3e-5
    assert rel_err(o, xla_o) <= 3e-5


def test_retention_step_pallas_reads_q_k_and_v_from_one_array():
    """One packed operand feeds the kernel's q, k and v blocks: the precondition for XLA to
    write q, k and v in one fusion inside a model, not one per array."""
    q, k, v, log_decay, state = step_inputs(10, 1, 8, 256, 432, False, jnp.bfloat16)
    jaxpr = jax.make_jaxpr(functools.partial(retention_step_pallas, rotate_at=3,
                                             interpret=True))(q, k, v, log_decay, state)
    calls = [eqn for eqn in equations(jaxpr.jaxpr) if eqn.primitive.name == "pallas_call"]
    assert len(calls) == 1
    first, second, third = calls[0].invars[:3]
    assert first is second is third and first.aval.shape == (1, 1, 2 * 8 * 256 + 8 * 432)


def test_retention_step_pallas_keeps_a_weakly_typed_v_exact():
    """A weakly typed float32 v (a Python float broadcast) beside bfloat16 q and k is packed
    in float32, not rounded to bfloat16 by JAX's weak-type promotion."""
    q, k, _, log_decay, state = step_inputs(11, 1, 2, 16, 32, False, jnp.bfloat16)
    v = jnp.broadcast_to(1.1, (1, 2, 32))
    assert v.weak_type and v.dtype == jnp.float32
    o, new_state = retention_step_pallas(q, k, v, log_decay, state, interpret=True)
    with jax.default_matmul_precision("highest"):
        xla_o, xla_state = retention.retention_step(q, k, jnp.asarray(v, jnp.float32),
                                                    log_decay, state)
    assert rel_err(new_state, xla_state) <= 1e-6     # a bfloat16 v (1.1016) would be ~1e-3 off
    assert rel_err(o, xla_o) <= 1e-5


@pytest.mark.parametrize("batch, heads, value_dim, want, columns", [
    (1, 8, 432, 32, 16),      # the 1.3B heads at batch 1: 27 groups of 16, 216 programs
    (2, 8, 432, 128, 48),     # 9 groups of 48, 144 programs
    (8, 8, 432, 256, 144),    # 3 groups of 144 (as timed at batch 8-64)
    (1, 2, 32, 16, 16),       # too few programs at any width: the narrowest
])
def test_default_block_v_gives_enough_programs(batch, heads, value_dim, want, columns):
    block_v = default_block_v(batch, heads, value_dim)
    assert block_v == want and column_group(value_dim, block_v) == columns


def test_default_block_v_names_a_value_dim_it_cannot_split():
    with pytest.raises(ValueError, match="value_dim must be a multiple of 16, got 40"):
        default_block_v(1, 8, 40)


@pytest.mark.parametrize("change, match", [
    ({"rotate_at": jnp.zeros((2,), jnp.int32)}, r"rotate_at must be an int scalar or int "
                                                r"\[batch=1\]"),
    ({"rotate_at": 1.5}, "rotate_at must be an int"),
    ({"q": jnp.ones((1, 2, 24)), "k": jnp.ones((1, 2, 24)), "state": jnp.ones((1, 2, 24, 32))},
     r"key head dim Dk \(q.shape\[2\]\) = 24 is not a multiple of 16"),
    ({"v": jnp.ones((1, 2, 40)), "state": jnp.ones((1, 2, 16, 40))},
     r"value head dim Dv \(v.shape\[2\]\) = 40 is not a multiple of 16"),
    ({"block_v": 48}, "block_v must be a power of two"),
    ({"state": jnp.ones((1, 2, 32, 16))}, "state must have shape"),
    ({"log_decay": -jnp.ones((3,))}, "log_decay must have shape"),
    ({"log_decay": jnp.ones((2,))}, "log_decay must be <= 0"),
    ({"k": jnp.ones((1, 2, 32))}, "q and k must have the same shape"),
])
def test_retention_step_pallas_rejects_bad_arguments(change, match):
    args = {"q": jnp.ones((1, 2, 16)), "k": jnp.ones((1, 2, 16)), "v": jnp.ones((1, 2, 32)),
            "log_decay": -jnp.ones((2,)), "state": jnp.ones((1, 2, 16, 32))} | change
    with pytest.raises(ValueError, match=match):
        retention_step_pallas(**args, interpret=True)


def test_pallas_path_never_transposes_activations():
    # Forward and backward read q, k, v, do and write o, dq, dk, dv in their [B, T, H, D]
    # layout: no transpose of any rank >= 4 tensor anywhere in the traced program (only the
    # [B, T, H] log decays are transposed). T = 40 needs padding to 3 chunks of 16.
    q, k, v, log_decay, s0 = random_inputs(10, batch=2, time=40, heads=3, key_dim=32,
                                           value_dim=64)

    def transposed_shapes(fn):
        step = jax.value_and_grad(functools.partial(summed_outputs, fn), argnums=(0, 1, 2, 3, 4))
        jaxpr = jax.make_jaxpr(step)(q, k, v, log_decay, s0).jaxpr
        return [eqn.invars[0].aval.shape for eqn in equations(jaxpr)
                if eqn.primitive.name == "transpose" and eqn.invars[0].aval.ndim >= 4]

    assert transposed_shapes(functools.partial(chunkwise_retention_pallas, interpret=True)) == []
    # ... while the XLA path transposes q, padded and split into chunks [B, N, C, H, Dk], to
    # [B, H, N, C, Dk] (so the check above can fail).
    assert (2, 3, 16, 3, 32) in transposed_shapes(retention.chunkwise_retention)


def kernel_args(chunk=16, key_dim=16, value_dim=32):
    """Valid chunk_output arguments (batch 1, heads 1, 2 chunks), float32, as a dict."""
    q = jnp.ones((1, 2 * chunk, 1, key_dim))
    return {"q": q, "k": q, "v": jnp.ones((1, 2 * chunk, 1, value_dim)),
            "b": -jnp.ones((1, 1, 2, chunk)), "states": jnp.ones((1, 1, 2, key_dim, value_dim)),
            "block_v": 32}


def segments_of(local=(1, 2, 1, 1, 16, 32), entering=(1, 2, 1, 16, 32), offsets=(1, 1, 2),
                local_dtype=jnp.float32, entering_dtype=jnp.float32):
    """`SegmentedStates` for kernel_args' shapes (2 chunks in 2 segments) unless changed."""
    return SegmentedStates(local=jnp.ones(local, local_dtype),
                           entering=jnp.ones(entering, entering_dtype),
                           offsets=-jnp.ones(offsets), final=jnp.ones((1, 1, 16, 32)))


@pytest.mark.parametrize("dim, most, group", [
    (128, 64, 64), (48, 64, 48), (432, 64, 48), (432, 256, 144), (432, 512, 432),
    (32, 64, 32), (24, 64, None), (64, 8, None)])
def test_column_group_is_the_widest_divisor_in_multiples_of_16(dim, most, group):
    assert column_group(dim, most) == group


@pytest.mark.parametrize("key_dim, value_dim, kernels", [
    (128, 128, ["retention_chunk_grads"]),
    (128, 256, ["retention_chunk_grads"]),           # one group each: nothing to spread
    (256, 432, ["retention_chunk_value_grads", "retention_chunk_key_grads"]),
    (64, 432, ["retention_chunk_value_grads", "retention_chunk_key_grads"]),
])
def test_training_takes_two_gradient_kernels_for_wide_heads(key_dim, value_dim, kernels):
    """`default_blocks` routes the backward pass of heads wider than one group to the
    two-kernel `chunk_grads`, and the rest to the fused one."""
    q, k = (jnp.ones((1, 32, 1, key_dim), jnp.bfloat16),) * 2
    v = jnp.ones((1, 32, 1, value_dim), jnp.bfloat16)

    def loss(q, k, v):
        o, _ = chunkwise_retention_pallas(q, k, v, -jnp.ones((1,)) / 8, chunk_size=16,
                                          interpret=True)
        return jnp.sum(o.astype(jnp.float32))

    names = [eq.params["name"] for eq in equations(
        jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr)
        if eq.primitive.name == "pallas_call"]
    assert [name for name in names if "grads" in name] == kernels
    assert default_blocks(key_dim, value_dim) == (None if len(kernels) == 1 else (128, 256))


@pytest.mark.parametrize("width, sizes", [
    (128, [128]), (16, [16]), (48, [32, 16]), (256, [128, 128]), (432, [128, 128, 128, 32, 16])])
def test_pieces_are_power_of_two_tiles_covering_the_width(width, sizes):
    slices = pieces(width)
    assert [s.size for s in slices] == sizes
    assert [s.start for s in slices] == list(np.cumsum([0] + sizes[:-1]))


@pytest.mark.parametrize("shape, change, match", [
    ({}, {"block_v": 48}, "block_v"),                           # not a power of two
    ({}, {"block_v": 8}, "block_v"),                            # below a Triton dot tile
    ({"chunk": 8}, {}, "chunk size"),                           # C < 16
    ({"chunk": 24}, {}, "chunk size"),                          # not a power of two
    ({"key_dim": 24}, {}, "key head dim 24"),                   # not a multiple of 16
    ({"value_dim": 24}, {}, "value head dim 24"),
    ({}, {"b": -jnp.ones((1, 1, 2, 16), jnp.bfloat16)}, "b must be float32"),
    ({}, {"b": -jnp.ones((2, 1, 2, 16))}, "b must have shape"),  # G = 2 > B = 1
    ({}, {"b": -jnp.ones((1, 1, 3, 16))}, "must equal the padded time"),  # N * C != Tp
    ({}, {"states": jnp.ones((1, 1, 2, 16, 32), jnp.bfloat16)}, "states must have q's"),
    ({}, {"states": jnp.ones((1, 1, 2, 32, 16))}, "states must have shape"),
    ({}, {"k": jnp.ones((1, 32, 1, 32))}, "k must have q's shape"),
    ({}, {"v": jnp.ones((1, 16, 1, 32))}, "v must have shape"),
    ({}, {"states": segments_of(local=(1, 3, 1, 1, 16, 32))}, r"S \* L = N = 2"),
    ({}, {"states": segments_of(local=(1, 2, 1, 16, 32))}, r"\[B, S, H, L, Dk, Dv\]"),
    ({}, {"states": segments_of(local_dtype=jnp.bfloat16)}, "states.local must be float32"),
    ({}, {"states": segments_of(entering_dtype=jnp.bfloat16)},
     "states.entering must be float32"),
    ({}, {"states": segments_of(entering=(1, 1, 1, 16, 32))}, "states.entering must be"),
    ({}, {"states": segments_of(offsets=(1, 1, 3))},
     r"states.offsets must be float32 \(1, 1, 2\)"),
])
def test_chunk_output_rejects_bad_arguments(shape, change, match):
    args = kernel_args(**shape) | change
    with pytest.raises(ValueError, match=match):
        chunk_output(**args, interpret=True)


@pytest.mark.parametrize("change, match", [
    ({"chunk": 8}, "chunk size"),                           # C < 16
    ({"key_dim": 8}, "key dim"),                            # below a Triton dot tile
    ({"key_dim": 24}, "key dim Dk .* = 24"),                # no power-of-two block >= 16
    ({"value_dim": 40}, "value dim Dv .* = 40"),
    ({"do": jnp.ones((1, 32, 1, 16))}, "do must have shape"),
    ({"d_kv": jnp.ones((1, 1, 2, 32, 16))}, "d_kv must have shape"),
    ({"d_kv": jnp.ones((1, 1, 2, 16, 32), jnp.bfloat16)}, "d_kv must have q's dtype"),
    ({"states": jnp.ones((1, 1, 16, 32))}, "states must have rank 5"),
    ({"q": jnp.ones((1, 32, 16))}, "q must have rank 4"),
    ({"b": -jnp.ones((1, 1, 2, 16), jnp.bfloat16)}, "b must be float32"),
    ({"b": -jnp.ones((2, 1, 2, 16))}, "b must have shape"),  # G = 2 > B = 1
    ({"blocks": (16, 48)}, r"blocks\[1\] \(block_v\) must be a power of two"),
    ({"blocks": (8, 16)}, "blocks must be >= 16"),
    ({"blocks": (16,)}, r"blocks must be None or \(block_k, block_v\)"),
])
def test_chunk_grads_rejects_bad_arguments(change, match):
    chunk = change.pop("chunk", 16)
    key_dim, value_dim = change.pop("key_dim", 16), change.pop("value_dim", 32)
    q = jnp.ones((1, 2 * chunk, 1, key_dim))
    v = jnp.ones((1, 2 * chunk, 1, value_dim))
    state = jnp.ones((1, 1, 2, key_dim, value_dim))
    args = {"q": q, "k": q, "v": v, "do": v, "b": -jnp.ones((1, 1, 2, chunk)),
            "states": state, "d_kv": state} | change
    with pytest.raises(ValueError, match=match):
        chunk_grads(**args, interpret=True)


@pytest.mark.parametrize("change, match", [
    ({"block_k": 8}, "key dim"),                             # no block >= 16
    ({"block_v": 24}, "block_v"),                            # not a power of two
    ({"y": jnp.ones((1, 32, 1, 24)), "x0": jnp.ones((1, 1, 16, 24))},
     "value dim"),                                           # not a multiple of 16
    ({"x0": jnp.ones((1, 1, 16, 32), jnp.bfloat16)}, "x0 must be float32"),
    ({"x0": jnp.ones((1, 1, 32, 16))}, "x0 must be float32"),
    ({"y": jnp.ones((1, 32, 1, 32), jnp.bfloat16)}, "y must have x's dtype"),
    ({"b": -jnp.ones((1, 1, 4, 16))}, "must equal the padded time"),
    ({"segments": 3}, "segments must be a positive divisor"),   # N = 2 chunks
    ({"segments": 0}, "segments must be a positive divisor"),
])
def test_chunk_states_rejects_bad_arguments(change, match):
    args = {"x": jnp.ones((1, 32, 1, 16)), "y": jnp.ones((1, 32, 1, 32)),
            "b": -jnp.ones((1, 1, 2, 16)), "x0": jnp.ones((1, 1, 16, 32)), "reverse": False}
    with pytest.raises(ValueError, match=match):
        chunk_states(**(args | change), interpret=True)


def test_chunkwise_retention_pallas_rejects_bad_settings():
    q, k, v, log_decay, _ = random_inputs(6, time=20)
    for chunk_size in (8, 24, 0, 16.0):
        with pytest.raises(ValueError, match="chunk_size"):
            chunkwise_retention_pallas(q, k, v, log_decay, chunk_size=chunk_size, interpret=True)
    with pytest.raises(ValueError, match="segments must be a positive divisor"):   # N = 2
        chunkwise_retention_pallas(q, k, v, log_decay, chunk_size=16, segments=4,
                                   interpret=True)
    with pytest.raises(ValueError, match="num_warps must be a power of two"):
        chunkwise_retention_pallas(q, k, v, log_decay, num_warps=6, interpret=True)
    with pytest.raises(ValueError, match="state_num_warps must be a power of two"):
        chunkwise_retention_pallas(q, k, v, log_decay, state_num_warps=3, interpret=True)
    with pytest.raises(ValueError, match="state_num_stages must be a positive integer"):
        chunkwise_retention_pallas(q, k, v, log_decay, state_num_stages=0, interpret=True)


@pytest.mark.parametrize("preset, supported", [
    ("small", False),              # value head dim 108: not a multiple of 16
    ("retnet_125m", True),         # Dk 256, Dv 432 (torchscale's 27/16 d_model per head)
    ("retnet_1_3b", True),
    ("retnet_2_7b", False),        # Dv 428
    ("retnet_6_7b", True),
])
def test_which_presets_the_kernels_take(preset, supported):
    import pathlib
    import runpy

    from retnet_jax import kernels
    from retnet_jax.model import ModelConfig
    path = pathlib.Path(__file__).parent.parent / "configs" / f"{preset}.py"
    config = ModelConfig.from_config(runpy.run_path(str(path))["get_config"]().model)
    key_dim = config.d_model // config.num_heads
    value_dim = config.resolved_value_dim // config.num_heads
    assert (kernels.unsupported_reason(key_dim, value_dim, config.chunk_size) is None) == supported


def test_the_gpu_ablation_model_gets_the_kernels():
    from retnet_jax import ablation, kernels
    model = ablation.SCALES["gpu"].model                          # Dk 128, Dv 256
    key_dim, value_dim = (model["d_model"] // model["num_heads"],
                          model["value_dim"] // model["num_heads"])
    assert kernels.unsupported_reason(key_dim, value_dim, model["chunk_size"]) is None


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rotate_at", [None, np.array([3, 70_001])])
def test_retention_step_from_splits_adds_the_splits_itself(dtype, rotate_at):
    """q, k and v read from 3 K-splits' partials of one [q | k | pad | v | gate] array: the
    same step as retention_step_pallas on the splits' sums rounded to dtype (k scaled by
    key_scale after its rounding), and as float64 numpy."""
    from retnet_jax.kernels import retention_step_from_splits
    from retnet_jax.kernels.projections import SplitSums
    batch, heads, key_dim, value_dim = 2, 2, 48, 80
    rng = np.random.default_rng(21)
    q_at, k_at, v_at = 0, heads * key_dim, 2 * heads * key_dim + 32   # v after 32 pad columns
    width = v_at + heads * value_dim + 64
    partials = jnp.asarray(rng.standard_normal((3, batch, width)), jnp.float32)
    q, k, v = (SplitSums(partials, at, heads * dim) for at, dim in
               ((q_at, key_dim), (k_at, key_dim), (v_at, value_dim)))
    _, _, _, log_decay, state = step_inputs(12, batch, heads, key_dim, value_dim, True, dtype)
    o, new_state = retention_step_from_splits(q, k, v, log_decay, state, dtype=dtype,
                                              key_scale=key_dim**-0.5, rotate_at=rotate_at,
                                              interpret=True)
    assert o.dtype == dtype and o.shape == (batch, heads, value_dim)
    sums = [s.total().astype(dtype) for s in (q, k, v)]
    sums[1] = sums[1] * jnp.asarray(key_dim**-0.5, dtype)
    sq, sk, sv = (x.reshape(batch, heads, -1) for x in sums)
    want_o, want_state = retention_step_pallas(sq, sk, sv, log_decay, state,
                                               rotate_at=rotate_at, interpret=True)
    assert rel_err(new_state, want_state) <= 1e-6
    assert rel_err(o, want_o) <= 1e-6
    at = 0 if rotate_at is None else rotate_at
    q64, k64 = (rotated_float64(x, at) for x in (sq, sk))
    v64, state64 = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (sv, state))
    decay = np.exp(np.asarray(log_decay, np.float64))[..., None, None]
    ref_state = decay * state64 + k64[..., :, None] * v64[..., None, :]
    assert rel_err(new_state, ref_state) <= TOLERANCE[dtype]
    assert rel_err(o, np.einsum("bhd,bhde->bhe", q64, ref_state)) <= TOLERANCE[dtype]


def test_splits_layout_reason_names_what_the_step_cannot_read():
    from retnet_jax.kernels import splits_layout_reason
    from retnet_jax.kernels.projections import SplitSums
    partials = jnp.zeros((2, 1, 1024), jnp.float32)
    q, k = SplitSums(partials, 0, 128), SplitSums(partials, 128, 128)
    assert splits_layout_reason(q, k, SplitSums(partials, 256, 256), heads=2) is None
    misplaced = SplitSums(partials, 264, 256)
    assert "v starts at column 264" in splits_layout_reason(q, k, misplaced, heads=2)
    other = SplitSums(jnp.zeros((2, 1, 1024), jnp.float32), 256, 256)
    assert "one partials array" in splits_layout_reason(q, k, other, heads=2)
    assert "multiple of 16" in splits_layout_reason(q, k, SplitSums(partials, 256, 200),
                                                     heads=2)


def test_retention_step_from_splits_lowers_for_the_triton_gpu_backend():
    """The 1.3B preset's batch-1 step from q|k|v|gate's 8 split partials (q at column 0, k
    at 2048, v at 4096; heads Dk 256, Dv 432), rotating q and k."""
    from retnet_jax.kernels import retention_step_from_splits
    from retnet_jax.kernels.projections import SplitSums

    def step(partials, log_decay, state, position):
        q, k, v = (SplitSums(partials, at, width)
                   for at, width in ((0, 2048), (2048, 2048), (4096, 3456)))
        return retention_step_from_splits(q, k, v, log_decay, state, dtype=jnp.bfloat16,
                                          key_scale=256**-0.5, rotate_at=position)
    args = (jax.ShapeDtypeStruct((8, 1, 11008), jnp.float32),
            jax.ShapeDtypeStruct((8,), jnp.float32),
            jax.ShapeDtypeStruct((1, 8, 256, 432), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.int32))
    assert "triton" in lower_for_cuda(step, *args).lower()


def test_retention_step_from_splits_checks_widths_against_the_state():
    """q's columns must be the state's heads x Dk (a q of 2 x 48 columns beside a Dk = 32
    state would read the wrong columns)."""
    from retnet_jax.kernels import retention_step_from_splits
    from retnet_jax.kernels.projections import SplitSums
    partials = jnp.zeros((2, 1, 512), jnp.float32)
    q, k, v = SplitSums(partials, 0, 96), SplitSums(partials, 96, 96), SplitSums(partials,
                                                                                 192, 64)
    state = jnp.zeros((1, 2, 32, 32), jnp.float32)
    with pytest.raises(ValueError, match="q has 96 columns, the state's 2 heads x 32 need 64"):
        retention_step_from_splits(q, k, v, jnp.zeros(2), state, dtype=jnp.float32,
                                   interpret=True)
