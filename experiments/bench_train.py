"""Training-throughput benchmark: RetNet (chunkwise) vs a Transformer with the same parameter
count (`model.transformer_baseline`, cuDNN flash attention where supported), on the first k
devices with the library's sharded train step (bf16 compute, float32 params and AdamW).

Step time is the median over `--windows` windows of `--steps` steps run back to back (the host
dispatches step k+1 while the GPU runs step k, as in the training loop; each window's batches
are put on the device before it starts) after the compiling step. With a sync after every
step instead, the RetNet of configs/ablation_gpu.py measured 782K tokens/s where the training
loop ran it at 1.19M. MFU counts
6 x (matmul parameters) FLOPs per token plus the mixer's sequence term, times 3 for
forward + backward:
  attention (causal):  2 * T * d per token and layer, forward
  retention (chunk C): 4 * H * Dk * Dv (state) + C * H * (Dk + Dv) (intra-chunk), forward
against a bf16 matmul rate measured in the same run (and the H100 SXM datasheet's 989 TFLOP/s).
Batches are uniform random bytes, or windows of the embedded stdlib corpus (`--data=corpus`):
real text repeats a few bytes thousands of times per batch, which random bytes never show
(the embedding gradient's scatter-add, for one).

The RetNet is timed once per `--retention_kernels` entry (its `retention_kernel`, e.g. XLA's
chunkwise form against the fused Pallas kernels), the Transformer once; each row records its
kernel. With 'pallas' the library runs XLA's form where the kernels cannot (off a GPU, head
dims they do not take): such rows say so (`pallas_fallback`, the reason) instead of passing
XLA's time off as the kernel's. A setting that raises (a kernel that fails to compile, say)
becomes a row with its `error`, and the others are still timed.

  python experiments/bench_train.py --config=configs/retnet_1_3b.py --seq_lens=2048,8192
  python experiments/bench_train.py --config=configs/retnet_1_3b.py --device_counts=1,2
  python experiments/bench_train.py --config=configs/retnet_1_3b.py --retention_kernels=xla,pallas
  python experiments/bench_train.py --config=configs/retnet_1_3b.py --seq_lens=8192 --profile_top=30

Each row records `peak_gib_so_far`, device 0's peak bytes in use since the process started
(the matmul and copy probes and earlier rows included: a row's own peak only when it is the
process's first row; run one process per row to read a setting's), and `memory_limit_gib`.

`--profile_top=N` then traces one more step per row with jax.profiler and records where it
went (`trace_kernels.summarize`: kernel time against idle time, by kind of kernel, the N
costliest instructions with their bytes against the copy bandwidth and the model line each
came from; cuBLAS kernels inside CUDA graphs keep their library names); it compiles the
step once more to read its HLO.
"""

import dataclasses
import json
import tempfile
import time

from absl import app, flags
import jax
import ml_collections
import numpy as np
from ml_collections import config_flags

from ceilings import copy_bandwidth, matmul_tflops
from hlo_text import launches
from retnet_jax import data as data_lib
from retnet_jax import sharding
from retnet_jax import train as train_lib
from retnet_jax.layers import RETENTION_KERNELS, pallas_fallback_reason
from retnet_jax.model import ModelConfig, transformer_baseline
from trace_kernels import device_kernels, print_summary, summarize, trace_call

