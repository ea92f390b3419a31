"""Benchmark of chunkwise retention against cuDNN flash attention and fla's Triton kernels.

Times forward and forward+backward (median of --runs timed runs after warm-up, each run the
mean of --calls_per_run back-to-back calls, inputs rotated between two fresh random sets) for
fixed and gated decay on each shape [B, T, H, D] (D = Dk = Dv, bf16), and in the same process:
  * `jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn")`,
  * fla's `chunk_retention` / `chunk_simple_gla` when `fla` imports (torch + triton),
  * the plain scan-over-chunks prototype (`scan_prototype` below).
Before timing, a correctness check on --check_shape compares each implementation's output and
gradients with a float32 reference of the same function (`parallel_retention` on upcast
inputs, highest matmul precision) on the same device, printing relative errors
RMS(out - ref) / RMS(ref) (fla's metric) and max|out - ref| / max|ref|.

Roofline: bytes of q, k, v, o (forward) plus dq, dk, dv, do (backward) over the measured
device-to-device copy bandwidth (bytes read + written), as a fraction of the measured time.

  python experiments/bench_retention.py                     # full run (GPU)
  python experiments/bench_retention.py --smoke             # tiny shapes, runs on CPU
"""

from __future__ import annotations

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

from retnet_jax import kernels, positions, retention  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["8x2048x16x128", "4x8192x16x128", "1x32768x16x128"],
                  "Shapes BxTxHxD to time.")
flags.DEFINE_bool("smoke", False, "Tiny shapes and few runs (checks the script on CPU).")
flags.DEFINE_list("chunk_sizes", ["64", "128"], "Chunk sizes of ours to time.")
flags.DEFINE_list("impls", ["ours", "pallas", "autodiff", "scan", "cudnn", "fla"],
                  "ours: chunkwise_retention; pallas: kernels.chunkwise_retention_pallas "
                  "(fused output and gradient kernels; interpreted off GPU); autodiff: ours' forward with "
                  "JAX autodiff (fwd+bwd only, first chunk size); scan: the prototype (first "
                  "chunk size); cudnn: jax.nn.dot_product_attention; fla: fla's Triton kernels.")
flags.DEFINE_integer("pallas_block_v", 64, "Value columns per program of the Pallas kernel.")
flags.DEFINE_list("decays", ["fixed", "gated"], "Decay kinds.")
flags.DEFINE_list("modes", ["fwd", "fwdbwd"], "fwd and/or fwdbwd (forward+backward).")
flags.DEFINE_integer("runs", 20, "Timed runs (median reported).")
flags.DEFINE_integer("calls_per_run", 5, "Back-to-back calls per timed run.")
flags.DEFINE_integer("warmup", 3, "Warm-up calls (after compilation).")
flags.DEFINE_string("check_shape", "2x4096x16x128", "Shape of the correctness check ('' skips).")
flags.DEFINE_string("out", "", "Write all results as JSON here.")
flags.DEFINE_string("hlo_dir", "", "Dump optimized HLO of ours (first chunk size, 2nd shape).")
flags.DEFINE_float("time_budget_s", 1e9, "Skip remaining timings after this many seconds.")

RESULTS: dict = {"env": {}, "bandwidth": {}, "checks": [], "timings": []}
_START = time.time()


def parse_shape(text: str) -> tuple[int, int, int, int]:
    b, t, h, d = (int(x) for x in text.lower().split("x"))
    return b, t, h, d


def save() -> None:
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(RESULTS, f, indent=1)


# ------------------------------------------------------------------------------- inputs


def make_inputs(seed: int, shape, gated: bool, dtype=jnp.bfloat16):
    """q (scaled by D^-0.5), k, v, do [B, T, H, D] in dtype; log_decay [H] or f32 [B, T, H]."""
    b, t, h, d = shape
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = (jax.random.normal(ks[0], (b, t, h, d)) * d ** -0.5).astype(dtype)
    k = jax.random.normal(ks[1], (b, t, h, d)).astype(dtype)
    v = jax.random.normal(ks[2], (b, t, h, d)).astype(dtype)
    do = jax.random.normal(ks[3], (b, t, h, d)).astype(dtype)
    if gated:  # log-sigmoid gates, mostly near 0 with a tail down to ~ -5
        log_decay = jax.nn.log_sigmoid(jax.random.normal(ks[4], (b, t, h)) + 3.0)
    else:
        log_decay = positions.decay_log_gammas(h)  # = fla's chunk_retention decays
    return q, k, v, log_decay, do


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


