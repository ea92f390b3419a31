"""The three forms of retention (and the single step) are one function.

Every form is checked against an independent float64 reference built from the definition,
on random inputs, for fixed and gated decay, odd lengths and several chunk sizes.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax import positions, retention

FORMS = ("parallel", "recurrent", "chunkwise")


def reference_retention(q, k, v, log_decay, initial_state=None):
    """float64 retention from the definition: o_n = q_n S_n, S_n = exp(a_n) S_{n-1} + k_n^T v_n.

    Written as the closed form o_n = sum_{m<=n} exp(A_n - A_m) (q_n.k_m) v_m
    + exp(A_n) q_n S_0 with A the running sum of log decays; returns (o, S_T) as float64
    arrays (differentiable when called inside `jax.enable_x64(True)`).
    """
    if not jax.config.jax_enable_x64:
        with jax.enable_x64(True):
            o, state = reference_retention(q, k, v, log_decay, initial_state)
            return np.asarray(o), np.asarray(state)
    q, k, v = (jnp.asarray(x, jnp.float64) for x in (q, k, v))
    batch, time, heads, _ = q.shape
    a = jnp.broadcast_to(jnp.asarray(log_decay, jnp.float64), (batch, time, heads))
    cum = jnp.cumsum(a, axis=1)                                         # [B, T, H]
    gap = cum[:, :, None, :] - cum[:, None, :, :]                      # [B, n, m, H]
    causal = jnp.tril(jnp.ones((time, time), bool))[None, :, :, None]
    decay = jnp.where(causal, jnp.exp(jnp.where(causal, gap, 0.0)), 0.0)
    scores = jnp.einsum("bnhd,bmhd->bnmh", q, k) * decay
    o = jnp.einsum("bnmh,bmhe->bnhe", scores, v)
    to_end = jnp.exp(cum[:, -1:, :] - cum)                              # [B, T, H]
    state = jnp.einsum("bth,bthd,bthe->bhde", to_end, k, v)
    if initial_state is not None:
        s0 = jnp.asarray(initial_state, jnp.float64)
        o = o + jnp.einsum("bnhd,bnh,bhde->bnhe", q, jnp.exp(cum), s0)
        state = state + jnp.exp(cum[:, -1])[..., None, None] * s0
    return o, state


def run_form(form, q, k, v, log_decay, chunk_size=16, initial_state=None):
    """(o, final_state or None) of one form."""
    if form == "parallel":
        return retention.parallel_retention(q, k, v, log_decay), None
    if form == "recurrent":
        return retention.recurrent_retention(q, k, v, log_decay, initial_state=initial_state)
    return retention.chunkwise_retention(q, k, v, log_decay, chunk_size=chunk_size,
                                         initial_state=initial_state)


def random_inputs(seed, batch=2, time=37, heads=3, key_dim=8, value_dim=12, gated=True,
                  low=-3.0, high=0.0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (batch, time, heads, key_dim)) * key_dim ** -0.5
    k = jax.random.normal(ks[1], (batch, time, heads, key_dim))
    v = jax.random.normal(ks[2], (batch, time, heads, value_dim))
    if gated:
        log_decay = jax.random.uniform(ks[3], (batch, time, heads), minval=low, maxval=high)
    else:
        log_decay = positions.decay_log_gammas(heads)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), log_decay


def rel_err(x, ref):
    """max |x - ref| / max |ref|, in float64."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.abs(x - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("time,chunk_size", [(1, 16), (37, 16), (37, 64), (64, 16), (64, 32),
                                             (97, 7)])
def test_forms_match_float64_reference(form, gated, time, chunk_size):
    q, k, v, log_decay = random_inputs(time, time=time, gated=gated)
    o, state = run_form(form, q, k, v, log_decay, chunk_size=chunk_size)
    o_ref, state_ref = reference_retention(q, k, v, log_decay)
    chex.assert_shape(o, v.shape)
    assert o.dtype == jnp.float32
    assert rel_err(o, o_ref) <= 1e-5
    if state is not None:
        chex.assert_shape(state, (2, 3, 8, 12))
        assert state.dtype == jnp.float32
        assert rel_err(state, state_ref) <= 1e-5


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("gated", [False, True])
def test_bf16_inputs_match_reference(form, gated):
    q, k, v, log_decay = random_inputs(5, time=67, gated=gated, dtype=jnp.bfloat16)
    o, state = run_form(form, q, k, v, log_decay, chunk_size=16)
    o_ref, state_ref = reference_retention(q, k, v, log_decay)
    assert o.dtype == jnp.bfloat16
    assert rel_err(o, o_ref) <= 2e-2
    if state is not None:
        assert state.dtype == jnp.float32
        assert rel_err(state, state_ref) <= 2e-2


