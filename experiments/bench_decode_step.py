"""One decoding step of retention alone: XLA's `retention_step` against
`kernels.retention_step_pallas` at each tile setting (issue 5 part 3).

`bench_decode.py` times whole models; this isolates the step that dominates their time at
batch 8-32, to choose the kernel's `block_v` and `num_warps`. With `--rotate` (the default,
as in the models) q and k arrive unrotated: XLA's side is `positions.rotate` of both and
its step in one jitted function, the kernel's rotates them itself (`rotate_at`), at
positions from `--position` on. Each timed call runs `--steps`
tokens in one jitted `lax.scan` with the state donated (the kernel then updates it in
place, as in the model's decode loop), so host dispatch is shared by `--steps` tokens.
Before timing, every Pallas setting's outputs and final state are checked against XLA's on
the same inputs; a setting that fails the check or does not compile is recorded, not timed.

  python3 experiments/bench_decode_step.py --batches=1,8,32 --block_v=auto,32,64,128,256 --num_warps=4,8 --out=$OUT/decode_step.json

Defaults: the 1.3B preset's heads (8 heads, Dk 256, Dv 432), bf16 q, k, v, float32 state.
Reports microseconds per step, the state's read+write rate (2 x state bytes / time) and its
fraction of the copy bandwidth measured in the same run.
"""

import functools
import json
import statistics
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from ceilings import copy_bandwidth
from retnet_jax import kernels, positions, retention
from retnet_jax.kernels.common import column_group, is_power_of_two
from retnet_jax.kernels.decode_step import default_block_v

_HEADS = flags.DEFINE_integer("heads", 8, "Retention heads H.")
_KEY_DIM = flags.DEFINE_integer("key_dim", 256, "Key dim Dk.")
_VALUE_DIM = flags.DEFINE_integer("value_dim", 432, "Value dim Dv.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8", "32"], "Batch sizes.")
_DECAYS = flags.DEFINE_list("decays", ["fixed", "gated"], "fixed ([H] decay) and/or gated "
                            "([B, H] per token).")
_BLOCK_V = flags.DEFINE_list("block_v", ["auto", "64", "128", "256"], "Pallas block_v "
                             "values; 'auto': the kernel's default (`default_block_v`).")
flags.register_validator("block_v", lambda v: bool(v) and all(b == "auto" or b.isdigit()
                                                               for b in v),
                         message="--block_v takes 'auto' and/or whole numbers")
_ROTATE = flags.DEFINE_boolean("rotate", True, "q and k arrive unrotated and are rotated "
                               "(xPos) at the token's position, as in the models.")
_POSITION = flags.DEFINE_integer("position", 8192, "Position of the first timed token.")
_NUM_WARPS = flags.DEFINE_list("num_warps", ["4", "8"], "Pallas num_warps values.")
_STEPS = flags.DEFINE_integer("steps", 32, "Tokens per timed call (one lax.scan).")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per setting (median reported).")
_INPUT_SETS = flags.DEFINE_integer("input_sets", 4, "Random input sets the timed calls cycle "
                                   "through.")
_COPY_BYTES = flags.DEFINE_integer("copy_bytes", 1 << 30, "Bytes of the copy-bandwidth probe.")
_OUT = flags.DEFINE_string("out", None, "Write all results as JSON here.")

# Largest relative errors accepted against XLA's step after --steps tokens: the state is
# float32 in both (the same products, summed in another order), o is rounded to bf16.
STATE_TOLERANCE = 1e-4
OUTPUT_TOLERANCE = 2e-2


def random_inputs(key, steps: int, batch: int, gated: bool) -> tuple:
    """(q, k [steps, B, H, Dk], v [steps, B, H, Dv] bf16, log_decay [H] or [steps, B, H],
    positions int32 [steps, B]: --position + t, plus b for sequence b)."""
    kq, kk, kv, kd = jax.random.split(key, 4)
    heads, key_dim, value_dim = _HEADS.value, _KEY_DIM.value, _VALUE_DIM.value
    scale = key_dim ** -0.5
    q = (jax.random.normal(kq, (steps, batch, heads, key_dim)) * scale).astype(jnp.bfloat16)
    k = (jax.random.normal(kk, (steps, batch, heads, key_dim)) * scale).astype(jnp.bfloat16)
    v = jax.random.normal(kv, (steps, batch, heads, value_dim)).astype(jnp.bfloat16)
    if gated:   # YOCO's gate: log sigmoid(x) / 16
        log_decay = jax.nn.log_sigmoid(jax.random.normal(kd, (steps, batch, heads))) / 16
    else:       # RetNet's fixed multi-scale decay, 1 - 2^(-5 - h)
        log_decay = jnp.log1p(-2.0 ** (-5.0 - jnp.arange(heads, dtype=jnp.float32)))
    at = _POSITION.value + jnp.arange(steps, dtype=jnp.int32)[:, None] + jnp.arange(batch)
    return q, k, v, log_decay, at.astype(jnp.int32)


def xla_step(q, k, v, log_decay, state, at):
    """XLA's step, after XLA's rotation of q and k at positions `at` [B] (None: none)."""
    if at is not None:
        q, k = (positions.rotate(x[:, None], at)[:, 0] for x in (q, k))
    return retention.retention_step(q, k, v, log_decay, state)


