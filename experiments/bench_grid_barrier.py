"""A kernel boundary against a grid-wide barrier inside one persistent Pallas kernel.

Batch-1 decoding runs ~9.5 kernels a block (229 a token at the 1.3B preset), and each
pays a fixed cost beyond its bytes (BENCHMARKS.md "Decoding", sessions 20-23). A
persistent kernel per block would put a grid-wide barrier where each kernel boundary is,
and could issue the next phase's weight loads before it waits. This probe times the two
with the same work, before anyone writes that kernel:

* `chain`: `--rounds` pallas_calls in one jit, as a decode step runs them (one CUDA
  graph, XLA's programmatic dependent launch between them), each of `--programs` programs;
* `persistent`: one pallas_call of `--programs` programs looping over the rounds, with a
  grid barrier after each: an atomic counter (acquire-release, GPU scope) that every
  program adds 1 to and then polls until all have arrived.

Every round, program p sums the columns of its [`--tile_rows`, 128] bf16 tile of that
round's weights (in 64-row steps, as the decode GEMV does; 0 rows: no weights) and writes
out[r, p] = 0.5 * out[r - 1, (p + 1) % P] + those sums, float32 [128] (out[-1] is x). The
neighbour's value is written by another program in the round before, so a barrier that
lets a program through early gives a wrong answer: both forms are checked against float64
first, then timed (median wall time of a call, divided by the rounds).

The persistent form needs all its programs resident at once: at most one per SM here.
Pallas' interpret mode (the CPU) runs programs one by one, so there it runs with one.

  python3 experiments/bench_grid_barrier.py --tile_rows=0,64,512 --out=$OUT/grid_barrier.json
"""

import functools
import json

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from ceilings import copy_bandwidth, median_seconds
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_ROUNDS = flags.DEFINE_integer("rounds", 96, "Rounds (kernels of the chain, barriers of the "
                               "persistent kernel) a call.")
_PROGRAMS = flags.DEFINE_integer("programs", 0, "Programs of each form; 0: the GPU's SM "
                                 "count (1 when Pallas is interpreted).")
_TILE_ROWS = flags.DEFINE_list("tile_rows", ["0", "64", "512"], "Weight rows a program "
                               "streams each round (multiples of 64; 0: no weights).")
_NUM_WARPS = flags.DEFINE_integer("num_warps", 4, "Triton warps per program.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per setting (median reported).")
_COPY_BYTES = flags.DEFINE_integer("copy_bytes", 1 << 30, "Bytes of the copy-bandwidth probe.")
_OUT = flags.DEFINE_string("out", None, "Write all results as JSON here.")

WIDTH = 128         # float32 columns a program writes each round
BLOCK_ROWS = 64     # weight rows a loop step loads
TOLERANCE = 1e-5    # float32 sums of bf16 weights against float64


def column_sums(w_ref, at: tuple) -> jax.Array:
    """float32 [WIDTH]: the rows of w_ref[*at] ([rows, WIDTH]) summed, BLOCK_ROWS at a time
    (one indexer a load: Triton's lowering takes no view of a view)."""
    def step(i, acc):
        rows = pl.ds(pl.multiple_of(i * BLOCK_ROWS, BLOCK_ROWS), BLOCK_ROWS)
        return acc + jnp.sum(w_ref[(*at, rows, slice(None))].astype(jnp.float32), axis=0)
    return jax.lax.fori_loop(0, w_ref.shape[-2] // BLOCK_ROWS, step,
                             jnp.zeros((WIDTH,), jnp.float32))


def next_value(prev_ref, prev_at: tuple, w_ref, w_at: tuple, p, programs: int) -> jax.Array:
    """0.5 * prev_ref[*prev_at][(p + 1) % programs] (+ the column sums of w_ref[*w_at], if
    w_ref is not None)."""
    value = 0.5 * prev_ref[(*prev_at, (p + 1) % programs, slice(None))]
    return value if w_ref is None else value + column_sums(w_ref, w_at)


def chain_round_kernel(prev_ref, *refs):
    """One round of the chain, program p: prev [P, WIDTH] (all of it), w [rows, WIDTH]
    (this program's tile; absent without weights), out [WIDTH]."""
    w_ref, out_ref = refs if len(refs) == 2 else (None, refs[0])
    out_ref[...] = next_value(prev_ref, (), w_ref, (), pl.program_id(0), pl.num_programs(0))


