"""Batch-1 decoding's matrix-vector products: XLA's GEMM against the Pallas GEMV kernel.

At batch 1 a decoded token is a chain of [1, K] x [K, N] products, one per weight, and the
weights are most of its bytes (BENCHMARKS.md "Decoding"). This times, for each weight shape
of the 1.3B preset's blocks, `--layers` products in a dependent chain (each input depends on
the previous output, as in a model; distinct weights, so none is served from L2), with
(a) XLA's dot under `generate`'s batch-1 options and (b) the library's GEMV kernel
(`kernels.projections_pallas`, what `decode_projections='pallas'` runs) at each tiling: one
program per (group of `block_n` output columns, split of K), each streaming its
[K / splits, block_n] weight tile in `block_k`-row steps and summing x_k * W[k, :] in
float32; XLA adds the splits' partial sums. A shape `KxN1+N2+...` is one input against
several weights kept apart, as the model keeps q, k, v and the gate: XLA gets one dot per
weight (and may fuse them), the kernel one call whose column groups span all of them, each
program reading only its own weight. With `--norm_prologue` each product first applies an
RMSNorm with a learned scale to x, as the blocks do before q|k|v|gate and the FFN: XLA in a
fusion of its own (the model's `layers.RMSNorm`), the kernel inside the GEMV (each program
reads all of x for its 1 / rms, then scales its rows as it streams them), so the kernel
count per product shows what the prologue saves. `--block_k` sweeps the kernel's K loop
(rows per step).
Each setting is checked against a float64 product before it is timed. Wall time per product
(`us`) includes the launches between kernels; then `--traced_calls` more calls are traced
and `kernel_us` is the median time the device ran kernels per product (the product's
kernels and the chain's one elementwise step), the number a decode loop run as one CUDA
graph sees (on a CPU: XLA's host ops, interpreted Pallas included).

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
from ceilings import copy_bandwidth
from retention_inputs import parse_weight_shape
from trace_kernels import busy_ns, device_kernels, trace_call
from retnet_jax.generate import decode_compiler_options
from retnet_jax.kernels.projections import default_splits, projections_pallas
from retnet_jax.layers import rms_normalize

_SHAPES = flags.DEFINE_list(
    "shapes", ["2048x11008", "2048x2048+2048+3456+3456", "3456x2048", "2048x6912",
               "2048x3456+3456", "2048x2048"],
    "KxN weight shapes (KxN1+N2+...: several weights kept apart, one input): the 1.3B "
    "block's q|k|v|gate as one weight and apart, out and FFN-out, FFN-in|gate as one and "
    "apart, and a square one.")
_LAYERS = flags.DEFINE_integer("layers", 24, "Distinct weights per chained call.")
_NORM_PROLOGUE = flags.DEFINE_bool("norm_prologue", False, "RMSNorm x (with a scale) before "
                                   "each product.")
_BLOCK_N = flags.DEFINE_list("block_n", ["64", "128"], "Output columns per program.")
_PROGRAMS = flags.DEFINE_list("programs", ["132", "264", "528"], "Least programs per "
                              "product: K splits are added until the grid reaches it.")
_BLOCK_K = flags.DEFINE_list("block_k", ["64"], "Weight rows per loop step (powers of two; "
                             "the kernel's default is default_block_k, 64 at these K).")
_NUM_WARPS = flags.DEFINE_list("num_warps", ["4"], "Triton warps per program.")
_NUM_STAGES = flags.DEFINE_list("num_stages", ["3"], "Triton pipeline stages of the K loop.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per setting (median reported).")
_COPY_BYTES = flags.DEFINE_integer("copy_bytes", 1 << 30, "Bytes of the copy-bandwidth probe.")
_TRACED_CALLS = flags.DEFINE_integer("traced_calls", 5, "Traced calls per setting (median "
                                     "kernel time reported).")
_TRACE_DIR = flags.DEFINE_string("trace_dir", "/tmp/bench_gemv_trace", "Where the traced "
                                 "calls' profiles go.")
_OUT = flags.DEFINE_string("out", None, "Write all results as JSON here.")

TOLERANCE = 2e-2     # bf16 output against float64
EPS = 1e-6           # the RMSNorm's


def pallas_product(x, weights, scale=None, **kw) -> list:
    """x [K] @ each weight through `kernels.projections_pallas` (one kernel; with scale,
    float32 [K], x RMS-normalised inside it), x's dtype out."""
    return [y[0].astype(x.dtype) for y in projections_pallas(
        x[None], weights, norm_scale=scale, norm_eps=EPS, **kw)]


