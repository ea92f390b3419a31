"""Decoding benchmark: RetNet (constant-size recurrent state) vs a Transformer (KV cache).

Both models have the preset's width and depth and (nearly) the same parameter count
(`model.transformer_baseline`), bf16 weights and compute, one GPU. For each batch size and
context length the cache (its length rounded up to a multiple of 128 positions,
`decode_models.cache_length`, and recorded as `cache_len`) is filled with random values at
position = context, then a jitted `lax.scan` decodes `--new_tokens` greedy tokens;
per-token latency is the median over `--repeats` runs divided by new_tokens. Also reported:
the weight-read floor (weight bytes / measured copy bandwidth), decode-state bytes, and
XLA's temporary bytes of the decode loop.
The environment's XLA_FLAGS (e.g. `--xla_gpu_enable_command_buffer=`, which changes how the
decode loop's kernels are launched) are printed first and recorded in the JSON (`xla_flags`,
null when unset), so runs with and without them stay apart. The decode loop compiles with the
options `generate` uses at that batch (`generate.decode_compiler_options`: at batch 1 on a GPU,
XLA's dot strength reduction off), or XLA's defaults with `--xla_defaults`; `--compiler_options`
compiles it again with other XLA options (per compile, same process), timed beside;
`--hlo_dir` keeps each compiled loop's HLO, and every row counts its kernel
launches per token by kind. `--retention_kernels=xla,pallas` times the RetNet's decode step
with XLA's kernels and with the fused Pallas step (`kernels.retention_step_pallas`) side by
side; `--decode_projections=xla,pallas` times both models with XLA's GEMMs and with the
GEMV kernel for the blocks' projections (`kernels.projections_pallas`, at the batches of
`layers.PROJECTION_KERNEL_BATCHES`, which `--projection_kernel_batches` replaces for the
run, e.g. to time the kernel at batch 8 beside the Pallas retention step; `--gemv_tiles`
sets the kernel's tiles for every call, e.g. one K split; `--step_block_v` the Pallas step's
value columns per program). A row whose model
asks for the Pallas step where the library falls back to XLA's (off GPU, or head dims the
step does not take) records why (`pallas_fallback`) and prints '(XLA step)'.

  python experiments/bench_decode.py --config=configs/retnet_1_3b.py
  XLA_FLAGS=--xla_gpu_enable_command_buffer= python experiments/bench_decode.py ...
  python experiments/bench_decode.py --batches=1,8 --compiler_options=xla_gpu_enable_triton_gemm=false
  python experiments/bench_decode.py --contexts=8192 --retention_kernels=xla,pallas
  python experiments/bench_decode.py --contexts=8192 --batches=1 --decode_projections=xla,pallas
  python experiments/bench_decode.py --contexts=8192 --batches=1,8 --retention_kernels=pallas --decode_projections=xla,pallas --projection_kernel_batches=1,8
  python experiments/bench_decode.py --contexts=8192 --batches=1 --retention_kernels=pallas --decode_projections=pallas --notransformer --gemv_tiles=16,128,1
  python experiments/bench_decode.py --contexts=8192 --batches=1 --retention_kernels=pallas --decode_projections=pallas --notransformer --step_block_v=64
"""

import dataclasses
import json
import math
import os
import re
import time

# JAX's GPU allocator takes 75 % of the device unless told otherwise; the Transformer's
# largest caches (batch 64 at 8K: 98.6 GiB beside 4.9 GiB of weights) need more of an H200.
# Set before jax is imported; an explicit XLA_PYTHON_CLIENT_MEM_FRACTION wins.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ceilings import copy_bandwidth  # noqa: E402
from decode_models import (build, cache_length, decode_configs, decode_loop,  # noqa: E402
                           forced_decode, graphdef_of, override_gemv_tiles,
                           override_step_block_v, random_cache,
                           retnet_name, same_weights, tree_bytes)
