"""The decode benchmarks' models: configs (RetNet per retention kernel and state dtype, and
the parameter-matched Transformer), random weights and caches drawn on the host, and the
jitted greedy decode loop.

Imported by bench_decode.py and profile_decode.py (they run with experiments/ on sys.path).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retnet_jax.kernels.common import round_up
from retnet_jax.model import ModelConfig, RetNetLM, transformer_baseline

# KV caches hold a multiple of this many positions, as serving stacks size theirs. Until
# session 19 bench_decode sized them to context + 224 (8,416 at 8K), profile_decode to
# context + 256 (8,448, a multiple of 128), and the Transformer's bench_decode tokens took
# 1.26-1.29x its profiled ones (BENCHMARKS.md, "Decoding", sessions 16 and 19): attention
# dots over an unaligned cache are the suspected cause, not yet timed.
CACHE_MULTIPLE = 128


def cache_length(positions: int) -> int:
    """A decoding cache's length holding `positions` tokens, rounded up to CACHE_MULTIPLE
    (a pure-retention model's state does not depend on it)."""
    return round_up(positions, CACHE_MULTIPLE)


def projections_suffix(projections: str) -> str:
    """'' for XLA's projections, else '-<decode_projections>-projections'."""
    return "" if projections == "xla" else f"-{projections}-projections"


def retnet_name(kernel: str, state_dtype: str, projections: str = "xla") -> str:
    """A RetNet row's model name: 'retnet', 'retnet-<kernel>', then '-<dtype>-state' unless
    the state is float32, then `projections_suffix`."""
    name = "retnet" if kernel == "xla" else f"retnet-{kernel}"
    name = name if state_dtype == "float32" else f"{name}-{state_dtype}-state"
    return name + projections_suffix(projections)


def decode_configs(base: ModelConfig, kernels: list[str], state_dtypes: list[str],
                   max_seq_len: int, projections: tuple[str, ...] = ("xla",), *,
                   transformer: bool = True) -> dict[str, ModelConfig]:
    """{model name: config} in bf16 with room for max_seq_len positions: a RetNet per
    decode_projections, retention kernel and state dtype (`retnet_name`), then (unless
    transformer is False) a Transformer per decode_projections ('transformer' +
    `projections_suffix`). The
    Transformer has bench_train's 128-wide heads and an FFN width that is a multiple of the
    GEMM tiles (5544, multiple=8, made XLA concatenate both FFN input weights in every
    decode step)."""
    base = dataclasses.replace(base, dtype="bfloat16", param_dtype="bfloat16",
                               max_seq_len=max_seq_len)
    models = {retnet_name(kernel, state_dtype, impl):
              dataclasses.replace(base, retention_kernel=kernel, decode_kernel=None,
                                  state_dtype=state_dtype, decode_projections=impl)
              for impl in projections for state_dtype in state_dtypes for kernel in kernels}
    if transformer:
        baseline = transformer_baseline(base, head_dim=128, multiple=128)
        models.update({"transformer" + projections_suffix(impl):
                       dataclasses.replace(baseline, decode_projections=impl)
                       for impl in projections})
    return models


def same_weights(config: ModelConfig) -> str:
    """A key equal for configs that differ only in how decoding is computed (retention
    and decode kernels, state dtype, projections), i.e. whose models can share one set of
    weights."""
    return repr(dataclasses.replace(config, retention_kernel="xla", decode_kernel=None,
                                    state_dtype="float32", decode_projections="xla"))


def graphdef_of(config: ModelConfig):
    """The model's structure alone (no weights drawn)."""
    return nnx.graphdef(nnx.eval_shape(lambda: RetNetLM(config, rngs=nnx.Rngs(0))))


def build(config: ModelConfig):
    """(graphdef, params) with random N(0, 0.02) weights drawn on the host (timing needs no
    trained weights, and XLA compiles a jitted 1.3B-parameter initialiser very slowly)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: RetNetLM(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda x: jnp.asarray((rng.standard_normal(x.shape, np.float32) * 0.02).astype(x.dtype)),
        abstract)
    return graphdef, params


def random_cache(model_shape, batch: int, max_len: int, context: int, seed: int):
    """A cache at position `context` whose float leaves hold random values: a random host
    tile over the last two axes, broadcast on the device (a jitted random fill of a multi-GiB
    KV cache takes XLA minutes to compile; the values do not change decode time)."""
    abstract = jax.eval_shape(lambda: nnx.merge(*model_shape).init_cache(batch, max_len))
    leaves, treedef = jax.tree.flatten(abstract)
    rng = np.random.default_rng(seed)

    def fill(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.zeros(x.shape, x.dtype)
        # Values a bfloat16 state can hold, so float32- and bfloat16-state caches start equal.
        tile = (rng.standard_normal(x.shape[-2:], np.float32) * 0.1).astype(
            jnp.bfloat16).astype(x.dtype)
        return jnp.broadcast_to(jnp.asarray(tile), x.shape)

    cache = jax.tree.unflatten(treedef, [fill(x) for x in leaves])
    return dataclasses.replace(cache, position=jnp.full((batch,), context, jnp.int32))


def decode_loop(graphdef, new_tokens: int):
    """jit((params, cache, tokens [B]) -> (tokens, cache)) decoding greedily new_tokens steps."""
    def run(params, cache, tokens):
        model = nnx.merge(graphdef, params)
        def step(carry, _):
            tokens, cache = carry
            logits, cache = model.decode_step(tokens, cache)
            return (jnp.argmax(logits, -1).astype(jnp.int32), cache), None
        (tokens, cache), _ = jax.lax.scan(step, (tokens, cache), None, length=new_tokens)
        return tokens, cache
    return jax.jit(run, donate_argnums=1)


def forced_decode(graphdef):
    """jit((params, cache, tokens [steps, B]) -> (greedy choices [steps, B], cache)): decodes
    the given tokens (teacher forcing), so two models' states can be compared after the same
    inputs even where their greedy choices differ."""
    def run(params, cache, tokens):
        model = nnx.merge(graphdef, params)
        def step(cache, token):
            logits, cache = model.decode_step(token, cache)
            return cache, jnp.argmax(logits, -1).astype(jnp.int32)
        cache, choices = jax.lax.scan(step, cache, tokens)
        return choices, cache
    return jax.jit(run)


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def override_gemv_tiles(block_n: int | None, block_k: int | None, splits: int | None) -> None:
    """For this process, the GEMV kernel's tile choices (`kernels.projections`' default_*,
    which every model call leaves to it) become these, where not None: a way to time the
    model with other tiles than the kernel's defaults (e.g. one K split)."""
    from retnet_jax.kernels import projections
    if block_n is not None:
        projections.default_block_n = lambda k, widths, *, block_k: block_n
    if block_k is not None:
        projections.default_block_k = lambda k: block_k
    if splits is not None:
        projections.default_splits = lambda k, columns, *, block_n, block_k, **_: splits


def override_step_block_v(block_v: int) -> None:
    """For this process, the Pallas decode step's most value columns per program
    (`kernels.decode_step.default_block_v`, which every model call leaves to it) become
    block_v (a power of two >= 16; each program takes the widest multiple of 16 dividing Dv
    up to it): a way to time the model's step at other widths. At batch 1 with the GEMV
    projections a width whose columns do not divide v's first column in the q|k|v|gate
    partials (at the 1.3B heads any above 32: v starts at column 4096, 48 columns do not
    divide it) makes the model add q, k and v in XLA and run the packed step
    (`kernels.splits_layout_reason`)."""
    from retnet_jax.kernels import common, decode_step
    if common.check_block_arg("block_v", block_v) < common.MIN_DOT_DIM:
        raise ValueError(f"block_v must be at least {common.MIN_DOT_DIM}, got {block_v}")
    decode_step.default_block_v = lambda batch, heads, value_dim, **_: block_v
