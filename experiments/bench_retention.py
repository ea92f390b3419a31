"""Benchmark of chunkwise retention against cuDNN flash attention and fla's Triton kernels.

Times forward and forward+backward for fixed and gated decay on each shape, bf16, given as
BxTxHxD (q, k [B, T, H, D] and v [B, T, H, D]) or BxTxHxDkxDv (q, k [B, T, H, Dk], v
[B, T, H, Dv]: the presets' head shapes, e.g. 2x8192x8x256x512 for 1.3B), and in the same
process:
  * `jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn")`, skipped with
    the reason JAX gives for shapes it refuses (its API needs v shaped like k: Dk = Dv),
  * fla's `chunk_retention` / `chunk_simple_gla` when `fla` imports (torch + triton),
  * the plain scan-over-chunks prototype (`scan_prototype` below).
The Pallas kernels are skipped, with `kernels.unsupported_reason`'s reason, for head dims or
chunk sizes they do not take.

Timing: each implementation is called --warmup times after its first (compiling) call, then
again until --min_warmup_s seconds of warm-up have passed (every call synced; the same for
every implementation), then --runs timed runs, each the mean of --calls_per_run back-to-back
calls with one sync, inputs rotated between two fresh random sets. Reported: the median run,
with every run's time in the JSON row (`runs_ms`) and min-max in the tables.

Before timing, a correctness check on each --check_shape compares each implementation's
output and gradients with a float32 reference of the same function (`parallel_retention` on
upcast inputs, highest matmul precision) on the same device, printing relative errors
RMS(out - ref) / RMS(ref) (fla's metric) and max|out - ref| / max|ref|.

Roofline: bytes of q, k (Dk) and v, o (Dv) for the forward, plus dq, dk (Dk) and dv, do (Dv)
for the backward, over the measured device-to-device copy bandwidth (bytes read + written:
the fastest of JAX's bf16 and float32 negate and, with fla, torch's copy_), as a fraction of
the measured time.

  python experiments/bench_retention.py                     # full run (GPU)
  python experiments/bench_retention.py --smoke             # tiny shapes, runs on CPU
  python experiments/bench_retention.py --smoke --shapes=1x64x2x32x64   # --smoke fills in
                                                            # only the flags not given
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")  # leave room for torch (fla)

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from retnet_jax import kernels, retention  # noqa: E402
from retnet_jax.kernels.chunk_states import STATE_NUM_STAGES, STATE_NUM_WARPS  # noqa: E402
from retnet_jax.kernels.common import is_power_of_two  # noqa: E402
from retention_inputs import make_inputs, parse_shape  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["8x2048x16x128", "4x8192x16x128", "1x32768x16x128"],
                  "Shapes to time: BxTxHxD (Dk = Dv = D) or BxTxHxDkxDv.")
flags.DEFINE_bool("smoke", False, "Tiny shapes and few runs (checks the script on CPU); "
                  "flags given on the command line keep their values.")
flags.DEFINE_list("chunk_sizes", ["64", "128"], "Chunk sizes of ours to time.")
flags.DEFINE_list("impls", ["ours", "pallas", "autodiff", "scan", "cudnn", "fla"],
                  "ours: chunkwise_retention; pallas: kernels.chunkwise_retention_pallas "
                  "(fused output and gradient kernels; interpreted off GPU); autodiff: ours' forward with "
                  "JAX autodiff (fwd+bwd only, first chunk size); scan: the prototype (first "
                  "chunk size); cudnn: jax.nn.dot_product_attention; fla: fla's Triton kernels.")
flags.DEFINE_list("pallas_block_v", ["256"], "Most value columns per program of the Pallas "
                  "output kernel (powers of two); several are timed side by side, named "
                  "pallas_c<C>_bv<block_v>.")
flags.DEFINE_list("pallas_state_block_v", ["256"], "Most value columns per program of the "
                  "Pallas state kernel (powers of two); several: named ..._sbv<value>.")
flags.DEFINE_list("pallas_num_warps", ["auto"], "Triton warps per program of the Pallas "
                  "output kernel ('auto': its default, or a power of two); several: named "
                  "..._w<value>.")
flags.DEFINE_list("pallas_state_num_warps", [str(STATE_NUM_WARPS)], "Triton warps per "
                  "program of the Pallas state kernel (powers of two); several: named "
                  "..._sw<value>.")
flags.DEFINE_list("pallas_state_num_stages", [str(STATE_NUM_STAGES)], "Software-pipelining "
                  "stages of the Pallas state kernel's chunk loop; several: named "
                  "..._ss<value>.")
flags.DEFINE_list("pallas_segments", ["auto"], "Segments of the Pallas state kernel's chunk "
                  "loop ('auto': kernels' choice, or a number); several: named ..._seg<value>.")
flags.DEFINE_list("decays", ["fixed", "gated"], "Decay kinds.")
flags.DEFINE_list("modes", ["fwd", "fwdbwd"], "fwd and/or fwdbwd (forward+backward).")
flags.DEFINE_integer("runs", 20, "Timed runs (median reported).")
flags.DEFINE_integer("calls_per_run", 5, "Back-to-back calls per timed run.")
flags.DEFINE_integer("warmup", 3, "Warm-up calls (after compilation).")
flags.DEFINE_float("min_warmup_s", 2.0, "After the --warmup calls, keep calling (and syncing) "
                   "each implementation until this many seconds of warm-up have passed.")
flags.DEFINE_list("check_shape", ["2x4096x16x128"],
                  "Shapes of the correctness check, BxTxHxD or BxTxHxDkxDv ('' skips).")
flags.DEFINE_string("out", "", "Write all results as JSON here.")
flags.DEFINE_string("hlo_dir", "", "Dump optimized HLO of ours (first chunk size, 2nd shape).")
flags.DEFINE_float("time_budget_s", 1e9, "Skip remaining timings after this many seconds.")
flags.DEFINE_string("triton_cache_dir", "", "Keep Triton's compiled kernels and fla's autotuning "
                    "results in this folder (TRITON_CACHE_DIR, TRITON_CACHE_AUTOTUNING=1), so a "
                    "later process on a fresh machine that is given the folder skips fla's "
                    "minutes of autotuning; '' leaves Triton's defaults.")

RESULTS: dict = {"env": {}, "bandwidth": {}, "checks": [], "timings": []}
_START = time.time()
SMOKE_DEFAULTS = {"shapes": ["2x256x4x32", "1x1024x2x32x64"], "chunk_sizes": ["16", "32"],
                  "check_shape": ["1x128x2x32x64"], "runs": 3, "calls_per_run": 1,
                  "warmup": 1, "min_warmup_s": 0.0}


def shape_fields(shape_text: str) -> dict:
    """The JSON row fields naming a shape: its text and its key and value head dims."""
    *_, key_dim, value_dim = parse_shape(shape_text)
    return {"shape": shape_text, "key_dim": key_dim, "value_dim": value_dim}


def save() -> None:
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(RESULTS, f, indent=1)


# ------------------------------------------------------------------------------- inputs


# ------------------------------------------------------------------------------ prototype


def _split_chunks(x, chunk_size: int):
    """[B, N*C, ...] -> [B, N, C, ...]."""
    return x.reshape(x.shape[0], -1, chunk_size, *x.shape[2:])


def scan_prototype(q, k, v, log_decay, *, chunk_size: int = 64, initial_state=None):
    """The plain chunkwise form before the performance work (no validation, autodiff
    gradients): per-chunk masks materialised in [B, N, C, H] layout and a `lax.scan` with one
    step per chunk. The benchmark's prototype baseline (impl 'scan'), checked for correctness
    like every impl.
    """
    batch, time, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    if initial_state is None:
        initial_state = retention.zero_state(batch, heads, key_dim, value_dim)
    chunk_size = int(min(chunk_size, time))
    padding = -time % chunk_size
    a = retention._per_token_log_decay(log_decay, batch, time, heads)
    qc, kc, vc, ac = (_split_chunks(retention._pad_time(x, padding), chunk_size)
                      for x in (q, k, v, a))
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

    k_to_end = (kc * jnp.exp(g[:, :, None] - b)[..., None]).astype(kc.dtype)
    chunk_kv = jnp.einsum("bnjhd,bnjhe->nbhde", k_to_end, vc, preferred_element_type=jnp.float32)

    def carry_state(state, x):
        chunk_decay, kv = x                                       # [B, H], [B, H, Dk, Dv]
        return jnp.exp(chunk_decay)[..., None, None] * state + kv, state

    final_state, states_before = jax.lax.scan(
        carry_state, initial_state.astype(jnp.float32), (jnp.moveaxis(g, 1, 0), chunk_kv))

    q_decayed = (qc * jnp.exp(b)[..., None]).astype(qc.dtype)
    o_inter = jnp.einsum("bnihd,nbhde->bnihe", q_decayed, states_before.astype(qc.dtype),
                         preferred_element_type=jnp.float32)
    o = (o_intra + o_inter).reshape(batch, -1, heads, value_dim)[:, :time]
    return o.astype(v.dtype), final_state


# ------------------------------------------------------------------------------ timing


def warm_up(call, inputs_list, sync) -> dict:
    """FLAGS.warmup calls, then more until FLAGS.min_warmup_s seconds have passed since the
    first, each synced. Returns {'warmup_calls': n, 'warmup_s': seconds}."""
    start = time.perf_counter()
    calls = 0
    while calls < FLAGS.warmup or time.perf_counter() - start < FLAGS.min_warmup_s:
        sync(call(*inputs_list[calls % len(inputs_list)]))
        calls += 1
    return {"warmup_calls": calls, "warmup_s": time.perf_counter() - start}


def median_ms(call, inputs_list, sync) -> tuple[float, list[float], dict]:
    """Median over FLAGS.runs of the mean time of FLAGS.calls_per_run calls, in ms, after
    `warm_up`. Returns (median, every run's ms, warm_up's dict)."""
    warmup = warm_up(call, inputs_list, sync)
    times = []
    for r in range(FLAGS.runs):
        start = time.perf_counter()
        out = None
        for c in range(FLAGS.calls_per_run):
            out = call(*inputs_list[(r * FLAGS.calls_per_run + c) % len(inputs_list)])
        sync(out)
        times.append((time.perf_counter() - start) * 1e3 / FLAGS.calls_per_run)
    return statistics.median(times), times, warmup


def jax_sync(x):
    jax.block_until_ready(x)


def ours_fn(impl: str, chunk_size: int, tiling: dict | None = None):
    if impl == "scan":
        return lambda q, k, v, a: scan_prototype(q, k, v, a, chunk_size=chunk_size)[0]
    if impl == "autodiff":
        return lambda q, k, v, a: retention._chunkwise_forward(
            q, k, v, a, retention.zero_state(q.shape[0], q.shape[2], q.shape[3], v.shape[3]),
            chunk_size, False)[0]
    if impl == "pallas":
        return lambda q, k, v, a: kernels.chunkwise_retention_pallas(
            q, k, v, a, chunk_size=chunk_size, interpret=jax.default_backend() != "gpu",
            **(tiling or {}))[0]
    return lambda q, k, v, a: retention.chunkwise_retention(q, k, v, a,
                                                            chunk_size=chunk_size)[0]


def cudnn_fn():
    return lambda q, k, v, a: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                           implementation="cudnn")


def cudnn_unsupported_reason(shape) -> str | None:
    """Why cuDNN attention cannot run on q, k [B, T, H, Dk], v [B, T, H, Dv] here, or None.

    Asks JAX by tracing the call on abstract bf16 inputs: its API refuses v shaped unlike k
    (Dk != Dv), its cuDNN path refuses head dims cuDNN lacks, and it raises off a GPU.
    """
    b, t, h, dk, dv = shape
    spec = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.bfloat16)
    try:
        jax.eval_shape(cudnn_fn(), spec(b, t, h, dk), spec(b, t, h, dk), spec(b, t, h, dv),
                       spec(h))
    except Exception as e:  # noqa: BLE001 - whatever JAX raises is the reason to skip
        return (f"jax.nn.dot_product_attention(implementation='cudnn') refuses q, k "
                f"[..., {dk}], v [..., {dv}]: {type(e).__name__}: {str(e)[:200]}")
    if jax.default_backend() != "gpu":
        return f"backend {jax.default_backend()!r} is not a GPU"
    return None


def pallas_variants(shape, chunk_size: int) -> list[tuple[str, str | None, dict]]:
    """(name, why the kernels refuse it or None, tiling kwargs) for each combination of
    --pallas_block_v, --pallas_state_block_v, --pallas_segments, --pallas_num_warps,
    --pallas_state_num_warps and --pallas_state_num_stages at this shape's head dims and chunk
    size; named pallas_c<C>, plus _bv / _sbv / _seg / _w / _sw / _ss<value> for each flag
    with several values."""
    *_, key_dim, value_dim = shape
    axes = [("bv", "block_v", [int(b) for b in FLAGS.pallas_block_v]),
            ("sbv", "state_block_v", [int(b) for b in FLAGS.pallas_state_block_v]),
            ("seg", "segments", [None if s == "auto" else int(s) for s in FLAGS.pallas_segments]),
            ("w", "num_warps", [None if w == "auto" else int(w) for w in FLAGS.pallas_num_warps]),
            ("sw", "state_num_warps", [int(w) for w in FLAGS.pallas_state_num_warps]),
            ("ss", "state_num_stages", [int(n) for n in FLAGS.pallas_state_num_stages])]
    variants = []
    for values in itertools.product(*(choices for _, _, choices in axes)):
        tiling = {arg: value for (_, arg, _), value in zip(axes, values)}
        name = f"pallas_c{chunk_size}" + "".join(
            f"_{tag}{'auto' if value is None else value}"
            for (tag, _, choices), value in zip(axes, values) if len(choices) > 1)
        variants.append((name, kernels.unsupported_reason(
            key_dim, value_dim, chunk_size, block_v=tiling["block_v"]), tiling))
    return variants


def jax_call(fn, mode: str, gated: bool):
    """jit of fn (forward) or of its vjp (forward+backward; log_decay only when gated).

    forward+backward returns the output too, as training uses it: a jit returning only the
    gradients lets XLA drop the forward's output computation as dead code.
    """
    if mode == "fwd":
        return jax.jit(lambda q, k, v, a, do: fn(q, k, v, a))
    if gated:
        def fwdbwd(q, k, v, a, do):
            o, pullback = jax.vjp(fn, q, k, v, a)
            return o, pullback(do)
    else:
        def fwdbwd(q, k, v, a, do):
            o, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, a), q, k, v)
            return o, pullback(do)
    return jax.jit(fwdbwd)


# --------------------------------------------------------------------------------- fla


def use_triton_cache(folder: str) -> int:
    """Points Triton's cache and its autotuning cache at folder (before torch / fla import)
    and returns how many autotuning results it already holds (0: fla will autotune)."""
    folder = os.path.abspath(os.path.expanduser(folder))
    os.makedirs(folder, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = folder
    os.environ["TRITON_CACHE_AUTOTUNING"] = "1"
    return sum(name.endswith(".autotune.json")
               for _, _, names in os.walk(folder) for name in names)


def load_fla():
    try:
        import torch
        if not torch.cuda.is_available():
            return None, "torch sees no GPU"
        from fla.ops.retention import chunk_retention
        from fla.ops.simple_gla import chunk_simple_gla
        import fla
        return (torch, chunk_retention, chunk_simple_gla, getattr(fla, "__version__", "?")), None
    except Exception as e:  # noqa: BLE001 - optional baseline
        return None, f"{type(e).__name__}: {e}"


def to_torch(torch, x):
    arr = np.asarray(jnp.asarray(x, jnp.float32))
    t = torch.from_numpy(arr).cuda()
    return t.to(torch.bfloat16) if x.dtype == jnp.bfloat16 else t


def fla_call(fla, mode: str, gated: bool):
    torch, chunk_retention, chunk_simple_gla, _ = fla

    def forward(q, k, v, g):
        if gated:
            return chunk_simple_gla(q, k, v, g=g, scale=1.0)[0]
        return chunk_retention(q, k, v, scale=1.0)[0]

    if mode == "fwd":
        def call(q, k, v, g, do):
            with torch.no_grad():
                return forward(q, k, v, g)
        return call

    def call(q, k, v, g, do):
        leaves = [q, k, v] + ([g] if gated else [])
        o = forward(q, k, v, g)
        return torch.autograd.grad(o, leaves, do)
    return call


def fla_inputs(fla, inputs, mode: str, gated: bool):
    torch = fla[0]
    q, k, v, a, do = inputs
    ts = [to_torch(torch, x) for x in (q, k, v)]
    g = to_torch(torch, a) if gated else None
    if mode == "fwdbwd":
        for t in ts:
            t.requires_grad_(True)
        if g is not None:
            g.requires_grad_(True)
    return ts + [g, to_torch(torch, do)]


def torch_sync(torch):
    return lambda _: torch.cuda.synchronize()


# ---------------------------------------------------------------------------- roofline


def measure_bandwidth(fla) -> None:
    """Device-to-device copy bandwidth (read + write bytes / s) and a bf16 matmul rate."""
    n = (1 << 29) if not FLAGS.smoke else (1 << 20)      # 1 GiB of bf16
    neg = jax.jit(lambda x: -x)
    for key, dtype, size in (("jax_negate_GBps", jnp.bfloat16, n),
                             ("jax_negate_f32_GBps", jnp.float32, n // 2)):
        x = jax.random.normal(jax.random.PRNGKey(0), (size,), dtype)
        ms, _, _ = median_ms(neg, [(x,)], jax_sync)
        RESULTS["bandwidth"][key] = 2 * x.nbytes / ms / 1e6
        del x
    if fla is not None:
        torch = fla[0]
        src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
        dst = torch.empty_like(src)
        ms, _, _ = median_ms(lambda: dst.copy_(src), [()], torch_sync(torch))
        RESULTS["bandwidth"]["torch_copy_GBps"] = 2 * src.nbytes / ms / 1e6
        del src, dst
    m = 8192 if not FLAGS.smoke else 256
    a = jax.random.normal(jax.random.PRNGKey(1), (m, m), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(2), (m, m), jnp.bfloat16)
    ms, _, _ = median_ms(jax.jit(jnp.matmul), [(a, b)], jax_sync)
    RESULTS["bandwidth"]["jax_bf16_matmul_TFLOPs"] = 2 * m ** 3 / ms / 1e9
    bw = max(RESULTS["bandwidth"][key] for key in
             ("torch_copy_GBps", "jax_negate_GBps", "jax_negate_f32_GBps")
             if key in RESULTS["bandwidth"])
    RESULTS["bandwidth"]["used_GBps"] = bw
    print("bandwidth:", json.dumps(RESULTS["bandwidth"]), flush=True)


def min_bytes(shape, mode: str) -> int:
    """bf16 bytes of q, k [B, T, H, Dk] and v, o [B, T, H, Dv]; for fwdbwd also dq, dk and
    dv, do."""
    b, t, h, dk, dv = shape
    forward = b * t * h * 2 * (2 * dk + 2 * dv)
    return forward * (1 if mode == "fwd" else 2)


# ------------------------------------------------------------------------- correctness


def rel_errors(x, ref) -> dict:
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    finite = bool(np.isfinite(x).all())
    rms = float(np.sqrt(np.mean((x - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))
    mx = float(np.abs(x - ref).max() / np.abs(ref).max())
    return {"rms_rel": rms, "max_rel": mx, "finite": finite}


def check_correctness(fla, shape_text: str) -> None:
    """Output and gradients of each implementation (first chunk size) against the float32
    reference on one shape, for each decay kind; a refused or failing one is recorded and
    the others still run."""
    shape = parse_shape(shape_text, "check_shape")
    chunk = int(FLAGS.chunk_sizes[0])
    for decay in FLAGS.decays:
        gated = decay == "gated"
        inputs = make_inputs(100 + gated, shape, gated)
        q, k, v, a, do = inputs
        with jax.default_matmul_precision("highest"):
            f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
            ref_fn = lambda q, k, v, a: retention.parallel_retention(q, k, v, a)
            ref = jax.jit(lambda q, k, v, a, do: _grads_of(ref_fn, gated, q, k, v, a, do))(
                f32[0], f32[1], f32[2], a, f32[3])
        candidates = {f"ours_c{chunk}": ours_fn("ours", chunk)}
        pallas = pallas_variants(shape, chunk) if "pallas" in FLAGS.impls else []
        for name, reason, tiling in pallas:
            if reason:
                record_check(name, shape_text, decay, "all", {"skipped": reason})
            else:
                candidates[name] = ours_fn("pallas", chunk, tiling)
        if "scan" in FLAGS.impls:
            candidates[f"scan_c{chunk}"] = ours_fn("scan", chunk)
        for name, fn in candidates.items():
            starting(f"check {name}", shape_text, decay, "fwdbwd")
            try:
                got = jax.jit(lambda q, k, v, a, do, fn=fn: _grads_of(fn, gated, q, k, v, a, do))(
                    q, k, v, a, do)
            except Exception as e:  # noqa: BLE001 - record it, check the others
                record_check(name, shape_text, decay, "all", {"error": _error_text(e)})
                continue
            for n, x, r in zip(_output_names(gated), got, ref):
                record_check(name, shape_text, decay, n, rel_errors(x, r))
        if fla is not None and "fla" in FLAGS.impls:
            check_fla(fla, shape_text, decay, inputs, ref)
        del inputs, ref


def _output_names(gated: bool) -> list[str]:
    return ["o", "dq", "dk", "dv"] + (["dlog_decay"] if gated else [])


def _grads_of(fn, gated: bool, q, k, v, a, do):
    """(o, dq, dk, dv[, dlog_decay when gated]) of fn(q, k, v, a) against cotangent do."""
    if gated:
        o, pullback = jax.vjp(fn, q, k, v, a)
    else:
        o, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, a), q, k, v)
    return (o,) + tuple(pullback(do))


def check_fla(fla, shape_text: str, decay: str, inputs, ref) -> None:
    """fla's output and gradients on `inputs` against the reference outputs `ref`."""
    torch, chunk_retention, chunk_simple_gla, _ = fla
    gated = decay == "gated"
    starting("check fla", shape_text, decay, "fwdbwd")
    try:
        tin = fla_inputs(fla, inputs, "fwdbwd", gated)
        o = (chunk_simple_gla(*tin[:3], g=tin[3], scale=1.0) if gated
             else chunk_retention(*tin[:3], scale=1.0))[0]
        got = [o.detach()]
        try:
            leaves = tin[:3] + ([tin[3]] if gated else [])
            got += list(torch.autograd.grad(o, leaves, tin[4]))
        except Exception as e:  # noqa: BLE001
            record_check("fla", shape_text, decay, "backward", {"error": _error_text(e, 120)})
        for n, x, r in zip(_output_names(gated), got, ref):
            x = jnp.asarray(x.float().cpu().numpy())
            record_check("fla", shape_text, decay, n, rel_errors(x, r))
    except Exception as e:  # noqa: BLE001
        record_check("fla", shape_text, decay, "forward", {"error": _error_text(e)})


