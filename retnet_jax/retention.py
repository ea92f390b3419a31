"""Retention: one linear recurrence, computed three ways.

For every batch element b and head h, with a state S in R^{Dk x Dv}:

    S_t = exp(log_decay_t) * S_{t-1} + k_t^T v_t        o_t = q_t S_t

* `parallel_retention`   the masked-matrix form, O(T^2): o = ((q k^T) * D) v with
                         D[n, m] = exp(sum_{m < j <= n} log_decay_j) for m <= n, else 0.
* `recurrent_retention`  a `lax.scan` over time of `retention_step`, O(T) with O(1) state.
* `chunkwise_retention`  chunks of C tokens: dense matmuls inside each chunk for all chunks
                         at once, a `lax.scan` over chunks carrying only the [Dk, Dv] state.

`log_decay` is `[H]` (fixed per-head decay: RetNet) or `[B, T, H]` (data-dependent decay:
gated retention). No scaling or normalisation happens here; callers do that.

Numerics: decays stay in log space and are summed only inside one chunk (or as segment sums
in the parallel form), every exponent is <= 0, and states and accumulation are float32 for
any input dtype, so all forms stay finite for millions of tokens and for log decays anywhere
in [-30, 0].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = [
    "parallel_retention",
    "recurrent_retention",
    "chunkwise_retention",
    "retention_step",
    "zero_state",
]


# --------------------------------------------------------------------------- validation


def _check_qkv(q, k, v, *, time_axis: bool) -> None:
    """Raises ValueError unless q, k [B, (T,) H, Dk] and v [B, (T,) H, Dv] agree."""
    rank = 4 if time_axis else 3
    layout = "[batch, time, heads, dim]" if time_axis else "[batch, heads, dim]"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != rank:
            raise ValueError(f"{name} must have rank {rank} {layout}, got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
    if time_axis and q.shape[1] == 0:
        raise ValueError(f"q, k, v must hold at least one time step, got shape {q.shape}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got q {q.shape} and k {k.shape}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"v must match q in all but the last (value-dim) axis {layout}, "
            f"got q {q.shape} and v {v.shape}")


def _check_log_decay(log_decay, batch: int, time: int | None, heads: int) -> None:
    """Raises ValueError unless log_decay is [H] or [B, (T,) H] and (when concrete) <= 0."""
    per_token = (batch, heads) if time is None else (batch, time, heads)
    if log_decay.shape not in ((heads,), per_token):
        raise ValueError(
            f"log_decay must have shape ({heads},) (fixed, per head) or {per_token} "
            f"(gated, per token and head), got {log_decay.shape}")
    if not jnp.issubdtype(log_decay.dtype, jnp.floating):
        raise ValueError(f"log_decay must be floating point, got dtype {log_decay.dtype}")
    if isinstance(log_decay, jax.core.Tracer):
        return  # values are unknown under tracing; models produce log decays <= 0 by design
    values = np.asarray(log_decay)
    if np.isnan(values).any() or (values > 0).any():
        raise ValueError(
            "log_decay must be <= 0 everywhere (a decay factor exp(log_decay) in (0, 1]); "
            f"got max {np.nanmax(values) if not np.isnan(values).all() else 'nan'}"
            + (" and NaN entries" if np.isnan(values).any() else ""))


def _check_state(state, q, v) -> None:
    """Raises ValueError unless state is [B, H, Dk, Dv] for q [B, ..., H, Dk], v [..., Dv]."""
    expected = (q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1])
    if state.shape != expected:
        raise ValueError(f"initial_state/state must have shape {expected} [batch, heads, "
                         f"key_dim, value_dim], got {state.shape}")
    if not jnp.issubdtype(state.dtype, jnp.floating):
        raise ValueError(f"initial_state/state must be floating point, got dtype {state.dtype}")


def _check_step_inputs(q, k, v, log_decay, state) -> None:
    """Raises ValueError unless `retention_step`'s q, k [B, H, Dk], v [B, H, Dv], log_decay
    [H] or [B, H] and state [B, H, Dk, Dv] agree."""
    _check_qkv(q, k, v, time_axis=False)
    _check_log_decay(log_decay, q.shape[0], None, q.shape[1])
    _check_state(state, q, v)


def _per_token_log_decay(log_decay: Array, batch: int, time: int, heads: int) -> Array:
    """[H] or [B, T, H] -> float32 [B, T, H]."""
    return jnp.broadcast_to(log_decay.astype(jnp.float32), (batch, time, heads))


def zero_state(batch: int, heads: int, key_dim: int, value_dim: int,
               dtype=jnp.float32) -> Array:
    """An empty recurrent state, [batch, heads, key_dim, value_dim] in dtype (float32 unless
    a decoding cache keeps its state narrower, `ModelConfig.state_dtype`)."""
    return jnp.zeros((batch, heads, key_dim, value_dim), dtype)


# --------------------------------------------------------------------------- parallel form


def _segment_sums(log_decay: Array) -> Array:
    """Masked segment sums of log decays.

    Args:
      log_decay: float32 [B, T, H].
    Returns:
      float32 [B, H, T, T] with entry [n, m] = sum_{m < j <= n} log_decay_j for m <= n and
      -inf above the diagonal. Computed as a cumulative sum of masked copies, so each entry
      is summed directly (no difference of two large prefix sums, which loses precision).
    """
    time = log_decay.shape[1]
    a = jnp.moveaxis(log_decay, 1, -1)                                   # [B, H, T]
    strictly_lower = jnp.tril(jnp.ones((time, time), bool), k=-1)
    # x[..., n, m] = a_n if n > m else 0; cumsum over n gives sum_{m < j <= n} a_j.
    x = jnp.where(strictly_lower, a[..., :, None], 0.0)
    sums = jnp.cumsum(x, axis=-2)
    return jnp.where(jnp.tril(jnp.ones((time, time), bool)), sums, -jnp.inf)


def parallel_retention(q: Array, k: Array, v: Array, log_decay: Array) -> Array:
    """Retention in its parallel (masked attention-like) form; O(T^2) time and memory.

    Args:
      q, k: [B, T, H, Dk], any float dtype.
      v: [B, T, H, Dv].
      log_decay: float [H] (fixed decay) or [B, T, H] (gated decay), entries <= 0.
    Returns:
      o: [B, T, H, Dv] in v's dtype, o_n = sum_{m <= n} exp(sum_{m<j<=n} log_decay_j)
      (q_n . k_m) v_m, accumulated in float32.
    """
    _check_qkv(q, k, v, time_axis=True)
    batch, time, heads, _ = q.shape
    _check_log_decay(log_decay, batch, time, heads)
    decay = jnp.exp(_segment_sums(_per_token_log_decay(log_decay, batch, time, heads)))
    scores = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32)
    weights = (scores * decay).astype(v.dtype)
    o = jnp.einsum("bhnm,bmhe->bnhe", weights, v, preferred_element_type=jnp.float32)
    return o.astype(v.dtype)


# --------------------------------------------------------------------------- recurrent form


def _step(q: Array, k: Array, v: Array, log_decay: Array, state: Array) -> tuple[Array, Array]:
    """One token; no validation. q, k [B, H, Dk]; v [B, H, Dv]; log_decay [H] or [B, H]."""
    decay = jnp.exp(log_decay.astype(jnp.float32))
    decay = jnp.broadcast_to(decay, state.shape[:2])[..., None, None]  # [B, H, 1, 1]
    outer = jnp.einsum("bhd,bhe->bhde", k, v, preferred_element_type=jnp.float32)
    state = decay * state + outer
    o = jnp.einsum("bhd,bhde->bhe", q.astype(jnp.float32), state)
    return o.astype(v.dtype), state


def retention_step(q: Array, k: Array, v: Array, log_decay: Array,
                   state: Array) -> tuple[Array, Array]:
    """Retention for one token: the O(1)-state decoding update.

    Args:
      q, k: [B, H, Dk].
      v: [B, H, Dv].
      log_decay: float [H] (fixed) or [B, H] (gated), entries <= 0.
      state: [B, H, Dk, Dv], the state after the previous token: float32, or bfloat16 for a
        cache kept at half the memory (`ModelConfig.state_dtype`).
    Returns:
      (o [B, H, Dv] in v's dtype, new state [B, H, Dk, Dv] in state's dtype). The update and
      the read-out are computed in float32; a bfloat16 state is rounded once, when stored.
    """
    _check_step_inputs(q, k, v, log_decay, state)
    o, new_state = _step(q, k, v, log_decay, state.astype(jnp.float32))
    return o, new_state.astype(state.dtype)


def recurrent_retention(q: Array, k: Array, v: Array, log_decay: Array, *,
                        initial_state: Array | None = None) -> tuple[Array, Array]:
    """Retention as a recurrence over time (`lax.scan` of `retention_step`).

    Args:
      q, k: [B, T, H, Dk]; v: [B, T, H, Dv].
      log_decay: float [H] (fixed) or [B, T, H] (gated), entries <= 0.
      initial_state: optional [B, H, Dk, Dv], any float dtype (used as float32); zeros
        when None.
    Returns:
      (o [B, T, H, Dv] in v's dtype, final state float32 [B, H, Dk, Dv]).
    """
    _check_qkv(q, k, v, time_axis=True)
    batch, time, heads, key_dim = q.shape
    _check_log_decay(log_decay, batch, time, heads)
    if initial_state is None:
        initial_state = zero_state(batch, heads, key_dim, v.shape[-1])
    _check_state(initial_state, q, v)

    per_token = log_decay.ndim == 3
    xs = (jnp.moveaxis(q, 1, 0), jnp.moveaxis(k, 1, 0), jnp.moveaxis(v, 1, 0),
          jnp.moveaxis(log_decay, 1, 0) if per_token else None)

    def body(state, x):
        q_t, k_t, v_t, a_t = x
        o_t, state = _step(q_t, k_t, v_t, a_t if per_token else log_decay, state)
        return state, o_t

    state, o = jax.lax.scan(body, initial_state.astype(jnp.float32), xs)
    return jnp.moveaxis(o, 0, 1), state


# --------------------------------------------------------------------------- chunkwise form


def _pad_time(x: Array, padding: int) -> Array:
    """Zero-pads axis 1 (time) at the end."""
    if padding == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, padding)
    return jnp.pad(x, widths)


def chunkwise_retention(q: Array, k: Array, v: Array, log_decay: Array, *,
                        chunk_size: int = 64,
                        initial_state: Array | None = None) -> tuple[Array, Array]:
    """Retention in chunks: parallel inside each chunk, recurrent across chunks.

    With b_i the within-chunk cumulative log decay (b_{C-1} = g, the chunk's total):
      intra:  o_i += sum_{j <= i} exp(b_i - b_j) (q_i . k_j) v_j      (all chunks at once)
      inter:  o_i += exp(b_i) q_i S_prev
      state:  S    = exp(g) S_prev + sum_j exp(g - b_j) k_j^T v_j
    The states entering the chunks are not found by a step-per-chunk scan but by one batched
    matmul per block of up to `_MAX_CHUNKS_PER_BLOCK` chunks with a [chunks, chunks] matrix of
    decays (lower-triangular, each entry a direct sum of chunk log decays), and a short scan
    over blocks. Every exponent is <= 0. T need not be a multiple of chunk_size: the tail is
    padded with zero keys/values and zero log decay, which leaves outputs and the final state
    unchanged. Gradients come from a hand-written backward pass (`jax.custom_vjp`) that mirrors
    the forward; forward-mode differentiation (jvp) is not supported.

    Args:
      q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; any float dtype. Matmul operands (and the
        per-chunk states fed to matmuls) are kept in the inputs' dtype, accumulation is float32.
      log_decay: float [H] (fixed) or [B, T, H] (gated), entries <= 0.
      chunk_size: tokens per chunk, > 0.
      initial_state: optional [B, H, Dk, Dv], any float dtype (used as float32); zeros
        when None.
    Returns:
      (o [B, T, H, Dv] in v's dtype, final state float32 [B, H, Dk, Dv]).
    """
    _check_qkv(q, k, v, time_axis=True)
    batch, time, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    _check_log_decay(log_decay, batch, time, heads)
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    has_state = initial_state is not None
    if initial_state is None:
        initial_state = zero_state(batch, heads, key_dim, value_dim)
    _check_state(initial_state, q, v)
    return _chunkwise(q, k, v, log_decay, initial_state.astype(jnp.float32),
                      int(min(chunk_size, time)), has_state)


# Chunks per block of the state matmul. Its cost per state element is ~2 * block FLOPs
# against ~4 bytes moved, so up to a few hundred it stays memory-bound on a GPU; sequences of
# more than block * chunk_size tokens add a (short) scan over blocks.
_MAX_CHUNKS_PER_BLOCK = 256


def _to_chunks(x: Array, chunk_size: int) -> Array:
    """[B, T, H, D] -> [B, H, N, C, D], zero-padding T up to N * C."""
    x = _pad_time(x, -x.shape[1] % chunk_size)
    batch, padded, heads, dim = x.shape
    x = x.reshape(batch, padded // chunk_size, chunk_size, heads, dim)
    return jnp.transpose(x, (0, 3, 1, 2, 4))


def _from_chunks(x: Array, time: int) -> Array:
    """[B, H, N, C, D] -> [B, T, H, D] (drops the padding)."""
    batch, heads, chunks, chunk_size, dim = x.shape
    x = jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(batch, chunks * chunk_size, heads, dim)
    return x[:, :time]


def _chunk_cumulative_log_decay(log_decay: Array, time: int, heads: int,
                                chunk_size: int) -> Array:
    """[H] or [B, T, H] -> float32 [G, H, N, C]: within-chunk inclusive cumulative log decay.

    G is 1 for fixed decay (no per-batch copies) and B for gated decay; the padded tail has
    zero log decay.
    """
    a = log_decay.astype(jnp.float32)
    if a.ndim == 1:
        a = jnp.broadcast_to(a[None, :, None], (1, heads, time))
    else:
        a = jnp.transpose(a, (0, 2, 1))                                  # [B, H, T]
    a = jnp.pad(a, ((0, 0), (0, 0), (0, -time % chunk_size)))
    a = a.reshape(a.shape[0], heads, -1, chunk_size)
    return jnp.cumsum(a, axis=-1)


def _decay_mask(b: Array) -> Array:
    """[..., C] cumulative log decays -> float32 [..., C, C]: exp(b_i - b_j) for j <= i, else 0."""
    chunk_size = b.shape[-1]
    causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))
    return jnp.exp(jnp.where(causal, b[..., :, None] - b[..., None, :], -jnp.inf))


def _block_weights(g: Array) -> tuple[Array, Array, Array, Array]:
    """Decay weights of a linear recurrence x_{n+1} = exp(g_n) x_n + u_n inside blocks.

    Args:
      g: float32 [..., M] log decays of the M chunks of each block.
    Returns float32 (w [..., M, M], before [..., M], after [..., M], total [...]):
      w[n, m]   = exp(sum_{m < p < n} g_p) for m < n, else 0;
      before[n] = exp(sum_{p < n} g_p);  after[m] = exp(sum_{p > m} g_p);  total = exp(sum g).
    Every exponent is a direct sum of the g's it spans (masked cumulative sums), never a
    difference of two prefix sums.
    """
    m = g.shape[-1]
    rows = jnp.arange(m)[:, None]
    cols = jnp.arange(m)[None, :]
    g_prev = jnp.pad(g, [(0, 0)] * (g.ndim - 1) + [(1, 0)])[..., :m]   # g_{n-1}, 0 for n = 0
    steps = jnp.where(rows - 1 > cols, g_prev[..., :, None], 0.0)      # [..., M, M]
    w = jnp.where(rows > cols, jnp.exp(jnp.cumsum(steps, axis=-2)), 0.0)
    before = jnp.exp(jnp.cumsum(g_prev, axis=-1))
    g_next = jnp.pad(g, [(0, 0)] * (g.ndim - 1) + [(0, 1)])[..., 1:]   # g_{m+1}, 0 for m = M-1
    after = jnp.exp(jnp.flip(jnp.cumsum(jnp.flip(g_next, -1), axis=-1), -1))
    return w, before, after, jnp.exp(jnp.sum(g, axis=-1))


def _chunk_states(u: Array, g: Array, x0: Array | None, *,
                  reverse: bool) -> tuple[Array, Array]:
    """The chunk-level recurrence x_{n+1} = exp(g_n) x_n + u_n, all at once.

    Forward (reverse=False): returns the values entering each chunk,
      x_n = sum_{m < n} exp(sum_{m < p < n} g_p) u_m + exp(sum_{p < n} g_p) x0,
    and the value after the last chunk. reverse=True runs the same recurrence from the end
    (the transpose, used by the backward pass): x_m = sum_{n > m} exp(sum_{m < p < n} g_p) u_n
    + exp(sum_{p > m} g_p) x0, and the value "before" the first chunk.

    Args:
      u: [B, H, N, F] in the compute dtype (matmul operand).
      g: float32 [G, H, N] chunk log decays, G in {1, B}.
      x0: float32 [B, H, F] entering value (at the start, or at the end when reverse), or None
        for zeros.
    Returns:
      (x [B, H, N, F] in u's dtype, the value past the last processed chunk float32 [B, H, F]).
    """
    batch, heads, chunks, features = u.shape
    dtype = u.dtype
    block = min(chunks, _MAX_CHUNKS_PER_BLOCK)
    blocks = -(-chunks // block)
    padding = blocks * block - chunks
    if padding:  # zero inputs with zero log decay: the identity step
        u = jnp.pad(u, ((0, 0), (0, 0), (0, padding), (0, 0)))
        g = jnp.pad(g, ((0, 0), (0, 0), (0, padding)))
    u = u.reshape(batch, heads, blocks, block, features)
    w, before, after, total = _block_weights(g.reshape(g.shape[0], heads, blocks, block))
    if reverse:
        w, w_x0, w_out = jnp.swapaxes(w, -1, -2), after, before
    else:
        w_x0, w_out = before, after

    def full(t):  # [G, ...] -> [B, ...]
        return jnp.broadcast_to(t, (batch,) + t.shape[1:])

    # Each block's contribution past its last chunk, from a zero entering value.
    ends = jnp.einsum("bhxm,bhxmf->bhxf", full(w_out).astype(dtype), u,
                      preferred_element_type=jnp.float32)
    if x0 is None and blocks == 1:
        entering, last = None, ends[:, :, 0]
    else:
        if x0 is None:
            x0 = jnp.zeros((batch, heads, features), jnp.float32)
        decay = jnp.broadcast_to(total, (batch, heads, blocks))

        def step(x, inputs):
            end, d = inputs
            return d[..., None] * x + end, x

        last, entering = jax.lax.scan(
            step, x0, (jnp.moveaxis(ends, 2, 0), jnp.moveaxis(decay, 2, 0)), reverse=reverse)
        entering = jnp.moveaxis(entering, 0, 2)                         # [B, H, X, F]
    # Written in the compute dtype (f32 accumulation): these values only feed matmuls.
    x = jnp.einsum("bhxnm,bhxmf->bhxnf", full(w).astype(dtype), u, preferred_element_type=dtype)
    if entering is not None:
        x = (x.astype(jnp.float32)
             + full(w_x0)[..., None] * entering[:, :, :, None, :]).astype(dtype)
    x = x.reshape(batch, heads, blocks * block, features)[:, :, :chunks]
    return x, last


def _chunk_weights(qc: Array, kc: Array, b: Array) -> tuple[Array, Array]:
    """In qc's dtype: the intra-chunk weights exp(b_i - b_j) q_i.k_j (j <= i) [B, H, N, C, C]
    and the keys decayed to their chunk's end exp(g - b_j) k_j [B, H, N, C, Dk]."""
    scores = jnp.einsum("bhnid,bhnjd->bhnij", qc, kc, preferred_element_type=jnp.float32)
    weights = (scores * _decay_mask(b)).astype(qc.dtype)
    return weights, (kc * jnp.exp(b[..., -1:] - b)[..., None]).astype(qc.dtype)


def _chunkwise_forward(q, k, v, log_decay, initial_state, chunk_size, has_state):
    """The chunkwise forward pass (no validation); returns (o, final_state, residuals)."""
    batch, time, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    qc, kc, vc = (_to_chunks(x.astype(dtype), chunk_size) for x in (q, k, v))
    # qc, kc [B, H, N, C, Dk]; vc [B, H, N, C, Dv]
    b = _chunk_cumulative_log_decay(log_decay, time, heads, chunk_size)  # [G, H, N, C] <= 0
    g = b[..., -1]                                                       # [G, H, N]
    chunks = qc.shape[2]

    weights, k_to_end = _chunk_weights(qc, kc, b)
    # The two partial outputs are written in the compute dtype (f32 accumulation inside the
    # matmul; bf16 halves their traffic) and summed in float32.
    o = jnp.einsum("bhnij,bhnje->bhnie", weights, vc, preferred_element_type=dtype)

    # Each chunk's own contribution to the state at its end: sum_j exp(g - b_j) k_j^T v_j.
    chunk_kv = jnp.einsum("bhncd,bhnce->bhnde", k_to_end, vc, preferred_element_type=dtype)
    states, final_state = _chunk_states(
        chunk_kv.reshape(batch, heads, chunks, key_dim * value_dim), g,
        initial_state.reshape(batch, heads, -1) if has_state else None, reverse=False)
    states = states.reshape(batch, heads, chunks, key_dim, value_dim)  # entering each chunk

    o_inter = jnp.einsum("bhnid,bhnde->bhnie", qc, states, preferred_element_type=dtype)
    o = o.astype(jnp.float32) + jnp.exp(b)[..., None] * o_inter.astype(jnp.float32)
    final_state = final_state.reshape(batch, heads, key_dim, value_dim)
    o = _from_chunks(o, time).astype(v.dtype)
    return o, final_state, (qc, kc, vc, weights, k_to_end, states, b)


def _state_gradients(qc: Array, b: Array, do: Array, d_final: Array,
                     chunk_size: int) -> tuple[Array, Array, Array, Array]:
    """What each chunk's outputs ask of the state entering it, run back through the chunk
    recurrence: (do chunked [B, H, N, C, Dv], do * exp(b) (both in qc's dtype),
    dU [B, H, N, Dk, Dv] the gradient of each chunk's own state contribution, and the
    gradient of the initial state float32 [B, H, Dk * Dv])."""
    batch, heads, chunks, _, key_dim = qc.shape
    dtype = qc.dtype
    doc = _to_chunks(do.astype(dtype), chunk_size)                        # [B, H, N, C, Dv]
    value_dim = doc.shape[-1]
    do_decayed = (doc * jnp.exp(b)[..., None]).astype(dtype)
    d_states = jnp.einsum("bhnid,bhnie->bhnde", qc, do_decayed, preferred_element_type=dtype)
    d_kv, d_initial = _chunk_states(
        d_states.reshape(batch, heads, chunks, key_dim * value_dim), b[..., -1],
        d_final.astype(jnp.float32).reshape(batch, heads, -1), reverse=True)
    return doc, do_decayed, d_kv.reshape(batch, heads, chunks, key_dim, value_dim), d_initial


def _chunkwise_backward(chunk_size, has_state, residuals, cotangents):
    """The backward pass of `_chunkwise`: the forward's matmuls, transposed.

    With dS_n = sum_i exp(b_i) q_i^T do_i (what chunk n's outputs ask of its entering state),
    the state gradients dU_m = sum_{n > m} exp(sum_{m<p<n} g_p) dS_n + exp(sum_{p>m} g_p) dS_T
    are the chunk recurrence run backwards. The log-decay gradient uses the identity
    dL/dA_t = q_t . dq_t - k_t . dk_t (A the running sum of log decays), applied per chunk.
    """
    del has_state
    (qc, kc, vc, weights, k_to_end, states, b, shapes) = residuals
    q_aval, k_aval, v_aval, decay_aval, state_aval = shapes
    do, d_final = cotangents
    batch, heads = qc.shape[:2]
    time = q_aval.shape[1]
    dtype = qc.dtype
    g = b[..., -1]
    f32 = jnp.float32

    doc, do_decayed, d_kv, d_initial = _state_gradients(qc, b, do, d_final, chunk_size)

    # Partial gradients: float32 when the (gated) log-decay gradient needs them, else in the
    # compute dtype (half the traffic); summed in float32 either way.
    gated = len(decay_aval.shape) == 3
    part = f32 if gated else dtype
    d_weights = jnp.einsum("bhnie,bhnje->bhnij", doc, vc, preferred_element_type=f32)
    d_scores = (d_weights * _decay_mask(b)).astype(dtype)
    dq = (jnp.einsum("bhnij,bhnjd->bhnid", d_scores, kc, preferred_element_type=part)
          .astype(f32)
          + jnp.einsum("bhnie,bhnde->bhnid", do_decayed, states, preferred_element_type=part))
    dk_inter = (jnp.exp(g[..., None] - b)[..., None]
                * jnp.einsum("bhnje,bhnde->bhnjd", vc, d_kv, preferred_element_type=part))
    dk = (jnp.einsum("bhnij,bhnid->bhnjd", d_scores, qc, preferred_element_type=part)
          .astype(f32) + dk_inter)
    dv = (jnp.einsum("bhnij,bhnie->bhnje", weights, doc, preferred_element_type=part)
          .astype(f32)
          + jnp.einsum("bhnjd,bhnde->bhnje", k_to_end, d_kv, preferred_element_type=part))

    # Log-decay gradient (dead code, removed by XLA, when nobody asks for it). With b the
    # within-chunk cumulative log decay, dL/db_i = q_i.dq_i - k_i.dk_i, except that the last
    # position also carries the chunk total g: + sum_j k_j.dk_inter_j (keys' path to the chunk
    # end) + exp(g) <S_entering, dS_leaving> (the state passing through the chunk). Then
    # dL/da_t = sum_{i >= t in the chunk} dL/db_i: sums stay inside one chunk, which keeps the
    # cancellation error of q.dq - k.dk from piling up along the sequence.
    d_b = (jnp.sum(qc.astype(f32) * dq, axis=-1)
           - jnp.sum(kc.astype(f32) * dk, axis=-1))                         # [B, H, N, C]
    through = jnp.exp(g) * jnp.einsum("bhnde,bhnde->bhn", states.astype(f32),
                                      d_kv.astype(f32))
    to_end = jnp.sum(kc.astype(f32) * dk_inter, axis=(-2, -1))
    d_log_decay = (jnp.flip(jnp.cumsum(jnp.flip(d_b, -1), axis=-1), -1)
                   + (through + to_end)[..., None])
    d_log_decay = d_log_decay.reshape(batch, heads, -1)[:, :, :time]        # [B, H, T]
    if len(decay_aval.shape) == 1:
        d_log_decay = jnp.sum(d_log_decay, axis=(0, 2))
    else:
        d_log_decay = jnp.transpose(d_log_decay, (0, 2, 1))

    return (_from_chunks(dq, time).astype(q_aval.dtype),
            _from_chunks(dk, time).astype(k_aval.dtype),
            _from_chunks(dv, time).astype(v_aval.dtype),
            d_log_decay.astype(decay_aval.dtype),
            d_initial.reshape(state_aval.shape).astype(state_aval.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _chunkwise(q, k, v, log_decay, initial_state, chunk_size, has_state):
    o, final_state, _ = _chunkwise_forward(q, k, v, log_decay, initial_state, chunk_size,
                                           has_state)
    return o, final_state


def _chunkwise_fwd_rule(q, k, v, log_decay, initial_state, chunk_size, has_state):
    o, final_state, residuals = _chunkwise_forward(q, k, v, log_decay, initial_state,
                                                   chunk_size, has_state)
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype)
                   for x in (q, k, v, log_decay, initial_state))
    return (o, final_state), residuals + (shapes,)


_chunkwise.defvjp(_chunkwise_fwd_rule, _chunkwise_backward)
