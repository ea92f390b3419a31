"""Decay schedules and xPos-style rotation (the complex part of RetNet's decay).

RetNet's per-head decay is `gamma_h * exp(i * theta)`: the modulus `gamma_h` is a per-head
log decay fed to `retention.py`; the phase is a rotation of q and k by angle `n * theta` at
absolute position n, applied here before retention (torchscale's `theta_shift`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

DECAY_SCHEDULES = ("torchscale", "paper", "single", "none")


def decay_gammas(num_heads: int, schedule: str = "torchscale", *,
                 gamma: float = 1 - 2.0 ** -5) -> np.ndarray:
    """Per-head decay factors gamma_h in (0, 1], float64 [num_heads].

    Schedules:
      'torchscale': gamma_h = 1 - 2^(-5 - h), as torchscale's RetNetRelPos.
      'paper':      gamma = 1 - exp(linspace(log 1/32, log 1/512, H)), the paper's experiments.
      'single':     every head uses `gamma` (single-scale ablation).
      'none':       gamma = 1, no decay (the paper's "gamma = 1" ablation).
    """
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    heads = np.arange(num_heads, dtype=np.float64)
    if schedule == "torchscale":
        return 1.0 - 2.0 ** (-5.0 - heads)
    if schedule == "paper":
        return 1.0 - np.exp(np.linspace(np.log(1 / 32), np.log(1 / 512), num_heads))
    if schedule == "single":
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        return np.full(num_heads, gamma, np.float64)
    if schedule == "none":
        return np.ones(num_heads, np.float64)
    raise ValueError(f"decay schedule must be one of {DECAY_SCHEDULES}, got {schedule!r}")


def decay_log_gammas(num_heads: int, schedule: str = "torchscale", *,
                     gamma: float = 1 - 2.0 ** -5) -> Array:
    """log(gamma_h) as float32 [num_heads]: the fixed `log_decay` of `retention.py`."""
    return jnp.asarray(np.log(decay_gammas(num_heads, schedule, gamma=gamma)), jnp.float32)


def rotation_frequencies(head_dim: int) -> np.ndarray:
    """theta for each feature, float64 [head_dim]: 1/10000^linspace(0, 1, head_dim/2),
    each value repeated twice in place ([t0, t0, t1, t1, ...]) as in torchscale."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be positive and even for the xPos rotation, got {head_dim}")
    base = 1.0 / 10000.0 ** np.linspace(0.0, 1.0, head_dim // 2)
    return np.repeat(base, 2)


def rotate_every_two(x: Array) -> Array:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) on the last axis."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return jnp.stack((-pairs[..., 1], pairs[..., 0]), axis=-1).reshape(x.shape)


def rotate(x: Array, offset: Array | int = 0) -> Array:
    """Rotates q or k by n * theta at absolute positions n = offset + t (torchscale theta_shift).

    Args:
      x: [B, T, H, D] with D even.
      offset: int or int [B]: the absolute position of x[:, 0] (per sequence if [B]), so that
        recurrent steps and later chunks rotate by their absolute position.
    Returns:
      [B, T, H, D] in x's dtype; the rotation is computed in float32.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be [batch, time, heads, dim], got shape {x.shape}")
    theta = jnp.asarray(rotation_frequencies(x.shape[-1]), jnp.float32)
    offset = jnp.asarray(offset, jnp.int32)
    if offset.ndim not in (0, 1) or (offset.ndim == 1 and offset.shape[0] != x.shape[0]):
        raise ValueError(f"offset must be a scalar or [batch={x.shape[0]}], got {offset.shape}")
    positions = jnp.reshape(offset, (-1, 1)) + jnp.arange(x.shape[1], dtype=jnp.int32)  # [B|1, T]
    angle = positions.astype(jnp.float32)[:, :, None, None] * theta           # [B|1, T, 1, D]
    xf = x.astype(jnp.float32)
    return (xf * jnp.cos(angle) + rotate_every_two(xf) * jnp.sin(angle)).astype(x.dtype)