def _error_text(e: Exception, limit: int = 300) -> str:
    return f"{type(e).__name__}: {str(e)[:limit]}"


def record_check(impl, shape_text, decay, name, errs) -> None:
    RESULTS["checks"].append({"impl": impl, **shape_fields(shape_text), "decay": decay,
                              "output": name, **errs})
    print(f"check {impl:>10} {shape_text} {decay:>5} {name:>10}: " + " ".join(
        f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in errs.items()),
        flush=True)


# ------------------------------------------------------------------------------- main


def time_all(fla) -> None:
    """Times every asked implementation on every shape, decay kind and mode."""
    for si, shape_text in enumerate(FLAGS.shapes):
        shape = parse_shape(shape_text)
        for decay in FLAGS.decays:
            gated = decay == "gated"
            sets = [make_inputs(10 * si + s + 1000 * gated, shape, gated) for s in range(2)]
            for mode in FLAGS.modes:
                for name, fn in jax_variants(shape, shape_text, decay, mode):
                    if not over_budget(name, shape_text, decay, mode):
                        time_jax(name, fn, sets, si, shape_text, decay, mode)
                if "fla" in FLAGS.impls and fla is not None and not over_budget(
                        "fla", shape_text, decay, mode):
                    time_fla(fla, sets, shape_text, decay, mode)
            del sets