from hlo_text import hlo_launches  # noqa: E402
from retnet_jax.generate import decode_compiler_options  # noqa: E402
from retnet_jax import layers  # noqa: E402
from retnet_jax.kernels.projections import MAX_ROWS  # noqa: E402
from retnet_jax.layers import (DECODE_PROJECTIONS, RETENTION_KERNELS,  # noqa: E402
                               pallas_fallback_reason)
from retnet_jax.model import DTYPES, ModelConfig  # noqa: E402

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
_COPY_BYTES = flags.DEFINE_integer("copy_bytes", 1 << 30,
                                   "Bytes of the copy that measures the bandwidth (small for "
                                   "CPU smoke runs).")
_OUT = flags.DEFINE_string("out", None, "Write all results as JSON here.")
_COMPILER_OPTIONS = flags.DEFINE_multi_string(
    "compiler_options", [], "An XLA option set to time beside generate's, "
    "'name=value[,name=value]' (e.g. xla_gpu_enable_triton_gemm=false; a list value goes "
    "comma-separated: xla_gpu_enable_command_buffer=FUSION,WHILE), applied to the decode "
    "loop's compile only (jax's `compile(compiler_options=...)`); repeat the flag for more "
    "sets. Rows record theirs; one XLA refuses is an error row.")
_TRANSFORMER = flags.DEFINE_bool("transformer", True, "Also time the Transformer baseline "
                                  "(--notransformer: RetNet rows only, e.g. to compare "
                                  "RetNet settings in less device time).")
_XLA_DEFAULTS = flags.DEFINE_bool(
    "xla_defaults", False, "Compile the first option set with XLA's defaults instead of the "
    "options generate uses at each batch (generate.decode_compiler_options).")


def distinct_names_flag(name: str, default: list[str], allowed, help_text: str):
    """A list flag whose entries must be distinct names from `allowed` (checked at parse)."""
    holder = flags.DEFINE_list(name, default, help_text)
    flags.register_validator(
        name, lambda names: bool(names) and len(set(names)) == len(names)
        and set(names) <= set(allowed),
        message=f"--{name} must be distinct names from {tuple(allowed)}")
    return holder


_KERNELS = distinct_names_flag(
    "retention_kernels", ["xla"], RETENTION_KERNELS, f"The RetNet's retention_kernel, one "
    f"RetNet row each (from {RETENTION_KERNELS}; 'pallas' decodes each token's retention with "
    f"the fused step kernel `kernels.retention_step_pallas`); rows 'retnet' (xla) and "
    f"'retnet-<kernel>'.")
_STATE_DTYPES = distinct_names_flag(
    "state_dtypes", ["float32"], DTYPES, f"The RetNets' decoding state dtypes "
    f"(ModelConfig.state_dtype, from {tuple(DTYPES)}): each kernel's row for each; rows other "
    f"than float32 are named '<name>-<dtype>-state' and checked against XLA's decode with the "
    f"same state dtype.")
_PROJECTIONS = distinct_names_flag(
    "decode_projections", ["xla"], DECODE_PROJECTIONS, f"Both models' decode_projections, "
    f"rows for each (from {DECODE_PROJECTIONS}; 'pallas' runs the projections of steps at "
    f"the batches of layers.PROJECTION_KERNEL_BATCHES (--projection_kernel_batches) through "
    f"the GEMV kernel `kernels.projections_pallas`); rows other than xla's are named "
    f"'<name>-<projections>-projections' and checked against XLA's projections first, at "
    f"each such batch of the run.")
_PROJECTION_BATCHES = flags.DEFINE_list(
    "projection_kernel_batches", None, "Batch sizes at which decode_projections='pallas' "
    "uses the GEMV kernel in this run (replaces layers.PROJECTION_KERNEL_BATCHES, recorded "
    "in the JSON; powers of two <= kernels.projections.MAX_ROWS); default: the library's.")
flags.register_validator(
    "projection_kernel_batches",
    lambda v: v is None or (bool(v) and all(b.isdigit() and 0 < int(b) <= MAX_ROWS
                                            and int(b) & (int(b) - 1) == 0 for b in v)),
    message=f"--projection_kernel_batches must be powers of two <= {MAX_ROWS}")
