"""Batch-1 decoding's matrix-vector products: XLA's GEMM against a Pallas GEMV probe.

At batch 1 a decoded token is a chain of [1, K] x [K, N] products, one per weight, and the
weights are most of its bytes (BENCHMARKS.md "Decoding"). This times, for each weight shape
of the 1.3B preset's blocks, `--layers` products in a dependent chain (each input depends on
the previous output, as in a model; distinct weights, so none is served from L2), with
(a) XLA's dot under `generate`'s batch-1 options and (b) a probe Pallas kernel at each
tiling: one program per (group of `block_n` output columns, split of K), each streaming its
[K / splits, block_n] weight tile in `block_k`-row steps and summing x_k * W[k, :] in
float32; XLA adds the splits' partial sums. The probe is not used by the library: it answers
whether a GEMV kernel can read weights faster than XLA's GEMMs do at M = 1.
Each setting is checked against a float64 product before it is timed. Wall time per product
(`us`) includes the launches between kernels; then one more call is traced and `kernel_us`
is the time the device ran kernels per product (the product's kernels and the chain's one
elementwise step), the number a decode loop run as one CUDA graph sees (on a CPU: XLA's
host ops, interpreted Pallas included).

  python3 experiments/bench_gemv.py --out=$OUT/gemv.json
"""

import functools
import itertools
import json
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ceilings import copy_bandwidth
from trace_kernels import busy_ns, device_kernels, trace_call
from retnet_jax.generate import decode_compiler_options

_SHAPES = flags.DEFINE_list(
    "shapes", ["2048x11008", "3456x2048", "2048x6912", "2048x2048"],
    "KxN weight shapes: the 1.3B block's q|k|v|gate, out and FFN-out, FFN-in|gate, and a "
    "square one.")
_LAYERS = flags.DEFINE_integer("layers", 24, "Distinct weights per chained call.")
_BLOCK_N = flags.DEFINE_list("block_n", ["64", "128"], "Output columns per program.")
_PROGRAMS = flags.DEFINE_list("programs", ["132", "264", "528"], "Least programs per "
                              "product: K splits are added until the grid reaches it.")
_BLOCK_K = flags.DEFINE_integer("block_k", 64, "Weight rows per loop step.")
_NUM_WARPS = flags.DEFINE_list("num_warps", ["4"], "Triton warps per program.")
_NUM_STAGES = flags.DEFINE_list("num_stages", ["3"], "Triton pipeline stages of the K loop.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per setting (median reported).")
_COPY_BYTES = flags.DEFINE_integer("copy_bytes", 1 << 30, "Bytes of the copy-bandwidth probe.")
_TRACE_DIR = flags.DEFINE_string("trace_dir", "/tmp/bench_gemv_trace", "Where the traced "
                                 "calls' profiles go.")
_OUT = flags.DEFINE_string("out", None, "Write all results as JSON here.")

TOLERANCE = 2e-2     # bf16 output against float64


def _gemv_kernel(x_ref, w_ref, o_ref, *, block_k: int):
    """One (column group, K split) program. x [Ks], w [Ks, BN] -> o float32 [BN], the
    split's partial sum."""
    def step(i, acc):
        rows = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        x = x_ref[rows].astype(jnp.float32)
        return acc + jnp.sum(x[:, None] * w_ref[rows, :].astype(jnp.float32), axis=0)
    acc = jax.lax.fori_loop(0, x_ref.shape[0] // block_k, step,
                            jnp.zeros((o_ref.shape[0],), jnp.float32))
    o_ref[...] = acc