def jax_variants(shape, shape_text: str, decay: str, mode: str) -> list:
    """(name, fn) of each JAX implementation to time at this setting; Pallas chunk sizes and
    cuDNN shapes that are refused are recorded as skipped, with the reason."""
    chunks = [int(c) for c in FLAGS.chunk_sizes]
    variants = []
    if "ours" in FLAGS.impls:
        variants += [(f"ours_c{c}", ours_fn("ours", c)) for c in chunks]
    if "pallas" in FLAGS.impls:
        for c in chunks:
            for name, reason, tiling in pallas_variants(shape, c):
                if reason:
                    record_skip(name, shape_text, decay, mode, reason)
                else:
                    variants.append((name, ours_fn("pallas", c, tiling)))
    if "autodiff" in FLAGS.impls and mode == "fwdbwd":
        variants.append((f"autodiff_c{chunks[0]}", ours_fn("autodiff", chunks[0])))
    if "scan" in FLAGS.impls:
        variants.append((f"scan_c{chunks[0]}", ours_fn("scan", chunks[0])))
    if "cudnn" in FLAGS.impls and decay == "fixed":   # attention has no decay: timed once
        reason = cudnn_unsupported_reason(shape)
        if reason:
            record_skip("cudnn", shape_text, decay, mode, reason)
        else:
            variants.append(("cudnn", cudnn_fn()))
    return variants