_CONFIG = config_flags.DEFINE_config_file("config", "configs/retnet_1_3b.py", "Model preset.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["2048", "8192"], "Sequence lengths.")
_TOKENS = flags.DEFINE_integer("tokens_per_step", 16384,
                               "Tokens per step per device (the global batch grows with the "
                               "device count: weak scaling).")
_DEVICE_COUNTS = flags.DEFINE_list("device_counts", None,
                                   "Time on the first k devices for each k, e.g. 1,2 "
                                   "(default: all local devices); rows on k > 1 get the "
                                   "scaling efficiency against k = 1.")
_MESH_AXIS = flags.DEFINE_enum("mesh_axis", "fsdp", ["data", "fsdp"],
                               "Mesh axis spanning the devices: FSDP (parameters and "
                               "optimizer state sharded) or plain data parallelism.")
_STEPS = flags.DEFINE_integer("steps", 8, "Steps per timed window, run back to back.")
_WINDOWS = flags.DEFINE_integer("windows", 3, "Timed windows (median step time reported).")
_MODELS = flags.DEFINE_list("models", ["retnet", "transformer"], "Which models to time.")
_KERNELS = flags.DEFINE_list("retention_kernels", ["xla"],
                             f"The RetNet's retention_kernel, one timing each (overrides the "
                             f"preset's); from {RETENTION_KERNELS}.")
_BUDGET = flags.DEFINE_float("time_budget_s", 1e9, "Stop starting new settings after this.")
_DATA = flags.DEFINE_enum("data", "random", ["random", "corpus"],
                          "Batch tokens: uniform random bytes or stdlib corpus windows.")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 8192,
                                    "n of the [n, n] x [n, n] matmul that measures the peak.")
_OUT = flags.DEFINE_string("out", None, "Write all results as JSON here.")
_COPY_BYTES = flags.DEFINE_integer("copy_bytes", 1 << 30, "Bytes of the copy-bandwidth probe "
                                  "(with --profile_top).")
_PROFILE_TOP = flags.DEFINE_integer("profile_top", 0, "If > 0: trace one more step per row "
                                    "and record this many of its costliest instructions.")

DATASHEET_TFLOPS = 989.0  # H100 SXM dense bf16


