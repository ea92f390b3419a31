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


def _per_token_log_decay(log_decay: Array, batch: int, time: int, heads: int) -> Array:
    """[H] or [B, T, H] -> float32 [B, T, H]."""
    return jnp.broadcast_to(log_decay.astype(jnp.float32), (batch, time, heads))


def zero_state(batch: int, heads: int, key_dim: int, value_dim: int) -> Array:
    """An empty recurrent state, float32 [batch, heads, key_dim, value_dim]."""
    return jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)


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
      state: float32 [B, H, Dk, Dv], the state after the previous token.
    Returns:
      (o [B, H, Dv] in v's dtype, new state float32 [B, H, Dk, Dv]).
    """
    _check_qkv(q, k, v, time_axis=False)
    _check_log_decay(log_decay, q.shape[0], None, q.shape[1])
    _check_state(state, q, v)
    return _step(q, k, v, log_decay, state.astype(jnp.float32))


def recurrent_retention(q: Array, k: Array, v: Array, log_decay: Array, *,
                        initial_state: Array | None = None) -> tuple[Array, Array]:
    """Retention as a recurrence over time (`lax.scan` of `retention_step`).

    Args:
      q, k: [B, T, H, Dk]; v: [B, T, H, Dv].
      log_decay: float [H] (fixed) or [B, T, H] (gated), entries <= 0.
      initial_state: optional float32 [B, H, Dk, Dv]; zeros when None.
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


def _split_chunks(x: Array, chunk_size: int) -> Array:
    """[B, N*C, ...] -> [B, N, C, ...]."""
    return x.reshape(x.shape[0], -1, chunk_size, *x.shape[2:])


def chunkwise_retention(q: Array, k: Array, v: Array, log_decay: Array, *,
                        chunk_size: int = 64,
                        initial_state: Array | None = None) -> tuple[Array, Array]:
    """Retention in chunks: parallel inside each chunk, recurrent across chunks.

    With b_i the within-chunk cumulative log decay (b_{C-1} = g, the chunk's total):
      intra:  o_i += sum_{j <= i} exp(b_i - b_j) (q_i . k_j) v_j      (all chunks at once)
      inter:  o_i += exp(b_i) q_i S_prev
      state:  S    = exp(g) S_prev + sum_j exp(g - b_j) k_j^T v_j     (scan over chunks)
    Every exponent is <= 0. T need not be a multiple of chunk_size: the tail is padded with
    zero keys/values and zero log decay, which leaves outputs and the final state unchanged.

    Args:
      q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; any float dtype (matmuls accumulate in float32).
      log_decay: float [H] (fixed) or [B, T, H] (gated), entries <= 0.
      chunk_size: tokens per chunk, > 0.
      initial_state: optional float32 [B, H, Dk, Dv]; zeros when None.
    Returns:
      (o [B, T, H, Dv] in v's dtype, final state float32 [B, H, Dk, Dv]).
    """
    _check_qkv(q, k, v, time_axis=True)
    batch, time, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    _check_log_decay(log_decay, batch, time, heads)
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if initial_state is None:
        initial_state = zero_state(batch, heads, key_dim, value_dim)
    _check_state(initial_state, q, v)

    chunk_size = int(min(chunk_size, time))
    padding = -time % chunk_size
    a = _per_token_log_decay(log_decay, batch, time, heads)
    qc, kc, vc, ac = (_split_chunks(_pad_time(x, padding), chunk_size) for x in (q, k, v, a))
    # qc, kc [B, N, C, H, Dk]; vc [B, N, C, H, Dv]; ac float32 [B, N, C, H]

    b = jnp.cumsum(ac, axis=2)                                    # [B, N, C, H], <= 0
    g = b[:, :, -1]                                               # [B, N, H]
    causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))
    b_h = jnp.moveaxis(b, 3, 2)                                   # [B, N, H, C]
    gap = jnp.where(causal, b_h[..., :, None] - b_h[..., None, :], -jnp.inf)
    decay_mask = jnp.exp(gap)                                     # [B, N, H, C, C]

    scores = jnp.einsum("bnihd,bnjhd->bnhij", qc, kc, preferred_element_type=jnp.float32)
    weights = (scores * decay_mask).astype(vc.dtype)
    o_intra = jnp.einsum("bnhij,bnjhe->bnihe", weights, vc, preferred_element_type=jnp.float32)

    # Each chunk's own contribution to the state at its end: sum_j exp(g - b_j) k_j^T v_j.
    k_to_end = (kc * jnp.exp(g[:, :, None] - b)[..., None]).astype(kc.dtype)
    chunk_kv = jnp.einsum("bnjhd,bnjhe->nbhde", k_to_end, vc, preferred_element_type=jnp.float32)

    def carry_state(state, x):
        chunk_decay, kv = x                                       # [B, H], [B, H, Dk, Dv]
        return jnp.exp(chunk_decay)[..., None, None] * state + kv, state

    final_state, states_before = jax.lax.scan(
        carry_state, initial_state.astype(jnp.float32), (jnp.moveaxis(g, 1, 0), chunk_kv))
    # states_before [N, B, H, Dk, Dv]: the state entering each chunk.

    q_decayed = (qc * jnp.exp(b)[..., None]).astype(qc.dtype)
    o_inter = jnp.einsum("bnihd,nbhde->bnihe", q_decayed, states_before.astype(qc.dtype),
                         preferred_element_type=jnp.float32)
    o = (o_intra + o_inter).reshape(batch, -1, heads, value_dim)[:, :time]
    return o.astype(v.dtype), final_state