def over_budget(name, shape_text, decay, mode) -> bool:
    if time.time() - _START <= FLAGS.time_budget_s:
        return False
    print("time budget spent; skipping", name, shape_text, decay, mode, flush=True)
    return True


def time_jax(name, fn, sets, si, shape_text, decay, mode) -> None:
    """Compiles, warms up and times one JAX implementation; records the row or the error."""
    starting(name, shape_text, decay, mode)
    try:
        call = jax_call(fn, mode, decay == "gated")
        if FLAGS.hlo_dir and si == min(1, len(FLAGS.shapes) - 1) and \
                name == f"ours_c{int(FLAGS.chunk_sizes[0])}" and decay == "fixed":
            os.makedirs(FLAGS.hlo_dir, exist_ok=True)
            text = call.lower(*sets[0]).compile().as_text()
            with open(os.path.join(FLAGS.hlo_dir, f"hlo_{mode}.txt"), "w") as f:
                f.write(text)
        t0 = time.time()
        jax_sync(call(*sets[0]))
        compile_s = time.time() - t0
        ms, runs, warmup = median_ms(call, sets, jax_sync)
        record(name, shape_text, decay, mode, ms, runs, compile_s, warmup)
    except Exception as e:  # noqa: BLE001
        record_error(name, shape_text, decay, mode, e)


