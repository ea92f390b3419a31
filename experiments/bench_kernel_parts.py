"""Where the Pallas chunkwise retention's time goes: each kernel and XLA step timed alone.

For each shape (BxTxHxD or BxTxHxDkxDv, bf16) and decay kind, at chunk size --chunk_size,
in one process. Forward parts (--parts=forward):

  decays          the within-chunk cumulative log decays b [G, H, N, C] (XLA)
  states_local    `chunk_state_segments`: the state kernel over S segments of the chunks
                  and the carries entering them (S = 1: one loop)
  join            `join_segments` alone: every chunk's state, [B, H, N, Dk, Dv], in XLA
  output          `chunk_output` on the joined states
  output_fused    `chunk_output` on the segments, joined as it reads (S > 1)
  forward         `chunkwise_retention_pallas`, forward only (states joined in the output
                  kernel when S > 1)
  forward_train   the forward a training step runs (the custom VJP's forward rule, which
                  keeps the joined states for the backward pass)

Backward parts (--parts=backward):

  states_reverse  `chunk_states` in reverse (the state gradients d_kv from q and the
                  output cotangent), S segments joined, as the backward pass runs it
  grads           `chunk_grads`: dq, dk, dv and the cumulative-decay gradient per chunk
  train_step      forward and backward together (`jax.vjp` of the output and final state,
                  applied to random cotangents), the gradients and the output returned

for each --segments (auto: `state_segments`' pick), each --state_num_warps x
--state_num_stages of the state kernel (`states_local`, `states_reverse`), each
--output_num_warps (`output`, `output_fused`) and each --grads_blocks x --grads_num_warps
(`grads`);
`forward`, `forward_train` and `train_step` run the kernels' defaults but for the segment
count. Each part is one jit, called with fresh random inputs (two sets, rotated); median of
--runs timings of --calls back-to-back calls after a warm-up call (`ceilings.median_seconds`).
Each row also gives the part's bytes (its inputs read once and outputs written once) over
the time, against the copy bandwidth measured in the same process.

  python experiments/bench_kernel_parts.py                   # GPU: the issue's shapes
  python experiments/bench_kernel_parts.py --smoke           # tiny shapes, CPU (interpret)
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import platform
import sys
import time

from absl import app, flags
import jax

from ceilings import copy_bandwidth, median_seconds
from retention_inputs import (
    blocks_name, grads_blocks_for, make_inputs, parse_grads_blocks, parse_shape)
from retnet_jax import kernels, retention
from retnet_jax.kernels.chunk_states import (
    STATE_NUM_STAGES, STATE_NUM_WARPS, chunk_state_segments, join_segments, state_segments)
from retnet_jax.kernels.common import is_power_of_two

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["8x2048x16x128", "4x8192x16x128", "1x32768x16x128"],
                  "BxTxHxD or BxTxHxDkxDv.")
flags.DEFINE_list("decays", ["fixed", "gated"], "Decay kinds.")
flags.DEFINE_integer("chunk_size", 128, "Chunk size C (a power of two >= 16).")
flags.DEFINE_list("segments", ["auto"], "State-kernel segment counts ('auto' or divisors "
                  "of the number of chunks).")
flags.DEFINE_list("state_num_warps", [str(STATE_NUM_WARPS)], "Warps per state-kernel "
                  "program.")
flags.DEFINE_list("state_num_stages", [str(STATE_NUM_STAGES)], "Software-pipelining stages "
                  "of the state kernel's chunk loop.")
flags.DEFINE_list("output_num_warps", ["auto"], "Warps per output-kernel program ('auto': "
                  "its default).")
flags.DEFINE_list("grads_num_warps", ["auto"], "Warps per gradient-kernel program ('auto': "
                  "its default).")
flags.DEFINE_list("grads_blocks", ["auto"], "Gradient-kernel layouts: 'auto' (the one "
                  "training takes at these heads, `chunk_grads.default_blocks`), 'fused' (one "
                  "kernel, one program per chunk) or KxV (two kernels over groups of up to K "
                  "key and V value columns, `chunk_grads(blocks=(K, V))`), e.g. 128x256.")
flags.DEFINE_list("parts", ["forward", "backward"], "Which parts to time: forward and/or "
                  "backward.")
flags.DEFINE_integer("state_block_v", 256, "Most value columns per state-kernel program.")
flags.DEFINE_integer("block_v", 256, "Most value columns per output-kernel program.")
flags.DEFINE_integer("runs", 20, "Timings per part (median reported).")
flags.DEFINE_integer("calls", 5, "Back-to-back calls per timing.")
flags.DEFINE_bool("smoke", False, "Tiny shapes, few runs, interpret mode (checks the "
                  "script on CPU).")
flags.DEFINE_string("out", "", "Write the results as JSON here.")

# The counting flags: flag -> (takes 'auto', must be a power of two); others are positive.
COUNT_FLAGS = {"segments": (True, False), "state_num_warps": (False, True),
               "state_num_stages": (False, False), "output_num_warps": (True, True),
               "grads_num_warps": (True, True)}
SMOKE_DEFAULTS = {"shapes": ["1x256x2x32", "2x128x2x16x32"], "chunk_size": 16,
                  "segments": ["auto", "2"], "runs": 2, "calls": 1}
RESULTS: dict = {"env": {}, "rows": []}


def interpret() -> bool:
    return jax.default_backend() != "gpu"


def warps_arg(text: str) -> int | None:
    """A --*_num_warps value as a kernel's num_warps argument ('auto': None, its default)."""
    return None if text == "auto" else int(text)


