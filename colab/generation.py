# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # O(1)-state decoding vs a KV cache
#
# A retention layer summarises its whole past in a `[heads, key_dim, value_dim]` state, so
# decoding costs the same memory and time at any context length. An attention layer keeps
# every past key and value. This notebook measures both for two models of the same width
# and depth: a RetNet and a Transformer baseline. `RETNET_TINY=1` runs a quick version.

# %%
import sys
if "google.colab" in sys.modules:  # install the library in Colab; locally it is already there
    # !pip install -q "retnet_jax @ git+https://github.com/retnet-jax/retnet_jax"
    pass

# %%
import os
import time

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from retnet_jax.generate import generate
from retnet_jax.model import ModelConfig, RetNetLM

TINY = os.environ.get("RETNET_TINY") == "1"
CONTEXTS = [64, 128, 256] if TINY else [512, 1024, 2048, 4096, 8192]
WIDTH = dict(d_model=64, num_layers=2, num_heads=2, num_attention_heads=2) if TINY else \
    dict(d_model=512, num_layers=8, num_heads=4, num_attention_heads=8)
models = {
    name: RetNetLM(ModelConfig(**WIDTH, layer_schedule=(mixer,) * WIDTH["num_layers"],
                               max_seq_len=max(CONTEXTS) + 64), rngs=nnx.Rngs(0))
    for name, mixer in (("RetNet", "retention"), ("Transformer", "attention"))
}
print({name: f"{m.count_params():,} params" for name, m in models.items()})

# %% [markdown]
# ## Decoding-state memory against context length

# %%
def cache_bytes(model, context, batch=1):
    cache = model.init_cache(batch, context)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))

memory = {name: [cache_bytes(m, c) / 2**20 for c in CONTEXTS] for name, m in models.items()}
fig, ax = plt.subplots(figsize=(6, 4))
for name, mib in memory.items():
    ax.plot(CONTEXTS, mib, marker="o", label=name)
ax.set_xscale("log", base=2)
ax.set_xlabel("context length (tokens)")
ax.set_ylabel("decoding state per sequence (MiB)")
ax.set_title("RetNet state is constant; the KV cache grows")
ax.legend()
plt.show()
assert memory["RetNet"][0] == memory["RetNet"][-1]

# %% [markdown]
# ## Time per generated token against context length
# Each model prefills a random prompt of the given length, then greedily decodes 32 tokens
# in one jitted loop; the time per token is the difference between two runs of different
# lengths, so prefill cancels.

# %%
def per_token_ms(model, context, new=32):
    prompt = [np.random.default_rng(context).integers(0, 256, context)]
    def timed(n):
        generate(model, prompt, max_new_tokens=n, max_len=context + 2 * new)  # compile
        start = time.perf_counter()
        jax.block_until_ready(generate(model, prompt, max_new_tokens=n, max_len=context + 2 * new))
        return time.perf_counter() - start
    return (timed(2 * new) - timed(new)) / new * 1e3

latency = {name: [per_token_ms(m, c) for c in CONTEXTS] for name, m in models.items()}
fig, ax = plt.subplots(figsize=(6, 4))
for name, ms in latency.items():
    ax.plot(CONTEXTS, ms, marker="o", label=name)
ax.set_xscale("log", base=2)
ax.set_xlabel("context length (tokens)")
ax.set_ylabel("ms per generated token (batch 1)")
ax.set_title(f"decoding on {jax.devices()[0].platform}")
ax.legend()
plt.show()
for name in models:
    print(name, " ".join(f"{c}: {ms:.2f} ms" for c, ms in zip(CONTEXTS, latency[name])))