def time_fla(fla, sets, shape_text, decay, mode) -> None:
    """The same for fla's Triton kernels (inputs copied to torch tensors first)."""
    gated = decay == "gated"
    starting("fla", shape_text, decay, mode)
    try:
        tsets = [fla_inputs(fla, s, mode, gated) for s in sets]
        call = fla_call(fla, mode, gated)
        t0 = time.time()
        call(*tsets[0])
        fla[0].cuda.synchronize()
        compile_s = time.time() - t0
        ms, runs, warmup = median_ms(call, tsets, torch_sync(fla[0]))
        record("fla", shape_text, decay, mode, ms, runs, compile_s, warmup)
        del tsets
    except Exception as e:  # noqa: BLE001
        record_error("fla", shape_text, decay, mode, e)


def starting(name, shape, decay, mode) -> None:
    """One line before each check and timing, so a hang (a stuck kernel, a Triton autotune
    that never ends) names its culprit in the log."""
    print(f"start {name} {shape} {decay} {mode} at {time.time() - _START:.0f}s", flush=True)


def record(name, shape, decay, mode, ms, runs, compile_s, warmup) -> None:
    """A timing row: median ms, every run's ms, roofline fraction, first call and warm-up."""
    floor_ms = min_bytes(parse_shape(shape), mode) / RESULTS["bandwidth"]["used_GBps"] / 1e6
    row = {"impl": name, **shape_fields(shape), "decay": decay, "mode": mode, "ms": ms,
           "runs_ms": runs, "roofline": floor_ms / ms, "first_call_s": compile_s, **warmup}
    RESULTS["timings"].append(row)
    save()
    print(f"time {name:>14} {shape:>16} {decay:>5} {mode:>6}: {ms:8.3f} ms "
          f"(spread {min(runs):.3f}-{max(runs):.3f}) roofline {floor_ms / ms:6.1%} "
          f"first call {compile_s:.1f}s, warm-up {warmup['warmup_calls']} calls in "
          f"{warmup['warmup_s']:.1f}s", flush=True)


