"""kernels.projections: decoding's GEMV kernel (interpreted on the CPU) against float64
products, its argument checks, its grid, and its lowering for the Triton GPU backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprs import equations, lower_for_cuda
from retnet_jax.kernels.projections import (default_block_k, default_block_n, default_splits,
                                             projection_splits, projections_pallas)

EPS = 1e-6
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def reference(x, weights, scale, dtype) -> list[np.ndarray]:
    """float64 products of x (after `layers.RMSNorm`'s norm with `scale`, if given) with the
    weights rounded to the compute dtype, as `nnx.Linear` rounds them. (The norm's own
    rounding to bf16 is not modelled: XLA may keep it in float32, as the interpreted kernel
    does, so bf16 is checked to 1e-2.)"""
    wide = np.asarray(x, np.float64)
    if scale is not None:
        wide = wide / np.sqrt(np.mean(wide**2, axis=-1, keepdims=True) + EPS)
        wide = wide * np.asarray(jnp.asarray(scale).astype(dtype), np.float64)
    return [wide @ np.asarray(w.astype(dtype), np.float64) for w in weights]


@pytest.mark.parametrize("rows", [1, 2, 8])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("splits", [None, 1, 4])
def test_projections_match_float64(rows, dtype, norm, splits):
    # Four float32 weights read by one call, two narrower than a column group: 40 of 64
    # (zero columns added and dropped) and 8 (read as it is, as a gated block's decay
    # gate); K = 256 walked in 32-row steps.
    rng = np.random.default_rng(rows * 10 + splits if splits else rows)
    k = 256
    x = jnp.asarray(2 * rng.standard_normal((rows, k)), dtype)
    weights = [jnp.asarray(rng.standard_normal((k, n)) * k**-0.5, jnp.float32)
               for n in (128, 64, 40, 8)]
    scale = jnp.asarray(1 + 0.2 * rng.standard_normal(k), jnp.float32) if norm else None
    got = projections_pallas(x, weights, norm_scale=scale, norm_eps=EPS, block_n=64,
                             block_k=32, splits=splits, interpret=True)
    for y, want in zip(got, reference(x, weights, scale, dtype), strict=True):
        assert y.dtype == jnp.float32 and y.shape == want.shape
        err = np.abs(np.asarray(y, np.float64) - want).max() / np.abs(want).max()
        assert err <= TOLERANCE[dtype], err


def test_the_first_weight_tile_is_loaded_before_the_norm():
    """Every program's first [block_k, block_n] weight load comes before the norm's sums of
    squares, so its HBM latency overlaps them (the program order Triton keeps)."""
    x = jax.ShapeDtypeStruct((1, 256), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((256, 64), jnp.bfloat16)
    scale = jax.ShapeDtypeStruct((256,), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda x, w, s: projections_pallas(
        x, [w], norm_scale=s, block_n=64, block_k=32, splits=2))(x, w, scale).jaxpr
    (call,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "pallas_call"]
    order = [eqn for eqn in equations(call.params["jaxpr"])
             if eqn.primitive.name == "reduce_sum" or (
                 eqn.primitive.name == "get" and eqn.outvars[0].aval.shape == (32, 64))]
    assert order and order[0].primitive.name == "get", [e.primitive.name for e in order]


def test_split_partials_are_added_elementwise():
    """The K splits' partials are summed by adds XLA can fuse with their reader, not by a
    reduction over the split axis (a kernel of its own on the GPU)."""
    x = jax.ShapeDtypeStruct((1, 256), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((256, 64), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda x, w: projections_pallas(
        x, [w], block_n=64, block_k=32, splits=4, interpret=True))(x, w).jaxpr
    outside = [eqn.primitive.name for eqn in jaxpr.eqns]
    assert "pallas_call" in outside
    assert not [name for name in outside if name.startswith("reduce")], outside
    assert outside.count("add") == 3                      # 4 splits: 3 adds


@pytest.mark.parametrize("k", [96, 216])
def test_the_norm_reads_x_in_pieces_when_k_is_not_a_power_of_two(k):
    # 96 = 64 + 32 and 216 = 128 + 64 + 16 + 8: the sum of squares from several loads, the
    # weights in 32- and 8-row steps (block_k divides K).
    rng = np.random.default_rng(k)
    x = jnp.asarray(2 * rng.standard_normal((2, k)), jnp.float32)
    weights = [jnp.asarray(rng.standard_normal((k, 64)) * k**-0.5, jnp.float32)]
    scale = jnp.asarray(1 + 0.2 * rng.standard_normal(k), jnp.float32)
    (y,) = projections_pallas(x, weights, norm_scale=scale, norm_eps=EPS, block_n=64,
                              interpret=True)
    (want,) = reference(x, weights, scale, jnp.float32)
    assert np.abs(np.asarray(y, np.float64) - want).max() / np.abs(want).max() <= 1e-5


def test_every_row_is_normalised_by_its_own_rms():
    # Rows 100x apart in scale give the same normalised products: a kernel sharing one
    # 1 / rms across rows (or skipping the norm) fails. eps 0, which the smallest row would
    # feel.
    rng = np.random.default_rng(3)
    row = rng.standard_normal(128)
    x = jnp.asarray(np.stack([row, 100 * row, -row, 0.01 * row]), jnp.float32)
    w = jnp.asarray(rng.standard_normal((128, 64)), jnp.float32)
    (y,) = projections_pallas(x, [w], norm_scale=jnp.ones(128), norm_eps=0.0, block_n=64,
                              block_k=32, interpret=True)
    np.testing.assert_allclose(y[1], y[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[2], -y[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[3], y[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k, columns, splits", [
    (2048, 11008, 8),      # 1.3B's q|k|v|gate: 86 column groups, 688 programs
    (2048, 6912, 16),      # its FFN fc1|gate: 54 groups x 16 = 864
    (3456, 2048, 54),      # out and fc2: 16 groups; 27 splits give 432, so the most (54)
])
def test_default_splits_fill_the_grid(k, columns, splits):
    assert default_splits(k, columns, block_n=128, block_k=64) == splits


@pytest.mark.parametrize("k, widths, block_n, splits", [
    (2048, (2048, 2048, 3456, 3456, 8), 128, 8),   # gated q|k|v|gate|decay gate: 87 groups
    (2048, (3456, 3456), 128, 16),
    (3456, (2048,), 64, 18),       # 128 columns would need 54 splits (> MAX_SPLITS)
    (64, (32,), 128, 1),           # one K step: one split, whatever the grid
    (5504, (2048,), 128, 43),      # the Transformer's fc2: 64 columns need 43 splits too
])
def test_default_block_n_keeps_the_splits_few(k, widths, block_n, splits):
    assert default_block_n(k, widths, block_k=64) == block_n
    columns = sum(-(-n // block_n) * block_n for n in widths)
    assert default_splits(k, columns, block_n=block_n, block_k=64) == splits


@pytest.mark.parametrize("k, block_k", [(2048, 64), (3456, 64), (48, 16), (36, 4)])
def test_default_block_k_is_the_largest_power_of_two_dividing_k(k, block_k):
    assert default_block_k(k) == block_k


@pytest.mark.parametrize("change, match", [
    ({"x": jnp.ones((1, 1, 64))}, r"x must be \[M, K\]"),
    ({"x": jnp.ones((3, 64))}, "power of two <= 8 rows"),
    ({"x": jnp.ones((16, 64))}, "power of two <= 8 rows"),
    ({"x": jnp.ones((1, 64), jnp.int32)}, "x must be floating point"),
    ({"weights": [jnp.ones((32, 64))]}, r"weights\[0\] must be \[K=64, N\]"),
    ({"weights": []}, "at least one"),
    ({"norm_scale": jnp.ones(32)}, r"norm_scale must be \[K=64\]"),
    ({"block_n": 48}, "block_n must be a power of two"),
    ({"block_k": 128}, "block_k = 128 must divide K = 64"),
    ({"splits": 3}, "splits must divide K / block_k = 4"),
])
def test_projections_reject_bad_arguments(change, match):
    args = dict(x=jnp.ones((1, 64)), weights=[jnp.ones((64, 32))], block_n=32,
                block_k=16) | change
    with pytest.raises(ValueError, match=match):
        projections_pallas(**args, interpret=True)


@pytest.mark.parametrize("rows", [1, 8])
def test_projections_lower_for_the_triton_gpu_backend(rows):
    # The 1.3B presets' shapes: q, k, v, gate (and gated's decay gate) behind the norm, and
    # fc2 (K = 3456).
    def struct(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    def normed(x, weights, scale):
        return projections_pallas(x, weights, norm_scale=scale, norm_eps=EPS)
    calls = [(normed, (struct(rows, 2048), [struct(2048, 2048), struct(2048, 2048),
                                            struct(2048, 3456), struct(2048, 3456),
                                            struct(2048, 8)],        # gated's decay gate
                       jax.ShapeDtypeStruct((2048,), jnp.float32))),
             (projections_pallas, (struct(rows, 3456), [struct(3456, 2048)]))]
    for kernel, args in calls:
        assert "triton" in lower_for_cuda(kernel, *args).lower()


def test_split_sums_hold_each_weights_columns():
    """projection_splits' SplitSums share one partials array; each names its weight's
    columns, and their totals are projections_pallas' results."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((1, 128)), jnp.float32)
    weights = [jnp.asarray(rng.standard_normal((128, n)), jnp.float32) for n in (64, 40, 8)]
    sums = projection_splits(x, weights, block_n=64, block_k=32, splits=2, interpret=True)
    assert [(s.start, s.width, s.splits) for s in sums] == [(0, 64, 2), (64, 40, 2),
                                                              (128, 8, 2)]
    assert sums[0].partials is sums[2].partials
    for s, y in zip(sums, projections_pallas(x, weights, block_n=64, block_k=32, splits=2,
                                             interpret=True), strict=True):
        np.testing.assert_array_equal(s.total(), y)