def median_ms(call, inputs_list, sync) -> tuple[float, list[float]]:
    """Median over FLAGS.runs of the mean time of FLAGS.calls_per_run calls, in ms."""
    for i in range(FLAGS.warmup):
        sync(call(*inputs_list[i % len(inputs_list)]))
    times = []
    for r in range(FLAGS.runs):
        start = time.perf_counter()
        out = None
        for c in range(FLAGS.calls_per_run):
            out = call(*inputs_list[(r * FLAGS.calls_per_run + c) % len(inputs_list)])
        sync(out)
        times.append((time.perf_counter() - start) * 1e3 / FLAGS.calls_per_run)
    return statistics.median(times), times


def jax_sync(x):
    jax.block_until_ready(x)


def ours_fn(impl: str, chunk_size: int):
    if impl == "scan":
        return lambda q, k, v, a: scan_prototype(q, k, v, a, chunk_size=chunk_size)[0]
    if impl == "autodiff":
        return lambda q, k, v, a: retention._chunkwise_forward(
            q, k, v, a, retention.zero_state(q.shape[0], q.shape[2], q.shape[3], v.shape[3]),
            chunk_size, False)[0]
    if impl == "pallas":
        return lambda q, k, v, a: kernels.chunkwise_retention_pallas(
            q, k, v, a, chunk_size=chunk_size, block_v=FLAGS.pallas_block_v,
            interpret=jax.default_backend() != "gpu")[0]
    return lambda q, k, v, a: retention.chunkwise_retention(q, k, v, a,
                                                            chunk_size=chunk_size)[0]


def cudnn_fn():
    return lambda q, k, v, a: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                           implementation="cudnn")


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
    x = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.bfloat16)
    neg = jax.jit(lambda x: -x)
    ms, _ = median_ms(neg, [(x,)], jax_sync)
    RESULTS["bandwidth"]["jax_negate_GBps"] = 2 * x.nbytes / ms / 1e6
    del x
    if fla is not None:
        torch = fla[0]
        src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
        dst = torch.empty_like(src)
        ms, _ = median_ms(lambda: dst.copy_(src), [()], torch_sync(torch))
        RESULTS["bandwidth"]["torch_copy_GBps"] = 2 * src.nbytes / ms / 1e6
        del src, dst
    m = 8192 if not FLAGS.smoke else 256
    a = jax.random.normal(jax.random.PRNGKey(1), (m, m), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(2), (m, m), jnp.bfloat16)
    ms, _ = median_ms(jax.jit(jnp.matmul), [(a, b)], jax_sync)
    RESULTS["bandwidth"]["jax_bf16_matmul_TFLOPs"] = 2 * m ** 3 / ms / 1e9
    bw = RESULTS["bandwidth"].get("torch_copy_GBps", RESULTS["bandwidth"]["jax_negate_GBps"])
    RESULTS["bandwidth"]["used_GBps"] = bw
    print("bandwidth:", json.dumps(RESULTS["bandwidth"]), flush=True)


def min_bytes(shape, mode: str) -> int:
    b, t, h, d = shape
    tensor = b * t * h * d * 2
    return tensor * (4 if mode == "fwd" else 8)


# ------------------------------------------------------------------------- correctness