def flops_per_token(config: ModelConfig, matmul_params: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward)."""
    forward = 2 * matmul_params
    for mixer in config.mixers:
        if mixer == "attention":
            forward += 2 * seq_len * config.d_model
        else:
            heads, dk = config.num_heads, config.d_model // config.num_heads
            dv = config.resolved_value_dim // heads
            forward += 4 * heads * dk * dv + config.chunk_size * heads * (dk + dv)
    return 3 * forward


def run_config(model: ModelConfig, seq_len: int, batch: int) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(train_lib.default_sections())
    config.model = ml_collections.ConfigDict(dataclasses.asdict(model))
    config.train.update(num_steps=1000, warmup_steps=10, progress_bar=False)
    config.data.update(seq_len=seq_len, batch_size=batch)
    return config


def make_batches(seq_len: int, batch: int, *, vocab_size: int):
    """Endless numpy batches {'inputs', 'targets', 'loss_mask'} of [batch, seq_len] (--data)."""
    if _DATA.value == "corpus":
        if vocab_size < data_lib.VOCAB_SIZE:
            raise ValueError(f"--data=corpus needs model.vocab_size >= {data_lib.VOCAB_SIZE} "
                             f"(bytes, BOS, EOS, pad), got {vocab_size}")
        corpus = data_lib.load_stdlib_corpus()
        return iter(data_lib.BatchIterator(data_lib.RandomWindows(corpus.train, seq_len),
                                           batch_size=batch, seed=seq_len))
    rng = np.random.default_rng(seq_len)

    def random_bytes():
        while True:
            tokens = rng.integers(0, min(vocab_size, 256), (batch, seq_len + 1)).astype(np.int32)
            yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                   "loss_mask": np.ones((batch, seq_len), np.float32)}
    return random_bytes()


def check_kernels(names: list[str]) -> list[str]:
    """--retention_kernels, checked against RETENTION_KERNELS (a UsageError otherwise)."""
    unknown = [n for n in names if n not in RETENTION_KERNELS]
    if not names or unknown or len(set(names)) != len(names):
        raise app.UsageError(f"--retention_kernels must be distinct names from "
                             f"{RETENTION_KERNELS}, got {names}")
    return names


def model_variants(base: ModelConfig, models: list[str], kernels: list[str]) -> list:
    """(name, retention kernel or None, config) to time: the RetNet once per kernel, the
    Transformer once (it has no retention: kernel None)."""
    variants = []
    for name in models:
        if name == "retnet":
            variants += [(name, k, dataclasses.replace(base, retention_kernel=k))
                         for k in kernels]
        elif name == "transformer":
            # FFN width a multiple of the GEMM tiles: 5544 (multiple=8) made XLA pad and
            # concatenate the FFN weights in every step.
            variants.append((name, None, transformer_baseline(base, head_dim=128, multiple=128)))
        else:
            raise app.UsageError(f"--models must be from ['retnet', 'transformer'], got {name!r}")
    return variants


def pallas_fallback(model: ModelConfig) -> str | None:
    """Why `retention_kernel='pallas'` runs XLA's chunkwise form in this model here, or None
    (`layers.pallas_fallback_reason`, which the library asks before it falls back)."""
    if model.retention_kernel != "pallas":
        return None
    return pallas_fallback_reason(*model.retention_head_dims, model.chunk_size)


def time_setting(name: str, model: ModelConfig, seq_len: int, devices: list,
                 peak: float) -> dict:
    """One result row: the model trained at `seq_len` on a mesh over `devices` (its
    `--mesh_axis` spanning them all), `--tokens_per_step` tokens per device per step."""
    count = len(devices)
    axes = {"data": 1, "fsdp": 1, _MESH_AXIS.value: count}
    mesh = sharding.make_mesh(sharding.MeshConfig(**axes), devices)
    batch = count * max(1, _TOKENS.value // seq_len)
    model = dataclasses.replace(model, max_seq_len=max(seq_len, model.max_seq_len))
    trainer = train_lib.make_trainer(run_config(model, seq_len, batch), mesh=mesh)
    params = trainer.abstract_state.params
    matmul_params = sum(x.size for x in jax.tree.leaves(params)) - (
        0 if model.tie_embeddings else model.vocab_size * model.d_model)
    state = trainer.init()
    batches = make_batches(seq_len, batch, vocab_size=model.vocab_size)

    def batch_data():
        return sharding.put_batch(next(batches), mesh)
    t0 = time.perf_counter()
    state, metrics = trainer.train_step(state, batch_data())   # compiles
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(_WINDOWS.value):  # steps back to back, as the training loop runs
        data = [batch_data() for _ in range(_STEPS.value)]
        jax.block_until_ready(data)
        t0 = time.perf_counter()
        for step_data in data:
            state, metrics = trainer.train_step(state, step_data)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - t0) / _STEPS.value)
    step_s = float(np.median(times))
    profile = None
    if _PROFILE_TOP.value > 0:
        profile = profile_step(trainer, state, batch_data())
    tokens_per_s = batch * seq_len / step_s
    memory = {k: v / 2**30 for k, v in (devices[0].memory_stats() or {}).items()  # CPU: None
              if k in ("peak_bytes_in_use", "bytes_limit")}
    per_device = tokens_per_s * flops_per_token(model, matmul_params, seq_len) / 1e12 / count
    return dict(model=name, seq_len=seq_len, devices=count, mesh=axes, batch=batch,
                params=sum(x.size for x in jax.tree.leaves(params)), ffn_dim=model.resolved_ffn_dim,
                remat=model.remat and model.remat_policy,
                mixers="+".join(sorted(set(model.mixers))),
                step_ms=step_s * 1e3, tokens_per_s=tokens_per_s, tflops=per_device,
                mfu_measured=per_device / peak, mfu_datasheet=per_device / DATASHEET_TFLOPS,
                loss=float(metrics["loss"]), first_step_s=compile_s, data=_DATA.value,
                # the process's peak so far: this row's own only if it is the first
                peak_gib_so_far=memory.get("peak_bytes_in_use"),
                memory_limit_gib=memory.get("bytes_limit"),
                timing=f"median of {_WINDOWS.value} windows of {_STEPS.value} "
                       "back-to-back steps", **({"profile": profile} if profile else {}))


def profile_step(trainer, state, data) -> dict:
    """One train step traced: `trace_kernels.summarize` per step, instructions matched to
    the step's compiled HLO, rates against a copy bandwidth measured now."""
    costs = {launch.name: launch for launch in
             launches(trainer.train_step.lower(state, data).compile().as_text())}
    bandwidth = copy_bandwidth(_COPY_BYTES.value)
    _, trace = trace_call(trainer.train_step, state, data,
                          trace_dir=tempfile.mkdtemp(prefix="bench_train_trace_"))
    summary = summarize(device_kernels(trace), 1, costs, bandwidth, _PROFILE_TOP.value,
                        unit="step")
    print_summary(summary, unit="step")
    return dict(summary, copy_bandwidth=bandwidth)


