"""Registers, spills and shared memory of the Pallas kernels, compiled offline (no GPU).

Each kernel is traced and lowered for CUDA as `jax.jit` would (Pallas' Triton lowering
works without a GPU), its Triton IR is compiled for sm_90 by the `triton` package, and
ptxas reports the resources of one program: registers per thread, spill stores and loads
(bytes per thread), shared memory, and the wgmma instructions in the PTX. A kernel at 255
registers runs one program per SM, and spills go through local memory: the first things
to read when a kernel runs far below the matmul rate or the copy bandwidth (BENCHMARKS.md,
run 19: `chunk_grads` at 10-19 % of the matmul rate). Timings still need the GPU
(`bench_kernel_parts.py`).

Needs the `triton` wheel of the GPU machine's version (`pip install triton==3.6.0`; a
dev-only tool, not a dependency) and reads jax's Pallas lowering through a private hook
(checked on jax 0.10-0.11).

  python experiments/kernel_resources.py --heads=128x128,256x432 --chunk_sizes=64,128
  python experiments/kernel_resources.py --kernels=grads --grads_blocks=fused,128x256 --num_warps=4,8
  python experiments/kernel_resources.py --kernels=step,gemv --heads=256x432 --num_warps=4 --out=results/bench/resources.json

Decoding's kernels take their own sizes: `step` (`retention_step_pallas`, plain and with
the rotation, at each `--step_batches` batch with `--step_heads` heads of each `--heads`
size, the default tiles; and `retention_step_from_splits` reading 8 splits' partials
where their layout allows, as batch 1 runs it) and `gemv` (`projections.projections_pallas` at batch 1 for each
`--gemv_shapes` KxN1+N2+... with the blocks' norm on the first, each `--gemv_block_k`);
`--chunk_sizes` does not apply to them.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

from absl import app, flags
import jax
import jax.numpy as jnp

from retention_inputs import (blocks_name, grads_blocks_for, parse_grads_blocks,
                              parse_weight_shape)
from retnet_jax import kernels
from retnet_jax.kernels import projections

KERNELS = ("grads", "output", "states", "step", "gemv")
CHUNKED = ("grads", "output", "states")   # the kernels a chunk size applies to
_KERNELS = flags.DEFINE_list("kernels", list(KERNELS), f"Kernels, from {KERNELS}.")
_HEADS = flags.DEFINE_list("heads", ["128x128", "256x432"], "Head dims DkxDv.")
_CHUNK_SIZES = flags.DEFINE_list("chunk_sizes", ["64", "128"], "Chunk sizes C.")
_NUM_WARPS = flags.DEFINE_list("num_warps", ["8"], "Triton warps per program.")
_GRADS_BLOCKS = flags.DEFINE_list("grads_blocks", ["auto"], "chunk_grads layouts: 'auto' "
                                  "(default_blocks), 'fused' or KxV.")
_STEP_BATCHES = flags.DEFINE_list("step_batches", ["1", "8", "32"], "step: batch sizes.")
_STEP_HEADS = flags.DEFINE_integer("step_heads", 8, "step: heads (the 1.3B preset's 8).")
_STEP_SPLITS = 8      # the 1.3B q|k|v|gate GEMV's K splits, which the step then adds
_GEMV_SHAPES = flags.DEFINE_list("gemv_shapes", ["2048x2048+2048+3456+3456", "3456x2048"],
                                 "gemv: KxN1+N2+... weight shapes (the 1.3B block's q|k|v|gate "
                                 "and out_proj / fc2); the first K's input is normalised.")
_GEMV_BLOCK_K = flags.DEFINE_list("gemv_block_k", ["64", "128", "256"], "gemv: block_k "
                                  "values (those dividing K).")
_ARCH = flags.DEFINE_integer("arch", 90, "CUDA compute capability to compile for.")
_OUT = flags.DEFINE_string("out", None, "Write the rows as JSON here.")


def triton_modules(fn, *args) -> list[tuple[str, str, int]]:
    """(name, Triton IR text, num_stages) of each pallas_call in jit(fn)(*args), in order."""
    from jax._src.pallas.triton import lowering
    texts = []
    lower = lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        result = lower(*a, **k)
        texts.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    traced = jax.jit(fn).trace(*args)
    lowering.lower_jaxpr_to_triton_module = capture
    try:
        traced.lower(lowering_platforms=("cuda",))
    finally:
        lowering.lower_jaxpr_to_triton_module = lower
    calls = [eqn.params for eqn in traced.jaxpr.eqns if eqn.primitive.name == "pallas_call"]
    if len(calls) != len(texts):
        raise RuntimeError(f"{len(calls)} pallas_calls but {len(texts)} Triton modules")
    return [(params["name"], text, params["compiler_params"].num_stages or 1)
            for params, text in zip(calls, texts, strict=True)]


def compile_resources(ttir: str, num_warps: int, num_stages: int) -> dict:
    """Registers, spills, shared memory and wgmma count of one Triton IR module."""
    import triton
    from triton.backends.compiler import GPUTarget
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        compiled = triton.compile(path, target=GPUTarget("cuda", _ARCH.value, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
        ptx = compiled.asm["ptx"]
        with open(path + ".ptx", "w") as f:
            f.write(ptx)
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "ptxas")
        report = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{_ARCH.value}a", path + ".ptx",
                                 "-o", os.devnull], capture_output=True, text=True, check=True)
    registers = re.search(r"Used (\d+) registers", report.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report.stderr)
    return {"registers": int(registers.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2)), "shared_bytes": compiled.metadata.shared,
            "wgmma": ptx.count("wgmma.mma_async")}


def calls(kernel: str, key_dim: int, value_dim: int, chunk: int, num_warps: int):
    """(setting, fn, args) for one kernel at these sizes (batch 1, 1 head, 2 chunks, bf16)."""
    def act(dim):
        return jax.ShapeDtypeStruct((1, 2 * chunk, 1, dim), jnp.bfloat16)

    matrix = jax.ShapeDtypeStruct((1, 1, 2, key_dim, value_dim), jnp.bfloat16)
    b = jax.ShapeDtypeStruct((1, 1, 2, chunk), jnp.float32)
    if kernel == "grads":
        layouts = dict.fromkeys(   # distinct layouts: 'auto' may be one of the others
            grads_blocks_for(parse_grads_blocks(layout), key_dim, value_dim)
            for layout in _GRADS_BLOCKS.value)
        for blocks in layouts:
            yield (f"blocks {blocks_name(blocks)}", functools.partial(
                kernels.chunk_grads, blocks=blocks, num_warps=num_warps),
                (act(key_dim), act(key_dim), act(value_dim), act(value_dim), b, matrix, matrix))
    elif kernel == "output":
        yield ("", functools.partial(kernels.chunk_output, num_warps=num_warps),
               (act(key_dim), act(key_dim), act(value_dim), b, matrix))
    elif kernel == "states":
        carry = jax.ShapeDtypeStruct((1, 1, key_dim, value_dim), jnp.float32)
        yield ("", functools.partial(kernels.chunk_states, reverse=False, num_warps=num_warps),
               (act(key_dim), act(value_dim), b, carry))
    elif kernel == "step":
        yield from step_calls(key_dim, value_dim, num_warps)
    else:
        yield from gemv_calls(num_warps)


def step_calls(key_dim: int, value_dim: int, num_warps: int):
    """(setting, fn, args) of the decode step at each --step_batches batch, plain and with
    the rotation (bf16 q, k, v; float32 state; fixed decay)."""
    heads = _STEP_HEADS.value
    for batch in map(int, _STEP_BATCHES.value):
        qk = jax.ShapeDtypeStruct((batch, heads, key_dim), jnp.bfloat16)
        args = (qk, qk, jax.ShapeDtypeStruct((batch, heads, value_dim), jnp.bfloat16),
                jax.ShapeDtypeStruct((heads,), jnp.float32),
                jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32))
        plain = functools.partial(kernels.retention_step_pallas, num_warps=num_warps)
        position = jax.ShapeDtypeStruct((batch,), jnp.int32)
        yield f"batch {batch}", plain, args
        yield (f"batch {batch} rotate", lambda *a, plain=plain: plain(*a[:5], rotate_at=a[5]),
               args + (position,))
        # As a batch-1 decoding model runs it: q, k, v from the q|k|v|gate GEMV's 8 splits.
        starts = (0, heads * key_dim, 2 * heads * key_dim)
        widths = (heads * key_dim, heads * key_dim, heads * value_dim)
        partials = jax.ShapeDtypeStruct((_STEP_SPLITS, batch, 2 * heads * (key_dim + value_dim)),
                                        jnp.float32)

        def split_sums(partials):
            return [projections.SplitSums(partials, at, width)
                    for at, width in zip(starts, widths)]

        def from_splits(partials, log_decay, state, position):
            return kernels.retention_step_from_splits(
                *split_sums(partials), log_decay, state, dtype=jnp.bfloat16,
                key_scale=key_dim**-0.5, rotate_at=position, num_warps=num_warps)
        if kernels.splits_layout_reason(*split_sums(partials), heads=heads) is None:
            yield (f"batch {batch} rotate from {_STEP_SPLITS} splits", from_splits,
                   (partials, args[3], args[4], position))


def gemv_calls(num_warps: int):
    """(setting, fn, args) of the GEMV at batch 1 for each --gemv_shapes shape and
    --gemv_block_k dividing its K; the first shape behind the norm, as the blocks'
    q|k|v|gate."""
    for index, shape in enumerate(_GEMV_SHAPES.value):
        k, widths = parse_weight_shape(shape, "gemv_shapes")
        x = jax.ShapeDtypeStruct((1, k), jnp.bfloat16)
        weights = [jax.ShapeDtypeStruct((k, n), jnp.bfloat16) for n in widths]
        scale = jax.ShapeDtypeStruct((k,), jnp.bfloat16) if index == 0 else None
        for block_k in (int(b) for b in _GEMV_BLOCK_K.value if k % int(b) == 0):
            def fn(x, scale, *weights, block_k=block_k):
                return projections.projections_pallas(
                    x, list(weights), norm_scale=scale, block_k=block_k, num_warps=num_warps)
            yield (f"{shape}{' norm' if scale is not None else ''} bk{block_k}", fn,
                   (x, scale, *weights))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = sorted(set(_KERNELS.value) - set(KERNELS))
    if unknown:
        raise app.UsageError(f"--kernels: {unknown} not in {KERNELS}")
    for text in _GRADS_BLOCKS.value:
        parse_grads_blocks(text)
    for text in _GEMV_SHAPES.value:
        parse_weight_shape(text, "gemv_shapes")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise app.UsageError("needs the triton package: pip install triton==3.6.0 (the GPU "
                             "machine's version; a dev-only tool)") from None
    rows = []
    for kernel, heads, chunk, warps in itertools.product(
            _KERNELS.value, _HEADS.value, _CHUNK_SIZES.value, _NUM_WARPS.value):
        if kernel not in CHUNKED and chunk != _CHUNK_SIZES.value[0]:
            continue                 # decoding's kernels: once, whatever the chunk sizes
        if kernel == "gemv" and heads != _HEADS.value[0]:
            continue                 # the GEMV's sizes are its own flags
        key_dim, value_dim = map(int, heads.split("x"))
        for setting, fn, args in calls(kernel, key_dim, value_dim, int(chunk), int(warps)):
            for name, ttir, stages in triton_modules(fn, *args):
                row = {"kernel": name, "heads": None if kernel == "gemv" else heads,
                       "chunk": int(chunk) if kernel in CHUNKED else None,
                       "num_warps": int(warps), "num_stages": stages, "setting": setting,
                       **compile_resources(ttir, int(warps), stages)}
                rows.append(row)
                print(f"{name:>32} {row['heads'] or '':>8} C={row['chunk'] or '-':<4} "
                      f"{warps} warps {setting:<16} "
                      f"{row['registers']:>3} regs, spills {row['spill_stores']:>5} B stored "
                      f"/ {row['spill_loads']:>5} B loaded, shared {row['shared_bytes']:>6} B, "
                      f"wgmma {row['wgmma']}", flush=True)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump({"jax": jax.__version__, "arch": _ARCH.value, "argv": sys.argv,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
