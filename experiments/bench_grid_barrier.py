"""A kernel boundary against a grid-wide barrier inside one persistent Pallas kernel.

Batch-1 decoding runs ~9.5 kernels a block (229 a token at the 1.3B preset), and each
pays a fixed cost beyond its bytes (BENCHMARKS.md "Decoding", sessions 20-23). A
persistent kernel per block would put a grid-wide barrier where each kernel boundary is,
and could issue the next phase's weight loads before it waits. This probe times the two
with the same work, before anyone writes that kernel:

* `chain`: `--rounds` pallas_calls in one jit, as a decode step runs them (one CUDA
  graph, XLA's programmatic dependent launch between them), each of `--programs` programs;
* `persistent`: one pallas_call of `--programs` programs looping over the rounds, with a
  grid barrier between rounds: an atomic counter (acquire-release, GPU scope) that every
  program adds 1 to and then polls until all have arrived. With `--ahead` N, each program
  first loads its next round's first N weight row blocks (they depend on no other
  program), so those loads are in flight while it waits: what a kernel boundary cannot do.

Every round, program p sums the columns of its [`--tile_rows`, 128] bf16 tile of that
round's weights (in 64-row steps, as the decode GEMV does; 0 rows: no weights) and writes
out[r, p] = 0.5 * out[r - 1, (p + 1) % P] + those sums, float32 [128] (out[-1] is x). The
neighbour's value is written by another program in the round before, so a barrier that
lets a program through early gives a wrong answer: the persistent kernel's output starts
as NaN, and each form (its own random inputs) is checked against float64 before and after
it is timed, the persistent kernel's counter too (it must end at (rounds - 1) x programs
arrivals and no wait given up). As a control, the persistent kernel without its barrier
runs once and must fail that check (with more than one program). Time a round = the
median wall time of a call (five back to back, one sync) over the rounds. The persistent
kernel's waiting programs poll the counter with atomic adds of 0, which contend on one
address (`--poll=atomic`), or with volatile loads and one acquiring atomic after
(`--poll=load`).

`--phases` adds one more setting whose rounds cycle through uneven tiles, a decode block's
phases (at 528 programs, 320/64/128/192/128 rows are 43.3/8.7/17.3/26.0/17.3 MB: the 1.3B's
q/k/v/gate 45.1 MB, its float32 retention state read and written 7.1, out_proj 14.2, the
gated FFN's 28.3 and 14.2), each phase with its own barrier or kernel, so a block's time is
measured, not added up from even rounds. Rows past a round's tile are NaN: reading them
fails the check.

The persistent form needs all its programs resident at once: one per SM by default, up
to PROGRAMS_PER_SM with `--programs` (more programs, smaller tiles: more loads in flight;
at one per SM a 512-row round is 8 loads in a row, each waiting on HBM's latency). A
program that is never resident would make the barrier wait forever, so a wait gives up
after MAX_POLLS polls and counts itself, and the check reports it. Pallas' interpret mode (the
CPU) runs programs one by one, so there it runs with one.

  python3 experiments/bench_grid_barrier.py --tile_rows=0,64,512 --ahead=0,1,2 \
      --num_warps=4,8 --out=$OUT/grid_barrier.json
  python3 experiments/bench_grid_barrier.py --programs=528 --tile_rows=128 --ahead=0,2 \
      --num_warps=4 --out=$OUT/grid_barrier_528.json     # 4 a SM of an H100, same bytes
  python3 experiments/bench_grid_barrier.py --programs=528 --tile_rows= --rounds=40 \
      --phases=320,64,128,192,128 --ahead=0,1 --num_warps=4 --out=$OUT/gb_block.json
"""

import datetime
import functools
import json
import os
from collections.abc import Sequence

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from ceilings import copy_bandwidth, median_seconds
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_ROUNDS = flags.DEFINE_integer("rounds", 96, "Rounds (kernels of the chain, barriers + 1 of "
                               "the persistent kernel) a call.")
_PROGRAMS = flags.DEFINE_integer("programs", 0, "Programs of each form; 0: the GPU's SM "
                                 "count (1 when Pallas is interpreted).")
_TILE_ROWS = flags.DEFINE_list("tile_rows", ["0", "64", "512"], "Weight rows a program "
                               "streams each round (multiples of 64; 0: no weights).")
