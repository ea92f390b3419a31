"""Where a decoded token's time goes, kernel by kernel (issue 5 part 3).

`bench_decode.py` times whole decode loops; this traces one loop per model and batch with
`jax.profiler` and reads the device's kernel timeline back (`jax.profiler.ProfileData`): per
token, the time the GPU spent in kernels against the time between them (launch gaps and
host round trips), then each kind of kernel (Triton GEMMs, loop and reduction fusions,
Pallas kernels, library calls) and the costliest instructions, each with the bytes it
moves (read off the compiled HLO: `hlo_text.Launch`), the rate that makes against the
copy bandwidth measured in the same run, and the model line it came from (`source`). The
cache holds a multiple of 128 positions (`decode_models.cache_length`, as bench_decode's;
`cache_len` in the JSON). The models,
weights and caches are bench_decode's (`decode_models`); each loop compiles with
`generate`'s options for its batch.

  python3 experiments/profile_decode.py --config=configs/retnet_1_3b.py --batches=1,8 --out=$OUT/profile_decode.json

On a CPU the same numbers come from the host's XLA op events (for testing the script; the
timings mean nothing for a GPU).
"""

import json
import tempfile

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from ceilings import copy_bandwidth, median_seconds
from decode_models import (build, cache_length, decode_configs, decode_loop, graphdef_of,
                           random_cache)
from hlo_text import launches
from retnet_jax.generate import decode_compiler_options
from retnet_jax.layers import DECODE_PROJECTIONS, RETENTION_KERNELS
from retnet_jax.model import ModelConfig
from trace_kernels import device_kernels, print_summary, summarize, trace_call

_CONFIG = config_flags.DEFINE_config_file("config", "configs/retnet_1_3b.py", "Model preset.")
_BATCHES = flags.DEFINE_list("batches", ["1"], "Batch sizes.")
_CONTEXT = flags.DEFINE_integer("context", 8192, "Tokens already in the cache.")
_NEW = flags.DEFINE_integer("new_tokens", 32, "Tokens decoded in the traced call.")
_KERNELS = flags.DEFINE_list("retention_kernels", ["xla"], "The RetNet's retention_kernel "
                             f"values, one RetNet each (from {RETENTION_KERNELS}).")
_TRANSFORMER = flags.DEFINE_bool("transformer", True, "Also profile the Transformer baseline.")
_TOP = flags.DEFINE_integer("top", 16, "Instructions listed per profile, costliest first.")
_COPY_BYTES = flags.DEFINE_integer("copy_bytes", 1 << 30, "Bytes of the copy-bandwidth probe.")
_TRACE_DIR = flags.DEFINE_string("trace_dir", None, "Keep the raw traces here (TensorBoard / "
                                 "xprof format); a temporary directory otherwise.")
_OUT = flags.DEFINE_string("out", None, "Write all profiles as JSON here.")
_PROJECTIONS = flags.DEFINE_list("decode_projections", ["xla"], "Both models' "
                                 "decode_projections, a profile each (bench_decode's names).")
flags.register_validator("decode_projections", lambda v: set(v) <= set(DECODE_PROJECTIONS),
                         message=f"--decode_projections must be names from "
                         f"{DECODE_PROJECTIONS}")
flags.register_validator("retention_kernels", lambda v: set(v) <= set(RETENTION_KERNELS),
                         message=f"--retention_kernels must be names from {RETENTION_KERNELS}")
flags.register_validator("batches", lambda v: all(b.isdigit() and int(b) > 0 for b in v),
                         message="--batches must be positive integers")

def profile_model(name: str, graphdef, params, batch: int, context: int, new: int,
                  bandwidth: float, trace_dir: str) -> dict:
    """One model's decode loop at one batch: compiled with generate's options, timed
    untraced (median of 5 calls), then traced once and summarised."""
    platform = jax.devices()[0].platform
    options = decode_compiler_options(batch, platform)
    shape = (graphdef, jax.eval_shape(lambda p: p, params))
    max_len = cache_length(context + 8 * new)
    cache = random_cache(shape, batch, max_len, context, seed=batch)
    tokens = jnp.full((batch,), 65, jnp.int32)
    compiled = decode_loop(graphdef, new).lower(params, cache, tokens).compile(
        compiler_options=options or None)
    costs = {launch.name: launch for launch in launches(compiled.as_text())}
    state = {"cache": cache, "tokens": tokens}

    def call():
        state["tokens"], state["cache"] = compiled(params, state["cache"], state["tokens"])
        return state["tokens"]

    wall = median_seconds(call, repeats=5)
    _, profile = trace_call(call, trace_dir=trace_dir)
    summary = summarize(device_kernels(profile), new, costs, bandwidth, _TOP.value)
    return dict(model=name, batch=batch, context=context, cache_len=max_len, new_tokens=new,
                compiler_options=options, wall_ms_per_token=wall / new * 1e3,
                hlo_launching_instructions=len(costs), **summary)


def print_profile(p: dict) -> None:
    print(f"\n{p['model']}, batch {p['batch']}, context {p['context']}: "
          f"{p['wall_ms_per_token'] * 1e3:.1f} us/token untraced; traced:")
    print_summary(p)


def main(argv):
    del argv
    base = ModelConfig.from_config(_CONFIG.value.model)
    new = _NEW.value
    configs = decode_configs(base, _KERNELS.value, ["float32"],
                             cache_length(_CONTEXT.value + 8 * new),
                             tuple(_PROJECTIONS.value), transformer=_TRANSFORMER.value)
    device = jax.devices()[0]
    bandwidth = copy_bandwidth(_COPY_BYTES.value)
    print(f"device {device.device_kind}, jax {jax.__version__}, copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s", flush=True)
    trace_dir = _TRACE_DIR.value or tempfile.mkdtemp(prefix="profile_decode_")
    profiles, shared = [], None
    for name, config in configs.items():
        if name.startswith("retnet") and shared is not None:
            graphdef, params = graphdef_of(config), shared   # the kernel changes no weight
        else:
            graphdef, params = build(config)
            shared = params if name.startswith("retnet") else shared
        for batch in (int(b) for b in _BATCHES.value):
            p = profile_model(name, graphdef, params, batch, _CONTEXT.value, new, bandwidth,
                              trace_dir)
            print_profile(p)
            profiles.append(p)
            if _OUT.value:
                with open(_OUT.value, "w") as f:
                    json.dump(dict(device=device.device_kind, jax=jax.__version__,
                                   copy_bandwidth=bandwidth, trace_dir=_TRACE_DIR.value,
                                   profiles=profiles), f, indent=2)
        del params


if __name__ == "__main__":
    app.run(main)