@pytest.mark.parametrize("form", ("recurrent", "chunkwise"))
@pytest.mark.parametrize("gated", [False, True])
def test_initial_state_is_carried(form, gated):
    q, k, v, log_decay = random_inputs(11, time=29, gated=gated)
    s0 = jax.random.normal(jax.random.PRNGKey(3), (2, 3, 8, 12))
    o, state = run_form(form, q, k, v, log_decay, chunk_size=8, initial_state=s0)
    o_ref, state_ref = reference_retention(q, k, v, log_decay, initial_state=s0)
    assert rel_err(o, o_ref) <= 1e-5
    assert rel_err(state, state_ref) <= 1e-5


@pytest.mark.parametrize("gated", [False, True])
def test_steps_equal_recurrent_form(gated):
    q, k, v, log_decay = random_inputs(2, time=9, gated=gated)
    state = retention.zero_state(2, 3, 8, 12)
    outputs = []
    for t in range(q.shape[1]):
        a_t = log_decay[:, t] if gated else log_decay
        o_t, state = retention.retention_step(q[:, t], k[:, t], v[:, t], a_t, state)
        outputs.append(o_t)
    o_ref, state_ref = reference_retention(q, k, v, log_decay)
    assert rel_err(jnp.stack(outputs, 1), o_ref) <= 1e-5
    assert rel_err(state, state_ref) <= 1e-5


@pytest.mark.parametrize("gated", [False, True])
def test_a_bfloat16_state_is_updated_in_float32_and_rounded_once(gated):
    """retention_step keeps a bfloat16 state bfloat16: the update and the read-out use the
    float32 sum (o to float32 accuracy), only the stored state is rounded."""
    q, k, v, log_decay = random_inputs(4, time=1, gated=gated)
    state = jax.random.normal(jax.random.PRNGKey(5), (2, 3, 8, 12)).astype(jnp.bfloat16)
    o, new_state = retention.retention_step(q[:, 0], k[:, 0], v[:, 0],
                                            log_decay[:, 0] if gated else log_decay, state)
    assert new_state.dtype == jnp.bfloat16 and o.dtype == jnp.float32
    q64, k64, v64, s64 = (np.asarray(x, np.float64) for x in (q[:, 0], k[:, 0], v[:, 0], state))
    decay = np.exp(np.broadcast_to(np.asarray(log_decay[:, 0] if gated else log_decay,
                                              np.float64), (2, 3)))[..., None, None]
    ref_state = decay * s64 + k64[..., :, None] * v64[..., None, :]
    assert rel_err(o, np.einsum("bhd,bhde->bhe", q64, ref_state)) <= 1e-5
    assert 0 < rel_err(new_state, ref_state) <= 2.0**-8      # one bfloat16 rounding


@pytest.mark.parametrize("gated", [False, True])
def test_gradients_agree_across_forms_and_reference(gated):
    q, k, v, log_decay = random_inputs(7, time=41, gated=gated)
    cotangent = jax.random.normal(jax.random.PRNGKey(9), v.shape)

    def loss(fn, q, k, v, log_decay):
        return jnp.sum(fn(q, k, v, log_decay) * cotangent)

    argnums = (0, 1, 2, 3) if gated else (0, 1, 2)
    with jax.enable_x64(True):
        ref = jax.grad(functools.partial(loss, lambda *a: reference_retention(*a)[0]),
                       argnums)(*(jnp.asarray(x, jnp.float64) for x in (q, k, v, log_decay)))
    for form in FORMS:
        fn = lambda *a, form=form: run_form(form, *a, chunk_size=16)[0]
        grads = jax.jit(jax.grad(functools.partial(loss, fn), argnums))(q, k, v, log_decay)
        for name, g, g_ref in zip("q k v log_decay".split(), grads, ref):
            assert np.isfinite(np.asarray(g)).all(), (form, name)
            assert rel_err(g, g_ref) <= 1e-5, (form, name, rel_err(g, g_ref))


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("split", [1, 16, 23])
def test_chunkwise_split_with_carried_state_equals_one_pass(gated, split):
    q, k, v, log_decay = random_inputs(13, time=50, gated=gated)
    whole, state_whole = retention.chunkwise_retention(q, k, v, log_decay, chunk_size=16)

    def part(sl, state):
        a = log_decay[:, sl] if gated else log_decay
        return retention.chunkwise_retention(q[:, sl], k[:, sl], v[:, sl], a, chunk_size=16,
                                             initial_state=state)

    first, state = part(slice(0, split), None)
    second, state = part(slice(split, None), state)
    assert rel_err(jnp.concatenate([first, second], 1), whole) <= 1e-5
    assert rel_err(state, state_whole) <= 1e-5


