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

from retention_inputs import blocks_name, grads_blocks_for, parse_grads_blocks
from retnet_jax import kernels

KERNELS = ("grads", "output", "states")
_KERNELS = flags.DEFINE_list("kernels", list(KERNELS), f"Kernels, from {KERNELS}.")
_HEADS = flags.DEFINE_list("heads", ["128x128", "256x432"], "Head dims DkxDv.")
_CHUNK_SIZES = flags.DEFINE_list("chunk_sizes", ["64", "128"], "Chunk sizes C.")
_NUM_WARPS = flags.DEFINE_list("num_warps", ["8"], "Triton warps per program.")
_GRADS_BLOCKS = flags.DEFINE_list("grads_blocks", ["auto"], "chunk_grads layouts: 'auto' "
                                  "(default_blocks), 'fused' or KxV.")
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
    else:
        carry = jax.ShapeDtypeStruct((1, 1, key_dim, value_dim), jnp.float32)
        yield ("", functools.partial(kernels.chunk_states, reverse=False, num_warps=num_warps),
               (act(key_dim), act(value_dim), b, carry))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = sorted(set(_KERNELS.value) - set(KERNELS))
    if unknown:
        raise app.UsageError(f"--kernels: {unknown} not in {KERNELS}")
    for text in _GRADS_BLOCKS.value:
        parse_grads_blocks(text)
    try:
        import triton  # noqa: F401
    except ImportError:
        raise app.UsageError("needs the triton package: pip install triton==3.6.0 (the GPU "
                             "machine's version; a dev-only tool)") from None
    rows = []
    for kernel, heads, chunk, warps in itertools.product(
            _KERNELS.value, _HEADS.value, _CHUNK_SIZES.value, _NUM_WARPS.value):
        key_dim, value_dim = map(int, heads.split("x"))
        for setting, fn, args in calls(kernel, key_dim, value_dim, int(chunk), int(warps)):
            for name, ttir, stages in triton_modules(fn, *args):
                row = {"kernel": name, "heads": heads, "chunk": int(chunk),
                       "num_warps": int(warps), "num_stages": stages, "setting": setting,
                       **compile_resources(ttir, int(warps), stages)}
                rows.append(row)
                print(f"{name:>32} {heads:>8} C={chunk:<4} {warps} warps {setting:<16} "
                      f"{row['registers']:>3} regs, spills {row['spill_stores']:>5} B stored "
                      f"/ {row['spill_loads']:>5} B loaded, shared {row['shared_bytes']:>6} B, "
                      f"wgmma {row['wgmma']}", flush=True)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump({"jax": jax.__version__, "arch": _ARCH.value, "argv": sys.argv,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
