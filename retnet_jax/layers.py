"""Flax NNX building blocks: RMSNorm, gated FFN, retention (fixed and gated decay), attention.

Every token mixer (`MultiScaleRetention`, `GatedRetention`, `Attention`) has one interface:

    y, cache = mixer(x, mode=..., cache=None, position=None, valid=None, input_norm=None)

* x: [batch, time, d_model] in the compute dtype.
* mode: 'parallel' | 'chunkwise' | 'recurrent'; selects the retention form (attention ignores it:
  all three forms of attention are the same computation).
* cache: None (start from nothing, return None) or the mixer's cache (`RetentionCache`,
  `AttentionCache`), which is read and returned updated.
* position: int32 [batch], absolute position of x[:, 0] per sequence; None means 0.
* valid: bool [batch, time]; False marks right-padding that must not touch the cache.
* input_norm: the block's pre-norm (`RMSNorm`) to apply to x first, or None. Every mixer
  (and `GatedFFN`) applies it inside its projections' kernel when a batch-1 decoding step
  runs them through the GEMV kernel (`kernels.projections`; `project`,
  `DECODE_PROJECTIONS`), so the norm costs no kernel of its own; otherwise as a separate
  step before XLA's dots. Where the Pallas step runs too, a retention block's step reads
  q, k and v from the GEMV's split partials (`RetentionBase._step_from_splits`).

Parameters carry logical axis names (`LOGICAL_AXIS_NAMES`, or None for small axes) as
`out_sharding` metadata (flax 0.12's name for the deprecated `sharding_names`) with
`eager_sharding=False`, so no mesh is needed to build a model and
`nnx.get_partition_spec(nnx.state(model))` gives PartitionSpecs of logical names, which a
training loop maps onto its device mesh.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from retnet_jax import positions, retention, sharding

Array = jax.Array

__all__ = [
    "LOGICAL_AXIS_NAMES", "FORWARD_MODES", "ACTIVATIONS",
    "xavier_uniform", "sharded", "linear", "attention_implementation",
    "RMSNorm", "rms_normalize", "GatedFFN",
    "RetentionCache", "AttentionCache", "sqrt_row_scale", "RETENTION_KERNELS", "run_retention",
    "retention_kernel_specs",
    "DECODE_PROJECTIONS", "PROJECTION_KERNEL_BATCHES", "project",
    "RetentionBase", "MultiScaleRetention", "GatedRetention", "Attention",
]

LOGICAL_AXIS_NAMES = ("vocab", "embed", "heads", "mlp")
FORWARD_MODES = ("parallel", "chunkwise", "recurrent")
# Retention implementations (the chunkwise form's and the decoding step's: retention_kernel,
# decode_kernel): XLA ops, the fused Pallas kernels (GPU; fall back to XLA where they cannot
# run), or those kernels in Pallas interpret mode (any backend; for tests).
RETENTION_KERNELS = ("xla", "pallas", "pallas_interpret")
# Decoding steps' projections (`project`): XLA's dots, the Pallas GEMV kernel (GPU; XLA
# elsewhere or where it does not apply), or that kernel interpreted (any backend; tests).
DECODE_PROJECTIONS = ("xla", "pallas", "pallas_interpret")
# The batch sizes whose decoding steps use the kernel: the 1.3B preset decodes 1.18x (H200)
# and 1.14x (H100) faster with it at batch 1, 2.6-2.7x slower at batch 8, with XLA's step
# and with the Pallas step alike (BENCHMARKS.md "Decoding", sessions 16 and 18).
PROJECTION_KERNEL_BATCHES = (1,)
ACTIVATIONS = {"swish": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
               "relu": jax.nn.relu}  # torchscale's names; gelu is exact (erf) as torch's F.gelu


# --------------------------------------------------------------------------- parameters


def xavier_uniform(gain: float = 1.0) -> jax.nn.initializers.Initializer:
    """torch.nn.init.xavier_uniform_(w, gain): U(+-gain * sqrt(6 / (fan_in + fan_out)))."""
    return jax.nn.initializers.variance_scaling(gain**2, "fan_avg", "uniform")


# torch.nn.Linear's default init (kaiming_uniform, a=sqrt(5)): U(+-1 / sqrt(fan_in)).
torch_linear_default = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def sharded(names: Sequence[str | None]) -> dict:
    """Parameter metadata carrying logical axis names, applied lazily (no mesh needed)."""
    return {"out_sharding": tuple(names), "eager_sharding": False}


def linear(in_features: int, out_features: int, names: tuple[str | None, str | None], *,
           init: jax.nn.initializers.Initializer, dtype, param_dtype,
           rngs: nnx.Rngs) -> nnx.Linear:
    """A bias-free Linear layer (every projection here is) with kernel [in, out] named `names`;
    computes in `dtype` from parameters stored in `param_dtype`."""
    return nnx.Linear(in_features, out_features, use_bias=False, kernel_init=init, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs, kernel_metadata=sharded(names))


@functools.lru_cache(maxsize=None)
def _warn_projections_fallback(reason: str) -> None:
    logging.getLogger(__name__).warning("decode_projections='pallas' falls back to XLA: %s",
                                        reason)


def _check_decode_projections(impl: str) -> str:
    """impl, or a ValueError unless it is one of DECODE_PROJECTIONS."""
    if impl not in DECODE_PROJECTIONS:
        raise ValueError(f"decode_projections must be one of {DECODE_PROJECTIONS}, got {impl!r}")
    return impl


def _check_kernel(name: str, kernel: str | None, *, optional: bool = False) -> str | None:
    """kernel, or a ValueError naming `name` unless it is one of RETENTION_KERNELS (or None,
    when optional)."""
    if kernel not in RETENTION_KERNELS and not (optional and kernel is None):
        allowed = f"None or one of {RETENTION_KERNELS}" if optional else (
            f"one of {RETENTION_KERNELS}")
        raise ValueError(f"{name} must be {allowed}, got {kernel!r}")
    return kernel


def _projections_kernel_args(impl: str, x: Array, linears: Sequence[nnx.Linear]) -> dict | None:
    """kwargs for the GEMV kernel (`kernels.projections.projection_splits`) when `project`
    (or `RetentionBase._step_from_splits`) should use it, else None (XLA):
    impl 'pallas' (on a GPU, no multi-device mesh in context) or 'pallas_interpret', one
    token (time 1) of a batch in PROJECTION_KERNEL_BATCHES, bias-free linears computing in
    x's dtype at default precision (what the kernel computes; anything else is XLA's)."""
    if _check_decode_projections(impl) == "xla":
        return None
    batch, time, _ = x.shape
    if (time != 1 or batch not in PROJECTION_KERNEL_BATCHES
            or any(lin.dtype != x.dtype or lin.use_bias or lin.precision is not None
                   for lin in linears)):
        return None                 # not a small decoding step: XLA's GEMMs are the tool
    if impl == "pallas_interpret":
        return {"interpret": True}
    if jax.default_backend() != "gpu":
        _warn_projections_fallback(f"backend {jax.default_backend()!r} is not a GPU")
        return None
    if sharding.mesh_in_context() is not None:
        _warn_projections_fallback("a multi-device mesh is in context (the kernel has no "
                                   "partitioning rule)")
        return None
    return {"interpret": False}


def project(x: Array, linears: Sequence[nnx.Linear], *, norm: RMSNorm | None = None,
            impl: str = "xla") -> list[Array]:
    """Each bias-free Linear of `linears` applied to norm(x) (x if norm is None).

    With impl 'pallas' or 'pallas_interpret' and a single-token x of a batch in
    PROJECTION_KERNEL_BATCHES (a decoding step), all of them are one call of the GEMV
    kernel (`kernels.projections.projection_splits`, its split partials added by XLA) that
    applies the norm too; otherwise XLA's dots after the norm (see `DECODE_PROJECTIONS`).

    Args:
      x: [batch, time, d_in] in the compute dtype.
      linears: Linears with kernels [d_in, d_out_i].
      norm: an `RMSNorm` of x, or None.
      impl: one of DECODE_PROJECTIONS.
    Returns:
      [batch, time, d_out_i] for each linear, in its dtype.
    """
    kernel_args = _projections_kernel_args(impl, x, linears)
    if kernel_args is None:
        if norm is not None:
            x = norm(x)
        return [lin(x) for lin in linears]
    return [sums.total()[:, None].astype(x.dtype)
            for sums in _project_splits(x, linears, norm, kernel_args)]


def _project_splits(x: Array, linears: Sequence[nnx.Linear], norm: RMSNorm | None,
                    kernel_args: dict) -> list:
    """`kernels.projections.projection_splits` of x [batch, 1, d_in] behind norm: each
    linear's `SplitSums` [batch, d_out_i]."""
    from retnet_jax.kernels import projections
    return projections.projection_splits(
        x[:, 0], [lin.kernel[...] for lin in linears],
        norm_scale=None if norm is None else norm.scale[...],
        norm_eps=0.0 if norm is None else norm.eps, **kernel_args)