def rel_errors(x, ref) -> dict:
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    finite = bool(np.isfinite(x).all())
    rms = float(np.sqrt(np.mean((x - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))
    mx = float(np.abs(x - ref).max() / np.abs(ref).max())
    return {"rms_rel": rms, "max_rel": mx, "finite": finite}


def check_correctness(fla) -> None:
    shape = parse_shape(FLAGS.check_shape)
    chunk = int(FLAGS.chunk_sizes[0])
    for decay in FLAGS.decays:
        gated = decay == "gated"
        inputs = make_inputs(100 + gated, shape, gated)
        q, k, v, a, do = inputs
        argnums = (0, 1, 2, 3) if gated else (0, 1, 2)
        names = ["o", "dq", "dk", "dv"] + (["dlog_decay"] if gated else [])

        def grads_of(fn, q, k, v, a, do):
            o, pullback = jax.vjp(fn, *(q, k, v, a)[:len(argnums)], *(() if gated else (a,)))
            return (o,) + tuple(pullback(do)[:len(argnums)])

        with jax.default_matmul_precision("highest"):
            f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
            ref_fn = lambda q, k, v, a: retention.parallel_retention(q, k, v, a)
            ref = jax.jit(lambda q, k, v, a, do: grads_of(ref_fn, q, k, v, a, do))(
                f32[0], f32[1], f32[2], a, f32[3])
        candidates = {f"ours_c{chunk}": ours_fn("ours", chunk)}
        if "pallas" in FLAGS.impls:
            candidates[f"pallas_c{chunk}"] = ours_fn("pallas", chunk)
        if "scan" in FLAGS.impls:
            candidates[f"scan_c{chunk}"] = ours_fn("scan", chunk)
        for name, fn in candidates.items():
            starting(f"check {name}", FLAGS.check_shape, decay, "fwdbwd")
            got = jax.jit(lambda q, k, v, a, do, fn=fn: grads_of(fn, q, k, v, a, do))(
                q, k, v, a, do)
            for n, x, r in zip(names, got, ref):
                record_check(name, decay, n, rel_errors(x, r))
        if fla is not None and "fla" in FLAGS.impls:
            torch = fla[0]
            starting("check fla", FLAGS.check_shape, decay, "fwdbwd")
            try:
                tin = fla_inputs(fla, inputs, "fwdbwd", gated)
                _, cr, csg, _ = fla
                o = (csg(*tin[:3], g=tin[3], scale=1.0) if gated
                     else cr(*tin[:3], scale=1.0))[0]
                got = [o.detach()]
                try:
                    leaves = tin[:3] + ([tin[3]] if gated else [])
                    got += list(torch.autograd.grad(o, leaves, tin[4]))
                except Exception as e:  # noqa: BLE001
                    record_check("fla", decay, "backward", {"error": f"{type(e).__name__}: "
                                                            f"{str(e)[:120]}"})
                for n, x, r in zip(names, got, ref):
                    x = jnp.asarray(x.float().cpu().numpy())
                    record_check("fla", decay, n, rel_errors(x, r))
            except Exception as e:  # noqa: BLE001
                record_check("fla", decay, "forward", {"error": f"{type(e).__name__}: {e}"})
        del inputs, ref


def record_check(impl, decay, name, errs) -> None:
    RESULTS["checks"].append({"impl": impl, "decay": decay, "output": name, **errs})
    print(f"check {impl:>10} {decay:>5} {name:>10}: " + " ".join(
        f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in errs.items()),
        flush=True)


# ------------------------------------------------------------------------------- main


def time_all(fla) -> None:
    bw = RESULTS["bandwidth"]["used_GBps"]
    chunks = [int(c) for c in FLAGS.chunk_sizes]
    for si, shape_text in enumerate(FLAGS.shapes):
        shape = parse_shape(shape_text)
        for decay in FLAGS.decays:
            gated = decay == "gated"
            sets = [make_inputs(10 * si + s + 1000 * gated, shape, gated) for s in range(2)]
            for mode in FLAGS.modes:
                variants = []
                if "ours" in FLAGS.impls:
                    variants += [(f"ours_c{c}", ours_fn("ours", c)) for c in chunks]
                if "pallas" in FLAGS.impls:
                    variants += [(f"pallas_c{c}", ours_fn("pallas", c)) for c in chunks]
                if "autodiff" in FLAGS.impls and mode == "fwdbwd":
                    variants.append((f"autodiff_c{chunks[0]}", ours_fn("autodiff", chunks[0])))
                if "scan" in FLAGS.impls:
                    variants.append((f"scan_c{chunks[0]}", ours_fn("scan", chunks[0])))
                if "cudnn" in FLAGS.impls and jax.default_backend() == "gpu" and not gated:
                    variants.append(("cudnn", cudnn_fn()))
                for name, fn in variants:
                    if time.time() - _START > FLAGS.time_budget_s:
                        print("time budget spent; skipping", name, shape_text, decay, mode)
                        continue
                    starting(name, shape_text, decay, mode)
                    try:
                        call = jax_call(fn, mode, gated)
                        if FLAGS.hlo_dir and si == min(1, len(FLAGS.shapes) - 1) and \
                                name == f"ours_c{chunks[0]}" and not gated:
                            os.makedirs(FLAGS.hlo_dir, exist_ok=True)
                            text = call.lower(*sets[0]).compile().as_text()
                            with open(os.path.join(FLAGS.hlo_dir, f"hlo_{mode}.txt"), "w") as f:
                                f.write(text)
                        t0 = time.time()
                        jax_sync(call(*sets[0]))
                        compile_s = time.time() - t0
                        ms, runs = median_ms(call, sets, jax_sync)
                        record(name, shape_text, decay, mode, ms, runs, bw, compile_s)
                    except Exception as e:  # noqa: BLE001
                        record_error(name, shape_text, decay, mode, e)
                if "fla" in FLAGS.impls and fla is not None:
                    if time.time() - _START > FLAGS.time_budget_s:
                        continue
                    starting("fla", shape_text, decay, mode)
                    try:
                        tsets = [fla_inputs(fla, s, mode, gated) for s in sets]
                        call = fla_call(fla, mode, gated)
                        t0 = time.time()
                        call(*tsets[0])
                        fla[0].cuda.synchronize()
                        compile_s = time.time() - t0
                        ms, runs = median_ms(call, tsets, torch_sync(fla[0]))
                        record("fla", shape_text, decay, mode, ms, runs, bw, compile_s)
                        del tsets
                    except Exception as e:  # noqa: BLE001
                        record_error("fla", shape_text, decay, mode, e)
            del sets


def starting(name, shape, decay, mode) -> None:
    """One line before each check and timing, so a hang (a stuck kernel, a Triton autotune
    that never ends) names its culprit in the log."""
    print(f"start {name} {shape} {decay} {mode} at {time.time() - _START:.0f}s", flush=True)


def record(name, shape, decay, mode, ms, runs, bw, compile_s) -> None:
    floor_ms = min_bytes(parse_shape(shape), mode) / bw / 1e6
    row = {"impl": name, "shape": shape, "decay": decay, "mode": mode, "ms": ms,
           "runs_ms": runs, "roofline": floor_ms / ms, "first_call_s": compile_s}
    RESULTS["timings"].append(row)
    save()
    print(f"time {name:>14} {shape:>16} {decay:>5} {mode:>6}: {ms:8.3f} ms "
          f"(spread {min(runs):.3f}-{max(runs):.3f}) roofline {floor_ms / ms:6.1%} "
          f"first call {compile_s:.1f}s", flush=True)


def record_error(name, shape, decay, mode, e) -> None:
    msg = f"{type(e).__name__}: {str(e)[:300]}"
    RESULTS["timings"].append({"impl": name, "shape": shape, "decay": decay, "mode": mode,
                               "error": msg})
    save()
    print(f"time {name:>14} {shape:>16} {decay:>5} {mode:>6}: ERROR {msg}", flush=True)
    if os.environ.get("BENCH_TRACEBACK"):
        traceback.print_exc()


def summary() -> None:
    """One table: each impl's ms and its ratio to cudnn and fla (same shape/decay/mode)."""
    rows = [r for r in RESULTS["timings"] if "ms" in r]
    base = {(r["impl"], r["shape"], r["decay"], r["mode"]): r["ms"] for r in rows}
    print("\nsummary (ms; x = time / baseline time, < 1 is faster than the baseline)")
    print(f"{'impl':>14} {'shape':>16} {'decay':>5} {'mode':>6} {'ms':>8} {'/cudnn':>7} "
          f"{'/fla':>7} {'roof':>6}")
    for r in rows:
        key = (r["shape"], r["decay"], r["mode"])
        cud = base.get(("cudnn", r["shape"], "fixed", r["mode"]))
        fl = base.get(("fla",) + key)
        fmt = lambda b: f"{r['ms'] / b:7.2f}" if b else f"{'-':>7}"
        print(f"{r['impl']:>14} {r['shape']:>16} {r['decay']:>5} {r['mode']:>6} "
              f"{r['ms']:8.3f} {fmt(cud)} {fmt(fl)} {r['roofline']:6.1%}")


def main(argv) -> None:
    del argv
    if FLAGS.smoke:
        FLAGS.shapes = ["2x256x4x32", "1x1024x2x32"]
        FLAGS.chunk_sizes = ["16", "32"]
        FLAGS.check_shape = "1x128x2x32"
        FLAGS.runs, FLAGS.calls_per_run, FLAGS.warmup = 3, 1, 1
    fla, why = load_fla() if "fla" in FLAGS.impls else (None, "not asked")
    RESULTS["env"] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind, "python": platform.python_version(),
        "argv": sys.argv, "fla": fla[3] if fla else f"unavailable ({why})",
        "torch": fla[0].__version__ if fla else None,
    }
    if fla:
        import triton
        RESULTS["env"]["triton"] = triton.__version__
    print("env:", json.dumps(RESULTS["env"]), flush=True)
    measure_bandwidth(fla)
    save()
    if FLAGS.check_shape:
        check_correctness(fla)
        save()
    time_all(fla)
    save()
    summary()


if __name__ == "__main__":
    app.run(main)