def chain(x, weights, *, rounds: int, interpret: bool = False, num_warps: int = 4) -> list:
    """One pallas_call a round: x [P, WIDTH] float32, weights [rounds, P, rows, WIDTH] or
    None; returns the rounds' [P, WIDTH]."""
    programs = x.shape[0]
    outs, prev = [], x
    for r in range(rounds):
        in_specs = [pl.BlockSpec(x.shape, lambda p: (0, 0))]
        args = [prev]
        if weights is not None:
            in_specs.append(pl.BlockSpec((None, None) + weights.shape[2:],
                                         lambda p, r=r: (r, p, 0, 0)))
            args.append(weights)
        prev = pl.pallas_call(
            chain_round_kernel, grid=(programs,), in_specs=in_specs,
            out_specs=pl.BlockSpec((None, WIDTH), lambda p: (p, 0)),
            out_shape=jax.ShapeDtypeStruct(x.shape, jnp.float32),
            compiler_params=plgpu.CompilerParams(num_warps=num_warps),
            interpret=interpret, name="chain_round")(*args)
        outs.append(prev)
    return outs


def grid_barrier(counter_ref, arrived: jax.Array, *, on_gpu: bool) -> None:
    """Waits until `arrived` programs have called this (the counter, int32 [1], starts at
    0 each call and is never reset). On the GPU, CTA barriers order every thread's stores
    before the arrival, and every later load after the wait (the interpreter has none, and
    runs one thread). The atomics' index and value are a traced 0: the interpreter's loops
    take no constants, and its atomics no Python int."""
    zero = arrived - arrived
    if on_gpu:
        plgpu.debug_barrier()
    plgpu.atomic_add(counter_ref, zero, zero + 1)

    def poll(seen):
        return plgpu.atomic_add(counter_ref, seen - seen, seen - seen)
    jax.lax.while_loop(lambda seen: seen < arrived, poll, poll(zero))
    if on_gpu:
        plgpu.debug_barrier()


def persistent_kernel(x_ref, *refs, rounds: int, on_gpu: bool):
    """All rounds in one program p: x [P, WIDTH], w [R, P, rows, WIDTH] (all of it; absent
    without weights), the counter [1] (aliased to the output counter), out [R, P, WIDTH]."""
    if len(refs) == 4:
        w_ref, _, out_ref, counter_ref = refs
    else:
        w_ref, (_, out_ref, counter_ref) = None, refs
    p, programs = pl.program_id(0), pl.num_programs(0)
    out_ref[0, p, :] = next_value(x_ref, (), w_ref, (0, p), p, programs)

    def step(r, carry):
        grid_barrier(counter_ref, r * programs, on_gpu=on_gpu)
        out_ref[r, p, :] = next_value(out_ref, (r - 1,), w_ref, (r, p), p, programs)
        return carry
    jax.lax.fori_loop(1, rounds, step, 0)


def persistent(x, weights, *, rounds: int, interpret: bool = False,
               num_warps: int = 4) -> list:
    """The same rounds as `chain`, in one pallas_call with a grid barrier between rounds."""
    programs = x.shape[0]
    in_specs = [pl.BlockSpec(x.shape, lambda p: (0, 0))]
    args = [x]
    if weights is not None:
        in_specs.append(pl.BlockSpec(weights.shape, lambda p: (0, 0, 0, 0)))
        args.append(weights)
    in_specs.append(pl.BlockSpec((1,), lambda p: (0,)))
    args.append(jnp.zeros((1,), jnp.int32))
    out, _ = pl.pallas_call(
        functools.partial(persistent_kernel, rounds=rounds, on_gpu=not interpret), grid=(programs,),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((rounds, programs, WIDTH), lambda p: (0, 0, 0)),
                   pl.BlockSpec((1,), lambda p: (0,))],
        out_shape=[jax.ShapeDtypeStruct((rounds, programs, WIDTH), jnp.float32),
                   jax.ShapeDtypeStruct((1,), jnp.int32)],
        input_output_aliases={len(args) - 1: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        interpret=interpret, name="persistent_rounds")(*args)
    return [out[r] for r in range(rounds)]


