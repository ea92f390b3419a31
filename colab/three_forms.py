# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Retention, three ways
#
# Retention is one linear recurrence per head, `S_t = exp(a_t) S_{t-1} + k_t^T v_t`,
# `o_t = q_t S_t`. `retnet_jax.retention` computes it in parallel (a masked matrix, O(T^2)),
# recurrently (a scan over tokens, O(1) state) and chunkwise (parallel inside chunks, recurrent
# across them). This notebook checks that the three agree on random data, for fixed
# (RetNet) and gated (gRet) decay, and times them against the sequence length.
#
# Set `RETNET_TINY=1` for a seconds-long run (CI does).

# %%
import sys
if "google.colab" in sys.modules:  # install the library in Colab; locally it is already there
    # !pip install -q "retnet_jax @ git+https://github.com/retnet-jax/retnet_jax"
    pass

# %%
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt

from retnet_jax import positions, retention

TINY = os.environ.get("RETNET_TINY") == "1"
print(jax.devices())

# %% [markdown]
# ## Equivalence on random inputs

# %%
def random_inputs(key, batch, time, heads, key_dim, value_dim, gated):
    kq, kk, kv, ka = jax.random.split(key, 4)
    q = jax.random.normal(kq, (batch, time, heads, key_dim)) * key_dim ** -0.5
    k = jax.random.normal(kk, (batch, time, heads, key_dim))
    v = jax.random.normal(kv, (batch, time, heads, value_dim))
    if gated:  # gRet-style data-dependent log decay: logsigmoid(.) / 16
        log_decay = jax.nn.log_sigmoid(jax.random.normal(ka, (batch, time, heads))) / 16
    else:      # RetNet's fixed multi-scale decay, gamma_h = 1 - 2^(-5-h)
        log_decay = positions.decay_log_gammas(heads)
    return q, k, v, log_decay


parallel = jax.jit(retention.parallel_retention)
recurrent = jax.jit(retention.recurrent_retention)
chunkwise = jax.jit(retention.chunkwise_retention, static_argnames="chunk_size")


def rel_err(x, ref):
    return float(jnp.abs(x - ref).max() / jnp.abs(ref).max())


for gated in (False, True):
    args = random_inputs(jax.random.PRNGKey(0), 2, 300, 4, 32, 64, gated)
    o_par = parallel(*args)
    o_rec, _ = recurrent(*args)
    o_chk, _ = chunkwise(*args, chunk_size=64)
    print(f"{'gated' if gated else 'fixed'}: recurrent vs parallel {rel_err(o_rec, o_par):.1e}, "
          f"chunkwise vs parallel {rel_err(o_chk, o_par):.1e}")
    assert rel_err(o_rec, o_par) < 1e-5 and rel_err(o_chk, o_par) < 1e-5

# %% [markdown]
# ## Time against sequence length
# The parallel form grows quadratically, the recurrent form linearly but one token at a time,
# the chunkwise form linearly with dense matmuls inside each chunk.

# %%
def median_ms(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


lengths = [64, 128] if TINY else [256, 512, 1024, 2048, 4096]
results = {"parallel": [], "recurrent": [], "chunkwise": []}
for t in lengths:
    args = random_inputs(jax.random.PRNGKey(t), 1, t, 4, 32, 32, gated=False)
    results["parallel"].append(median_ms(parallel, *args))
    results["recurrent"].append(median_ms(recurrent, *args))
    results["chunkwise"].append(median_ms(lambda *a: chunkwise(*a, chunk_size=64), *args))
    print(t, {name: f"{ms[-1]:.2f} ms" for name, ms in results.items()})

fig, ax = plt.subplots(figsize=(6, 4))
for name, ms in results.items():
    ax.plot(lengths, ms, marker="o", label=name)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("sequence length T")
ax.set_ylabel("forward time (ms, median)")
ax.set_title(f"retention forward on {jax.devices()[0].platform}")
ax.legend()
plt.show()