_PHASES = flags.DEFINE_list("phases", [], "One more setting: weight rows a program streams "
                             "in each round, the rounds cycling through them (multiples of "
                             "64, none 0), e.g. a decode block's phases.")
_AHEAD = flags.DEFINE_list("ahead", ["0", "1", "2"], "Row blocks of each round's weight "
                           "tile the persistent kernel loads before its barrier (one row per "
                           "value; those above the smallest tile's row blocks are skipped).")
_NUM_WARPS = flags.DEFINE_list("num_warps", ["4", "8"], "Triton warps per program (each "
                               "form at each; one program per SM keeps few loads in flight "
                               "at 4).")
_POLL = flags.DEFINE_enum("poll", "atomic", ["atomic", "load"], "How a barrier's wait reads "
                          "the arrivals: an atomic add of 0 (all programs contend on one "
                          "address) or a volatile load, then one atomic to acquire.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per setting (median reported).")
_COPY_BYTES = flags.DEFINE_integer("copy_bytes", 1 << 30, "Bytes of the copy-bandwidth probe.")
_OUT = flags.DEFINE_string("out", None, "Write all results as JSON here.")

WIDTH = 128         # float32 columns a program writes each round
BLOCK_ROWS = 64     # weight rows a loop step loads
TOLERANCE = 1e-5    # float32 sums of bf16 weights against float64
CALLS = 5           # back-to-back calls a timing (host dispatch out of the per-call time)
MAX_POLLS = 1 << 16  # a barrier's polls before it gives up (~0.1 s; a wait takes µs)
PROGRAMS_PER_SM = 4  # the most --programs a SM (4 warps each fit 4 a SM here)


def load_tile(w_ref, at: tuple, i) -> jax.Array:
    """bf16 [BLOCK_ROWS, WIDTH]: the i-th row block of w_ref[*at] ([rows, WIDTH]), in one
    indexer (Triton's lowering takes no view of a view); i a Python or traced int."""
    start = i * BLOCK_ROWS
    rows = pl.ds(start if isinstance(i, int) else pl.multiple_of(start, BLOCK_ROWS), BLOCK_ROWS)
    return w_ref[(*at, rows, slice(None))]


def column_sums(w_ref, at: tuple, blocks, loaded: Sequence[jax.Array] = ()) -> jax.Array:
    """float32 [WIDTH]: the first `blocks` (an int) row blocks of w_ref[*at] (bf16 [rows,
    WIDTH]) summed a row block at a time; its first row blocks may come `loaded` already."""
    def add(acc, tile):
        return acc + jnp.sum(tile.astype(jnp.float32), axis=0)
    acc = functools.reduce(add, loaded, jnp.zeros((WIDTH,), jnp.float32))
    return jax.lax.fori_loop(len(loaded), blocks,
                             lambda i, acc: add(acc, load_tile(w_ref, at, i)), acc)


def next_value(prev_ref, prev_at: tuple, w_ref, w_at: tuple, p, programs: int, blocks=None,
               loaded: Sequence[jax.Array] = ()) -> jax.Array:
    """float32 [WIDTH]: 0.5 * prev_ref[*prev_at][(p + 1) % programs] (float32 [P, WIDTH])
    + the column sums of the first `blocks` row blocks of w_ref[*w_at] (bf16 [rows,
    WIDTH]; all of them if None; none if w_ref is None), its first row blocks `loaded`."""
    value = 0.5 * prev_ref[(*prev_at, (p + 1) % programs, slice(None))]
    if w_ref is None:
        return value
    blocks = w_ref.shape[-2] // BLOCK_ROWS if blocks is None else blocks
    return value + column_sums(w_ref, w_at, blocks, loaded)


def checked_cycle(cycle: Sequence[int] | None, rounds: int, weights) -> tuple[int, ...]:
    """The rows each round reads, cycling: `cycle`, or None for weights' whole [rounds, P,
    rows, WIDTH] tiles (0 rows without weights). Raises ValueError unless `rounds` is a
    multiple of its length and each tile is whole row blocks within weights' tiles."""
    rows = 0 if weights is None else weights.shape[2]
    cycle = (rows,) if cycle is None else tuple(cycle)
    if rounds % len(cycle):
        raise ValueError(f"{rounds} rounds are no whole number of {len(cycle)}-tile cycles")
    if any(r < 0 or r % BLOCK_ROWS or r > rows for r in cycle):
        raise ValueError(f"tiles of {list(cycle)} rows: each must be a multiple of "
                         f"{BLOCK_ROWS} up to the weights' {rows} rows")
    return cycle


