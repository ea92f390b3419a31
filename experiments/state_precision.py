"""What a bfloat16 decoding state does to a trained model (`ModelConfig.state_dtype`).

A bfloat16 state halves the decode cache's memory and the bytes each decoded token moves
(the state dominates them at batch >= 8, BENCHMARKS.md "Decoding"), at the cost of one
rounding of the state per token. This measures that cost on validation text: it decodes
--sequences rows of the run's evaluation data one token at a time, as generation does
(`prefill` of the first token, then `decode_step` per token, in one `lax.scan`), once per
--state_dtypes, and compares each with the model's parallel forward over the same tokens.
Per state dtype it reports the cross-entropy (nats per token and bits per byte), its change
against the parallel forward, the greedy tokens that differ, and the largest relative
logit deviation per position; a PNG plots the deviation against the position.

The eval rows are as long as the model's training rows; the rounding errors of a state
whose decay is close to 1 accumulate over its memory (about 1 / (1 - gamma) tokens: 4,096
for the slowest of torchscale's 8 heads). So it also runs `retention.retention_step` alone for
--drift_tokens random tokens (normal k / sqrt(Dk), v) with the model's head dims and fixed
decays (its `decay_schedule`; --drift_config takes them from another model, e.g. a preset),
in float32 and in each other state dtype, and reports each head's relative state difference
at powers of two of the position.

  python experiments/state_precision.py --workdir=/tmp/retnet_small --out=results/state_precision
  python experiments/state_precision.py --workdir=/tmp/retnet_small --drift_config=configs/retnet_1_3b.py
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import config_flags

from retnet_jax import data as data_lib
from retnet_jax import positions, retention, train
from retnet_jax.model import DTYPES, ModelConfig, RetNetLM

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BEST = flags.DEFINE_bool("best", False, "Use the checkpoint with the lowest eval loss.")
_SEQUENCES = flags.DEFINE_integer("sequences", 8, "Evaluation rows decoded (one batch).")
_TOKENS = flags.DEFINE_integer("tokens", None, "Tokens per row (default: the data's seq_len).")
_STATE_DTYPES = flags.DEFINE_list("state_dtypes", ["float32", "bfloat16"],
                                  f"Decoding state dtypes, from {tuple(DTYPES)}.")
_DRIFT_TOKENS = flags.DEFINE_integer("drift_tokens", 4096, "Random tokens of the per-head "
                                     "state drift (0: skip it).")
_DRIFT_CONFIG = config_flags.DEFINE_config_file(
    "drift_config", None, "A config file whose model's heads and decays the drift uses "
    "(e.g. configs/retnet_1_3b.py); default: the checkpoint's model.")
_OUT = flags.DEFINE_string("out", None, "Directory for state_precision.json and .png.")


def evaluation_rows(config, rows: int, tokens: int | None) -> dict[str, np.ndarray]:
    """The first `rows` rows of the run's evaluation data, cut to `tokens`: inputs, targets
    int32 and loss_mask float32, each [rows, T]."""
    datasets = data_lib.make_datasets(train.data_config(config))
    parts = []
    for batch in datasets.make_eval():
        parts.append(batch)
        if sum(len(p["inputs"]) for p in parts) >= rows:
            break
    found = sum(len(p["inputs"]) for p in parts)
    if found < rows:
        raise app.UsageError(f"--sequences={rows}: the evaluation data has {found} rows")
    out = {key: np.concatenate([p[key] for p in parts])[:rows, :tokens]
           for key in ("inputs", "targets", "loss_mask")}
    if tokens is not None and out["inputs"].shape[1] < tokens:
        raise app.UsageError(f"--tokens={tokens}: the evaluation rows have "
                             f"{out['inputs'].shape[1]} tokens")
    return out


def with_state_dtype(model: RetNetLM, state_dtype: str) -> RetNetLM:
    """The same parameters under a config that keeps the decoding state in state_dtype."""
    config = dataclasses.replace(model.config, state_dtype=state_dtype)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: RetNetLM(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


@nnx.jit
def parallel_logits(model: RetNetLM, inputs: jax.Array) -> jax.Array:
    return model(inputs, mode="parallel").astype(jnp.float32)


@nnx.jit
def decoded_logits(model: RetNetLM, inputs: jax.Array) -> jax.Array:
    """float32 [B, T, V]: token 0 prefilled, then one `decode_step` per later token."""
    batch, length = inputs.shape
    cache = model.init_cache(batch, length)
    first, cache = model.prefill(inputs[:, :1], jnp.ones((batch,), jnp.int32), cache)

    def step(cache, tokens):
        logits, cache = model.decode_step(tokens, cache)
        return cache, logits.astype(jnp.float32)

    _, rest = jax.lax.scan(step, cache, jnp.moveaxis(inputs[:, 1:], 1, 0))
    return jnp.concatenate([first[:, :1].astype(jnp.float32), jnp.moveaxis(rest, 0, 1)], 1)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """[B, T] negative log-likelihood of the targets, float64."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    return log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def compare(logits: np.ndarray, reference: np.ndarray, rows: dict) -> dict:
    """One state dtype's decoded logits against the parallel forward's."""
    mask = rows["loss_mask"].astype(np.float64)
    tokens = mask.sum()
    nll, nll_ref = (token_nll(x, rows["targets"]) for x in (logits, reference))
    deviation = (np.abs(logits - reference).max(axis=(0, 2))
                 / np.abs(reference).max(axis=(0, 2)))                      # [T]
    loss = float((nll * mask).sum() / tokens)
    return {"loss": loss, "bits_per_byte": loss / math.log(2),
            "loss_change": float(((nll - nll_ref) * mask).sum() / tokens),
            "greedy_differs": float(((logits.argmax(-1) != reference.argmax(-1)) * mask).sum()
                                    / tokens),
            "max_logit_deviation": float(deviation.max()),
            "logit_deviation_by_position": deviation.tolist()}