def record_skip(name, shape, decay, mode, reason: str) -> None:
    RESULTS["timings"].append({"impl": name, **shape_fields(shape), "decay": decay,
                               "mode": mode, "skipped": reason})
    save()
    print(f"time {name:>14} {shape:>16} {decay:>5} {mode:>6}: SKIPPED {reason}", flush=True)


def record_error(name, shape, decay, mode, e) -> None:
    msg = _error_text(e)
    RESULTS["timings"].append({"impl": name, **shape_fields(shape), "decay": decay,
                               "mode": mode, "error": msg})
    save()
    print(f"time {name:>14} {shape:>16} {decay:>5} {mode:>6}: ERROR {msg}", flush=True)
    if os.environ.get("BENCH_TRACEBACK"):
        traceback.print_exc()


def summary() -> None:
    """One table: each impl's median ms, its runs' min-max, and its ratio to cudnn and fla
    (same shape/decay/mode)."""
    rows = [r for r in RESULTS["timings"] if "ms" in r]
    base = {(r["impl"], r["shape"], r["decay"], r["mode"]): r["ms"] for r in rows}
    print("\nsummary (ms: median, min-max of the runs; x = time / baseline time, < 1 is faster "
          "than the baseline)")
    print(f"{'impl':>14} {'shape':>18} {'decay':>5} {'mode':>6} {'ms':>8} {'min-max':>17} "
          f"{'/cudnn':>7} {'/fla':>7} {'roof':>6}")
    for r in rows:
        key = (r["shape"], r["decay"], r["mode"])
        cud = base.get(("cudnn", r["shape"], "fixed", r["mode"]))
        fl = base.get(("fla",) + key)
        fmt = lambda b: f"{r['ms'] / b:7.2f}" if b else f"{'-':>7}"
        spread = f"{min(r['runs_ms']):.3f}-{max(r['runs_ms']):.3f}"
        print(f"{r['impl']:>14} {r['shape']:>18} {r['decay']:>5} {r['mode']:>6} "
              f"{r['ms']:8.3f} {spread:>17} {fmt(cud)} {fmt(fl)} {r['roofline']:6.1%}")