def chain_round_kernel(prev_ref, *refs):
    """One round of the chain, program p: prev float32 [P, WIDTH] (all of it), w bf16
    [rows, WIDTH] (this program's tile; absent without weights), out float32 [WIDTH]."""
    w_ref, out_ref = refs if len(refs) == 2 else (None, refs[0])
    out_ref[...] = next_value(prev_ref, (), w_ref, (), pl.program_id(0), pl.num_programs(0))


def chain(x, weights, *, rounds: int, cycle: Sequence[int] | None = None,
          interpret: bool = False, num_warps: int = 4) -> list:
    """One pallas_call a round: x float32 [P, WIDTH], weights bf16 [rounds, P, rows, WIDTH]
    or None, round r reading the first cycle[r % len(cycle)] rows of its tile (all of them
    if cycle is None); returns the rounds' float32 [P, WIDTH], a list."""
    programs = x.shape[0]
    cycle = checked_cycle(cycle, rounds, weights)
    outs, prev = [], x
    for r in range(rounds):
        in_specs = [pl.BlockSpec(x.shape, lambda p: (0, 0))]
        args = [prev]
        if weights is not None:
            in_specs.append(pl.BlockSpec((None, None, cycle[r % len(cycle)], WIDTH),
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


def grid_barrier(counter_ref, arrived: jax.Array, *, on_gpu: bool, poll: str) -> None:
    """Waits until `arrived` programs have called this: counter_ref int32 [2] holds the
    arrivals and the give-ups, both 0 at each call's start and never reset. A program
    gives up after MAX_POLLS polls and adds 1 to the give-ups, so one that is never
    resident gives a reported failure, not a hang (and the interpreter, which drops a loop
    whose results go unused, keeps this one). On the GPU, CTA barriers order every
    thread's stores before the arrival, and every later load after the wait (the
    interpreter has none, and runs one thread). `poll` is how the wait reads the arrivals:
    "atomic", an acquire-release atomic add of 0 each time (all programs' polls contend on
    one address), or "load", a volatile load each time and one such atomic after (the
    acquire that orders the later loads). The atomics' indices and values are traced: the
    interpreter's loops take no constants, and its atomics no Python int."""
    zero = arrived - arrived
    if on_gpu:
        plgpu.debug_barrier()
    plgpu.atomic_add(counter_ref, zero, zero + 1)

    def read(polls):
        if poll == "load":
            return plgpu.load(counter_ref.at[pl.ds(zero, 1)], volatile=True)[0], polls + 1
        return plgpu.atomic_add(counter_ref, zero, zero), polls + 1
    seen, _ = jax.lax.while_loop(lambda c: (c[0] < arrived) & (c[1] < MAX_POLLS),
                                 lambda c: read(c[1]), read(zero))
    if poll == "load":   # the loop's result is used below: unused, the loop is dropped
        plgpu.atomic_add(counter_ref, zero, zero)
    plgpu.atomic_add(counter_ref, zero + 1, (seen < arrived).astype(jnp.int32))
    if on_gpu:
        plgpu.debug_barrier()


def persistent_kernel(x_ref, *refs, rounds: int, cycle: Sequence[int], ahead: int,
                      barrier: str | None, on_gpu: bool):
    """All rounds in one program p: x float32 [P, WIDTH], w bf16 [R, P, rows, WIDTH] (all
    of it; absent without weights; round r reads the first cycle[r % len(cycle)] rows of
    its tile), the output's and the counter's initial values (aliased to them), out float32
    [R, P, WIDTH], the counter int32 [2]; R a multiple of len(cycle). Each round's first
    `ahead` weight row blocks are loaded before its barrier: they depend on no other
    program, so their loads are in flight while it waits. `barrier` is the barrier's poll
    (`grid_barrier`); None leaves the barrier out (the check's control). The first cycle
    is unrolled, then a loop over the cycles runs each phase unrolled, so every row-block
    loop has a fixed trip count, as in the chain's kernels."""
    if len(refs) == 5:
        w_ref, _, _, out_ref, counter_ref = refs
    else:
        w_ref, (_, _, out_ref, counter_ref) = None, refs
    p, programs = pl.program_id(0), pl.num_programs(0)
    blocks = [rows // BLOCK_ROWS for rows in cycle]
    out_ref[0, p, :] = next_value(x_ref, (), w_ref, (0, p), p, programs, blocks[0])

    def run_round(r, phase: int):
        loaded = [load_tile(w_ref, (r, p), i) for i in range(ahead)]
        if barrier:
            grid_barrier(counter_ref, r * programs, on_gpu=on_gpu, poll=barrier)
        out_ref[r, p, :] = next_value(out_ref, (r - 1,), w_ref, (r, p), p, programs,
                                      blocks[phase], loaded)

    def run_cycle(c, carry):
        for phase in range(len(cycle)):
            run_round(c * len(cycle) + phase, phase)
        return carry
    for phase in range(1, len(cycle)):   # r traced: the interpreter's atomics take no int
        run_round(p - p + phase, phase)
    jax.lax.fori_loop(1, rounds // len(cycle), run_cycle, 0)


def persistent(x, weights, *, rounds: int, cycle: Sequence[int] | None = None,
               ahead: int = 0, barrier: str | None = "atomic", interpret: bool = False,
               num_warps: int = 4) -> tuple[jax.Array, jax.Array]:
    """The same rounds as `chain` in one pallas_call, a grid barrier between rounds, each
    round's first `ahead` weight row blocks loaded before it (`persistent_kernel`): x
    float32 [P, WIDTH], weights bf16 [rounds, P, rows, WIDTH] or None, round r reading the
    first cycle[r % len(cycle)] rows of its tile (all if None). Returns the rounds, float32
    [rounds, P, WIDTH] (NaN where no program wrote), and the barrier's arrivals and
    give-ups, int32 [2] ((rounds - 1) x P and 0 with a barrier that held)."""
    programs = x.shape[0]
    cycle = checked_cycle(cycle, rounds, weights)
    if ahead and (weights is None or ahead > min(cycle) // BLOCK_ROWS):
        raise ValueError(f"ahead = {ahead} row blocks, but the smallest weight tile holds "
                         f"{0 if weights is None else min(cycle) // BLOCK_ROWS}")
    out_shape = (rounds, programs, WIDTH)
    whole_out, whole_counter = (pl.BlockSpec(out_shape, lambda p: (0, 0, 0)),
                                pl.BlockSpec((2,), lambda p: (0,)))
    in_specs = [pl.BlockSpec(x.shape, lambda p: (0, 0))]
    args = [x]
    if weights is not None:
        in_specs.append(pl.BlockSpec(weights.shape, lambda p: (0, 0, 0, 0)))
        args.append(weights)
    in_specs += [whole_out, whole_counter]
    args += [jnp.full(out_shape, jnp.nan, jnp.float32), jnp.zeros((2,), jnp.int32)]
    return pl.pallas_call(
        functools.partial(persistent_kernel, rounds=rounds, cycle=cycle, ahead=ahead,
                          barrier=barrier, on_gpu=not interpret),
        grid=(programs,), in_specs=in_specs, out_specs=[whole_out, whole_counter],
        out_shape=[jax.ShapeDtypeStruct(out_shape, jnp.float32),
                   jax.ShapeDtypeStruct((2,), jnp.int32)],
        input_output_aliases={len(args) - 2: 0, len(args) - 1: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        interpret=interpret, name="persistent_rounds")(*args)


def reference(x, weights, rounds: int) -> np.ndarray:
    """float64 [R, P, WIDTH]: the rounds computed in NumPy (the NaN rows past a round's
    tile left out)."""
    prev = np.asarray(x, np.float64)
    sums = (None if weights is None
            else np.nansum(np.asarray(weights.astype(jnp.float32), np.float64), axis=2))
    outs = []
    for r in range(rounds):
        prev = 0.5 * np.roll(prev, -1, axis=0) + (0 if sums is None else sums[r])
        outs.append(prev)
    return np.stack(outs)


def inputs(programs: int, rows: int | Sequence[int], rounds: int, seed: int = 0):
    """Random x float32 [P, WIDTH] and weights bf16 [rounds, P, max rows, WIDTH] (None for
    0 rows). With rows a cycle of tiles, round r's rows from cycle[r % len(cycle)] on are
    NaN: a kernel that reads them fails the check."""
    cycle = (rows,) if isinstance(rows, int) else tuple(rows)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((programs, WIDTH), np.float32))
    if not max(cycle):
        return x, None
    shape = (rounds, programs, max(cycle), WIDTH)
    w = rng.standard_normal(shape, np.float32) * max(cycle)**-0.5
    for r in range(rounds):
        w[r, :, cycle[r % len(cycle)]:] = np.nan
    return x, jnp.asarray(w, jnp.bfloat16)


def int_list(flag) -> list[int]:
    """A list flag's values as ints; ValueError naming the flag otherwise."""
    try:
        return [int(v) for v in flag.value]
    except ValueError:
        raise ValueError(f"--{flag.name} must be integers, got {flag.value}") from None


def check_flags(programs: int, interpret: bool,
                sm_count: int | None) -> tuple[list, list, list, tuple]:
    """(tile rows, row blocks ahead, warps, phases' rows); raises ValueError naming the flag
    whose value cannot run."""
    tile_rows, ahead, warps = int_list(_TILE_ROWS), int_list(_AHEAD), int_list(_NUM_WARPS)
    phases = tuple(int_list(_PHASES))
    if any(r <= 0 or r % BLOCK_ROWS for r in phases):
        raise ValueError(f"--phases must be multiples of {BLOCK_ROWS} above 0, got "
                         f"{list(phases)}")
    if not tile_rows and not phases:
        raise ValueError("--tile_rows and --phases are both empty: nothing to time")
    if phases and _ROUNDS.value % len(phases):
        raise ValueError(f"--rounds must be a multiple of the {len(phases)} --phases, got "
                         f"{_ROUNDS.value}")
    if not warps or any(w < 1 or w & (w - 1) for w in warps):
        raise ValueError(f"--num_warps must be powers of two, got {warps}")
    if any(r < 0 or r % BLOCK_ROWS for r in tile_rows):
        raise ValueError(f"--tile_rows must be multiples of {BLOCK_ROWS}, got {tile_rows}")
    if any(a < 0 for a in ahead):
        raise ValueError(f"--ahead must be row blocks >= 0, got {ahead}")
    if _ROUNDS.value < 2:
        raise ValueError(f"--rounds must be at least 2, got {_ROUNDS.value}")
    if _REPEATS.value < 1:
        raise ValueError(f"--repeats must be at least 1, got {_REPEATS.value}")
    if interpret and programs != 1:
        raise ValueError(f"--programs must be 1 when Pallas is interpreted (it runs programs "
                         f"one by one, so a barrier would wait forever), got {programs}")
    if sm_count is not None and not 1 <= programs <= PROGRAMS_PER_SM * sm_count:
        raise ValueError(f"--programs must be 1..{PROGRAMS_PER_SM * sm_count} (at most "
                         f"{PROGRAMS_PER_SM} a SM, so that every program of the persistent "
                         f"kernel can be resident), got {programs}")
    return tile_rows, sorted(set(ahead)), sorted(set(warps)), phases


def errors(fn, x, weights, want: np.ndarray, arrivals: int | None) -> tuple[float, str | None]:
    """fn(x, weights)'s largest error against want relative to want's largest entry, and
    what is wrong (None: nothing): an error over TOLERANCE (NaN included) or, for the
    persistent kernel (arrivals given), a counter that is not `arrivals` or a barrier
    wait that gave up."""
    result = fn(x, weights)
    rounds, counter = (np.stack(result), None) if arrivals is None else result
    rel_err = float(np.abs(np.asarray(rounds, np.float64) - want).max() / np.abs(want).max())
    if not rel_err <= TOLERANCE:
        return rel_err, "differs from the float64 rounds"
    if arrivals is not None and int(counter[0]) != arrivals:
        return rel_err, f"the barrier counted {int(counter[0])} arrivals, not {arrivals}"
    if arrivals is not None and int(counter[1]):
        return rel_err, f"{int(counter[1])} barrier waits gave up after {MAX_POLLS} polls"
    return rel_err, None


def measure(programs: int, rows: int | tuple, ahead_blocks: list[int], warps: list[int],
            bandwidth: float, interpret: bool) -> list[dict]:
    """At one tile size (rows an int) or cycle of tiles (a tuple: `--phases`), at each of
    warps: the chain, the persistent kernel at each of ahead_blocks that fits the smallest
    tile, each checked against float64 (each form its own random inputs), timed, checked
    again; then the control (more than one program only, at the first warps): the
    persistent kernel without its barrier, checked, not timed."""
    rounds = _ROUNDS.value
    arrivals = (rounds - 1) * programs
    cycle = (rows,) if isinstance(rows, int) else rows
    forms = [("chain", 0, chain, None, warps)] + [
        ("persistent", ahead, functools.partial(persistent, ahead=ahead, barrier=_POLL.value),
         arrivals, warps)
        for ahead in ahead_blocks if ahead <= min(cycle) // BLOCK_ROWS]
    if programs > 1:
        forms.append(("control: no barrier", 0, functools.partial(persistent, barrier=None),
                      0, warps[:1]))
    weight_bytes = sum(cycle[r % len(cycle)] for r in range(rounds)) * programs * WIDTH * 2
    weight_bytes /= rounds     # a round's, on average
    results = []
    for seed, (name, ahead, form, expected, form_warps) in enumerate(forms):
        x, weights = inputs(programs, cycle, rounds, seed=seed)
        want = reference(x, weights, rounds)
        for num_warps in form_warps:
            fn = jax.jit(functools.partial(form, rounds=rounds, cycle=cycle,
                                           interpret=interpret, num_warps=num_warps))
            rel_err, wrong = errors(fn, x, weights, want, expected)
            row = dict(form=name, ahead=ahead, num_warps=num_warps, programs=programs,
                       poll=_POLL.value,
                       tile_rows=rows if isinstance(rows, int) else list(rows),
                       rounds=rounds, mb_per_round=weight_bytes / 1e6, rel_err=rel_err)
            if name.startswith("control"):
                row["control_caught"] = wrong is not None
            elif wrong:
                row["error"] = f"{wrong}: not timed"
            else:
                seconds = median_seconds(fn, x, weights, repeats=_REPEATS.value, calls=CALLS)
                row["us_per_round"] = seconds / rounds * 1e6
                if len(cycle) > 1:   # a cycle's time: e.g. a decode block's
                    row["us_per_cycle"] = row["us_per_round"] * len(cycle)
                if weight_bytes:
                    row["bandwidth_fraction"] = weight_bytes / (seconds / rounds) / bandwidth
                row["rel_err_after"], wrong = errors(fn, x, weights, want, expected)
                if wrong:
                    row["error"] = f"after timing, {wrong}"
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
        tile_rows, ahead_blocks, warps, phases = check_flags(programs, interpret, sm_count)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    xla_flags = os.environ.get("XLA_FLAGS")
    bandwidth = copy_bandwidth(_COPY_BYTES.value)
    print(f"device {device.device_kind}, jax {jax.__version__}, XLA_FLAGS={xla_flags!r}, "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, {programs} programs, Pallas "
          f"{'interpreted' if interpret else 'on GPU'}")
    results = []
    for rows in tile_rows + ([phases] if phases else []):
        results += measure(programs, rows, ahead_blocks, warps, bandwidth, interpret)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(dict(device=device.device_kind, jax=jax.__version__,
                           date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                           xla_flags=xla_flags, copy_bandwidth=bandwidth,
                           interpret=interpret, results=results), f, indent=2)
    print("| form | blocks ahead | warps | programs | tile rows | MB a round | us a round | "
          "x copy bandwidth | rel err |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    nan = float("nan")
    for r in results:
        note = r.get("error", "")
        if "control_caught" in r:
            note = ("caught (the check sees a missing barrier)" if r["control_caught"] else
                    "NOT caught: the check cannot see a missing barrier here")
        tiles = r["tile_rows"]
        tiles = "/".join(map(str, tiles)) if isinstance(tiles, list) else tiles
        if "us_per_cycle" in r:
            note = f"{r['us_per_cycle']:.2f} us a cycle of tiles {note}".rstrip()
        print(f"| {r['form']} | {r['ahead']} | {r['num_warps']} | {r['programs']} | "
              f"{tiles} | "
              f"{r['mb_per_round']:.2f} | {r.get('us_per_round', nan):.2f} | "
              f"{r.get('bandwidth_fraction', nan):.2f} | {r['rel_err']:.1e} |"
              + (f" {note}" if note else ""))


if __name__ == "__main__":
    app.run(main)