# --------------------------------------------------------------------------- norms and FFN


def rms_normalize(x: Array, eps: float) -> Array:
    """x / sqrt(mean(x^2, last axis) + eps), computed in float32; returns float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """torchscale's RMSNorm: normalise in float32, cast back to x's dtype, times a learned scale."""

    def __init__(self, features: int, *, eps: float, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), **sharded((None,)))

    def __call__(self, x: Array) -> Array:
        """x: [..., features] -> same shape and dtype."""
        return rms_normalize(x, self.eps).astype(x.dtype) * self.scale[...].astype(x.dtype)


class GatedFFN(nnx.Module):
    """torchscale's GLU: fc2(act(fc1(x)) * gate(x)), bias-free, act computed in float32."""

    def __init__(self, d_model: int, hidden: int, *, activation: str, dtype, param_dtype,
                 rngs: nnx.Rngs, decode_projections: str = "xla"):
        kw = dict(init=torch_linear_default, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.activation = activation
        self.decode_projections = _check_decode_projections(decode_projections)
        self.fc1 = linear(d_model, hidden, ("embed", "mlp"), **kw)
        self.gate = linear(d_model, hidden, ("embed", "mlp"), **kw)
        self.fc2 = linear(hidden, d_model, ("mlp", "embed"), **kw)

    def __call__(self, x: Array, *, input_norm: RMSNorm | None = None,
                 decoding: bool = False) -> Array:
        """x: [batch, time, d_model] -> [batch, time, d_model]; input_norm (an `RMSNorm`)
        is applied to x first; decoding: a decoding step's call, whose projections may go
        through the `decode_projections` kernel (`project`)."""
        impl = self.decode_projections if decoding else "xla"
        h, gate = project(x, [self.fc1, self.gate], norm=input_norm, impl=impl)
        h = ACTIVATIONS[self.activation](h.astype(jnp.float32)).astype(h.dtype)
        return project(h * gate, [self.fc2], impl=impl)[0]


# --------------------------------------------------------------------------- caches


@flax.struct.dataclass
class RetentionCache:
    """Recurrent state of one retention layer: [batch, heads, key_dim, value_dim], float32
    unless the layer keeps it in bfloat16 (`state_dtype`). Its size does not depend on how
    many tokens it has absorbed."""
    state: Array


@flax.struct.dataclass
class AttentionCache:
    """Preallocated keys and values of one attention layer, [batch, max_len, heads, head_dim].
    Slot s holds absolute position s; which slots are filled is the model's per-sequence
    position (tokens consumed so far)."""
    key: Array
    value: Array


def _absolute_positions(position: Array | None, time: int) -> Array:
    """int32 [batch or 1, time]: position[:, None] + t."""
    start = jnp.zeros((1,), jnp.int32) if position is None else position.astype(jnp.int32)
    return start[:, None] + jnp.arange(time, dtype=jnp.int32)


def _split_heads(x: Array, heads: int) -> Array:
    """[batch, time, heads * dim] -> [batch, time, heads, dim]."""
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


# --------------------------------------------------------------------------- retention


def sqrt_row_scale(log_gamma: Array, absolute_positions: Array) -> Array:
    """torchscale's row normaliser of the decay matrix, 1/sqrt(sum_{m<=n} gamma^(n-m)).

    The geometric sum is (1 - gamma^(n+1)) / (1 - gamma), or n + 1 for gamma = 1; it is
    evaluated with expm1 in log space, so it is exact for gamma near 1 and finite at any n.

    Args:
      log_gamma: float32 [heads], log of the fixed per-head decay (<= 0).
      absolute_positions: int [batch, time] (or broadcastable), the position n of each row.
    Returns:
      float32 [batch, time, heads].
    """
    count = (absolute_positions + 1).astype(jnp.float32)[..., None]          # n + 1
    decays = log_gamma < 0
    safe = jnp.where(decays, log_gamma, -1.0)
    geometric = jnp.expm1(count * safe) / jnp.expm1(safe)
    return jax.lax.rsqrt(jnp.where(decays, geometric, count))


@functools.lru_cache(maxsize=None)
def _warn_fallback(field: str, reason: str) -> None:
    logging.getLogger(__name__).warning("%s='pallas' falls back to XLA: %s", field, reason)


def _unsupported_reason(key_dim: int, value_dim: int, chunk_size: int | None) -> str | None:
    """The kernels' own reason (`kernels.unsupported_reason` for the chunkwise form, or with
    chunk_size None `kernels.step_unsupported_reason` for the decoding step), or None."""
    from retnet_jax import kernels   # only when asked for: it imports Pallas' Triton backend
    if chunk_size is None:
        return kernels.step_unsupported_reason(key_dim, value_dim)
    return kernels.unsupported_reason(key_dim, value_dim, chunk_size)


def pallas_fallback_reason(key_dim: int, value_dim: int, chunk_size: int | None
                           ) -> str | None:
    """Why the Pallas kernels run XLA's form instead for these head dims on this backend
    (sizes the kernels do not take, or no GPU), or None: the chunkwise form's at chunk_size,
    or with chunk_size None the single-token decoding step's."""
    reason = _unsupported_reason(key_dim, value_dim, chunk_size)
    if reason is None and jax.default_backend() != "gpu":
        reason = f"backend {jax.default_backend()!r} is not a GPU"
    return reason


def _pallas_or_fallback(kernel: str, field: str, q: Array, v: Array,
                        chunk_size: int | None) -> dict | None:
    """kwargs for `kernels.chunkwise_retention_pallas` (chunk_size given) or the decoding
    step (chunk_size None), or None to use the XLA path; errors and warnings name `field`,
    the config field that asked for the kernel."""
    if kernel == "xla":
        return None
    if kernel == "pallas_interpret":
        reason = _unsupported_reason(q.shape[-1], v.shape[-1], chunk_size)
        if reason:
            raise ValueError(f"{field}='pallas_interpret': {reason}")
        return {"interpret": True}
    _check_kernel(field, kernel)
    reason = pallas_fallback_reason(q.shape[-1], v.shape[-1], chunk_size)
    if reason:
        _warn_fallback(field, reason)
        return None
    return {"interpret": False}


def retention_kernel_specs(mesh: jax.sharding.AbstractMesh | jax.sharding.Mesh,
                           q_shape: Sequence[int], log_decay_ndim: int
                           ) -> tuple[jax.sharding.PartitionSpec, ...]:
    """shard_map specs of the kernel's (activations, log_decay, state) on `mesh`.

    Batch goes over `sharding.BATCH_AXES` and heads over 'tensor' (the logical 'batch' and
    'heads' of `sharding.LOGICAL_AXIS_RULES`); a dimension its mesh axes do not divide is
    replicated along them, as for parameters. Time and head dims are never split.

    Args:
      mesh: the device mesh (its axis sizes are all that is read).
      q_shape: [batch, time, heads, key_dim].
      log_decay_ndim: 1 (fixed, [heads]) or 3 (gated, [batch, time, heads]).
    Returns:
      (spec of q, k, v and o [B, T, H, D]; of log_decay; of the state [B, H, Dk, Dv]).
    """
    P = jax.sharding.PartitionSpec
    batch, _, heads, _ = sharding.logical_to_mesh_spec(("batch", None, "heads", None),
                                                       q_shape, mesh)
    decay = P(heads) if log_decay_ndim == 1 else P(batch, None, heads)
    return P(batch, None, heads, None), decay, P(batch, heads, None, None)


def _pallas_decode_step(q: Array, k: Array, v: Array, log_decay: Array, *,
                        initial_state: Array | None, interpret: bool,
                        rotate_at: Array | int | None = None) -> tuple[Array, Array]:
    """One token, [B, 1, H, D] in and out, through `kernels.retention_step_pallas` (which
    rotates q and k at rotate_at when it is given)."""
    from retnet_jax import kernels
    batch, _, heads, key_dim = q.shape
    if initial_state is None:
        initial_state = retention.zero_state(batch, heads, key_dim, v.shape[-1])
    o, state = kernels.retention_step_pallas(
        q[:, 0], k[:, 0], v[:, 0], log_decay if log_decay.ndim == 1 else log_decay[:, 0],
        initial_state, rotate_at=rotate_at, interpret=interpret)
    return o[:, None], state


def _sharded_pallas(mesh: jax.sharding.AbstractMesh, kernel, q: Array, k: Array, v: Array,
                    log_decay: Array, initial_state: Array | None, **kwargs
                    ) -> tuple[Array, Array]:
    """A Pallas retention `kernel` (`kernels.chunkwise_retention_pallas` or
    `_pallas_decode_step`) run by `jax.shard_map` on each device's [B_local, T, H_local, D]
    block: retention is independent per sequence and per head, so no collectives are needed
    (a pallas_call has no SPMD partitioning rule; without this, XLA would gather its inputs
    and run the whole batch on every device). The backward pass of a fixed [H] decay, shared
    by the batch, is summed over the batch axes by shard_map's transpose.

    Arrays and kwargs as the kernel's; returns (o, final state).
    """
    act, decay, state = retention_kernel_specs(mesh, q.shape, log_decay.ndim)

    def local(q, k, v, log_decay, *initial_state):
        return kernel(q, k, v, log_decay,
                      initial_state=initial_state[0] if initial_state else None, **kwargs)

    args = (q, k, v, log_decay) + (() if initial_state is None else (initial_state,))
    in_specs = (act, act, act, decay) + (() if initial_state is None else (state,))
    # check_vma=False: pallas_call's outputs carry no varying-axes types (its out_shape
    # would need them); the specs above say how everything is split.
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(act, state),
                         check_vma=False)(*args)


