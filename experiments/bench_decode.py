"""Decoding benchmark: RetNet (constant-size recurrent state) vs a Transformer (KV cache).

Both models have the preset's width and depth and (nearly) the same parameter count
(`model.transformer_baseline`), bf16 weights and compute, one GPU. For each batch size and
context length the cache is filled with random values at position = context, then a jitted
`lax.scan` decodes `--new_tokens` greedy tokens; per-token latency is the median over
`--repeats` runs divided by new_tokens. Also reported: the weight-read floor (weight bytes /
measured copy bandwidth), decode-state bytes, and XLA's temporary bytes of the decode loop.

  python experiments/bench_decode.py --config=configs/retnet_1_3b.py
"""

import dataclasses
import json
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import config_flags

from ceilings import copy_bandwidth
from retnet_jax.model import ModelConfig, RetNetLM, transformer_baseline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/retnet_1_3b.py", "Model preset.")
_CONTEXTS = flags.DEFINE_list("contexts", ["1024", "4096", "8192", "16384", "32768"],
                              "Context lengths (tokens already in the cache).")
_BATCHES = flags.DEFINE_list("batches", ["1", "8", "32"], "Batch sizes.")
_NEW = flags.DEFINE_integer("new_tokens", 32, "Tokens decoded per timed run.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per setting (median reported).")
_BUDGET = flags.DEFINE_float("time_budget_s", 1e9, "Stop starting new settings after this.")
_MEMORY_FRACTION = flags.DEFINE_float("memory_fraction", 0.85,
                                      "Skip settings whose weights + cache exceed this "
                                      "fraction of device memory.")
_OUT = flags.DEFINE_string("out", None, "Write all results as JSON here.")


def build(config: ModelConfig):
    """(graphdef, params) of a randomly initialised model, built directly on the device."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: RetNetLM(config, rngs=nnx.Rngs(0))))
    params = jax.jit(lambda: nnx.state(RetNetLM(config, rngs=nnx.Rngs(0))))()
    return graphdef, params


def random_cache(model_shape, batch: int, max_len: int, context: int, seed: int):
    """A cache at position `context` whose every float leaf holds random values."""
    def make():
        cache = nnx.merge(*model_shape).init_cache(batch, max_len)
        leaves, treedef = jax.tree.flatten(cache)
        keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
        leaves = [jax.random.normal(k, x.shape, x.dtype) * 0.1
                  if jnp.issubdtype(x.dtype, jnp.floating) else x for k, x in zip(keys, leaves)]
        cache = jax.tree.unflatten(treedef, leaves)
        return dataclasses.replace(cache, position=jnp.full((batch,), context, jnp.int32))
    return jax.jit(make)()


def decode_loop(graphdef, new_tokens: int):
    """jit((params, cache, tokens [B]) -> (tokens, cache)) decoding greedily new_tokens steps."""
    def run(params, cache, tokens):
        model = nnx.merge(graphdef, params)
        def step(carry, _):
            tokens, cache = carry
            logits, cache = model.decode_step(tokens, cache)
            return (jnp.argmax(logits, -1).astype(jnp.int32), cache), None
        (tokens, cache), _ = jax.lax.scan(step, (tokens, cache), None, length=new_tokens)
        return tokens, cache
    return jax.jit(run, donate_argnums=1)


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main(argv):
    del argv
    base = ModelConfig.from_config(_CONFIG.value.model)
    contexts = [int(c) for c in _CONTEXTS.value]
    batches = [int(b) for b in _BATCHES.value]
    new, repeats = _NEW.value, _REPEATS.value
    max_len_extra = new * (repeats + 2)
    base = dataclasses.replace(base, dtype="bfloat16", param_dtype="bfloat16",
                               max_seq_len=max(contexts) + max_len_extra)
    models = {"retnet": base, "transformer": transformer_baseline(base)}
    device = jax.devices()[0]
    capacity = device.memory_stats().get("bytes_limit", 80e9) if device.platform == "gpu" else 16e9
    bandwidth = copy_bandwidth()
    print(f"device {device.device_kind}, jax {jax.__version__}, copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s, memory limit {capacity / 2**30:.1f} GiB")

    start_all = time.time()
    results = []
    for name, config in models.items():
        graphdef, params = build(config)
        weight_bytes = tree_bytes(params)
        floor_ms = weight_bytes / bandwidth * 1e3
        print(f"{name}: {sum(x.size for x in jax.tree.leaves(params)):,} params, weights "
              f"{weight_bytes / 2**30:.2f} GiB, weight-read floor {floor_ms:.3f} ms/token")
        shape = (graphdef, jax.eval_shape(lambda p: p, params))
        run = decode_loop(graphdef, new)
        for batch in batches:
            for context in contexts:
                max_len = context + max_len_extra
                cache_shape = jax.eval_shape(
                    lambda: nnx.merge(*shape).init_cache(batch, max_len))
                state_bytes = tree_bytes(cache_shape)
                row = dict(model=name, batch=batch, context=context,
                           weight_gib=weight_bytes / 2**30, state_gib=state_bytes / 2**30,
                           floor_ms=floor_ms)
                if time.time() - start_all > _BUDGET.value:
                    row["skipped"] = "time budget"
                elif weight_bytes + state_bytes > _MEMORY_FRACTION.value * capacity:
                    row["skipped"] = "does not fit"
                else:
                    cache = random_cache(shape, batch, max_len, context, seed=batch + context)
                    tokens = jnp.zeros((batch,), jnp.int32) + 65
                    compiled = run.lower(params, cache, tokens).compile()
                    tokens, cache = compiled(params, cache, tokens)          # warm-up
                    jax.block_until_ready(tokens)
                    times = []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        tokens, cache = compiled(params, cache, tokens)
                        jax.block_until_ready(tokens)
                        times.append(time.perf_counter() - t0)
                    ms = float(np.median(times)) / new * 1e3
                    temp = compiled.memory_analysis().temp_size_in_bytes
                    row.update(ms_per_token=ms, tokens_per_s=batch / ms * 1e3,
                               temp_gib=temp / 2**30,
                               total_gib=(weight_bytes + state_bytes + temp) / 2**30,
                               floor_ratio=ms / floor_ms)
                    del cache
                results.append(row)
                print(json.dumps(row))
        del params

    print("\n| model | batch | context | ms/token | tokens/s | x floor | state GiB | "
          "weights+state+temp GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if "skipped" in r:
            print(f"| {r['model']} | {r['batch']} | {r['context']} | {r['skipped']} | | | "
                  f"{r['state_gib']:.2f} | |")
        else:
            print(f"| {r['model']} | {r['batch']} | {r['context']} | {r['ms_per_token']:.3f} | "
                  f"{r['tokens_per_s']:,.0f} | {r['floor_ratio']:.2f} | {r['state_gib']:.3f} | "
                  f"{r['total_gib']:.2f} |")
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(dict(device=device.device_kind, jax=jax.__version__,
                           copy_bandwidth=bandwidth, results=results), f, indent=2)


if __name__ == "__main__":
    app.run(main)
