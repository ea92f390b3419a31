"""Device ceilings measured in the same run as a benchmark: copy bandwidth and matmul rate.

Imported by the bench_* scripts (they run with experiments/ on sys.path).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np


def median_seconds(fn, *args, repeats: int = 10, calls: int = 1) -> float:
    """Median wall time of one fn(*args) after a warm-up call: each of `repeats` timings runs
    `calls` back-to-back calls and one sync, so that host dispatch stays out of short ones."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return float(np.median(times))


# Element types of the copy probe. On an H200, JAX's bf16 negate moved 3.1 TB/s where torch's
# copy_ moved 4.2 (BENCHMARKS.md, session 11); wider elements are the candidate remedy.
COPY_DTYPES = (jnp.bfloat16, jnp.float32)


def copy_bandwidth(num_bytes: int = 1 << 30) -> float:
    """Device-to-device bandwidth in bytes/s, counting bytes read plus bytes written: the
    fastest jitted negate of num_bytes of each of COPY_DTYPES."""
    return max(negate_bandwidth(num_bytes, dtype) for dtype in COPY_DTYPES)


def negate_bandwidth(num_bytes: int, dtype) -> float:
    """Read + write bytes/s of a jitted negate over num_bytes of random dtype elements."""
    size = num_bytes // jnp.dtype(dtype).itemsize
    x = jax.random.normal(jax.random.PRNGKey(0), (size,), dtype)
    seconds = median_seconds(jax.jit(lambda x: -x), x, calls=10)
    return 2 * x.nbytes / seconds


def matmul_tflops(n: int = 8192) -> float:
    """bf16 [n, n] x [n, n] matmul rate on random data, in TFLOP/s."""
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.bfloat16)
    return 2 * n**3 / median_seconds(jax.jit(jnp.matmul), a, b, calls=5) / 1e12
