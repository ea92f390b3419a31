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

  python experiments/bench_train.py --config=configs/retnet_1_3b.py --seq_lens=2048,8192
  python experiments/bench_train.py --config=configs/retnet_1_3b.py --device_counts=1,2
"""

import dataclasses
import json
import time

from absl import app, flags
import jax
import ml_collections
import numpy as np
from ml_collections import config_flags

from ceilings import matmul_tflops
from retnet_jax import data as data_lib
from retnet_jax import sharding
from retnet_jax import train as train_lib
from retnet_jax.model import ModelConfig, transformer_baseline

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
_BUDGET = flags.DEFINE_float("time_budget_s", 1e9, "Stop starting new settings after this.")
_DATA = flags.DEFINE_enum("data", "random", ["random", "corpus"],
                          "Batch tokens: uniform random bytes or stdlib corpus windows.")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 8192,
                                    "n of the [n, n] x [n, n] matmul that measures the peak.")
_OUT = flags.DEFINE_string("out", None, "Write all results as JSON here.")

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
    tokens_per_s = batch * seq_len / step_s
    per_device = tokens_per_s * flops_per_token(model, matmul_params, seq_len) / 1e12 / count
    return dict(model=name, seq_len=seq_len, devices=count, mesh=axes, batch=batch,
                params=sum(x.size for x in jax.tree.leaves(params)),
                step_ms=step_s * 1e3, tokens_per_s=tokens_per_s, tflops=per_device,
                mfu_measured=per_device / peak, mfu_datasheet=per_device / DATASHEET_TFLOPS,
                loss=float(metrics["loss"]), first_step_s=compile_s, data=_DATA.value,
                timing=f"median of {_WINDOWS.value} windows of {_STEPS.value} "
                       "back-to-back steps")


def add_scaling_efficiency(results: list[dict]) -> None:
    """Adds 'scaling_efficiency' = tokens/s on k devices / (k x tokens/s on one) to each row
    whose model and length were also timed on one device (weak scaling: same batch per
    device)."""
    single = {(r["model"], r["seq_len"]): r["tokens_per_s"] for r in results if r["devices"] == 1}
    for r in results:
        base = single.get((r["model"], r["seq_len"]))
        if base and r["devices"] > 1:
            r["scaling_efficiency"] = r["tokens_per_s"] / (r["devices"] * base)


def main(argv):
    del argv
    base = ModelConfig.from_config(_CONFIG.value.model)
    models = {"retnet": base, "transformer": transformer_baseline(base, head_dim=128)}
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
        for name in _MODELS.value:
            for count in counts:
                if time.time() - start_all > _BUDGET.value:
                    print(f"time budget: skipping {name} at T={seq_len} on {count} devices")
                    continue
                results.append(time_setting(name, models[name], seq_len, devices[:count],
                                            peak))
                print(json.dumps(results[-1]))
    add_scaling_efficiency(results)
    print("\n| model | T | devices | batch | params | step ms | tokens/s | TFLOP/s/device | "
          "MFU (measured peak) | MFU (989) | scaling efficiency |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        efficiency = f"{r['scaling_efficiency']:.1%}" if "scaling_efficiency" in r else "-"
        print(f"| {r['model']} | {r['seq_len']} | {r['devices']} | {r['batch']} | "
              f"{r['params'] / 1e9:.2f}B | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['tflops']:.0f} | {r['mfu_measured']:.1%} | {r['mfu_datasheet']:.1%} | "
              f"{efficiency} |")
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(dict(device=devices[0].device_kind, jax=jax.__version__,
                           matmul_tflops=peak, results=results), f, indent=2)


if __name__ == "__main__":
    app.run(main)