_GEMV_TILES = flags.DEFINE_list(
    "gemv_tiles", None, "block_n,block_k,splits for every call of the GEMV kernel in this run "
    "(decode_projections='pallas'), each a whole number or 'default' (the kernel's choice, "
    "kernels.projections.default_block_n / default_block_k / default_splits); e.g. "
    "16,128,1 for one K split. Recorded in the JSON; default: the kernel's choices.")
flags.register_validator(
    "gemv_tiles",
    lambda v: v is None or (len(v) == 3 and all(t == "default" or (t.isdigit() and int(t) > 0)
                                                for t in v)),
    message="--gemv_tiles takes block_n,block_k,splits, each a positive number or 'default'")
_STEP_BLOCK_V = flags.DEFINE_integer(
    "step_block_v", None, "The Pallas decode step's most value columns per program for every "
    "call in this run (a power of two >= 16, `decode_models.override_step_block_v`); "
    "recorded in the JSON; default: kernels.decode_step.default_block_v's choice. At batch 1 "
    "with the GEMV projections a width whose value columns do not divide v's first column in "
    "the q|k|v|gate partials (kernels.splits_layout_reason; at the 1.3B heads any above 32) "
    "makes XLA add q, k and v first: the row's kernels/token shows it (277 against 253).")
flags.register_validator(
    "step_block_v", lambda v: v is None or (v >= 16 and v & (v - 1) == 0),
    message="--step_block_v must be a power of two >= 16")
_HLO_DIR = flags.DEFINE_string("hlo_dir", None, "Write each compiled decode loop's optimized "
                               "HLO here (<model>_batch<B>_context<T>[_<option>-<value>].txt), "
                               "e.g. to see how XLA lowers batch 1's matmuls against batch 8's.")