def xla_product(x, weights, scale=None) -> list:
    """XLA's dot of x [K] with each weight, float32 accumulation, x's dtype out; with scale
    (float32 [K]), x first goes through the model's RMSNorm (`layers.RMSNorm`'s steps)."""
    if scale is not None:
        x = rms_normalize(x, EPS).astype(x.dtype) * scale.astype(x.dtype)
    return [jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
            for w in weights]


def splits_for(k: int, ns: list[int], block_n: int, block_k: int,
               programs: int) -> int | None:
    """`default_splits` for at least `programs` programs over the weights' column groups;
    None if block_n does not divide every N_i or block_k does not divide K."""
    if any(n % block_n for n in ns) or k % block_k:
        return None
    return default_splits(k, sum(ns), block_n=block_n, block_k=block_k,
                          min_programs=programs)


def chain(product):
    """jit((x [K], layers [L] of (scale [K] or None, [W][K, N_i])) -> x): L dependent
    products of W weights each, x scaled by the sum of every output's first entry, so every
    product waits for the one before, none can be merged, and XLA drops no weight's product
    as unused."""
    def run(x, layers):
        for scale, weights in layers:
            first = sum(y[0].astype(jnp.float32) for y in product(x, weights, scale))
            x = x * (1 + 1e-3 * jnp.tanh(first)).astype(x.dtype)
        return x
    return run


def check(product, x, layer) -> float:
    """Largest error of product(x, weights, scale) for one layer (scale, weights), all
    outputs, relative to the float64 products' largest entry."""
    scale, weights = layer
    wide = np.asarray(x, np.float64)
    if scale is not None:
        wide = wide / np.sqrt(np.mean(wide**2) + EPS) * np.asarray(scale, np.float64)
    want = np.concatenate([wide @ np.asarray(w, np.float64) for w in weights])
    got = np.concatenate([np.asarray(y, np.float64) for y in product(x, weights, scale)])
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
    """`--traced_calls` traced calls: (median seconds the device ran kernels, kernels launched
    in the first)."""
    busy, counts = [], []
    for _ in range(_TRACED_CALLS.value):
        _, trace = trace_call(fn, x, weights, trace_dir=_TRACE_DIR.value)
        kernels = device_kernels(trace)
        if not kernels:
            raise RuntimeError("the traced call holds no kernel events")
        busy.append(busy_ns(kernels) * 1e-9)
        counts.append(len(kernels))
    return statistics.median(busy), counts[0]


def settings() -> list[dict]:
    return [dict(block_n=int(bn), block_k=int(bk), programs=int(p), num_warps=int(w),
                 num_stages=int(s))
            for bn, bk, p, w, s in itertools.product(
                _BLOCK_N.value, _BLOCK_K.value, _PROGRAMS.value, _NUM_WARPS.value,
                _NUM_STAGES.value)]


def measure(k: int, ns: list[int], bandwidth: float, interpret: bool) -> list[dict]:
    """The rows of one weight shape (K rows; one weight per entry of ns): XLA's dots, then
    each Pallas tiling."""
    rng = np.random.default_rng(k * sum(ns) + len(ns))
    layers = _LAYERS.value
    def scale():
        return jnp.asarray(1 + 0.1 * rng.standard_normal(k, np.float32)) if (
            _NORM_PROLOGUE.value) else None
    weights = [(scale(), [jnp.asarray((rng.standard_normal((k, n), np.float32) * k**-0.5)
                                      .astype(jnp.bfloat16)) for n in ns])
               for _ in range(layers)]
    x = jnp.asarray((3 * rng.standard_normal(k, np.float32)).astype(jnp.bfloat16))
    nbytes = k * sum(ns) * 2
    products = [("xla", dict(), xla_product)]
    for s in settings():
        splits = splits_for(k, ns, s["block_n"], s["block_k"], s["programs"])
        if splits is None:
            continue
        kw = dict(block_n=s["block_n"], splits=splits, block_k=s["block_k"],
                  num_warps=s["num_warps"], num_stages=s["num_stages"])
        name = (f"pallas bn{s['block_n']} bk{s['block_k']} s{splits} w{s['num_warps']} "
                f"st{s['num_stages']}")
        if any(name == p[0] for p in products):
            continue
        products.append((name, kw, functools.partial(pallas_product, interpret=interpret,
                                                      **kw)))
    options = decode_compiler_options(1, jax.default_backend()) or None
    rows = []
    for name, kw, product in products:
        row = dict(shape=f"{k}x{'+'.join(map(str, ns))}", impl=name,
                   norm_prologue=_NORM_PROLOGUE.value, **kw)
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
    for k, ns in [parse_weight_shape(shape) for shape in _SHAPES.value]:
        rows += measure(k, ns, bandwidth, interpret)
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
