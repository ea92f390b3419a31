"""Layers against independent float64 references written from torchscale's and YOCO's code.

Weights are random and scaled up (`randomize_params`), so activations are O(1) rather than the
tiny values of the default init; comparisons are float32 against float64 with
rel err = max|a - b| / max|b| <= 1e-5 unless stated.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retnet_jax import layers

RTOL = 1e-5
# Caveat on seeds: a row whose retention output is tiny (e.g. t = 0 with q_0 . k_0 nearly
# cancelling) sits at the head norm's eps, where float32 rounding of q . k passes straight to
# the output; such rows legitimately reach ~1e-5 against float64 (seen with seed 1 below).
D_MODEL, HEADS, VALUE_DIM = 32, 2, 48


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def randomize_params(module: nnx.Module, seed: int, scale: float = 1.5) -> nnx.Module:
    """Replaces every parameter in place: kernels [in, ...] ~ N(0, (scale / sqrt(in))^2),
    vectors (norm scales, biases) ~ 1 + N(0, 0.5^2). Returns the module."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def draw(key, x):
        noise = jax.random.normal(key, x.shape, jnp.float32)
        value = 1.0 + 0.5 * noise if x.ndim == 1 else noise * scale / math.sqrt(x.shape[0])
        return value.astype(x.dtype)

    nnx.update(module, jax.tree.unflatten(treedef, [draw(k, x) for k, x in zip(keys, leaves)]))
    return module


def kernel(linear: nnx.Linear) -> np.ndarray:
    return np.asarray(linear.kernel[...], np.float64)


# ----------------------------------------------------------------------------- references