def main(argv):
    del argv
    xla_flags = os.environ.get("XLA_FLAGS")
    extra_option_sets = [parse_compiler_options(text) for text in _COMPILER_OPTIONS.value]
    print(f"XLA_FLAGS={xla_flags!r}", flush=True)
    if _PROJECTION_BATCHES.value is not None:
        layers.PROJECTION_KERNEL_BATCHES = tuple(int(b) for b in _PROJECTION_BATCHES.value)
    if _GEMV_TILES.value is not None:
        override_gemv_tiles(*(None if t == "default" else int(t) for t in _GEMV_TILES.value))
    if _STEP_BLOCK_V.value is not None:
        override_step_block_v(_STEP_BLOCK_V.value)
    base = ModelConfig.from_config(_CONFIG.value.model)
    contexts = [int(c) for c in _CONTEXTS.value]
    batches = [int(b) for b in _BATCHES.value]
    new, repeats = _NEW.value, _REPEATS.value
    max_len_extra = new * (repeats + 2)
    models = decode_configs(base, _KERNELS.value, _STATE_DTYPES.value,
                            cache_length(max(contexts) + max_len_extra),
                            tuple(_PROJECTIONS.value),
                            transformer=_TRANSFORMER.value)
    device = jax.devices()[0]
    capacity = device.memory_stats().get("bytes_limit", 80e9) if device.platform == "gpu" else 16e9
    bandwidth = copy_bandwidth(_COPY_BYTES.value)
    print(f"device {device.device_kind}, jax {jax.__version__}, copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s, memory limit {capacity / 2**30:.1f} GiB")

    retnets = [name for name in models if name.startswith("retnet")]
    # Kernels, state dtype and projections change no weight: models share the first's.
    owner = {}
    for name, config in models.items():
        owner.setdefault(same_weights(config), name)
    built = {}
    for name, config in models.items():
        first = owner[same_weights(config)]
        if first != name:
            graphdef, params = graphdef_of(config), built[first]["params"]
        else:
            graphdef, params = build(config)
        weight_bytes = tree_bytes(params)
        floor_ms = weight_bytes / bandwidth * 1e3
        print(f"{name}: {sum(x.size for x in jax.tree.leaves(params)):,} params, weights "
              f"{weight_bytes / 2**30:.2f} GiB, weight-read floor {floor_ms:.3f} ms/token")
        built[name] = dict(params=params, shape=(graphdef, jax.eval_shape(lambda p: p, params)),
                           run=decode_loop(graphdef, new), executables={},
                           weight_bytes=weight_bytes, floor_ms=floor_ms)

    # Settings in the order given (put the most important first: a time budget cuts the
    # tail); both models at each setting, so a cut never leaves one model without numbers.
    # Every other kernel is checked against XLA's decode of the same weights and state dtype
    # before timing; a narrower state's XLA decode is compared with float32's (recorded, not
    # a failure: that difference is the state's rounding).
    def xla_model(name: str, **changes) -> dict:
        """The model `name` with XLA's projections and `changes`, over `name`'s weights (a
        reference that is not timed)."""
        graphdef = graphdef_of(dataclasses.replace(models[name], decode_projections="xla",
                                                   **changes))
        return dict(params=built[name]["params"], shape=(graphdef, built[name]["shape"][1]),
                    run=decode_loop(graphdef, new))

    def xla_reference(state_dtype: str) -> tuple[str, dict]:
        name = retnet_name("xla", state_dtype)
        if name in built:
            return name, built[name]
        return name, xla_model(retnets[0], retention_kernel="xla", state_dtype=state_dtype)

    references = {dtype: xla_reference(dtype)
                  for dtype in dict.fromkeys(["float32", *_STATE_DTYPES.value])}
    # The checks' inputs: the same random tokens for every model (teacher forcing), for two
    # sequences; where the projections kernel is on, for each batch of the run it runs at
    # (the smallest it takes if none), so it is checked at every batch it is timed at.
    kernel_batches = sorted(set(batches) & set(layers.PROJECTION_KERNEL_BATCHES)) or [
        min(layers.PROJECTION_KERNEL_BATCHES)]
    forced = jnp.asarray(np.random.default_rng(0).integers(
        0, base.vocab_size, (new, max(2, *kernel_batches))), jnp.int32)

    def forced_for(name: str) -> list:
        if models[name].decode_projections == "xla":
            return [forced[:, :2]]
        return [forced[:, :batch] for batch in kernel_batches]
    kernel_checks = []
    for state_dtype in _STATE_DTYPES.value:
        ref_name, reference = references[state_dtype]
        kernel_checks += [check_against_xla(reference, built[name], name, min(contexts),
                                            tokens, reference_name=ref_name)
                          for name in retnets
                          if name != ref_name and models[name].state_dtype == state_dtype
                          for tokens in forced_for(name)]
        if state_dtype != "float32":
            kernel_checks.append(check_against_xla(
                references["float32"][1], references[state_dtype][1], ref_name, min(contexts),
                forced, reference_name=references["float32"][0], tolerance=math.inf))
    transformers = [name for name in models if name.startswith("transformer-")]
    if transformers:
        reference = (built["transformer"] if "transformer" in built
                     else xla_model(transformers[0]))
        kernel_checks += [check_against_xla(reference, built[name], name, min(contexts),
                                            tokens, reference_name="transformer")
                          for name in transformers for tokens in forced_for(name)]
    # Every model's weights stay on the device; models of the same weights share one copy.
    all_weights = sum(built[name]["weight_bytes"] for name in set(owner.values()))
    start_all = time.time()
    results = []
    for context in contexts:
        for batch in batches:
            first = {} if _XLA_DEFAULTS.value else decode_compiler_options(batch, device.platform)
            option_sets = [first] + [o for o in extra_option_sets if o != first]
            for options in option_sets:
                for name, m in built.items():
                    max_len = cache_length(context + max_len_extra)
                    cache_shape = jax.eval_shape(
                        lambda: nnx.merge(*m["shape"]).init_cache(batch, max_len))
                    state_bytes = tree_bytes(cache_shape)
                    row = dict(model=name, batch=batch, context=context, cache_len=max_len,
                               pallas_fallback=step_fallback(models[name]),
                               compiler_options=options,
                               ffn_dim=models[name].resolved_ffn_dim,
                               weight_gib=m["weight_bytes"] / 2**30,
                               state_gib=state_bytes / 2**30, floor_ms=m["floor_ms"])
                    if time.time() - start_all > _BUDGET.value:
                        row["skipped"] = "time budget"
                    elif (models[name].decode_projections != "xla"
                          and batch not in layers.PROJECTION_KERNEL_BATCHES):
                        row["skipped"] = (f"decode_projections runs XLA's GEMMs at batch "
                                          f"{batch} (layers.PROJECTION_KERNEL_BATCHES)")
                    elif all_weights + state_bytes > _MEMORY_FRACTION.value * capacity:
                        row["skipped"] = (
                            f"does not fit: {(all_weights + state_bytes) / 2**30:.1f} GiB > "
                            f"{_MEMORY_FRACTION.value} x {capacity / 2**30:.1f} GiB")
                    else:
                        row.update(time_decode(m, name, batch, context, max_len, options,
                                               new, repeats, state_bytes))
                    results.append(row)
                    print(json.dumps(row), flush=True)
                    write_json(device, xla_flags, bandwidth, results,
                               kernel_checks)   # kept if killed
    print_table(results)