def _step_pallas_args(kernel: str, step_kernel: str | None, q, v) -> dict | None:
    """`_pallas_or_fallback` for a single-token step: step_kernel's ('decode_kernel'), or
    with step_kernel None kernel's ('retention_kernel'); q, v (or shape structs) [B, 1, H,
    D]."""
    if step_kernel is None:
        return _pallas_or_fallback(kernel, "retention_kernel", q, v, None)
    return _pallas_or_fallback(step_kernel, "decode_kernel", q, v, None)


def run_retention(mode: str, q: Array, k: Array, v: Array, log_decay: Array, *,
                  chunk_size: int, initial_state: Array | None, kernel: str = "xla",
                  step_kernel: str | None = None,
                  rotate_at: Array | int | None = None) -> tuple[Array, Array | None]:
    """Dispatches to one form of `retention.py`; the only place the forms differ.

    Args:
      mode: 'parallel' | 'chunkwise' | 'recurrent'.
      q, k: [batch, time, heads, key_dim]; v: [batch, time, heads, value_dim].
      log_decay: float [heads] or [batch, time, heads], <= 0.
      chunk_size: chunk length of the chunkwise form.
      initial_state: [batch, heads, key_dim, value_dim] (float32, or a bfloat16 cache's
        state) or None (zeros); the parallel form has no state and accepts only None.
      kernel: one of RETENTION_KERNELS: the implementation of the chunkwise form and, unless
        step_kernel says otherwise, of single-token recurrent steps (decoding;
        `kernels.retention_step_pallas`, forward only); longer recurrent inputs always use
        XLA's scan. 'pallas' falls back to 'xla', with one warning per config field and
        reason, off GPU or for sizes the kernels do not take (the step: head dims that are
        not multiples of 16, whatever the chunk size).
        With a multi-device mesh in context (`jax.set_mesh`, or
        `jax.sharding.use_abstract_mesh` inside jit, as `train.Trainer` does), the Pallas
        kernels run per shard under `jax.shard_map` (`retention_kernel_specs`).
      step_kernel: None, or one of RETENTION_KERNELS for single-token recurrent steps in
        place of `kernel` (a model can decode with the Pallas step and train with XLA's
        chunkwise form).
      rotate_at: None (q and k come rotated), or an int scalar or int [batch]: the absolute
        position of the first token; q and k are then rotated by `positions.rotate` at it
        first, inside the Pallas step for a single token on one device (no rotation
        kernels of its own), by XLA otherwise.
    Returns:
      (o [batch, time, heads, value_dim], final state or None for the parallel form). The
      state is float32 from the XLA forms and the chunkwise kernels, and in initial_state's
      dtype from the Pallas single-token step; `RetentionBase` stores it in its
      `state_dtype`.
    """
    if mode not in FORWARD_MODES:
        raise ValueError(f"mode must be one of {FORWARD_MODES}, got {mode!r}")
    # Pallas: the chunkwise form, and the recurrent form one token at a time (decoding).
    pallas = None
    if mode == "chunkwise":
        pallas = _pallas_or_fallback(kernel, "retention_kernel", q, v, chunk_size)
    elif mode == "recurrent" and q.shape[1] == 1:
        pallas = _step_pallas_args(kernel, step_kernel, q, v)
    mesh = sharding.mesh_in_context()
    if rotate_at is not None:
        rotate_at = jnp.asarray(rotate_at)
        if not jnp.issubdtype(rotate_at.dtype, jnp.integer):
            raise ValueError(f"rotate_at must hold integer positions, got dtype "
                             f"{rotate_at.dtype}")
        if pallas is not None and mode == "recurrent" and mesh is None:
            pallas["rotate_at"] = rotate_at       # the step kernel rotates q and k itself
        else:
            q, k = positions.rotate(q, rotate_at), positions.rotate(k, rotate_at)
    if mode == "parallel":
        if initial_state is not None:
            raise ValueError("mode='parallel' cannot continue from a state; use 'chunkwise' "
                             "or 'recurrent' with a cache")
        return retention.parallel_retention(q, k, v, log_decay), None
    if pallas is not None:
        from retnet_jax import kernels
        fused = (kernels.chunkwise_retention_pallas if mode == "chunkwise"
                 else _pallas_decode_step)
        if mode == "chunkwise":
            pallas["chunk_size"] = chunk_size
        if mesh is not None:
            return _sharded_pallas(mesh, fused, q, k, v, log_decay, initial_state, **pallas)
        return fused(q, k, v, log_decay, initial_state=initial_state, **pallas)
    if mode == "chunkwise":
        return retention.chunkwise_retention(q, k, v, log_decay, chunk_size=chunk_size,
                                             initial_state=initial_state)
    return retention.recurrent_retention(q, k, v, log_decay, initial_state=initial_state)


