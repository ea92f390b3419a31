"""Generation: constant retention state, recurrent decoding equals parallel-mode argmax, batched
prompts equal single prompts, sampling settings and stop tokens behave."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retnet_jax import generate as generate_module
from retnet_jax.generate import decode_compiler_options, generate, sample_tokens
from retnet_jax.model import RetNetLM
from test_model import SCHEDULES, VOCAB, forward, make_model, prefill, small_config

NEW = 10


@pytest.fixture(scope="module", params=["retention", "gated", "hybrid"])
def model(request):
    return make_model(small_config(SCHEDULES[request.param]), seed=11)


def prompt(seed, length):
    return np.asarray(jax.random.randint(jax.random.key(seed), (length,), 0, VOCAB, jnp.int32))


def cache_layout(cache):
    return [(x.shape, x.dtype, x.nbytes) for x in jax.tree.leaves(cache)]


@pytest.mark.parametrize("kind", ["retention", "gated"])
def test_retention_state_does_not_grow_with_context(kind):
    model = RetNetLM(small_config(SCHEDULES[kind], max_seq_len=512), rngs=nnx.Rngs(0))
    layouts = []
    for context, max_len in ((10, 16), (500, 512)):
        tokens = jnp.asarray(prompt(context, context))[None]
        _, cache = prefill(model, tokens, jnp.array([context]), model.init_cache(1, max_len))
        np.testing.assert_array_equal(cache.position, [context])
        layouts.append(cache_layout(cache))
    assert layouts[0] == layouts[1]
    assert sum(nbytes for *_, nbytes in layouts[0]) == 4 + 2 * 2 * 16 * 24 * 4   # position + states


def test_greedy_decoding_equals_parallel_argmax(model):
    """Each generated token is the argmax of parallel-mode logits of the prefix before it
    (one forward over the final sequence gives all prefixes' logits, by causality)."""
    start = prompt(1, 7)
    (generated,) = generate(model, [start], max_new_tokens=NEW)
    assert generated.shape == (NEW,)
    sequence = np.concatenate([start, generated])
    logits = forward(model, jnp.asarray(sequence)[None], "parallel")[0]
    np.testing.assert_array_equal(np.argmax(logits[len(start) - 1:-1], axis=-1), generated)


def test_batch_one_on_gpu_switches_dot_strength_reduction_off():
    assert decode_compiler_options(1, "gpu") == {"xla_disable_hlo_passes": "dot-strength-reduction"}
    assert decode_compiler_options(2, "gpu") == {}
    assert decode_compiler_options(1, "cpu") == {} == decode_compiler_options(1, "tpu")


def test_gpu_batch_one_options_reach_the_compile_and_keep_the_tokens(monkeypatch):
    """generate compiles with the GPU's batch-1 options (XLA accepts them on the CPU, where the
    pass does not exist) and decodes the same tokens."""
    model = make_model(small_config(SCHEDULES["retention"]), seed=11)
    start = prompt(5, 7)
    expected = generate(model, [start], max_new_tokens=NEW)[0]
    used = []
    jitted = generate_module._jitted_generate
    monkeypatch.setattr(generate_module.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(generate_module, "_jitted_generate",
                        lambda options: used.append(options) or jitted(options))
    np.testing.assert_array_equal(generate(model, [start], max_new_tokens=NEW)[0], expected)
    assert used == [(("xla_disable_hlo_passes", "dot-strength-reduction"),)]


def test_batched_prompts_equal_single_prompts():
    """On the hybrid model, which has all three mixers (one compile per prompt length)."""
    model = make_model(small_config(SCHEDULES["hybrid"]), seed=11)
    prompts = [prompt(2, 3), prompt(3, 9), prompt(4, 6)]
    batched = generate(model, prompts, max_new_tokens=NEW)
    for p, row in zip(prompts, batched, strict=True):
        np.testing.assert_array_equal(row, generate(model, [p], max_new_tokens=NEW)[0])
    padded = np.zeros((3, 9), np.int32)
    for i, p in enumerate(prompts):
        padded[i, :len(p)] = p
    as_array = generate(model, padded, lengths=[3, 9, 6], max_new_tokens=NEW)
    for a, b in zip(as_array, batched, strict=True):
        np.testing.assert_array_equal(a, b)


def test_top_k_one_and_tiny_top_p_sample_the_greedy_token():
    model = make_model(small_config(("retention",)), seed=12)      # sampling is mixer-agnostic
    prompts = [prompt(5, 4), prompt(6, 8)]
    greedy = generate(model, prompts, max_new_tokens=NEW)
    for settings in (dict(top_k=1), dict(top_p=1e-6)):
        sampled = generate(model, prompts, max_new_tokens=NEW, temperature=1.0,
                           rng=jax.random.key(0), **settings)
        for a, b in zip(sampled, greedy, strict=True):
            np.testing.assert_array_equal(a, b)
    hot = generate(model, prompts, max_new_tokens=NEW, temperature=5.0, rng=jax.random.key(0))
    assert any((a != b).any() for a, b in zip(hot, greedy))


def test_stop_tokens_end_each_sequence():
    model = make_model(small_config(("retention",)), seed=13)
    prompts = [prompt(7, 5), prompt(8, 3)]
    greedy = generate(model, prompts, max_new_tokens=NEW)
    stop = int(greedy[0][3])
    first_stop = [np.flatnonzero(g == stop) for g in greedy]
    stopped = generate(model, prompts, max_new_tokens=NEW, stop_tokens=(stop,))
    for g, s, hits in zip(greedy, stopped, first_stop, strict=True):
        want = g[:hits[0] + 1] if hits.size else g
        np.testing.assert_array_equal(s, want)
    assert stopped[0][-1] == stop and len(stopped[0]) <= 4


def test_sample_tokens_keeps_the_top_k_and_top_p_sets():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
    keys = jax.random.split(jax.random.key(0), 2000)

    def draw(keys, **settings):
        one = functools.partial(sample_tokens, logits, temperature=1.0, **settings)
        return jax.jit(jax.vmap(lambda key: one(key)[0]))(keys)

    assert set(np.asarray(draw(keys, top_k=2)).tolist()) == {1, 3}
    assert set(np.asarray(draw(keys, top_p=0.45)).tolist()) == {1}
    assert set(np.asarray(draw(keys, top_p=0.75)).tolist()) == {1, 3}
    assert set(np.asarray(draw(keys, top_p=0.81)).tolist()) == {1, 3, 2}
    counts = np.bincount(np.asarray(draw(keys)), minlength=4) / len(keys)
    np.testing.assert_allclose(counts, [0.05, 0.5, 0.15, 0.3], atol=0.04)
    assert int(sample_tokens(logits, None)[0]) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[np.zeros(65, np.int32)]), "max_seq_len"),
    (dict(prompts=[np.zeros(60, np.int32)]), "max_seq_len"),      # 60 + 10 new > 64
    (dict(prompts=[np.array([1, VOCAB])]), "tokens"),
    (dict(prompts=[np.array([], np.int32)]), "at least one token"),
    (dict(prompts=[np.array([1, 2])], temperature=1.0), "rng"),
    (dict(prompts=[np.array([1, 2])], top_k=0), "top_k"),
    (dict(prompts=[np.array([1, 2])], top_p=1.5), "top_p"),
    (dict(prompts=[np.array([1, 2])], stop_tokens=(VOCAB,)), "stop_tokens"),
    (dict(prompts=[np.array([1, 2])], max_len=5), "max_len"),
    (dict(prompts=np.zeros((2, 3), np.int32), lengths=[3, 4]), "lengths"),
])
def test_bad_arguments_raise(kwargs, match):
    model = RetNetLM(small_config(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        generate(model, max_new_tokens=NEW, **kwargs)