def check_against_xla(reference: dict, m: dict, name: str, context: int, tokens, *,
                      reference_name: str = "retnet", tolerance: float = 2e-2) -> dict:
    """Correctness before timing: the same random cache at `context` fed the same tokens
    (int32 [steps, batch]; teacher forcing: with random weights a greedy near-tie flipped by
    one rounding would send the two decodes down different tokens) by the XLA model and by
    `m` (same weights, another retention_kernel, state dtype or decode_projections). Returns
    the final states' largest relative error and the fraction of steps whose greedy choices agree; exits
    (UsageError) when the error exceeds `tolerance` (bf16 compute), so a wrong kernel is
    never timed."""
    new, batch = tokens.shape
    outputs = []
    for model in (reference, m):
        cache = random_cache(model["shape"], batch, cache_length(context + new), context,
                             seed=1)
        choices, cache = forced_decode(model["shape"][0])(model["params"], cache, tokens)
        outputs.append((np.asarray(choices), [np.asarray(x, np.float64) for x in
                                              jax.tree.leaves(cache.layers)]))
    (choices_a, states_a), (choices_b, states_b) = outputs
    error = max(float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))
                for a, b in zip(states_a, states_b, strict=True))
    check = dict(model=name, reference=reference_name, batch=batch, state_rel_err=error,
                 greedy_agreement=float((choices_a == choices_b).mean()))
    print(f"{name} against {reference_name}, batch {batch}, {new} forced tokens: {check}",
          flush=True)
    if not error <= tolerance:   # also when NaN
        raise app.UsageError(f"{name} decodes a state {error:.3g} away from "
                             f"{reference_name}'s (> {tolerance}): not timed")
    return check


def write_json(device, xla_flags: str | None, bandwidth: float, results: list[dict],
               kernel_checks: list[dict]) -> None:
    """All rows so far, with the device, jax version, XLA_FLAGS and copy bandwidth, to --out
    (if given)."""
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(dict(device=device.device_kind, jax=jax.__version__,
                           xla_flags=xla_flags, copy_bandwidth=bandwidth,
                           projection_kernel_batches=list(layers.PROJECTION_KERNEL_BATCHES),
                           gemv_tiles=_GEMV_TILES.value, step_block_v=_STEP_BLOCK_V.value,
                           kernel_checks=kernel_checks, results=results),
                      f, indent=2)


def parse_compiler_options(text: str) -> dict:
    """'name=value[,name=value]' -> {name: value} with true/false as bools, integers as ints
    and anything else as a string. A piece without '=' continues the previous value, for
    list-valued options: 'xla_gpu_enable_command_buffer=FUSION,WHILE' -> 'FUSION,WHILE'.
    A UsageError naming --compiler_options for a malformed entry."""
    items: list[str] = []
    for part in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in part and items:
            items[-1] += "," + part
        else:
            items.append(part)
    options = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise app.UsageError(f"--compiler_options: {item!r} is not name=value")
        if value.lower() in ("true", "false"):
            options[name] = value.lower() == "true"
        else:
            try:
                options[name] = int(value)
            except ValueError:
                options[name] = value
    return options