def state_bytes(batch, heads, chunks, key_dim, value_dim, itemsize=2) -> int:
    return batch * heads * chunks * key_dim * value_dim * itemsize


def time_part(name, fn, inputs_list, nbytes, bandwidth, **fields) -> None:
    """Median ms of jit(fn) over the rotated inputs; one JSON row and one printed line."""
    jitted = jax.jit(fn)
    start = time.perf_counter()
    jax.block_until_ready(jitted(*inputs_list[0]))
    compile_s = time.perf_counter() - start
    seconds = sorted(median_seconds(jitted, *args, repeats=FLAGS.runs, calls=FLAGS.calls)
                     for args in inputs_list)
    ms = 1e3 * seconds[len(seconds) // 2] if len(seconds) % 2 else 1e3 * sum(seconds) / 2
    row = {"part": name, **fields, "ms": ms, "ms_per_input_set": [1e3 * s for s in seconds],
           "bytes": nbytes, "GBps": nbytes / ms / 1e6,
           "of_copy_bandwidth": nbytes / ms / 1e6 / bandwidth, "compile_s": compile_s}
    RESULTS["rows"].append(row)
    setting = " ".join(f"{k}={v}" for k, v in fields.items()
                       if k not in ("shape", "decay", "chunk_size", "segments_flag"))
    print(f"{fields['shape']:>16} {fields['decay']:>5} {name:>13} {setting:<50} {ms:8.3f} ms "
          f"{row['GBps']:7.0f} GB/s ({row['of_copy_bandwidth']:.0%})", flush=True)
    save()


def time_shape(shape_text: str, gated: bool, bandwidth: float) -> None:
    """Every part at one shape and decay kind, for each flag setting."""
    shape = parse_shape(shape_text)
    batch, time_, heads, key_dim, value_dim = shape
    chunk = FLAGS.chunk_size
    if time_ % chunk:
        raise app.UsageError(f"--shapes: T = {time_} is not a multiple of --chunk_size {chunk}")
    chunks = time_ // chunk
    inputs_list, cotangents = [], []
    for seed in range(2):
        q, k, v, log_decay, do = make_inputs(seed + 10 * gated, shape, gated)
        x0, d_final = jax.random.normal(jax.random.PRNGKey(seed + 7),
                                        (2, batch, heads, key_dim, value_dim))
        inputs_list.append((q, k, v, log_decay, x0))
        cotangents.append((do, d_final))
    fields = {"shape": shape_text, "decay": "gated" if gated else "fixed", "chunk_size": chunk}
    b_of = jax.jit(functools.partial(retention._chunk_cumulative_log_decay, time=time_,
                                     heads=heads, chunk_size=chunk))
    with_b = [(q, k, v, b_of(a), x0) for q, k, v, a, x0 in inputs_list]
    key_bytes, value_bytes = (batch * time_ * heads * dim * 2 for dim in (key_dim, value_dim))
    activations = key_bytes + value_bytes         # one bf16 [B, T, H, Dk] and one [.., Dv]
    states = state_bytes(batch, heads, chunks, key_dim, value_dim)

    time_part("decays", lambda q, k, v, a, x0: b_of(a), inputs_list,
              4 * (inputs_list[0][3].size + heads * time_ * (batch if gated else 1)),
              bandwidth, **fields)
    joined = [(q, k, v, b, x0, kernels.chunk_states(k, v, b, x0, reverse=False,
                                                    block_v=FLAGS.state_block_v,
                                                    interpret=interpret())[0])
              for q, k, v, b, x0 in with_b]
    if "forward" in FLAGS.parts:
        for warps in FLAGS.output_num_warps:
            time_part("output", functools.partial(
                kernels.chunk_output, block_v=FLAGS.block_v, interpret=interpret(),
                num_warps=warps_arg(warps)),
                [(q, k, v, b, s) for q, k, v, b, _, s in joined], 2 * activations + states,
                bandwidth, **fields, output_num_warps=warps)
    if "backward" in FLAGS.parts:   # reads q, k, v, do, states, d_kv; writes dq, dk, dv
        time_grads(joined, cotangents, 4 * key_bytes + 3 * value_bytes + 2 * states,
                   bandwidth, fields)
    del joined

    for text in FLAGS.segments:
        segments = (state_segments(batch, heads, key_dim, value_dim, chunks,
                                   block_v=FLAGS.state_block_v) if text == "auto" else int(text))
        if chunks % segments:
            print(f"skip --segments {text}: {segments} does not divide N = {chunks}")
            continue
        seg_fields = {**fields, "segments": segments, "segments_flag": text}
        carries = state_bytes(batch, heads, segments, key_dim, value_dim, 4)
        local = functools.partial(chunk_state_segments, reverse=False, segments=segments,
                                  block_v=FLAGS.state_block_v, interpret=interpret())
        pallas = functools.partial(kernels.chunkwise_retention_pallas, chunk_size=chunk,
                                   segments=segments, block_v=FLAGS.block_v,
                                   state_block_v=FLAGS.state_block_v, interpret=interpret())
        if "forward" in FLAGS.parts:
            time_forward(local, pallas, with_b, inputs_list, bandwidth, seg_fields,
                         activations=activations, states=states, carries=carries)
        if "backward" in FLAGS.parts:
            time_backward(pallas, with_b, inputs_list, cotangents, bandwidth, seg_fields,
                          activations=activations, states=states)


def settings():
    """The state kernel's (warps, stages) settings to sweep, as ints."""
    return [(int(w), int(n)) for w, n in itertools.product(FLAGS.state_num_warps,
                                                           FLAGS.state_num_stages)]


def time_forward(local, pallas, with_b, inputs_list, bandwidth, fields, *, activations,
                 states, carries) -> None:
    """The forward parts that depend on the segment count (`local`: chunk_state_segments
    with it bound; `pallas`: chunkwise_retention_pallas with it bound)."""
    segments = fields["segments"]
    for warps, stages in settings():
        run = functools.partial(local, num_warps=warps, num_stages=stages)
        time_part("states_local", lambda q, k, v, b, x0, run=run: run(k, v, b, x0),
                  with_b, activations + states + carries, bandwidth, **fields,
                  state_num_warps=warps, state_num_stages=stages)
    if segments > 1:
        output = functools.partial(kernels.chunk_output, block_v=FLAGS.block_v,
                                   interpret=interpret())
        segmented = [jax.jit(local)(k, v, b, x0) for q, k, v, b, x0 in with_b]
        time_part("join", join_segments, [(s,) for s in segmented], 2 * states, bandwidth,
                  **fields)
        for warps in FLAGS.output_num_warps:
            time_part("output_fused", functools.partial(
                output, num_warps=warps_arg(warps)),
                [(q, k, v, b, s) for (q, k, v, b, _), s in zip(with_b, segmented)],
                2 * activations + states + carries, bandwidth, **fields,
                output_num_warps=warps)
    time_part("forward", lambda q, k, v, a, x0: pallas(q, k, v, a, initial_state=x0),
              inputs_list, 2 * activations, bandwidth, **fields)
    time_part("forward_train", lambda q, k, v, a, x0: jax.vjp(
        lambda q, k, v, a: pallas(q, k, v, a, initial_state=x0), q, k, v, a)[0],
        inputs_list, 2 * activations, bandwidth, **fields)


def time_backward(pallas, with_b, inputs_list, cotangents, bandwidth, fields, *,
                  activations, states) -> None:
    """The backward parts that depend on the segment count."""
    for warps, stages in settings():
        run = functools.partial(kernels.chunk_states, reverse=True, segments=fields["segments"],
                                block_v=FLAGS.state_block_v, num_warps=warps,
                                num_stages=stages, interpret=interpret())
        time_part("states_reverse",
                  lambda q, b, do, d_final, run=run: run(q, do, b, d_final),
                  [(q, b, do, d_final) for (q, _, _, b, _), (do, d_final)
                   in zip(with_b, cotangents)], activations + states, bandwidth, **fields,
                  state_num_warps=warps, state_num_stages=stages)

    def step(q, k, v, a, x0, do, d_final):
        outputs, vjp = jax.vjp(lambda q, k, v, a: pallas(q, k, v, a, initial_state=x0),
                               q, k, v, a)
        return outputs[0], vjp((do, d_final))

    time_part("train_step", step, [args + cot for args, cot in zip(inputs_list, cotangents)],
              4 * activations, bandwidth, **fields)


def time_grads(joined, cotangents, nbytes, bandwidth, fields) -> None:
    """`chunk_grads` on the joined states and state gradients, for each --grads_num_warps.
    joined: (q, k, v, b, x0, states) per input set."""
    args_list = []
    for (q, k, v, b, _, states), (do, d_final) in zip(joined, cotangents):
        d_kv = kernels.chunk_states(q, do, b, d_final, reverse=True,
                                    block_v=FLAGS.state_block_v, interpret=interpret())[0]
        args_list.append((q, k, v, do, b, states, d_kv))
    key_dim, value_dim = args_list[0][0].shape[-1], args_list[0][2].shape[-1]
    for layout, warps in itertools.product(FLAGS.grads_blocks, FLAGS.grads_num_warps):
        blocks = grads_blocks_for(parse_grads_blocks(layout), key_dim, value_dim)
        time_part("grads", functools.partial(
            kernels.chunk_grads, blocks=blocks, num_warps=warps_arg(warps),
            interpret=interpret()), args_list, nbytes, bandwidth, **fields,
            grads_blocks=layout if layout != "auto" else f"auto ({blocks_name(blocks)})",
            grads_num_warps=warps)


def save() -> None:
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(RESULTS, f, indent=1)


def main(argv) -> None:
    del argv
    if FLAGS.smoke:
        for name, value in SMOKE_DEFAULTS.items():
            if not FLAGS[name].present:
                setattr(FLAGS, name, value)
    for text in FLAGS.shapes:
        parse_shape(text)
    if not FLAGS.parts or set(FLAGS.parts) - {"forward", "backward"}:
        raise app.UsageError(f"--parts: {FLAGS.parts} is not a list of forward / backward")
    for flag, (takes_auto, power_of_two) in COUNT_FLAGS.items():
        for text in getattr(FLAGS, flag):
            if text == "auto" and takes_auto:
                continue
            if not (text.isdigit() and int(text) >= 1
                    and (is_power_of_two(int(text)) or not power_of_two)):
                wanted = "a power of two" if power_of_two else "a positive number"
                raise app.UsageError(f"--{flag}: {text!r} is not valid: {wanted}"
                                     + (" or 'auto'" if takes_auto else ""))
    for text in FLAGS.grads_blocks:
        parse_grads_blocks(text)
    bandwidth = copy_bandwidth(1 << 30 if not FLAGS.smoke else 1 << 20) / 1e9
    RESULTS["env"] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "jax": jax.__version__,
                      "device_kind": jax.devices()[0].device_kind, "argv": sys.argv,
                      "python": platform.python_version(), "copy_GBps": bandwidth}
    print("env:", json.dumps(RESULTS["env"]), flush=True)
    for shape_text, decay in itertools.product(FLAGS.shapes, FLAGS.decays):
        time_shape(shape_text, decay == "gated", bandwidth)
    save()


if __name__ == "__main__":
    app.run(main)