def add_scaling_efficiency(results: list[dict]) -> None:
    """Adds 'scaling_efficiency' = tokens/s on k devices / (k x tokens/s on one) to each row
    whose model, kernel and length were also timed on one device (weak scaling: same batch
    per device)."""
    key = lambda r: (r["model"], r["retention_kernel"], r["seq_len"])
    timed = [r for r in results if "error" not in r]
    single = {key(r): r["tokens_per_s"] for r in timed if r["devices"] == 1}
    for r in timed:
        base = single.get(key(r))
        if base and r["devices"] > 1:
            r["scaling_efficiency"] = r["tokens_per_s"] / (r["devices"] * base)


def kernel_label(row: dict) -> str:
    """The table's kernel column: '-' for no retention, '(XLA fallback)' after a fallback."""
    kernel = row["retention_kernel"] or "-"
    return f"{kernel} (XLA fallback)" if row["pallas_fallback"] else kernel


def print_table(results: list[dict]) -> None:
    """The rows as one markdown table, in the order timed (a failed one shows its error)."""
    print("\n| model | kernel | T | devices | batch | params | step ms | tokens/s | "
          "TFLOP/s/device | MFU (measured peak) | MFU (989) | scaling efficiency |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | {kernel_label(r)} | {r['seq_len']} | {r['devices']} | "
                  f"error: {r['error'][:120]} |")
            continue
        efficiency = f"{r['scaling_efficiency']:.1%}" if "scaling_efficiency" in r else "-"
        print(f"| {r['model']} | {kernel_label(r)} | {r['seq_len']} | {r['devices']} | "
              f"{r['batch']} | "
              f"{r['params'] / 1e9:.2f}B | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['tflops']:.0f} | {r['mfu_measured']:.1%} | {r['mfu_datasheet']:.1%} | "
              f"{efficiency} |")


def write_json(device, peak: float, results: list[dict]) -> None:
    """All rows so far, with the device, jax version and matmul rate, to --out (if given)."""
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(dict(device=device.device_kind, jax=jax.__version__,
                           matmul_tflops=peak, results=results), f, indent=2)


def main(argv):
    del argv
    base = ModelConfig.from_config(_CONFIG.value.model)
    variants = model_variants(base, _MODELS.value, check_kernels(_KERNELS.value))
    peak = matmul_tflops(_MATMUL_SIZE.value)
    devices = jax.devices()
    counts = [int(c) for c in _DEVICE_COUNTS.value or [len(devices)]]
    if any(not 1 <= c <= len(devices) for c in counts):
        raise app.UsageError(f"--device_counts must be in [1, {len(devices)}], got {counts}")
    print(f"{len(devices)} x {devices[0].device_kind}, jax {jax.__version__}, measured bf16 "
          f"matmul {peak:.0f} TFLOP/s")
    results = []
    start_all = time.time()
    for seq_len in (int(s) for s in _SEQ_LENS.value):
        for name, kernel, model in variants:
            fallback = pallas_fallback(model)
            if fallback:
                print(f"{name} retention_kernel={kernel} runs XLA's chunkwise form: {fallback}")
            for count in counts:
                if time.time() - start_all > _BUDGET.value:
                    print(f"time budget: skipping {name} ({kernel}) at T={seq_len} on {count} "
                          "devices")
                    continue
                try:
                    row = time_setting(name, model, seq_len, devices[:count], peak)
                except Exception as e:  # noqa: BLE001 - record it and time the others
                    row = dict(model=name, seq_len=seq_len, devices=count,
                               error=f"{type(e).__name__}: {str(e)[:300]}")
                results.append(dict(row, retention_kernel=kernel, pallas_fallback=fallback))
                print(json.dumps(results[-1]))
                write_json(devices[0], peak, results)   # kept if a time limit kills the run
    add_scaling_efficiency(results)
    print_table(results)
    write_json(devices[0], peak, results)


if __name__ == "__main__":
    app.run(main)