def test_forms_work_under_jit():
    q, k, v, log_decay = random_inputs(4, time=20)
    for form in FORMS:
        eager = run_form(form, q, k, v, log_decay, chunk_size=8)[0]
        jitted = jax.jit(lambda *a, form=form: run_form(form, *a, chunk_size=8)[0])(
            q, k, v, log_decay)
        assert rel_err(jitted, eager) <= 1e-6


@pytest.mark.parametrize("log_decay_value", [-1e-7, 0.0, -30.0])
def test_gated_long_sequence_stays_finite(log_decay_value):
    time = 65_536
    q, k, v, _ = random_inputs(1, batch=1, time=time, heads=2, key_dim=4, value_dim=4)
    noise = jax.random.uniform(jax.random.PRNGKey(0), (1, time, 2), maxval=1e-3)
    log_decay = jnp.minimum(log_decay_value + noise * (log_decay_value < -1), 0.0)
    o, state = retention.chunkwise_retention(q, k, v, log_decay, chunk_size=64)
    assert np.isfinite(np.asarray(o)).all() and np.isfinite(np.asarray(state)).all()
    o_r, state_r = jax.jit(retention.recurrent_retention)(q, k, v, log_decay)
    assert np.isfinite(np.asarray(o_r)).all()
    # The two forms still agree at this length (the state sums 65k terms when decay is ~1).
    assert rel_err(o, o_r) <= 1e-3 and rel_err(state, state_r) <= 1e-3


@pytest.mark.slow
def test_fixed_decay_one_million_tokens_stays_finite():
    time = 1_000_000
    q, k, v, log_decay = random_inputs(2, batch=1, time=time, heads=2, key_dim=4, value_dim=4,
                                       gated=False)
    o, state = jax.jit(functools.partial(retention.chunkwise_retention, chunk_size=64))(
        q, k, v, log_decay)
    o_r, state_r = jax.jit(retention.recurrent_retention)(q, k, v, log_decay)
    for x in (o, state, o_r, state_r):
        assert np.isfinite(np.asarray(x)).all()
    assert rel_err(o[:, -1000:], o_r[:, -1000:]) <= 1e-3


# ------------------------------------------------------------------------------ bad input


def _good():
    return random_inputs(0, time=8)


@pytest.mark.parametrize("form", FORMS)
def test_wrong_rank_names_argument(form):
    q, k, v, log_decay = _good()
    with pytest.raises(ValueError, match="q must have rank 4"):
        run_form(form, q[0], k, v, log_decay)
    with pytest.raises(ValueError, match="v must have rank 4"):
        run_form(form, q, k, v[..., 0], log_decay)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_mismatched_batch_time_heads(form, axis):
    q, k, v, log_decay = _good()
    with pytest.raises(ValueError, match="q and k must have the same shape"):
        run_form(form, q, jnp.concatenate([k, k], axis), v, log_decay)
    with pytest.raises(ValueError, match="v must match q"):
        run_form(form, q, k, jnp.concatenate([v, v], axis), log_decay)


@pytest.mark.parametrize("form", FORMS)
def test_mismatched_key_dim(form):
    q, k, v, log_decay = _good()
    with pytest.raises(ValueError, match="q and k must have the same shape"):
        run_form(form, q, k[..., :4], v, log_decay)