def gemv_pallas(x, w, *, block_n: int, splits: int, block_k: int, num_warps: int,
                num_stages: int, interpret: bool = False):
    """x [K] @ w [K, N] -> [N] in x's dtype, summed in float32 (K / splits a multiple of
    block_k, N of block_n)."""
    (k,), (_, n) = x.shape, w.shape
    part = k // splits
    partial = pl.pallas_call(
        functools.partial(_gemv_kernel, block_k=block_k),
        grid=(n // block_n, splits),
        in_specs=[pl.BlockSpec((None, part), lambda j, s: (s, 0)),
                  pl.BlockSpec((None, part, block_n), lambda j, s: (s, 0, j))],
        out_specs=pl.BlockSpec((None, block_n), lambda j, s: (s, j)),
        out_shape=jax.ShapeDtypeStruct((splits, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="gemv_probe",
    )(x.reshape(splits, part), w.reshape(splits, part, n))
    return partial.sum(0).astype(x.dtype)


def splits_for(k: int, n: int, block_n: int, block_k: int, programs: int) -> int | None:
    """The fewest K splits (each a multiple of block_k rows) giving >= programs programs."""
    if n % block_n or k % block_k:
        return None
    options = [s for s in range(1, k // block_k + 1) if (k // block_k) % s == 0]
    return next((s for s in options if (n // block_n) * s >= programs), options[-1])


def chain(product):
    """jit((x [K], weights [L][K, N]) -> x): L dependent products, x scaled by each output's
    first entry so every product waits for the one before (and none can be merged)."""
    def run(x, weights):
        for w in weights:
            y = product(x, w)
            x = x * (1 + 1e-3 * jnp.tanh(y[0].astype(jnp.float32))).astype(x.dtype)
        return x
    return run


def check(product, x, w) -> float:
    """Largest error of product(x, w) relative to the float64 product's largest entry."""
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    got = np.asarray(product(x, w), np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def time_chain(fn, x, weights, repeats: int) -> float:
    """Median seconds of one call (after a compile-and-warm-up call)."""
    jax.block_until_ready(fn(x, weights))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(x, weights))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kernel_time(fn, x, weights) -> tuple[float, int]:
    """One traced call: (seconds the device ran kernels, kernels launched)."""
    _, trace = trace_call(fn, x, weights, trace_dir=_TRACE_DIR.value)
    kernels = device_kernels(trace)
    return busy_ns(kernels) * 1e-9, len(kernels)


def settings() -> list[dict]:
    return [dict(block_n=int(bn), programs=int(p), num_warps=int(w), num_stages=int(s))
            for bn, p, w, s in itertools.product(_BLOCK_N.value, _PROGRAMS.value,
                                                  _NUM_WARPS.value, _NUM_STAGES.value)]


def measure(k: int, n: int, bandwidth: float, interpret: bool) -> list[dict]:
    """The rows of one KxN weight shape: XLA's dot, then each Pallas tiling."""
    rng = np.random.default_rng(k * n)
    layers = _LAYERS.value
    weights = [jnp.asarray((rng.standard_normal((k, n), np.float32) * k**-0.5)
                           .astype(jnp.bfloat16)) for _ in range(layers)]
    x = jnp.asarray(rng.standard_normal(k, np.float32).astype(jnp.bfloat16))
    nbytes = k * n * 2
    products = [("xla", dict(), lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32
                                                        ).astype(x.dtype))]
    for s in settings():
        splits = splits_for(k, n, s["block_n"], _BLOCK_K.value, s["programs"])
        if splits is None:
            continue
        kw = dict(block_n=s["block_n"], splits=splits, block_k=_BLOCK_K.value,
                  num_warps=s["num_warps"], num_stages=s["num_stages"])
        name = (f"pallas bn{s['block_n']} s{splits} w{s['num_warps']} st{s['num_stages']}")
        if any(name == p[0] for p in products):
            continue
        products.append((name, kw, functools.partial(gemv_pallas, interpret=interpret, **kw)))
    options = decode_compiler_options(1, jax.default_backend()) or None
    rows = []
    for name, kw, product in products:
        row = dict(shape=f"{k}x{n}", impl=name, **kw)
        try:
            row["rel_err"] = check(jax.jit(product), x, weights[0])
            if not row["rel_err"] <= TOLERANCE:
                row["error"] = "differs from the float64 product"
            else:
                fn = jax.jit(chain(product)).lower(x, weights).compile(compiler_options=options)
                seconds = time_chain(fn, x, weights, _REPEATS.value) / layers
                row.update(us=seconds * 1e6, bandwidth_fraction=nbytes / seconds / bandwidth)
                busy, count = kernel_time(fn, x, weights)
                row.update(kernel_us=busy / layers * 1e6, kernels_per_product=count / layers,
                           kernel_bandwidth_fraction=nbytes * layers / busy / bandwidth)
        except Exception as e:  # noqa: BLE001 - a tiling Triton refuses is recorded
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv):
    del argv
    interpret = jax.default_backend() != "gpu"
    bandwidth = copy_bandwidth(_COPY_BYTES.value)
    device = jax.devices()[0]
    print(f"device {device.device_kind}, jax {jax.__version__}, copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s, Pallas {'interpreted' if interpret else 'on GPU'}")
    rows = []
    for shape in _SHAPES.value:
        k, n = (int(d) for d in shape.split("x"))
        rows += measure(k, n, bandwidth, interpret)
        if _OUT.value:
            with open(_OUT.value, "w") as f:
                json.dump(dict(device=device.device_kind, jax=jax.__version__,
                               copy_bandwidth=bandwidth, layers=_LAYERS.value,
                               interpret=interpret, results=rows), f, indent=2)
    print("| shape | impl | wall us | x copy bandwidth | kernel us | x copy bandwidth | "
          "kernels | rel err |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    nan = float("nan")
    for r in rows:
        print(f"| {r['shape']} | {r['impl']} | {r.get('us', nan):.1f} | "
              f"{r.get('bandwidth_fraction', nan):.2f} | {r.get('kernel_us', nan):.1f} | "
              f"{r.get('kernel_bandwidth_fraction', nan):.2f} | "
              f"{r.get('kernels_per_product', nan):.1f} | "
              f"{r.get('rel_err', nan):.1e} |" + (f" {r['error']}" if "error" in r else ""))


if __name__ == "__main__":
    app.run(main)
