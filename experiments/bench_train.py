"""Training-throughput benchmark: RetNet (chunkwise) vs a Transformer with the same parameter
count (`model.transformer_baseline`, cuDNN flash attention where supported), on all local
devices with the library's sharded train step (bf16 compute, float32 params and AdamW).

Tokens/s is the median step time over `--steps` steps after warm-up; MFU counts
6 x (matmul parameters) FLOPs per token plus the mixer's sequence term, times 3 for
forward + backward:
  attention (causal):  2 * T * d per token and layer, forward
  retention (chunk C): 4 * H * Dk * Dv (state) + C * H * (Dk + Dv) (intra-chunk), forward
against a bf16 matmul rate measured in the same run (and the H100 SXM datasheet's 989 TFLOP/s).

  python experiments/bench_train.py --config=configs/retnet_1_3b.py --seq_lens=2048,8192
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
from retnet_jax import sharding
from retnet_jax import train as train_lib
from retnet_jax.model import ModelConfig, transformer_baseline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/retnet_1_3b.py", "Model preset.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["2048", "8192"], "Sequence lengths.")
_TOKENS = flags.DEFINE_integer("tokens_per_step", 16384, "Global batch size in tokens.")
_STEPS = flags.DEFINE_integer("steps", 8, "Timed steps (median reported).")
_MODELS = flags.DEFINE_list("models", ["retnet", "transformer"], "Which models to time.")
_BUDGET = flags.DEFINE_float("time_budget_s", 1e9, "Stop starting new settings after this.")
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


def main(argv):
    del argv
    base = ModelConfig.from_config(_CONFIG.value.model)
    models = {"retnet": base, "transformer": transformer_baseline(base, head_dim=128)}
    peak = matmul_tflops()
    devices = jax.devices()
    print(f"{len(devices)} x {devices[0].device_kind}, jax {jax.__version__}, measured bf16 "
          f"matmul {peak:.0f} TFLOP/s")
    results = []
    start_all = time.time()
    for seq_len in (int(s) for s in _SEQ_LENS.value):
        batch = max(len(devices), _TOKENS.value // seq_len)
        for name in _MODELS.value:
            if time.time() - start_all > _BUDGET.value:
                print(f"time budget: skipping {name} at T={seq_len}")
                continue
            model = dataclasses.replace(models[name], max_seq_len=max(seq_len,
                                                                      models[name].max_seq_len))
            trainer = train_lib.make_trainer(run_config(model, seq_len, batch))
            params = trainer.abstract_state.params
            matmul_params = sum(x.size for x in jax.tree.leaves(params)) - (
                0 if model.tie_embeddings else model.vocab_size * model.d_model)
            state = trainer.init()
            rng = np.random.default_rng(seq_len)
            def batch_data():
                tokens = rng.integers(0, min(model.vocab_size, 256), (batch, seq_len + 1))
                return sharding.put_batch(
                    {"inputs": tokens[:, :-1].astype(np.int32),
                     "targets": tokens[:, 1:].astype(np.int32),
                     "loss_mask": np.ones((batch, seq_len), np.float32)}, trainer.mesh)
            t0 = time.perf_counter()
            state, metrics = trainer.train_step(state, batch_data())   # compiles
            jax.block_until_ready(metrics)
            compile_s = time.perf_counter() - t0
            times = []
            for _ in range(_STEPS.value):
                data = batch_data()
                t0 = time.perf_counter()
                state, metrics = trainer.train_step(state, data)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - t0)
            step_s = float(np.median(times))
            tokens_per_s = batch * seq_len / step_s
            achieved = tokens_per_s * flops_per_token(model, matmul_params, seq_len) / 1e12
            row = dict(model=name, seq_len=seq_len, batch=batch,
                       params=sum(x.size for x in jax.tree.leaves(params)),
                       step_ms=step_s * 1e3, tokens_per_s=tokens_per_s,
                       tflops=achieved / len(devices), mfu_measured=achieved / len(devices) / peak,
                       mfu_datasheet=achieved / len(devices) / DATASHEET_TFLOPS,
                       loss=float(metrics["loss"]), first_step_s=compile_s)
            results.append(row)
            print(json.dumps(row))
            del state
    print("\n| model | T | batch | params | step ms | tokens/s | TFLOP/s/GPU | MFU (measured "
          "peak) | MFU (989) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['seq_len']} | {r['batch']} | {r['params'] / 1e9:.2f}B | "
              f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.0f} | "
              f"{r['mfu_measured']:.1%} | {r['mfu_datasheet']:.1%} |")
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(dict(device=devices[0].device_kind, jax=jax.__version__,
                           matmul_tflops=peak, results=results), f, indent=2)


if __name__ == "__main__":
    app.run(main)