def apply_smoke_defaults() -> None:
    """--smoke: SMOKE_DEFAULTS for every flag not given on the command line."""
    for name, value in SMOKE_DEFAULTS.items():
        if not FLAGS[name].present:
            setattr(FLAGS, name, value)


def main(argv) -> None:
    del argv
    if FLAGS.smoke:
        apply_smoke_defaults()
    for flag in ("shapes", "check_shape"):   # refuse a malformed shape before any device work
        for text in getattr(FLAGS, flag):
            parse_shape(text, flag)
    for flag in ("pallas_block_v", "pallas_state_block_v", "pallas_state_num_warps"):
        for text in getattr(FLAGS, flag):
            if not (text.isdigit() and is_power_of_two(int(text))):
                raise app.UsageError(f"--{flag}: {text!r} is not a power of two")
    for text in FLAGS.pallas_state_num_stages:
        if not (text.isdigit() and int(text) >= 1):
            raise app.UsageError(f"--pallas_state_num_stages: {text!r} is not a positive "
                                 f"number")
    for text in FLAGS.pallas_segments:
        if text != "auto" and not (text.isdigit() and int(text) >= 1):
            raise app.UsageError(f"--pallas_segments: {text!r} is neither 'auto' nor a "
                                 f"positive number")
    for text in FLAGS.pallas_num_warps:
        if text != "auto" and not (text.isdigit() and is_power_of_two(int(text))):
            raise app.UsageError(f"--pallas_num_warps: {text!r} is neither 'auto' nor a "
                                 f"power of two")
    cached = use_triton_cache(FLAGS.triton_cache_dir) if FLAGS.triton_cache_dir else None
    fla, why = load_fla() if "fla" in FLAGS.impls else (None, "not asked")
    RESULTS["env"] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind, "python": platform.python_version(),
        "argv": sys.argv, "fla": fla[3] if fla else f"unavailable ({why})",
        "torch": fla[0].__version__ if fla else None,
        "triton_cache_dir": FLAGS.triton_cache_dir or None,
        "cached_autotune_results": cached,
    }
    if fla:
        import triton
        RESULTS["env"]["triton"] = triton.__version__
    print("env:", json.dumps(RESULTS["env"]), flush=True)
    measure_bandwidth(fla)
    save()
    for shape_text in FLAGS.check_shape:
        check_correctness(fla, shape_text)
        save()
    time_all(fla)
    save()
    summary()


if __name__ == "__main__":
    app.run(main)