@pytest.mark.parametrize("form", FORMS)
def test_bad_log_decay(form):
    q, k, v, log_decay = _good()
    with pytest.raises(ValueError, match="log_decay must have shape"):
        run_form(form, q, k, v, log_decay[:, :, :2])
    with pytest.raises(ValueError, match="log_decay must have shape"):
        run_form(form, q, k, v, jnp.zeros((4,)))
    with pytest.raises(ValueError, match="log_decay must be <= 0"):
        run_form(form, q, k, v, log_decay.at[0, 3, 1].set(0.1))
    with pytest.raises(ValueError, match="log_decay must be <= 0"):
        run_form(form, q, k, v, log_decay.at[0, 3, 1].set(jnp.nan))


@pytest.mark.parametrize("chunk_size", [0, -4, 2.5])
def test_bad_chunk_size(chunk_size):
    q, k, v, log_decay = _good()
    with pytest.raises(ValueError, match="chunk_size"):
        retention.chunkwise_retention(q, k, v, log_decay, chunk_size=chunk_size)


def test_bad_state_and_step_inputs():
    q, k, v, log_decay = _good()
    with pytest.raises(ValueError, match="initial_state"):
        retention.chunkwise_retention(q, k, v, log_decay, initial_state=jnp.zeros((2, 3, 8, 8)))
    state = retention.zero_state(2, 3, 8, 12)
    with pytest.raises(ValueError, match="q must have rank 3"):
        retention.retention_step(q, k[:, 0], v[:, 0], log_decay[:, 0], state)
    with pytest.raises(ValueError, match="log_decay must have shape"):
        retention.retention_step(q[:, 0], k[:, 0], v[:, 0], log_decay, state)
    with pytest.raises(ValueError, match="must be floating point"):
        retention.parallel_retention(q.astype(jnp.int32), k, v, log_decay)


# ------------------------------------------------------- chunkwise internals (blocks, backward)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("block", [1, 3, 256])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunkwise_gradients_with_state_blocks_and_final_state(monkeypatch, gated, block,
                                                               with_state):
    """Hand-written backward vs float64 autodiff: every input incl. the initial state, with a
    cotangent on the final state too, with several blocks of chunks (short block scan)."""
    monkeypatch.setattr(retention, "_MAX_CHUNKS_PER_BLOCK", block)
    q, k, v, log_decay = random_inputs(21, time=45, gated=gated)
    s0 = jax.random.normal(jax.random.PRNGKey(5), (2, 3, 8, 12)) if with_state else None
    ct_o = jax.random.normal(jax.random.PRNGKey(6), v.shape)
    ct_s = jax.random.normal(jax.random.PRNGKey(7), (2, 3, 8, 12))

    def loss(fn, q, k, v, log_decay, s0):
        o, s = fn(q, k, v, log_decay, s0)
        return jnp.sum(o * ct_o) + jnp.sum(s * ct_s)

    chunkwise = lambda q, k, v, a, s: retention.chunkwise_retention(
        q, k, v, a, chunk_size=4, initial_state=s)
    argnums = (0, 1, 2, 3, 4) if with_state else (0, 1, 2, 3)
    with jax.enable_x64(True):
        ref = jax.grad(functools.partial(loss, reference_retention), argnums)(
            *(None if x is None else jnp.asarray(x, jnp.float64)
              for x in (q, k, v, log_decay, s0)))
        ref = [np.asarray(r) for r in ref]
    grads = jax.jit(jax.grad(functools.partial(loss, chunkwise), argnums))(
        q, k, v, log_decay, s0)
    for name, g, g_ref in zip("q k v log_decay state".split(), grads, ref):
        assert rel_err(g, g_ref) <= 2e-5, (name, rel_err(g, g_ref))
    o, s = chunkwise(q, k, v, log_decay, s0)
    o_ref, s_ref = reference_retention(q, k, v, log_decay, s0)
    assert rel_err(o, o_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5


@pytest.mark.parametrize("gated", [False, True])
def test_chunkwise_bf16_many_chunks_matches_reference(gated):
    q, k, v, log_decay = random_inputs(8, time=300, gated=gated, dtype=jnp.bfloat16)
    o, s = retention.chunkwise_retention(q, k, v, log_decay, chunk_size=32)
    o_ref, s_ref = reference_retention(q, k, v, log_decay)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert rel_err(o, o_ref) <= 2e-2 and rel_err(s, s_ref) <= 2e-2