def ref_rotate(x: np.ndarray) -> np.ndarray:
    """torchscale theta_shift at positions 0..T-1; x [B, H, T, D]."""
    d, time = x.shape[-1], x.shape[-2]
    angle = np.repeat(1.0 / 10000 ** np.linspace(0, 1, d // 2), 2)
    index = np.arange(time, dtype=np.float64)[:, None] * angle[None, :]
    rotated = np.stack((-x[..., 1::2], x[..., ::2]), axis=-1).reshape(x.shape)
    return x * np.cos(index) + rotated * np.sin(index)


def ref_heads(x: np.ndarray, heads: int) -> np.ndarray:
    """[B, T, H*D] -> [B, H, T, D]."""
    b, t, _ = x.shape
    return x.reshape(b, t, heads, -1).transpose(0, 2, 1, 3)


def ref_merge(x: np.ndarray) -> np.ndarray:
    """[B, H, T, D] -> [B, T, H*D]."""
    b, h, t, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * d)


def ref_silu(x):
    return x / (1 + np.exp(-x))


def ref_rmsnorm(x, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def ref_qkv(layer, x):
    """Rotated q, k (k * dk^-0.5) and v, [B, H, T, D], as torchscale's forward."""
    heads = layer.num_heads
    q, k, v = (x @ kernel(p) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    k = k * (layer.key_dim ** -0.5)
    return ref_rotate(ref_heads(q, heads)), ref_rotate(ref_heads(k, heads)), ref_heads(v, heads)


def ref_retention_output(layer, x, o):
    """group norm, swish gate and out_proj of o [B, H, T, Dv]."""
    if layer.use_head_norm:
        o = ref_rmsnorm(o, layer.norm_eps)
    o = ref_merge(o)
    if layer.use_swish_gate:
        o = ref_silu(x @ kernel(layer.g_proj)) * o
    return o @ kernel(layer.out_proj)


def torchscale_retention(layer: layers.MultiScaleRetention, x: np.ndarray, *,
                         abs_sum_clamp: bool = True) -> np.ndarray:
    """torchscale MultiScaleRetention.parallel_forward (with RetNetRelPos's mask), float64,
    optionally with the detached abs-row-sum clamp that our forms leave out."""
    q, k, v = ref_qkv(layer, x)
    time = x.shape[1]
    gamma = np.asarray(layers.positions.decay_gammas(layer.num_heads, layer.decay_schedule,
                                                     gamma=layer.decay_gamma))
    n = np.arange(time)
    gap = n[:, None] - n[None, :]
    mask = np.where(gap >= 0, gamma[:, None, None] ** np.maximum(gap, 0), 0.0)   # [H, T, T]
    if layer.sqrt_row_scaling:
        mask = mask / np.sqrt(mask.sum(-1, keepdims=True))
    scores = q @ np.swapaxes(k, -1, -2) * mask
    if abs_sum_clamp:
        scores = scores / np.maximum(np.abs(scores.sum(-1, keepdims=True)), 1.0)
    return ref_retention_output(layer, x, scores @ v)


def yoco_gated_retention(layer: layers.GatedRetention, x: np.ndarray) -> np.ndarray:
    """YOCO GateRetention with parallel_gate_retention, float64."""
    q, k, v = ref_qkv(layer, x)
    gt = ref_heads(x @ kernel(layer.gt_proj), layer.num_heads)[..., 0]          # [B, H, T]
    if layer.gt_bias is not None:
        gt = gt + np.asarray(layer.gt_bias[...], np.float64)[None, :, None]
    gt = -np.logaddexp(0.0, -gt) / layer.gate_logit_normalizer                 # logsigmoid
    cum = np.cumsum(gt, axis=-1)
    causal = np.tril(np.ones((x.shape[1],) * 2, bool))
    mask = np.where(causal, np.exp(np.where(causal, cum[..., :, None] - cum[..., None, :], 0)), 0)
    o = (q @ np.swapaxes(k, -1, -2) * mask) @ v
    return ref_retention_output(layer, x, o)


def reference_attention(layer: layers.Attention, x: np.ndarray) -> np.ndarray:
    """Causal softmax attention with the xPos rotation, float64."""
    heads = layer.num_heads
    q, k, v = (ref_heads(x @ kernel(p), heads) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    q, k = ref_rotate(q), ref_rotate(k)
    logits = q @ np.swapaxes(k, -1, -2) / math.sqrt(layer.head_dim)
    logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return ref_merge(weights @ v) @ kernel(layer.out_proj)


# ----------------------------------------------------------------------------- helpers


@functools.partial(nnx.jit, static_argnames="mode")
def run_mixer(mixer, x, mode):
    return mixer(x, mode=mode)[0]


def make_retention(seed=0, **overrides):
    kw = dict(num_heads=HEADS, value_dim=VALUE_DIM, use_swish_gate=True, use_head_norm=True,
              norm_eps=1e-6, chunk_size=8, decay_schedule="torchscale", decay_gamma=0.9,
              sqrt_row_scaling=True, dtype=jnp.float32, param_dtype=jnp.float32)
    kw.update(overrides)
    return randomize_params(layers.MultiScaleRetention(D_MODEL, rngs=nnx.Rngs(seed), **kw), seed)


def make_gated(seed=0, **overrides):
    kw = dict(num_heads=HEADS, value_dim=VALUE_DIM, use_swish_gate=True, use_head_norm=True,
              norm_eps=1e-5, chunk_size=8, gate_logit_normalizer=16.0, dtype=jnp.float32,
              param_dtype=jnp.float32)
    kw.update(overrides)
    return randomize_params(layers.GatedRetention(D_MODEL, rngs=nnx.Rngs(seed), **kw), seed)


def random_x(seed, batch=2, time=19):
    return jax.random.normal(jax.random.key(100 + seed), (batch, time, D_MODEL), jnp.float32)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("log_gamma", [0.0, math.log(0.5), math.log(1 - 2**-5), -1e-6])
def test_sqrt_row_scale_is_torchscale_row_normaliser(log_gamma):
    n = np.array([0, 1, 2, 7, 40, 1000])
    got = layers.sqrt_row_scale(jnp.full((1,), log_gamma, jnp.float32), jnp.asarray(n)[None])
    gamma = math.exp(log_gamma)
    want = [1 / math.sqrt(sum(gamma**m for m in range(k + 1))) for k in n]
    assert rel_err(got[0, :, 0], want) <= RTOL
    far = layers.sqrt_row_scale(jnp.full((1,), log_gamma, jnp.float32), jnp.array([[10**7]]))
    assert np.isfinite(np.asarray(far)).all()


@pytest.mark.parametrize("overrides", [
    {},
    dict(use_swish_gate=False, use_head_norm=False, decay_schedule="none"),
    dict(decay_schedule="paper", sqrt_row_scaling=False),
    dict(decay_schedule="single", use_head_norm=False),
], ids=["default", "no-gate-no-norm-gamma1", "paper-no-rowscale", "single-no-norm"])
def test_retention_matches_torchscale_in_every_mode(overrides):
    layer = make_retention(seed=0, **overrides)
    x = random_x(0)
    # torchscale's parallel-only abs-row-sum clamp cancels in the per-head norm (up to eps),
    # so with the norm we compare against torchscale exactly as written; without the norm
    # the clamp is visible, and our (documented) semantics are torchscale's without it.
    want = torchscale_retention(layer, np.asarray(x, np.float64),
                                abs_sum_clamp=layer.use_head_norm)
    for mode in layers.FORWARD_MODES:
        assert rel_err(run_mixer(layer, x, mode), want) <= RTOL, mode
    assert (layer.g_proj is None) == (not layer.use_swish_gate)


@pytest.mark.parametrize("normalizer", [16.0, 1.0], ids=["yoco", "strong-decay"])
def test_gated_retention_matches_yoco_in_every_mode(normalizer):
    layer = make_gated(seed=2, gate_logit_normalizer=normalizer)
    x = random_x(2)
    want = yoco_gated_retention(layer, np.asarray(x, np.float64))
    for mode in layers.FORWARD_MODES:
        assert rel_err(run_mixer(layer, x, mode), want) <= RTOL, mode


def test_gated_retention_with_gate_bias_matches_yoco_in_every_mode():
    layer = make_gated(seed=3, gate_bias=3.0)        # randomized: bias ~ 1 + N(0, 0.5^2) per head
    assert layer.gt_bias[...].shape == (HEADS,)
    x = random_x(3)
    want = yoco_gated_retention(layer, np.asarray(x, np.float64))
    for mode in layers.FORWARD_MODES:
        assert rel_err(run_mixer(layer, x, mode), want) <= RTOL, mode


@pytest.mark.parametrize("gate_bias", [None, 0.0, 3.0])
def test_gate_bias_sets_the_initial_memory(gate_bias):
    """With W_gt zeroed the decay is sigmoid(bias)^(1/normalizer) (bias 0 without one)."""
    layer = layers.GatedRetention(D_MODEL, num_heads=HEADS, value_dim=VALUE_DIM,
                                  use_swish_gate=True, use_head_norm=True, norm_eps=1e-5,
                                  chunk_size=8, gate_logit_normalizer=16.0, dtype=jnp.float32,
                                  param_dtype=jnp.float32, gate_bias=gate_bias,
                                  rngs=nnx.Rngs(0))
    assert (layer.gt_bias is None) == (gate_bias is None)
    layer.gt_proj.kernel[...] = jnp.zeros_like(layer.gt_proj.kernel[...])
    decay = np.exp(np.asarray(layer.log_decay({"gt": layer.gt_proj(random_x(0))}), np.float64))
    bias = 0.0 if gate_bias is None else gate_bias
    np.testing.assert_allclose(decay, (1 / (1 + np.exp(-bias))) ** (1 / 16), rtol=1e-6)


def test_attention_matches_reference():
    layer = randomize_params(layers.Attention(D_MODEL, num_heads=4, implementation=None,
                                              dtype=jnp.float32, param_dtype=jnp.float32,
                                              rngs=nnx.Rngs(3)), 3)
    x = random_x(3)
    want = reference_attention(layer, np.asarray(x, np.float64))
    assert rel_err(run_mixer(layer, x, "parallel"), want) <= RTOL


@pytest.mark.parametrize("activation", ["swish", "gelu", "relu"])
def test_gated_ffn_and_rmsnorm_match_reference(activation):
    ffn = randomize_params(layers.GatedFFN(D_MODEL, 40, activation=activation, dtype=jnp.float32,
                                           param_dtype=jnp.float32, rngs=nnx.Rngs(4)), 4)
    norm = randomize_params(layers.RMSNorm(D_MODEL, eps=1e-6, param_dtype=jnp.float32), 5)
    x = random_x(4)
    x64 = np.asarray(x, np.float64)
    h = x64 @ kernel(ffn.fc1)
    act = {"swish": ref_silu, "relu": lambda z: np.maximum(z, 0),
           "gelu": np.vectorize(lambda z: 0.5 * z * (1 + math.erf(z / math.sqrt(2))))}[activation]
    want = (act(h) * (x64 @ kernel(ffn.gate))) @ kernel(ffn.fc2)
    assert rel_err(ffn(x), want) <= RTOL
    want_norm = ref_rmsnorm(x64, 1e-6) * np.asarray(norm.scale[...], np.float64)
    assert rel_err(norm(x), want_norm) <= RTOL


def xavier_bound(linear, gain):
    fan_in, fan_out = linear.kernel.shape
    return gain * math.sqrt(6 / (fan_in + fan_out))


def assert_uniform(linear, bound):
    """Kernel looks like U(-bound, bound): inside the bound, std near bound / sqrt(3)."""
    w = np.asarray(linear.kernel[...])
    assert np.abs(w).max() <= bound
    assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.1


def test_init_follows_torchscale_and_yoco():
    d, kw = 128, dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    common = dict(num_heads=2, value_dim=256, use_swish_gate=True, use_head_norm=True,
                  norm_eps=1e-6, chunk_size=8)
    msr = layers.MultiScaleRetention(d, decay_schedule="torchscale", decay_gamma=0.9,
                                     sqrt_row_scaling=True, **common, **kw)
    gret = layers.GatedRetention(d, gate_logit_normalizer=16.0, **common, **kw)
    for proj in (msr.q_proj, msr.k_proj, msr.v_proj, msr.g_proj, gret.q_proj, gret.gt_proj):
        assert_uniform(proj, xavier_bound(proj, 2**-2.5))
    assert_uniform(msr.out_proj, xavier_bound(msr.out_proj, 1.0))
    assert_uniform(gret.out_proj, xavier_bound(gret.out_proj, 0.5))
    attn = layers.Attention(d, num_heads=2, implementation=None, **kw)
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert_uniform(proj, xavier_bound(proj, 2**-0.5))
    assert_uniform(attn.out_proj, xavier_bound(attn.out_proj, 1.0))
    ffn = layers.GatedFFN(d, 256, activation="swish", **kw)
    for proj in (ffn.fc1, ffn.gate, ffn.fc2):
        assert_uniform(proj, 1 / math.sqrt(proj.kernel.shape[0]))
    assert gret.gt_proj.bias is None and all(p.bias is None for p in (msr.q_proj, attn.out_proj))


@pytest.mark.parametrize("rotate_at", [1.5, jnp.ones((2,), jnp.float32)])
def test_run_retention_refuses_positions_that_are_not_integers(rotate_at):
    # A float position would be truncated by positions.rotate on XLA's paths and refused by
    # the Pallas step: every path refuses it alike.
    q = jnp.ones((2, 1, 2, 16))
    with pytest.raises(ValueError, match="rotate_at must hold integer positions, got dtype"):
        layers.run_retention("recurrent", q, q, q, -jnp.ones((2,)), chunk_size=16,
                             initial_state=None, rotate_at=rotate_at)