def state_drift(config, state_dtype: str, tokens: int, seed: int = 0) -> dict[int, list]:
    """Each head's max |S - S_float32| / max |S_float32| after t random tokens, for t the
    powers of two up to `tokens` (and `tokens`), for the config's fixed decays and head dims:
    {t: [heads]}."""
    heads, key_dim = config.num_heads, config.d_model // config.num_heads
    value_dim = config.resolved_value_dim // heads
    log_decay = positions.decay_log_gammas(heads, config.decay_schedule,
                                           gamma=config.decay_gamma)
    kk, kv = jax.random.split(jax.random.key(seed))
    k = jax.random.normal(kk, (tokens, 1, heads, key_dim)) * key_dim ** -0.5
    v = jax.random.normal(kv, (tokens, 1, heads, value_dim))

    @functools.partial(jax.jit, static_argnums=0)
    def advance(dtype, state, k, v):      # the state after tokens k, v [t, 1, H, D]
        def step(state, kv_t):
            return retention.retention_step(kv_t[0], kv_t[0], kv_t[1], log_decay, state)[1], None
        return jax.lax.scan(step, state.astype(DTYPES[dtype]), (k, v))[0]

    states = dict.fromkeys(("float32", state_dtype),
                           retention.zero_state(1, heads, key_dim, value_dim))
    drift, done = {}, 0
    for t in sorted({2**i for i in range(tokens.bit_length())} | {tokens}):
        states = {d: advance(d, s, k[done:t], v[done:t]) for d, s in states.items()}
        done = t
        wide, narrow = (np.asarray(states[d][0], np.float64) for d in ("float32", state_dtype))
        drift[t] = (np.abs(narrow - wide).max(axis=(1, 2))
                    / np.abs(wide).max(axis=(1, 2))).tolist()
    return drift


