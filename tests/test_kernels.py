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

from retnet_jax import retention
from retnet_jax.kernels import chunk_grads, chunk_output, chunkwise_retention_pallas
from retnet_jax.kernels.chunk_output import value_block

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


@functools.partial(jax.jit, static_argnames=("chunk_size", "block_v"))
def kernel_from_xla_residuals(q, k, v, log_decay, initial_state, chunk_size, block_v):
    """chunk_output on the chunked inputs, decays and entering states of retention.py."""
    _, _, (qc, kc, vc, _, _, states, b) = retention._chunkwise_forward(
        q, k, v, log_decay, initial_state, chunk_size, True)
    return chunk_output(qc, kc, vc, b, states, block_v=block_v, interpret=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("gated, chunk_size, key_dim, value_dim, block_v", [
    (True, 16, 16, 32, 16),     # two value blocks, Dk != Dv
    (False, 16, 16, 32, 16),
    (True, 32, 32, 16, 64),     # block_v > Dv: one block of Dv
    (False, 64, 16, 16, 64),    # one chunk longer than T (T padded)
])
def test_chunk_output_matches_xla(dtype, gated, chunk_size, key_dim, value_dim, block_v):
    q, k, v, log_decay, s0 = random_inputs(0, time=37, key_dim=key_dim, value_dim=value_dim,
                                           gated=gated, dtype=dtype)
    o = kernel_from_xla_residuals(q, k, v, log_decay, s0, chunk_size, block_v)
    ref, _ = xla_retention(q, k, v, log_decay, chunk_size, s0)
    assert o.dtype == dtype
    assert o.shape == (2, 2, -(-37 // chunk_size), chunk_size, value_dim)
    # Padded tail positions have zero queries, hence zero output, as the padded reference.
    assert rel_err(o, retention._to_chunks(ref, chunk_size)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype, gated, time, chunk_size, with_state", [
    (jnp.float32, True, 50, 16, True),
    (jnp.float32, False, 64, 32, False),
    (jnp.bfloat16, True, 64, 32, False),
    (jnp.bfloat16, False, 50, 16, True),
])
def test_chunkwise_retention_pallas_matches_xla(dtype, gated, time, chunk_size, with_state):
    q, k, v, log_decay, s0 = random_inputs(1, time=time, gated=gated, dtype=dtype)
    s0 = s0 if with_state else None
    o, state = jax.jit(functools.partial(chunkwise_retention_pallas, chunk_size=chunk_size,
                                         interpret=True, block_v=16))(
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
@pytest.mark.parametrize("dtype, gated, time, chunk_size, with_state, value_dim, min_log_decay", [
    (jnp.float32, True, 40, 16, True, 32, -0.2),
    (jnp.float32, False, 50, 32, False, 32, -0.2),
    (jnp.bfloat16, True, 50, 16, False, 32, -3.0),
    (jnp.bfloat16, False, 40, 16, True, 32, -0.2),
    (jnp.float32, True, 20, 16, True, 48, -0.2),   # Dv = 48: chunk_grads cannot; XLA einsums
])
def test_gradients_match_xla(dtype, gated, time, chunk_size, with_state, value_dim,
                             min_log_decay):
    q, k, v, log_decay, s0 = random_inputs(3, time=time, gated=gated, value_dim=value_dim,
                                           dtype=dtype, min_log_decay=min_log_decay)
    ks = jax.random.split(jax.random.key(4), 2)
    do = jax.random.normal(ks[0], v.shape)
    d_state = jax.random.normal(ks[1], s0.shape)
    args, argnums = ((q, k, v, log_decay, s0), (0, 1, 2, 3, 4)) if with_state else (
        (q, k, v, log_decay), (0, 1, 2, 3))

    def loss(fn, q, k, v, log_decay, initial_state=None):
        o, state = fn(q, k, v, log_decay, chunk_size=chunk_size, initial_state=initial_state)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(state * d_state)

    pallas = functools.partial(chunkwise_retention_pallas, interpret=True, block_v=16)
    with jax.default_matmul_precision("highest"):
        grads, ref = (jax.jit(jax.grad(functools.partial(loss, fn), argnums=argnums))(*args)
                      for fn in (pallas, retention.chunkwise_retention))
    for name, g, r in zip(("q", "k", "v", "log_decay", "initial_state"), grads, ref):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert np.abs(np.asarray(r, np.float32)).max() > 0, name
        assert rel_err(g, r) <= TOLERANCE[dtype], name


def test_training_step_never_materialises_chunk_weights():
    # Forward and backward: the [B, H, N, C, C] weights and their cotangents live only inside
    # the kernels (chunk_output, chunk_grads); XLA drops or never builds the einsum path.
    # (Interpret mode lowers each kernel to a loop over [C, C] tiles, so the check holds on CPU.)
    q, k, v, log_decay, s0 = random_inputs(5, batch=3, time=48, heads=5, key_dim=32,
                                           value_dim=64)

    def loss(fn, q, k, v, log_decay, initial_state):
        o, state = fn(q, k, v, log_decay, chunk_size=16, initial_state=initial_state)
        return jnp.sum(o) + jnp.sum(state)

    def compiled_hlo(fn):
        step = jax.value_and_grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3, 4))
        return jax.jit(step).lower(q, k, v, log_decay, s0).compile().as_text()

    assert "[3,5,3,16,16]" not in compiled_hlo(
        functools.partial(chunkwise_retention_pallas, interpret=True))
    # ... while the XLA path does build them (so the check above can fail).
    assert "[3,5,3,16,16]" in compiled_hlo(retention.chunkwise_retention)


def random_chunks(seed, batch, heads, chunks, chunk, key_dim, value_dim, shared_decay, dtype):
    """Random chunk_grads arguments: normal qc, kc, vc, doc, states, d_kv in dtype; b float32."""
    ks = jax.random.split(jax.random.key(seed), 7)
    shape = (batch, heads, chunks)
    qc, kc = (jax.random.normal(x, shape + (chunk, key_dim)).astype(dtype) for x in ks[:2])
    vc, doc = (jax.random.normal(x, shape + (chunk, value_dim)).astype(dtype) for x in ks[2:4])
    states, d_kv = (jax.random.normal(x, shape + (key_dim, value_dim)).astype(dtype)
                    for x in ks[4:6])
    # Weak decays: exp(chunk total) stays well above 0, so the chunk-end terms of db count.
    log_decay = jax.random.uniform(ks[6], (1 if shared_decay else batch,) + shape[1:] + (chunk,),
                                   minval=-0.1, maxval=-1e-3)
    return qc, kc, vc, doc, jnp.cumsum(log_decay, axis=-1), states, d_kv


@jax.jit
def chunk_grads_reference(qc, kc, vc, doc, b, states, d_kv):
    """chunk_grads' results from XLA einsums (retention._chunkwise_backward's per-chunk part)."""
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
    return dq, dk, dv, db.at[..., -1].add(chunk_end)


@pytest.mark.parametrize("dtype, shared_decay, chunk, key_dim, value_dim", [
    (jnp.float32, False, 16, 16, 32),
    (jnp.float32, True, 32, 32, 16),
    (jnp.bfloat16, False, 16, 32, 16),
])
def test_chunk_grads_matches_xla_einsums(dtype, shared_decay, chunk, key_dim, value_dim):
    args = random_chunks(7, 2, 2, 3, chunk, key_dim, value_dim, shared_decay, dtype)
    with jax.default_matmul_precision("highest"):
        out = jax.jit(functools.partial(chunk_grads, interpret=True))(*args)
        ref = chunk_grads_reference(*args)
    for name, x, r in zip(("dq", "dk", "dv", "db"), out, ref):
        assert x.shape == r.shape, name
        assert x.dtype == (jnp.float32 if name == "db" else dtype), name
        # The kernel rounds its float32 results once, to the compute dtype.
        assert rel_err(x, r) <= TOLERANCE[dtype] / 4, name


@pytest.mark.parametrize("dtype, batch_decay", [(jnp.bfloat16, 1), (jnp.float32, 2)])
def test_kernels_lower_for_the_triton_gpu_backend(dtype, batch_decay):
    # The largest tiles (C = 64, Dk = Dv = 128) through Pallas' Triton lowering rules, no GPU
    # needed on jax 0.10 (Triton compiles to PTX later, at XLA's GPU compile: not checked).
    def x(*shape):
        return jax.ShapeDtypeStruct((2, 2, 3) + shape, dtype)

    b = jax.ShapeDtypeStruct((batch_decay, 2, 3, 64), jnp.float32)
    calls = [(chunk_output, (x(64, 128), x(64, 128), x(64, 128), b, x(128, 128))),
             (chunk_grads, (x(64, 128), x(64, 128), x(64, 128), x(64, 128), b, x(128, 128),
                            x(128, 128)))]
    for kernel, args in calls:
        try:
            lowered = jax.jit(kernel).trace(*args).lower(lowering_platforms=("cuda",))
        except RuntimeError as e:  # newer jax asks for a (possibly abstract) GPU here
            if "No supported GPU" not in str(e):  # (NotImplementedError is a RuntimeError)
                raise
            pytest.skip(f"Triton lowering needs a GPU on this jax: {e}")
        assert "triton" in lowered.as_text().lower()


def chunked_args(chunk=16, key_dim=16, value_dim=32):
    """Valid chunk_output arguments (batch 1, heads 1, 2 chunks), float32, as a dict."""
    qc = jnp.ones((1, 1, 2, chunk, key_dim))
    return {"qc": qc, "kc": qc, "vc": jnp.ones((1, 1, 2, chunk, value_dim)),
            "b": -jnp.ones((1, 1, 2, chunk)), "states": jnp.ones((1, 1, 2, key_dim, value_dim)),
            "block_v": 32}


@pytest.mark.parametrize("value_dim, block_v, block", [
    (128, 64, 64), (48, 64, 16), (432, 64, 16), (32, 64, 32), (24, 64, None), (64, 8, None)])
def test_value_block_is_the_largest_power_of_two_divisor(value_dim, block_v, block):
    assert value_block(value_dim, block_v) == block


@pytest.mark.parametrize("shape, change, match", [
    ({}, {"block_v": 48}, "block_v"),                           # not a power of two
    ({}, {"block_v": 8}, "block_v"),                            # below a Triton dot tile
    ({"chunk": 8}, {}, "chunk size"),                           # C < 16
    ({"chunk": 24}, {}, "chunk size"),                          # not a power of two
    ({"key_dim": 24}, {}, "key head dim 24"),
    ({"value_dim": 24}, {}, "value head dim 24"),               # no power-of-two block >= 16
    ({}, {"b": -jnp.ones((1, 1, 2, 16), jnp.bfloat16)}, "b must be float32"),
    ({}, {"b": -jnp.ones((2, 1, 2, 16))}, "b must have shape"),  # G = 2 > B = 1
    ({}, {"states": jnp.ones((1, 1, 2, 16, 32), jnp.bfloat16)}, "states must have qc's"),
    ({}, {"states": jnp.ones((1, 1, 2, 32, 16))}, "states must have shape"),
    ({}, {"kc": jnp.ones((1, 1, 2, 16, 32))}, "kc must have qc's shape"),
])
def test_chunk_output_rejects_bad_arguments(shape, change, match):
    args = chunked_args(**shape) | change
    with pytest.raises(ValueError, match=match):
        chunk_output(**args, interpret=True)


@pytest.mark.parametrize("change, match", [
    ({"shape": (1, 1, 2, 8, 16)}, "chunk size"),            # C < 16
    ({"key_dim": 8}, "key dim"),                            # below a Triton dot tile
    ({"key_dim": 256}, "key dim"),                          # above one program's tile
    ({"value_dim": 48}, "value dim"),                       # not a power of two
    ({"doc": jnp.ones((1, 1, 2, 16, 16))}, "doc must have shape"),
    ({"d_kv": jnp.ones((1, 1, 2, 32, 16))}, "d_kv must have shape"),
    ({"d_kv": jnp.ones((1, 1, 2, 16, 32), jnp.bfloat16)}, "d_kv must have qc's dtype"),
    ({"states": jnp.ones((1, 1, 16, 32))}, "states must have rank 5"),
    ({"b": -jnp.ones((1, 1, 2, 16), jnp.bfloat16)}, "b must be float32"),
    ({"b": -jnp.ones((2, 1, 2, 16))}, "b must have shape"),  # G = 2 > B = 1
])
def test_chunk_grads_rejects_bad_arguments(change, match):
    shape = change.pop("shape", (1, 1, 2, 16, 16))
    key_dim, value_dim = change.pop("key_dim", shape[-1]), change.pop("value_dim", 32)
    qc = jnp.ones(shape[:4] + (key_dim,))
    vc = jnp.ones(shape[:4] + (value_dim,))
    state = jnp.ones(shape[:3] + (key_dim, value_dim))
    args = {"qc": qc, "kc": qc, "vc": vc, "doc": vc, "b": -jnp.ones(shape[:4]),
            "states": state, "d_kv": state} | change
    with pytest.raises(ValueError, match=match):
        chunk_grads(**args, interpret=True)


def test_chunkwise_retention_pallas_rejects_bad_chunk_size():
    q, k, v, log_decay, _ = random_inputs(6, time=20)
    for chunk_size in (8, 24, 0, 16.0):
        with pytest.raises(ValueError, match="chunk_size"):
            chunkwise_retention_pallas(q, k, v, log_decay, chunk_size=chunk_size, interpret=True)


@pytest.mark.parametrize("preset, forward, backward", [
    ("small", False, False),              # value head dim 108
    ("retnet_125m", True, False),         # Dk 256, Dv 432: output kernel, XLA backward
    ("retnet_1_3b", True, False),
    ("retnet_2_7b", False, False),        # Dv 428
    ("retnet_6_7b", True, False),
])
def test_which_presets_the_kernels_take(preset, forward, backward):
    import pathlib
    import runpy

    from retnet_jax import kernels
    from retnet_jax.model import ModelConfig
    path = pathlib.Path(__file__).parent.parent / "configs" / f"{preset}.py"
    config = ModelConfig.from_config(runpy.run_path(str(path))["get_config"]().model)
    key_dim = config.d_model // config.num_heads
    value_dim = config.resolved_value_dim // config.num_heads
    assert (kernels.unsupported_reason(key_dim, value_dim, config.chunk_size) is None) == forward
    assert (kernels.backward_unsupported_reason(key_dim, value_dim) is None) == backward