def time_decode(m: dict, name: str, batch: int, context: int, max_len: int, options: dict,
                new: int, repeats: int, state_bytes: int) -> dict:
    """Compiles (once per cache shape and option set) and times one model's decode loop at
    this batch and context: ms per token, launches per token by kind, memory. A compile
    that XLA refuses (e.g. an option this version lacks) is returned as {'error': ...}."""
    cache = random_cache(m["shape"], batch, max_len, context, seed=batch + context)
    tokens = jnp.zeros((batch,), jnp.int32) + 65
    # One compile per distinct cache shape (RetNet's does not grow with context).
    key = (batch, str(jax.tree.map(lambda x: x.shape, cache)), str(sorted(options.items())))
    if key not in m["executables"]:
        try:
            compiled = m["run"].lower(m["params"], cache, tokens).compile(
                compiler_options=options or None)
        except Exception as e:  # noqa: BLE001 - recorded as the row's result
            return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        hlo_text = compiled.as_text()
        if _HLO_DIR.value:
            os.makedirs(_HLO_DIR.value, exist_ok=True)
            # name-value, other characters as '_': file names of letters, digits, '.', '_', '-'
            suffix = "".join("_" + re.sub(r"[^\w.-]", "_", f"{k}-{v}", flags=re.ASCII)
                             for k, v in sorted(options.items()))
            path = os.path.join(_HLO_DIR.value, f"{name}_batch{batch}_context{context}{suffix}.txt")
            with open(path, "w") as f:
                f.write(hlo_text)
        m["executables"][key] = (compiled, hlo_launches(hlo_text))
    compiled, launches = m["executables"][key]
    tokens, cache = compiled(m["params"], cache, tokens)          # warm-up
    jax.block_until_ready(tokens)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens, cache = compiled(m["params"], cache, tokens)
        jax.block_until_ready(tokens)
        times.append(time.perf_counter() - t0)
    ms = float(np.median(times)) / new * 1e3
    temp = compiled.memory_analysis().temp_size_in_bytes
    return dict(ms_per_token=ms, tokens_per_s=batch / ms * 1e3,
                hlo_kernels_per_token=sum(launches.values()),
                hlo_launch_kinds=dict(launches.most_common()), temp_gib=temp / 2**30,
                total_gib=(m["weight_bytes"] + state_bytes + temp) / 2**30,
                floor_ratio=ms / m["floor_ms"])


def step_fallback(model: ModelConfig) -> str | None:
    """Why a model asking for the Pallas decoding step runs XLA's here (off GPU, or head
    dims the step does not take: `layers.pallas_fallback_reason`, what the library asks
    before it falls back), or None; such rows are printed '(XLA step)'."""
    kernel = model.decode_kernel or model.retention_kernel
    if kernel != "pallas" or all(mixer == "attention" for mixer in model.mixers):
        return None
    return pallas_fallback_reason(*model.retention_head_dims, None)


def print_table(results: list[dict]) -> None:
    print("\n| model | batch | context | compiler options | ms/token | tokens/s | x floor | "
          "kernels/token | state GiB | weights+state+temp GiB |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        options = ", ".join(f"{k}={v}" for k, v in r["compiler_options"].items()) or "default"
        model = r["model"] + (" (XLA step)" if r.get("pallas_fallback") else "")
        head = f"| {model} | {r['batch']} | {r['context']} | {options} |"
        if "skipped" in r or "error" in r:
            print(f"{head} {r.get('skipped') or r['error'][:60]} | | | | {r['state_gib']:.2f} | |")
        else:
            print(f"{head} {r['ms_per_token']:.3f} | {r['tokens_per_s']:,.0f} | "
                  f"{r['floor_ratio']:.2f} | {r['hlo_kernels_per_token']} | "
                  f"{r['state_gib']:.3f} | {r['total_gib']:.2f} |")


if __name__ == "__main__":
    app.run(main)