def plot(results: dict, path: str) -> None:
    """The logit deviation per position and, if measured, each head's state drift."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    drifts = {dtype: r["state_drift_by_head"] for dtype, r in results["state_dtypes"].items()
              if "state_drift_by_head" in r}
    fig, axes = plt.subplots(1, 1 + bool(drifts), figsize=(7 + 6 * bool(drifts), 4),
                             squeeze=False)
    ax = axes[0, 0]
    for dtype, r in results["state_dtypes"].items():
        curve = np.maximum(np.asarray(r["logit_deviation_by_position"]), 1e-9)
        ax.semilogy(np.arange(len(curve)), curve, label=f"{dtype} state")
    ax.set_xlabel("position (tokens decoded)")
    ax.set_ylabel("max |logit - parallel| / max |parallel|")
    ax.set_title(f"Decoding against the parallel forward, step {results['step']}")
    ax.legend()
    for dtype, drift in drifts.items():
        ax = axes[0, 1]
        tokens = [int(t) for t in drift]
        per_head = np.asarray(list(drift.values()))                          # [marks, H]
        for h in range(per_head.shape[1]):
            ax.loglog(tokens, per_head[:, h], marker=".", label=f"head {h}")
        heads, key_dim, value_dim = results["drift_heads"]
        ax.set_xlabel("random tokens")
        ax.set_ylabel(f"max |S_{dtype} - S_float32| / max |S_float32|")
        ax.set_title(f"{dtype} state drift, {heads} heads of {key_dim} x {value_dim}")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = [d for d in _STATE_DTYPES.value if d not in DTYPES]
    if unknown or not _STATE_DTYPES.value:
        raise app.UsageError(f"--state_dtypes: {unknown} not in {tuple(DTYPES)}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    model, config, step = train.load_model(_WORKDIR.value, step=_STEP.value, best=_BEST.value)
    rows = evaluation_rows(config, _SEQUENCES.value, _TOKENS.value)
    inputs = jnp.asarray(rows["inputs"])
    drift_config = (model.config if _DRIFT_CONFIG.value is None
                    else ModelConfig.from_config(_DRIFT_CONFIG.value.model))
    with jax.default_matmul_precision("highest"):
        reference = np.asarray(parallel_logits(model, inputs))
        results = {"workdir": _WORKDIR.value, "step": step, "shape": list(inputs.shape),
                   "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                   "jax": jax.__version__, "device": jax.devices()[0].device_kind,
                   "drift_heads": [drift_config.num_heads,
                                   drift_config.d_model // drift_config.num_heads,
                                   drift_config.resolved_value_dim // drift_config.num_heads],
                   "parallel": compare(reference, reference, rows), "state_dtypes": {}}
        for dtype in _STATE_DTYPES.value:
            start = time.perf_counter()
            logits = np.asarray(decoded_logits(with_state_dtype(model, dtype), inputs))
            r = compare(logits, reference, rows)
            results["state_dtypes"][dtype] = r
            print(f"{dtype:>8} state: loss {r['loss']:.5f} nats ({r['bits_per_byte']:.4f} "
                  f"bits/byte), change {r['loss_change']:+.2e} against the parallel forward, "
                  f"greedy tokens differing {r['greedy_differs']:.2%}, max logit deviation "
                  f"{r['max_logit_deviation']:.2e} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
            if dtype != "float32" and _DRIFT_TOKENS.value > 0:
                r["state_drift_by_head"] = state_drift(drift_config, dtype, _DRIFT_TOKENS.value)
                for t, errors in r["state_drift_by_head"].items():
                    print(f"{dtype:>8} state after {t:>6} random tokens, drift per head: "
                          + " ".join(f"{e:.1e}" for e in errors), flush=True)
    print(f"parallel forward: loss {results['parallel']['loss']:.5f} nats over "
          f"{inputs.shape[0]} x {inputs.shape[1]} tokens (step {step})")
    if _OUT.value:
        os.makedirs(_OUT.value, exist_ok=True)
        with open(os.path.join(_OUT.value, "state_precision.json"), "w") as f:
            json.dump(results, f, indent=1)
        plot(results, os.path.join(_OUT.value, "state_precision.png"))
        print(f"wrote {_OUT.value}/state_precision.json and .png")


if __name__ == "__main__":
    app.run(main)
