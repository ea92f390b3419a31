"""Generation: prefill the prompts (chunkwise), then decode one token per step (recurrent).

Retention layers carry a constant-size state (float32, or bfloat16 with
`ModelConfig.state_dtype`), so a step costs the same at any context length; attention layers of hybrid models use a preallocated KV cache. Prefill and
the whole decode loop (`lax.while_loop`, stopping early once every sequence has finished)
are one jitted function, compiled once per (model structure, batch shape, settings); at
batch 1 on a GPU with one XLA pass switched off (`decode_compiler_options`).

    tokens = generate(model, [prompt_a, prompt_b], max_new_tokens=64)          # greedy
    tokens = generate(model, prompts, max_new_tokens=64, temperature=0.8, top_p=0.95,
                      stop_tokens=(data.EOS,), rng=jax.random.key(0))
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retnet_jax.model import RetNetLM, check_tokens

Array = jax.Array

__all__ = ["decode_compiler_options", "generate", "sample_tokens"]


def sample_tokens(logits: Array, rng: Array | None, *, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None) -> Array:
    """Picks one token per row.

    Args:
      logits: float [batch, vocab].
      rng: a PRNG key; unused (may be None) when temperature == 0.
      temperature: 0 -> greedy argmax (top_k/top_p ignored); > 0 divides the logits.
      top_k: keep the k largest logits of each row.
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p
        (the most likely token is always kept); applied after top_k.
    Returns:
      int32 [batch].
    """
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p is not None:
        descending = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        threshold = jnp.min(jnp.where(mass_before < top_p, descending, jnp.inf), axis=-1,
                            keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# XLA's GPU pass `dot-strength-reduction` rewrites every [1, d] x [d, n] projection of a
# batch-1 decode step (those under its size threshold: all but the LM head at 1.3B) into a
# broadcast-multiply that writes a weight-sized product to HBM and a reduction that reads it
# back. Switched off, RetNet 1.3B decodes a token in 1.73 ms instead of 3.84 on an H200, the
# Transformer baseline in 2.73 instead of 3.17; at batch 2 and 8 it changed nothing for RetNet
# and cost the Transformer 12 GiB of temporaries at batch 8 (BENCHMARKS.md, "Decoding").
_BATCH1_GPU_OPTIONS = (("xla_disable_hlo_passes", "dot-strength-reduction"),)


def decode_compiler_options(batch: int, platform: str) -> dict[str, str]:
    """The XLA options `generate` compiles with for `batch` rows on `platform` ('gpu', 'cpu',
    'tpu'): the GPU's dot strength reduction off at batch 1, XLA's defaults otherwise."""
    return dict(_BATCH1_GPU_OPTIONS) if batch == 1 and platform == "gpu" else {}


@functools.cache
def _jitted_generate(options: tuple[tuple[str, str], ...]):
    """`_generate_padded` jitted with these XLA compiler options (one jit per option set)."""
    return jax.jit(_generate_padded, compiler_options=dict(options) or None, static_argnames=(
        "graphdef", "max_new_tokens", "max_len", "temperature", "top_k", "top_p", "stop_tokens"))


def _generate_padded(graphdef, state, tokens, lengths, rng, *, max_new_tokens, max_len,
                     temperature, top_k, top_p, stop_tokens):
    """Jitted core. tokens int32 [B, T] right-padded, lengths int32 [B] >= 1.
    Returns int32 [B, max_new_tokens]; columns after an early exit are 0 (every row has
    stopped by then), and a stopped row repeats its stop token."""
    model = nnx.merge(graphdef, state)
    batch = tokens.shape[0]
    sample = functools.partial(sample_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    stops = jnp.asarray(stop_tokens, jnp.int32)

    def pick(logits, key, done, previous):
        token = jnp.where(done, previous, sample(logits, key))
        return token, done | jnp.isin(token, stops)

    cache = model.init_cache(batch, max_len)
    logits, cache = model.prefill(tokens, lengths, cache)
    last_logits = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    rng, key = jax.random.split(rng)
    token, done = pick(last_logits, key, jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32))
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token)

    def unfinished(carry):
        step, _, done, _, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode(carry):
        step, token, done, cache, out, rng = carry
        logits, cache = model.decode_step(token, cache)
        rng, key = jax.random.split(rng)
        token, done = pick(logits, key, done, token)
        return step + 1, token, done, cache, out.at[:, step].set(token), rng

    carry = jax.lax.while_loop(unfinished, decode, (1, token, done, cache, out, rng))
    return carry[4]


def _batch_prompts(prompts, lengths) -> tuple[np.ndarray, np.ndarray]:
    """list of 1-D int arrays, or [B, T] (+ lengths [B]) -> (int32 [B, T] right-padded with
    0, int32 [B])."""
    if isinstance(prompts, (list, tuple)):
        if lengths is not None:
            raise ValueError("lengths is only for a [batch, time] prompts array; a list of "
                             "prompts carries its own lengths")
        rows = [np.asarray(p) for p in prompts]
        if not rows or any(r.ndim != 1 for r in rows):
            raise ValueError("prompts must be a non-empty list of 1-D token arrays, got shapes "
                             f"{[r.shape for r in rows]}")
        lengths = np.array([len(r) for r in rows], np.int32)
        tokens = np.zeros((len(rows), max(lengths)), np.int32)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r
    else:
        tokens = np.asarray(prompts)
        if tokens.ndim != 2:
            raise ValueError(f"prompts must be a list of 1-D arrays or a [batch, time] array, "
                             f"got shape {tokens.shape}")
        lengths = np.full(tokens.shape[0], tokens.shape[1], np.int32) if lengths is None \
            else np.asarray(lengths, np.int32)
        if lengths.shape != tokens.shape[:1] or (lengths > tokens.shape[1]).any():
            raise ValueError(f"lengths must be [batch={tokens.shape[0]}] values <= "
                             f"{tokens.shape[1]}, got {lengths}")
    if (lengths < 1).any():
        raise ValueError(f"every prompt needs at least one token, got lengths {lengths}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"prompts must hold integer token ids, got dtype {tokens.dtype}")
    valid = np.arange(tokens.shape[1]) < lengths[:, None]
    return np.where(valid, tokens, 0).astype(np.int32), lengths


def generate(model: RetNetLM, prompts: Sequence[Array] | Array, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop_tokens: Sequence[int] = (), rng: Array | None = None,
             max_len: int | None = None, lengths: Array | None = None) -> list[np.ndarray]:
    """Continues each prompt by up to `max_new_tokens` tokens.

    Args:
      model: a RetNetLM.
      prompts: a list of 1-D int arrays (any lengths >= 1), or an int [batch, time] array
        with `lengths` [batch] (default: all `time`), right-padded.
      max_new_tokens: tokens to generate per prompt (>= 1).
      temperature, top_k, top_p: see `sample_tokens`; temperature 0 is greedy.
      stop_tokens: ids that end a sequence; a finished sequence keeps repeating its stop token
        while the others continue, and the loop exits once all have finished.
      rng: PRNG key, required when temperature > 0.
      max_len: attention KV-cache length; default longest prompt + max_new_tokens.
    Returns:
      One int32 array per prompt: the generated tokens, ending with the first stop token
      (included) when one was produced.
    Raises:
      ValueError: for bad arguments, ids outside the vocabulary, or prompt + generated
        tokens longer than the model's max_seq_len.
    """
    config = model.config
    tokens, lengths = _batch_prompts(prompts, lengths)
    check_tokens(tokens, config.vocab_size, rank=2)
    longest = int(lengths.max())
    if longest > config.max_seq_len:
        raise ValueError(f"prompt of {longest} tokens exceeds max_seq_len={config.max_seq_len}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if longest + max_new_tokens > config.max_seq_len:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds "
                         f"max_seq_len={config.max_seq_len}")
    needed = longest + max_new_tokens
    max_len = needed if max_len is None else max_len
    if max_len < needed:
        raise ValueError(f"max_len={max_len} is shorter than the longest prompt + "
                         f"max_new_tokens = {needed}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= config.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={config.vocab_size}], got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature > 0 and rng is None:
        raise ValueError("rng (a PRNG key) is required when temperature > 0")
    stop_tokens = tuple(int(t) for t in stop_tokens)
    if any(not 0 <= t < config.vocab_size for t in stop_tokens):
        raise ValueError(f"stop_tokens must be ids in [0, vocab_size={config.vocab_size}), "
                         f"got {stop_tokens}")

    graphdef, state = nnx.split(model)
    options = decode_compiler_options(tokens.shape[0], jax.default_backend())
    out = _jitted_generate(tuple(sorted(options.items())))(
        graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths),
        jax.random.key(0) if rng is None else rng, max_new_tokens=max_new_tokens,
        max_len=max_len, temperature=float(temperature), top_k=top_k,
        top_p=None if top_p is None else float(top_p), stop_tokens=stop_tokens)
    results = []
    for row in np.asarray(out):
        stopped = np.flatnonzero(np.isin(row, stop_tokens))
        results.append(row[:stopped[0] + 1] if stopped.size else row)
    return results