class RetentionBase(nnx.Module):
    """The retention block shared by fixed and gated decay (subclasses supply the decay):

        q = rotate(x Wq), k = rotate(x Wk) * key_dim^-0.5, v = x Wv        (per head)
        o = retention(q, k, v, log_decay)                    (any of the three forms)
        o = RMSNorm_head(o * row_scale)                      (no affine, float32, eps)
        y = Wout(silu(x Wg) * o)

    Ablations: use_swish_gate=False drops Wg (y = Wout(o)); use_head_norm=False drops the
    per-head norm. Init as torchscale: xavier_uniform gain 2^-2.5 for q, k, v, g; out_proj
    gain `out_gain`. state_dtype: the dtype of the cache's state between calls (float32, or
    bfloat16 at half the memory; the forms compute in float32 either way).
    decode_projections: how a decoding step (a cache and one token; the kernel at batch 1
    only) computes the input projections (with the block's norm) and out_proj, one of
    DECODE_PROJECTIONS (`project`). decode_kernel: None (the step follows `kernel`) or one of
    RETENTION_KERNELS for a decoding step's retention (`run_retention`'s step_kernel).
    """

    out_gain = 1.0

    def __init__(self, d_model: int, *, num_heads: int, value_dim: int, use_swish_gate: bool,
                 use_head_norm: bool, norm_eps: float, chunk_size: int, dtype, param_dtype,
                 rngs: nnx.Rngs, kernel: str = "xla", state_dtype=jnp.float32,
                 decode_projections: str = "xla", decode_kernel: str | None = None):
        self.kernel = _check_kernel("kernel", kernel)
        self.decode_kernel = _check_kernel("decode_kernel", decode_kernel, optional=True)
        _check_decode_projections(decode_projections)
        self.decode_projections = decode_projections
        self.state_dtype = state_dtype
        self.num_heads = num_heads
        self.key_dim = d_model // num_heads
        self.value_head_dim = value_dim // num_heads
        self.use_swish_gate = use_swish_gate
        self.use_head_norm = use_head_norm
        self.norm_eps = norm_eps
        self.chunk_size = chunk_size
        self.dtype = dtype
        kw = dict(init=xavier_uniform(2**-2.5), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(d_model, d_model, ("embed", "heads"), **kw)
        self.k_proj = linear(d_model, d_model, ("embed", "heads"), **kw)
        self.v_proj = linear(d_model, value_dim, ("embed", "heads"), **kw)
        self.g_proj = linear(d_model, value_dim, ("embed", "heads"), **kw) if use_swish_gate else None
        self.out_proj = linear(value_dim, d_model, ("heads", "embed"),
                               init=xavier_uniform(self.out_gain), dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)

    def input_projections(self) -> dict[str, nnx.Linear]:
        """The Linears reading the block's normalised input, by name: q, k, v, then g (with
        the swish gate) and any a subclass adds."""
        linears = dict(q=self.q_proj, k=self.k_proj, v=self.v_proj)
        if self.use_swish_gate:
            linears["g"] = self.g_proj
        return linears

    def log_decay(self, projected: dict[str, Array]) -> Array:
        """Log decay from the input projections (`input_projections`' names ->
        [batch, time, d_out]): float32 [heads] or [batch, time, heads]."""
        raise NotImplementedError

    def row_scale(self, absolute_positions: Array) -> Array | None:
        """float32 [batch, time, heads] multiplying each output row, or None (no scaling)."""
        return None

    def init_cache(self, batch_size: int, max_len: int) -> RetentionCache:
        """Zero state, [batch, heads, key_dim, value_head_dim] in state_dtype; max_len is
        unused."""
        del max_len
        return RetentionCache(retention.zero_state(batch_size, self.num_heads, self.key_dim,
                                                   self.value_head_dim, self.state_dtype))

    def __call__(self, x: Array, *, mode: str, cache: RetentionCache | None = None,
                 position: Array | None = None, valid: Array | None = None,
                 input_norm: RMSNorm | None = None) -> tuple[Array, RetentionCache | None]:
        """See the module docstring for the arguments; returns ([batch, time, d_model], cache)."""
        batch, time, _ = x.shape
        impl = self.decode_projections if cache is not None else "xla"
        linears = self.input_projections()
        stepped = None
        if cache is not None and valid is None and mode == "recurrent":
            stepped = self._step_from_splits(x, cache, position, input_norm, linears, impl)
        if stepped is not None:
            o, state, projected = stepped
        else:
            projected = dict(zip(linears, project(x, list(linears.values()), norm=input_norm,
                                                  impl=impl)))
            q = _split_heads(projected["q"], self.num_heads)
            k = _split_heads(projected["k"], self.num_heads) * jnp.asarray(
                self.key_dim**-0.5, x.dtype)
            v = _split_heads(projected["v"], self.num_heads)
            log_decay = self.log_decay(projected)
            if valid is not None:
                # Padded steps leave the state untouched: nothing added (k = 0), no decay (0).
                k = jnp.where(valid[..., None, None], k, jnp.zeros_like(k))
                per_token = jnp.broadcast_to(log_decay, (batch, time, self.num_heads))
                log_decay = jnp.where(valid[..., None], per_token, 0.0)

            o, state = run_retention(mode, q, k, v, log_decay, chunk_size=self.chunk_size,
                                     initial_state=None if cache is None else cache.state,
                                     kernel=self.kernel, step_kernel=self.decode_kernel,
                                     rotate_at=0 if position is None else position)

        o = o.astype(jnp.float32)
        scale = self.row_scale(_absolute_positions(position, time))
        if scale is not None:
            o = o * scale[..., None]
        if self.use_head_norm:
            o = rms_normalize(o, self.norm_eps)
        o = o.astype(self.dtype)
        if self.use_swish_gate:
            # gated per head, before the heads are joined: one shape from the norm to the
            # product, so XLA may fuse them (decoding ran them as two kernels a block:
            # BENCHMARKS.md, "Decoding", session 22)
            o = jax.nn.silu(_split_heads(projected["g"], self.num_heads)) * o
        y = project(o.reshape(batch, time, -1), [self.out_proj], impl=impl)[0]
        if cache is None:
            return y, None
        return y, RetentionCache(state.astype(self.state_dtype))

    def _step_from_splits(self, x: Array, cache: RetentionCache, position: Array | None,
                          input_norm: RMSNorm | None, linears: dict[str, nnx.Linear],
                          impl: str) -> tuple[Array, Array, dict[str, Array]] | None:
        """A decoding step's projections and retention on two kernels with nothing of
        XLA's between them, or None where they do not both apply (then `__call__` runs
        `project` and `run_retention`): the GEMV kernel's q|k|v|gate(|gt) projections
        (with the block's norm) left as K-split partials
        (`kernels.projections.projection_splits`), read by the Pallas step
        (`kernels.retention_step_from_splits`: their sums, k's scaling, the rotation).

        Needs one token of a batch in PROJECTION_KERNEL_BATCHES on one device, the GEMV
        projections and the step's kernel both on (both interpreted or neither), and a
        partials layout the step reads (`kernels.splits_layout_reason`; the 1.3B presets'
        at batch 1). Returns (o [batch, 1, heads, value_head_dim], the new state, the other
        projections by name ([batch, 1, d_out] in x's dtype: the gate, a gated block's gt))."""
        from retnet_jax import kernels
        kernel_args = _projections_kernel_args(impl, x, list(linears.values()))
        if kernel_args is None or sharding.mesh_in_context() is not None:
            return None
        batch = x.shape[0]
        q_like = jax.ShapeDtypeStruct((batch, 1, self.num_heads, self.key_dim), x.dtype)
        v_like = jax.ShapeDtypeStruct((batch, 1, self.num_heads, self.value_head_dim),
                                      x.dtype)
        step = _step_pallas_args(self.kernel, self.decode_kernel, q_like, v_like)
        if step is None or step["interpret"] != kernel_args["interpret"]:
            return None
        sums = dict(zip(linears, _project_splits(x, list(linears.values()), input_norm,
                                                 kernel_args)))
        reason = kernels.splits_layout_reason(sums["q"], sums["k"], sums["v"],
                                              heads=self.num_heads)
        if reason is not None:
            return None       # `__call__` projects again; under jit this call is dropped
        others = {name: s.total()[:, None].astype(x.dtype) for name, s in sums.items()
                  if name not in ("q", "k", "v")}
        log_decay = self.log_decay(others)
        o, state = kernels.retention_step_from_splits(
            sums["q"], sums["k"], sums["v"],
            log_decay if log_decay.ndim == 1 else log_decay[:, 0], cache.state,
            dtype=x.dtype, key_scale=self.key_dim**-0.5,
            rotate_at=jnp.zeros((), jnp.int32) if position is None else position,
            interpret=step["interpret"])
        return o[:, None], state, others


class MultiScaleRetention(RetentionBase):
    """RetNet's multi-scale retention (torchscale's MultiScaleRetention): a fixed decay
    gamma_h per head (`positions.decay_gammas(decay_schedule, gamma=decay_gamma)`).

    With sqrt_row_scaling, row n of every form is multiplied by torchscale's
    1/sqrt(sum_{m<=n} gamma^(n-m)) (`sqrt_row_scale`, at absolute position n). torchscale's
    parallel form additionally divides each row of (q k^T * D) by max(1, |row sum|)
    (detached); that is not reproduced: like the sqrt scaling it is one scalar per (row, head)
    in front of the scale-invariant per-head norm, so it cancels except through eps, and it
    has no recurrent or chunkwise counterpart (torchscale's recurrent form omits it and its
    chunkwise form uses other per-chunk scalars), so reproducing it would make the forms
    disagree.
    """

    def __init__(self, d_model: int, *, num_heads: int, value_dim: int, use_swish_gate: bool,
                 use_head_norm: bool, norm_eps: float, chunk_size: int, decay_schedule: str,
                 decay_gamma: float, sqrt_row_scaling: bool, dtype, param_dtype,
                 rngs: nnx.Rngs, kernel: str = "xla", state_dtype=jnp.float32,
                 decode_projections: str = "xla", decode_kernel: str | None = None):
        super().__init__(d_model, num_heads=num_heads, value_dim=value_dim,
                         use_swish_gate=use_swish_gate, use_head_norm=use_head_norm,
                         norm_eps=norm_eps, chunk_size=chunk_size, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs, kernel=kernel,
                         state_dtype=state_dtype, decode_projections=decode_projections,
                         decode_kernel=decode_kernel)
        self.decay_schedule = decay_schedule
        self.decay_gamma = decay_gamma
        self.sqrt_row_scaling = sqrt_row_scaling

    def log_gammas(self) -> Array:
        """float32 [heads]: log gamma_h."""
        return positions.decay_log_gammas(self.num_heads, self.decay_schedule,
                                          gamma=self.decay_gamma)

    def log_decay(self, projected: dict[str, Array]) -> Array:
        """float32 [heads], the same for every token (projected is unused)."""
        del projected
        return self.log_gammas()

    def row_scale(self, absolute_positions: Array) -> Array | None:
        if not self.sqrt_row_scaling:
            return None
        return sqrt_row_scale(self.log_gammas(), absolute_positions)


class GatedRetention(RetentionBase):
    """Gated retention (gRet, YOCO's GateRetention): a data-dependent decay per token and head,

        log_decay[b, t, h] = logsigmoid(x W_gt + c)[b, t, h] / gate_logit_normalizer  (16 in YOCO)

    computed by the same retention forms, with no row scaling (YOCO has none). W_gt: d_model ->
    heads, xavier gain 2^-2.5; out_proj xavier gain 2^-1 (YOCO). c: none (gate_bias=None,
    YOCO's bias-free gt_proj) or a learned per-head bias [heads] initialised to gate_bias,
    which sets the initial memory: the decay starts near sigmoid(gate_bias)^(1/normalizer)
    (0.958 per token for no bias, 0.997 for gate_bias = 3 at normalizer 16).
    """

    out_gain = 0.5

    def __init__(self, d_model: int, *, num_heads: int, value_dim: int, use_swish_gate: bool,
                 use_head_norm: bool, norm_eps: float, chunk_size: int,
                 gate_logit_normalizer: float, dtype, param_dtype, rngs: nnx.Rngs,
                 gate_bias: float | None = None, kernel: str = "xla",
                 state_dtype=jnp.float32, decode_projections: str = "xla",
                 decode_kernel: str | None = None):
        super().__init__(d_model, num_heads=num_heads, value_dim=value_dim,
                         use_swish_gate=use_swish_gate, use_head_norm=use_head_norm,
                         norm_eps=norm_eps, chunk_size=chunk_size, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs, kernel=kernel,
                         state_dtype=state_dtype, decode_projections=decode_projections,
                         decode_kernel=decode_kernel)
        self.gate_logit_normalizer = gate_logit_normalizer
        self.gt_proj = linear(d_model, num_heads, ("embed", None), init=xavier_uniform(2**-2.5),
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gt_bias = (None if gate_bias is None else
                        nnx.Param(jnp.full((num_heads,), gate_bias, param_dtype),
                                  **sharded((None,))))

    def input_projections(self) -> dict[str, nnx.Linear]:
        """The base class's, then the decay gate's gt."""
        return {**super().input_projections(), "gt": self.gt_proj}

    def log_decay(self, projected: dict[str, Array]) -> Array:
        """float32 [batch, time, heads], <= 0, from the gate's logits projected["gt"]."""
        logits = projected["gt"].astype(jnp.float32)
        if self.gt_bias is not None:
            logits = logits + self.gt_bias[...].astype(jnp.float32)
        return jax.nn.log_sigmoid(logits) / self.gate_logit_normalizer


# --------------------------------------------------------------------------- attention


def attention_implementation(requested: str | None, dtype) -> str:
    """'xla' or 'cudnn': the requested one, or (None) cuDNN on GPU for 16-bit inputs, else XLA."""
    if requested is not None:
        return requested
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype).itemsize == 2 else "xla"


class Attention(nnx.Module):
    """Causal multi-head softmax attention with the same rotation as retention (torchscale's
    xPos angles applied at absolute positions, i.e. RoPE with interleaved pairs), so a
    Transformer baseline differs from RetNet only in the mixer. Bias-free q, k, v, out;
    init as torchscale's MultiheadAttention (xavier gain 2^-0.5 for q, k, v; out gain 1).

    Without a cache: `jax.nn.dot_product_attention(is_causal=True)` with the configured
    implementation. With a cache: keys/values of valid tokens are written at their absolute
    slots, and queries attend to slots <= their own position through an explicit mask (XLA),
    which also handles per-sequence offsets. decode_projections: as retention's (`project`).
    """

    def __init__(self, d_model: int, *, num_heads: int, implementation: str | None, dtype,
                 param_dtype, rngs: nnx.Rngs, decode_projections: str = "xla"):
        _check_decode_projections(decode_projections)
        self.decode_projections = decode_projections
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.implementation = implementation
        self.dtype = dtype
        kw = dict(init=xavier_uniform(2**-0.5), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(d_model, d_model, ("embed", "heads"), **kw)
        self.k_proj = linear(d_model, d_model, ("embed", "heads"), **kw)
        self.v_proj = linear(d_model, d_model, ("embed", "heads"), **kw)
        self.out_proj = linear(d_model, d_model, ("heads", "embed"), init=xavier_uniform(1.0),
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def init_cache(self, batch_size: int, max_len: int) -> AttentionCache:
        """Empty keys and values, [batch, max_len, heads, head_dim] in the compute dtype."""
        shape = (batch_size, max_len, self.num_heads, self.head_dim)
        return AttentionCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))

    def __call__(self, x: Array, *, mode: str, cache: AttentionCache | None = None,
                 position: Array | None = None, valid: Array | None = None,
                 input_norm: RMSNorm | None = None) -> tuple[Array, AttentionCache | None]:
        """See the module docstring for the arguments; returns ([batch, time, d_model], cache).
        `mode` is accepted for the common interface and does not change the result."""
        del mode
        batch, time, _ = x.shape
        impl = self.decode_projections if cache is not None else "xla"
        q, k, v = project(x, [self.q_proj, self.k_proj, self.v_proj], norm=input_norm,
                          impl=impl)
        offset = 0 if position is None else position
        q = positions.rotate(_split_heads(q, self.num_heads), offset)
        k = positions.rotate(_split_heads(k, self.num_heads), offset)
        v = _split_heads(v, self.num_heads)

        if cache is None:
            # Right-padding needs no mask here: valid queries only see earlier (valid) keys.
            o = jax.nn.dot_product_attention(
                q, k, v, is_causal=True,
                implementation=attention_implementation(self.implementation, q.dtype))
        else:
            max_len = cache.key.shape[1]
            query_pos = _absolute_positions(position, time)                   # [B, T]
            # Padded tokens (and any position >= max_len) get an out-of-range slot: dropped.
            slots = query_pos if valid is None else jnp.where(valid, query_pos, max_len)
            rows = jnp.arange(batch)[:, None]
            cache = AttentionCache(cache.key.at[rows, slots].set(k, mode="drop"),
                                   cache.value.at[rows, slots].set(v, mode="drop"))
            visible = jnp.arange(max_len)[None, None, :] <= query_pos[:, :, None]
            o = jax.nn.dot_product_attention(q, cache.key, cache.value,
                                             mask=visible[:, None], implementation="xla")
        return project(o.reshape(batch, time, -1), [self.out_proj], impl=impl)[0], cache