def reference(x, weights, rounds: int) -> np.ndarray:
    """float64 [R, P, WIDTH]: the rounds computed in NumPy."""
    prev = np.asarray(x, np.float64)
    sums = (None if weights is None
            else np.asarray(weights.astype(jnp.float32), np.float64).sum(axis=2))
    outs = []
    for r in range(rounds):
        prev = 0.5 * np.roll(prev, -1, axis=0) + (0 if sums is None else sums[r])
        outs.append(prev)
    return np.stack(outs)


def inputs(programs: int, rows: int, rounds: int, seed: int = 0):
    """Random x [P, WIDTH] float32 and weights [rounds, P, rows, WIDTH] bf16 (None for 0
    rows)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((programs, WIDTH), np.float32))
    if not rows:
        return x, None
    shape = (rounds, programs, rows, WIDTH)
    return x, jnp.asarray(rng.standard_normal(shape, np.float32) * rows**-0.5, jnp.bfloat16)


def check_flags(programs: int, interpret: bool, sm_count: int | None) -> list[int]:
    """The tile rows; raises ValueError naming the flag whose value cannot run."""
    rows = [int(r) for r in _TILE_ROWS.value]
    if any(r < 0 or r % BLOCK_ROWS for r in rows):
        raise ValueError(f"--tile_rows must be multiples of {BLOCK_ROWS}, got {rows}")
    if _ROUNDS.value < 2:
        raise ValueError(f"--rounds must be at least 2, got {_ROUNDS.value}")
    if interpret and programs != 1:
        raise ValueError(f"--programs must be 1 when Pallas is interpreted (it runs programs "
                         f"one by one, so a barrier would wait forever), got {programs}")
    if sm_count is not None and not 1 <= programs <= sm_count:
        raise ValueError(f"--programs must be 1..{sm_count} (one per SM keeps every program "
                         f"of the persistent kernel resident), got {programs}")
    return rows


def measure(programs: int, rows: int, bandwidth: float, interpret: bool) -> list[dict]:
    """Both forms at one tile size: checked against float64, then timed."""
    rounds = _ROUNDS.value
    x, weights = inputs(programs, rows, rounds)
    want = reference(x, weights, rounds)
    weight_bytes = 0 if weights is None else weights.size * 2 / rounds
    results = []
    for name, form in (("chain", chain), ("persistent", persistent)):
        fn = jax.jit(functools.partial(form, rounds=rounds, interpret=interpret,
                                       num_warps=_NUM_WARPS.value))
        got = np.stack([np.asarray(y, np.float64) for y in fn(x, weights)])
        row = dict(form=name, programs=programs, tile_rows=rows, rounds=rounds,
                   mb_per_round=weight_bytes / 1e6,
                   rel_err=float(np.abs(got - want).max() / np.abs(want).max()))
        if not row["rel_err"] <= TOLERANCE:
            row["error"] = "differs from the float64 rounds: not timed"
        else:
            seconds = median_seconds(fn, x, weights, repeats=_REPEATS.value)
            row["us_per_round"] = seconds / rounds * 1e6
            if weight_bytes:
                row["bandwidth_fraction"] = weight_bytes / (seconds / rounds) / bandwidth
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    interpret = jax.default_backend() != "gpu"
    device = jax.devices()[0]
    sm_count = None if interpret else device.core_count
    programs = _PROGRAMS.value or (1 if interpret else sm_count)
    try:
        tile_rows = check_flags(programs, interpret, sm_count)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    bandwidth = copy_bandwidth(_COPY_BYTES.value)
    print(f"device {device.device_kind}, jax {jax.__version__}, copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s, {programs} programs, Pallas "
          f"{'interpreted' if interpret else 'on GPU'}")
    rows = []
    for tile in tile_rows:
        rows += measure(programs, tile, bandwidth, interpret)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(dict(device=device.device_kind, jax=jax.__version__,
                           copy_bandwidth=bandwidth, interpret=interpret, results=rows),
                      f, indent=2)
    print("| form | programs | tile rows | MB a round | us a round | x copy bandwidth | rel err |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    nan = float("nan")
    for r in rows:
        print(f"| {r['form']} | {r['programs']} | {r['tile_rows']} | {r['mb_per_round']:.2f} | "
              f"{r.get('us_per_round', nan):.2f} | {r.get('bandwidth_fraction', nan):.2f} | "
              f"{r['rel_err']:.1e} |" + (f" {r['error']}" if "error" in r else ""))


if __name__ == "__main__":
    app.run(main)