def decode_steps(step, inputs: tuple, state):
    """`step(q, k, v, log_decay, state, at)` over the tokens of `inputs` (one lax.scan), with
    at the token's positions when --rotate, else None; returns (o [steps, B, H, Dv], state)."""
    q, k, v, log_decay, at = inputs
    per_token = log_decay.ndim == 3      # gated: one [B, H] decay per token; fixed: [H]

    def body(state, xs):
        q, k, v, at, *decay = xs
        o, state = step(q, k, v, decay[0] if per_token else log_decay, state,
                        at if _ROTATE.value else None)
        return state, o

    state, o = jax.lax.scan(body, state, (q, k, v, at) + ((log_decay,) if per_token else ()))
    return o, state


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def time_step(step, input_sets: list, state) -> float:
    """Median seconds per token of `decode_steps(step, ...)`, state donated, after a warm-up."""
    run = jax.jit(functools.partial(decode_steps, step), donate_argnums=1)
    _, state = run(input_sets[0], state)
    jax.block_until_ready(state)
    times = []
    for r in range(_REPEATS.value):
        start = time.perf_counter()
        _, state = run(input_sets[r % len(input_sets)], state)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - start) / _STEPS.value)
    return statistics.median(times)


def steps_to_time(interpret: bool) -> list[tuple[str, object, str | None]]:
    """(name, step function, block_v flag value or None for XLA) for XLA and each Pallas
    setting of the flags."""
    settings = [("xla", xla_step, None)]
    for block_v in _BLOCK_V.value:
        for num_warps in _NUM_WARPS.value:
            def step(q, k, v, log_decay, state, at, block_v=block_v, num_warps=num_warps):
                return kernels.retention_step_pallas(
                    q, k, v, log_decay, state, rotate_at=at, num_warps=int(num_warps),
                    block_v=None if block_v == "auto" else int(block_v), interpret=interpret)
            settings.append((f"pallas bv{block_v} w{num_warps}", step, block_v))
    return settings


def measure(batch: int, decay: str, bandwidth: float, interpret: bool) -> list[dict]:
    """Rows for one (batch, decay): XLA first, then each Pallas setting checked and timed."""
    keys = jax.random.split(jax.random.key(batch), _INPUT_SETS.value + 1)
    input_sets = [random_inputs(key, _STEPS.value, batch, decay == "gated") for key in keys[1:]]
    shape = (batch, _HEADS.value, _KEY_DIM.value, _VALUE_DIM.value)
    state0 = jax.random.normal(keys[0], shape, jnp.float32)
    state_bytes = 4 * int(np.prod(shape))
    want_o, want_state = jax.jit(functools.partial(decode_steps, xla_step))(
        input_sets[0], state0)
    rows = []
    for name, step, block_v in steps_to_time(interpret):
        row = {"impl": name, "decay": decay, "batch": batch, "state_bytes": state_bytes}
        if block_v == "auto" or (block_v and is_power_of_two(int(block_v))):
            most = (default_block_v(batch, _HEADS.value, _VALUE_DIM.value)
                    if block_v == "auto" else int(block_v))
            row["columns"] = column_group(_VALUE_DIM.value, most)   # per program
        try:
            o, state = jax.jit(functools.partial(decode_steps, step))(input_sets[0], state0)
            row["state_rel_err"] = relative_error(state, want_state)
            row["o_rel_err"] = relative_error(o, want_o)
            # `not <=`: a NaN error fails the check too
            if not (row["state_rel_err"] <= STATE_TOLERANCE
                    and row["o_rel_err"] <= OUTPUT_TOLERANCE):
                row["error"] = "differs from XLA's retention_step"
            else:
                seconds = time_step(step, input_sets, state0 + 0)   # a copy: it is donated
                row.update(us_per_step=seconds * 1e6,
                           state_GBps=2 * state_bytes / seconds / 1e9,
                           fraction_of_copy_bandwidth=2 * state_bytes / seconds / bandwidth)
        except Exception as error:   # a setting that does not compile: record it, go on
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| impl | decay | batch | us/step | state r+w GB/s | of copy bandwidth | "
          "check: state / o rel err |\n|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        check = (f"{r['state_rel_err']:.1e} / {r['o_rel_err']:.1e}"
                 if "state_rel_err" in r else "")
        if "us_per_step" in r:
            print(f"| {r['impl']} | {r['decay']} | {r['batch']} | {r['us_per_step']:.1f} | "
                  f"{r['state_GBps']:,.0f} | {r['fraction_of_copy_bandwidth']:.0%} | {check} |")
        else:
            note = " ".join(part for part in (check, r["error"]) if part)
            print(f"| {r['impl']} | {r['decay']} | {r['batch']} | | | | {note} |")


def main(argv):
    del argv
    for decay in _DECAYS.value:
        if decay not in ("fixed", "gated"):
            raise app.UsageError(f"--decays takes fixed and/or gated, got {decay!r}")
    interpret = jax.default_backend() != "gpu"
    device = jax.devices()[0]
    bandwidth = copy_bandwidth(_COPY_BYTES.value)
    print(f"device {device.device_kind}, jax {jax.__version__}, copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s, Pallas {'interpreted' if interpret else 'on GPU'}")
    rows = [row for batch in _BATCHES.value for decay in _DECAYS.value
            for row in measure(int(batch), decay, bandwidth, interpret)]
    print_table(rows)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump({"device": device.device_kind, "jax": jax.__version__,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                       "copy_bandwidth": bandwidth, "interpret": interpret,
                       "rotate": _ROTATE.value, "position": _POSITION.value,
                       "argv": sys.argv,
                       "results": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
