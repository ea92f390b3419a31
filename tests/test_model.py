"""The language model: forms agree, the state API reproduces the forward pass, bad input fails
clearly, parameters are named for sharding and counted right.

Models are small with random, scaled-up weights (`randomize_params`); comparisons are float32
with rel err = max|a - b| / max|b| <= 1e-5.

Seeds: the forms round differently, and a position whose retention output nearly vanishes
is ill-conditioned in float32 whatever the form. Seen with seed 1 of the gated model: at t = 0
of one head, q.k = 1e-3 against sum_d |q_d k_d| = 9.5, so the recurrent form (which rounds
every o_e = sum_d q_d k_d v_e separately) differs by 1.6e-4 relative after the head norm.
Such seeds are avoided rather than loosening the tolerance for all.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from retnet_jax import layers
from retnet_jax import model as model_lib
from jaxprs import equations
from retnet_jax.model import LOGICAL_AXIS_NAMES, REMAT_POLICIES, ModelConfig, RetNetLM
from test_layers import randomize_params, rel_err

RTOL = 1e-5
VOCAB = 61
SCHEDULES = {
    "retention": ("retention", "retention"),
    "gated": ("gated_retention", "gated_retention"),
    "attention": ("attention", "attention"),
    "hybrid": ("retention", "gated_retention", "attention"),
}


def small_config(schedule=SCHEDULES["hybrid"], **overrides) -> ModelConfig:
    """d 32, 2 retention heads of key dim 16 and value dim 24, chunk 8."""
    values = dict(vocab_size=VOCAB, d_model=32, num_layers=len(schedule), num_heads=2,
                  value_dim=48, ffn_dim=64, num_attention_heads=4, layer_schedule=schedule,
                  chunk_size=8, max_seq_len=64, norm_eps=1e-6)
    values.update(overrides)
    return ModelConfig(**values)


def make_model(config: ModelConfig, seed: int = 0) -> RetNetLM:
    return randomize_params(RetNetLM(config, rngs=nnx.Rngs(seed)), seed)


def random_tokens(seed, batch, time):
    return jax.random.randint(jax.random.key(seed), (batch, time), 0, VOCAB, jnp.int32)


@functools.partial(nnx.jit, static_argnames="mode")
def forward(model, tokens, mode="chunkwise"):
    return model(tokens, mode=mode)


@nnx.jit
def prefill(model, tokens, lengths, cache):
    return model.prefill(tokens, lengths, cache)


@nnx.jit
def decode_step(model, tokens, cache):
    return model.decode_step(tokens, cache)


def with_config(model: RetNetLM, **changes) -> RetNetLM:
    """The same parameters under a config with `changes` (fields that keep the layout)."""
    config = dataclasses.replace(model.config, **changes)
    return nnx.merge(nnx.graphdef(RetNetLM(config, rngs=nnx.Rngs(0))), nnx.state(model))


def assert_same_loss_and_gradients(model_a, model_b, tokens, grad_rtol=1e-4):
    """Loss mean(logits^2) within RTOL, every parameter gradient within grad_rtol (float32
    rounding through several blocks: different fusions round differently)."""
    @nnx.jit
    def loss_and_grads(model):
        return nnx.value_and_grad(lambda m: jnp.mean(m(tokens) ** 2))(model)

    (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(model_a), loss_and_grads(model_b)
    assert rel_err(loss_b, loss_a) <= RTOL
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        assert rel_err(b, a) <= grad_rtol


def assert_modes_agree(model, tokens, rtol=RTOL):
    logits = {mode: forward(model, tokens, mode) for mode in model_lib.FORWARD_MODES}
    for mode, value in logits.items():
        assert value.dtype == jnp.float32 and value.shape == (*tokens.shape, VOCAB)
        assert np.isfinite(np.asarray(value)).all()
        assert rel_err(value, logits["parallel"]) <= rtol, mode


# ----------------------------------------------------------------------------- forms


@pytest.mark.parametrize("kind", ["retention", "gated", "attention"])
def test_forms_agree_for_each_mixer(kind):
    model = make_model(small_config(SCHEDULES[kind]), seed=0)
    assert_modes_agree(model, random_tokens(0, 2, 21))       # 21: not a multiple of chunk 8


@pytest.mark.parametrize("time", [1, 16, 21])
def test_forms_agree_for_hybrid(time):
    model = make_model(small_config(gate_logit_normalizer=1.0), seed=2)   # strong gated decay
    assert_modes_agree(model, random_tokens(2, 2, time))


@pytest.mark.parametrize("overrides", [
    dict(use_swish_gate=False, use_head_norm=False, decay_schedule="none"),
    dict(decay_schedule="single", decay_gamma=0.8, sqrt_row_scaling=False, activation="gelu",
         tie_embeddings=True, scale_embedding=False, num_heads=4),
], ids=["no-gate-no-norm-gamma1", "single-gelu-tied-headdim8"])
def test_forms_agree_for_ablations(overrides):
    model = make_model(small_config(SCHEDULES["retention"], **overrides), seed=3)
    assert_modes_agree(model, random_tokens(3, 2, 19))


def test_bfloat16_compute_stays_close_and_returns_float32():
    """bf16 compute against float32 with the same float32 parameters, at the default init:
    a random network with scaled-up weights amplifies bf16 rounding (to ~5% here), a
    property of the weights rather than of the dtype plumbing checked here."""
    config = small_config()
    model32 = RetNetLM(config, rngs=nnx.Rngs(4))
    model16 = RetNetLM(dataclasses.replace(config, dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(model16, nnx.state(model32, nnx.Param))          # same float32 parameters
    tokens = random_tokens(4, 2, 19)
    logits = forward(model16, tokens, "chunkwise")
    assert logits.dtype == jnp.float32
    assert 1e-4 < rel_err(logits, forward(model32, tokens)) <= 1e-2   # really bf16, and close
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model16, nnx.Param)))
    _, cache = prefill(model16, tokens, jnp.array([19, 7]), model16.init_cache(2, 32))
    assert cache.layers[0].state.dtype == jnp.float32
    assert cache.layers[2].key.dtype == jnp.bfloat16


def test_causal():
    model = make_model(small_config(), seed=5)
    tokens = random_tokens(5, 1, 20)
    changed = tokens.at[:, 12:].set((tokens[:, 12:] + 1) % VOCAB)
    a, b = forward(model, tokens), forward(model, changed)
    np.testing.assert_array_equal(a[:, :12], b[:, :12])
    assert not np.allclose(a[:, 12:], b[:, 12:])


def test_remat_gives_the_same_logits_and_gradients():
    plain = make_model(small_config(SCHEDULES["retention"]), 6)
    assert_same_loss_and_gradients(plain, with_config(plain, remat=True), random_tokens(6, 2, 12))


@pytest.mark.parametrize("policy", sorted(REMAT_POLICIES))
def test_each_remat_policy_reaches_the_checkpoint_and_keeps_the_gradients(policy):
    plain = make_model(small_config(SCHEDULES["hybrid"]), 6)
    remat = with_config(plain, remat=True, remat_policy=policy)
    tokens = random_tokens(6, 2, 12)
    assert_same_loss_and_gradients(plain, remat, tokens)
    graphdef, state = nnx.split(remat)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens))(state)
    policies = [e.params["policy"] for e in equations(jaxpr.jaxpr)
                if e.primitive.name == "remat2"]                    # jax.checkpoint's
    assert policies == [REMAT_POLICIES[policy]] * 3                 # one per block


def test_an_unknown_remat_policy_is_refused_by_name():
    with pytest.raises(ValueError, match="remat_policy: must be one of .*'full'.* got 'half'"):
        small_config(remat_policy="half")


def test_scan_layers_over_a_mixed_period_gives_the_same_logits():
    """The quick check of a scanned period over 1 (the gradient checks of the mixed
    schedules below are slow): retention then attention, twice, scanned against plain in
    the training forms. (The recurrent form is left to those checks: at this seed this
    schedule amplifies float32 rounding, 6e-5 between recurrent and parallel with or
    without the scan.)"""
    plain = make_model(small_config(("retention", "attention") * 2), 8)
    scanned = with_config(plain, scan_layers=True)
    tokens = random_tokens(8, 2, 21)
    for mode in ("parallel", "chunkwise"):
        assert rel_err(forward(scanned, tokens, mode), forward(plain, tokens, mode)) <= RTOL


@pytest.mark.parametrize("schedule, remat", [
    (SCHEDULES["retention"] * 2, False),
    pytest.param(SCHEDULES["gated"], True, marks=pytest.mark.slow),
    pytest.param(("retention", "attention") * 3, False,          # period 2, three repeats
                 marks=pytest.mark.slow),
    pytest.param(SCHEDULES["hybrid"], True, marks=pytest.mark.slow),  # period 3: all layers
])
def test_scan_layers_gives_the_same_logits_and_gradients(schedule, remat):
    plain = make_model(small_config(schedule, remat=remat), 8)
    scanned = with_config(plain, scan_layers=True)
    tokens = random_tokens(8, 2, 21)
    assert_same_loss_and_gradients(plain, scanned, tokens)
    assert_modes_agree(scanned, tokens)


@pytest.mark.parametrize("mixers, period", [
    (("retention",) * 6, 1), (("retention", "attention") * 3, 2),
    (("gated_retention",) * 3 + ("attention",), 4), (("retention", "retention", "attention"), 3),
])
def test_schedule_period(mixers, period):
    assert model_lib.schedule_period(mixers) == period


# ----------------------------------------------------------------------------- state API


@pytest.mark.parametrize("overrides", [
    dict(layer_schedule=SCHEDULES["retention"]),
    dict(layer_schedule=SCHEDULES["retention"], use_head_norm=False),   # row scale visible
    dict(layer_schedule=SCHEDULES["gated"]),
    dict(layer_schedule=SCHEDULES["hybrid"]),
], ids=["retention", "retention-no-head-norm", "gated", "hybrid"])
def test_prefill_and_decode_reproduce_the_forward_pass(overrides):
    """Right-padded prompts of lengths 5, 11, 1 are prefilled in two calls (split at 3), then
    4 tokens are decoded; every logit equals the parallel forward of that sequence alone."""
    config = small_config(**overrides, num_layers=len(overrides["layer_schedule"]))
    model = make_model(config, seed=7)
    lengths = np.array([5, 11, 1])
    steps = 4
    sequences = np.array(random_tokens(7, 3, 11 + steps))   # row b: prompt[:len_b] + 4 more
    prompts = np.array(sequences[:, :11])
    for b, length in enumerate(lengths):
        sequences[b, length:length + steps] = sequences[b, 11:]
        prompts[b, length:] = VOCAB - 1                        # padding content is arbitrary
    # One batched forward; by causality (test_causal) row b's logits before length_b + steps
    # do not see the leftover tokens after that.
    reference = forward(model, jnp.asarray(sequences), "parallel")

    cache = model.init_cache(3, 32)
    first = np.minimum(lengths, 3)
    logits_a, cache = prefill(model, jnp.asarray(prompts[:, :3]), jnp.asarray(first), cache)
    rest = np.zeros_like(prompts[:, :8])
    for b, length in enumerate(lengths):
        rest[b, :length - first[b]] = prompts[b, first[b]:length]
    logits_b, cache = prefill(model, jnp.asarray(rest), jnp.asarray(lengths - first), cache)
    np.testing.assert_array_equal(cache.position, lengths)
    for b, length in enumerate(lengths):
        got = np.concatenate([logits_a[b, :first[b]], logits_b[b, :length - first[b]]])
        assert rel_err(got, reference[b][:length]) <= RTOL, b

    for step in range(steps):
        tokens = jnp.asarray([seq[length + step] for seq, length in zip(sequences, lengths)])
        logits, cache = decode_step(model, tokens, cache)
        for b, length in enumerate(lengths):
            assert rel_err(logits[b], reference[b][length + step]) <= RTOL, (b, step)
    np.testing.assert_array_equal(cache.position, lengths + steps)


def test_init_cache_shapes():
    model = RetNetLM(small_config(), rngs=nnx.Rngs(0))
    cache = model.init_cache(3, 20)
    retention_cache, gated_cache, attention_cache = cache.layers
    assert retention_cache.state.shape == gated_cache.state.shape == (3, 2, 16, 24)
    assert retention_cache.state.dtype == jnp.float32
    assert attention_cache.key.shape == attention_cache.value.shape == (3, 20, 4, 8)
    assert cache.position.shape == (3,) and cache.position.dtype == jnp.int32


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def tiny_model():
    return RetNetLM(small_config(), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("tokens, match", [
    (np.array([[1, 2, VOCAB]]), "tokens"),
    (np.array([[1, -1, 2]]), "tokens"),
    (np.array([[1.0, 2.0]]), "tokens"),
    (np.array([1, 2, 3]), "tokens"),
    (np.zeros((1, 65), np.int32), "max_seq_len"),
])
def test_bad_tokens_raise(tiny_model, tokens, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(tokens)


def test_bad_mode_and_cache_arguments_raise(tiny_model):
    tokens = np.zeros((2, 4), np.int32)
    with pytest.raises(ValueError, match="mode"):
        tiny_model(tokens, mode="fast")
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_model.init_cache(2, 65)
    cache = tiny_model.init_cache(2, 8)
    with pytest.raises(ValueError, match="lengths"):
        tiny_model.prefill(tokens, np.array([5, 1]), cache)
    with pytest.raises(ValueError, match="tokens"):
        tiny_model.decode_step(np.array([0, VOCAB]), cache)


@pytest.mark.parametrize("overrides, field", [
    (dict(num_heads=3), "num_heads"),
    (dict(d_model=36, num_heads=4), "num_heads"),                  # head dim 9 is odd
    (dict(value_dim=49), "value_dim"),
    (dict(layer_schedule=("retention", "mamba", "attention")), "layer_schedule"),
    (dict(layer_schedule=("retention",)), "layer_schedule"),
    (dict(layer_schedule="retention"), "layer_schedule"),
    (dict(num_attention_heads=3), "num_attention_heads"),
    (dict(activation="tanh"), "activation"),
    (dict(retention_kernel="triton"), "retention_kernel"),
    (dict(decode_kernel="triton"), "decode_kernel"),
    (dict(decode_projections="cublas"), "decode_projections"),
    (dict(decay_schedule="linear"), "decay_schedule"),
    (dict(decay_gamma=1.5), "decay_gamma"),
    (dict(dtype="float16"), "dtype"),
    (dict(param_dtype="fp32"), "param_dtype"),
    (dict(state_dtype="float16"), "state_dtype"),
    (dict(attention_impl="flash"), "attention_impl"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(chunk_size=2.5), "chunk_size"),
    (dict(logit_soft_cap=-1.0), "logit_soft_cap"),
    (dict(gate_bias=float("nan")), "gate_bias"),
    (dict(gate_bias="3"), "gate_bias"),
])
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        small_config(**overrides)


def test_from_config_accepts_mappings_and_config_dicts():
    values = dataclasses.asdict(small_config())
    values["layer_schedule"] = list(values["layer_schedule"])
    assert ModelConfig.from_config(values) == small_config()
    assert ModelConfig.from_config(ml_collections.ConfigDict(values)) == small_config()
    with pytest.raises(ValueError, match="n_layers"):
        ModelConfig.from_config({**values, "n_layers": 3})


def test_derived_defaults():
    config = ModelConfig(d_model=128, num_layers=2)
    assert config.mixers == ("retention", "retention")
    assert (config.resolved_value_dim, config.resolved_ffn_dim) == (256, 256)
    assert config.resolved_attention_heads == 2


# ----------------------------------------------------------------------------- parameters


def test_parameters_carry_logical_axis_names(tiny_model):
    specs = nnx.get_partition_spec(nnx.state(tiny_model, nnx.Param))
    params = nnx.state(tiny_model, nnx.Param)
    for spec, param in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.P)),
                           jax.tree.leaves(params), strict=True):
        assert len(spec) == param.ndim
        assert set(spec) <= set(LOGICAL_AXIS_NAMES) | {None}
    expected = {
        ("embed", "embedding"): ("vocab", "embed"),
        ("output_proj",): ("embed", "vocab"),
        ("final_norm", "scale"): (None,),
        ("blocks", 0, "mixer", "q_proj", "kernel"): ("embed", "heads"),
        ("blocks", 0, "mixer", "out_proj", "kernel"): ("heads", "embed"),
        ("blocks", 1, "mixer", "gt_proj", "kernel"): ("embed", None),
        ("blocks", 2, "mixer", "v_proj", "kernel"): ("embed", "heads"),
        ("blocks", 2, "ffn", "fc1", "kernel"): ("embed", "mlp"),
        ("blocks", 2, "ffn", "fc2", "kernel"): ("mlp", "embed"),
    }
    flat = dict(nnx.to_flat_state(specs))
    for path, names in expected.items():
        assert tuple(flat[path].get_value()) == names, path


def expected_param_count(config: ModelConfig) -> int:
    """Closed form, independent of the module code."""
    d, v, f = config.d_model, config.resolved_value_dim, config.resolved_ffn_dim
    heads = config.num_heads
    per_mixer = {
        "retention": 2 * d * d + (3 if config.use_swish_gate else 2) * d * v,
        "gated_retention": 2 * d * d + (3 if config.use_swish_gate else 2) * d * v + d * heads,
        "attention": 4 * d * d,
    }
    blocks = sum(per_mixer[m] + 3 * d * f + 2 * d for m in config.mixers)
    embeddings = config.vocab_size * d * (1 if config.tie_embeddings else 2)
    return blocks + embeddings + d


@pytest.mark.parametrize("overrides", [{}, dict(tie_embeddings=True, use_swish_gate=False)])
def test_count_params(overrides):
    config = small_config(**overrides)
    abstract = nnx.eval_shape(lambda: RetNetLM(config, rngs=nnx.Rngs(0)))
    assert abstract.count_params() == expected_param_count(config)
    assert RetNetLM(config, rngs=nnx.Rngs(0)).count_params() == expected_param_count(config)


def test_transformer_baseline_and_hybrids_match_parameter_count():
    def count(config):
        return nnx.eval_shape(lambda: RetNetLM(config, rngs=nnx.Rngs(0))).count_params()

    for d, heads, width in ((192, 3, 324), (2048, 8, 3456)):
        config = ModelConfig(d_model=d, num_layers=4, num_heads=heads, value_dim=width,
                             ffn_dim=width, vocab_size=259)
        baseline = model_lib.transformer_baseline(config)
        assert set(baseline.mixers) == {"attention"}
        hybrid = model_lib.parameter_matched(config, ("retention",) * 3 + ("attention",))
        assert hybrid.mixers[-1] == "attention" and hybrid.ffn_dim > config.ffn_dim
        for matched in (baseline, hybrid):
            assert abs(count(matched) - count(config)) <= 4 * 3 * d * 8   # FFN rounding only
        back = model_lib.parameter_matched(baseline, config.mixers)      # and the way back
        assert abs(count(back) - count(config)) <= 4 * 3 * d * 8


def test_logit_soft_cap_is_applied_by_the_model():
    config = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)))
    raw = np.asarray(RetNetLM(config, rngs=nnx.Rngs(0))(tokens), np.float64) * 1e3
    # Scale the output projection up so the cap bites, then compare with the float64 formula.
    capped_model = RetNetLM(dataclasses.replace(config, logit_soft_cap=2.0), rngs=nnx.Rngs(0))
    capped_model.output_proj.set_value(capped_model.output_proj.get_value() * 1e3)
    capped = np.asarray(capped_model(tokens))
    np.testing.assert_allclose(capped, 2.0 * np.tanh(raw / 2.0), rtol=1e-4, atol=1e-5)
    assert np.abs(capped).max() <= 2.0 and np.abs(raw).max() > 2.0


# ----------------------------------------------------------------------------- kernels


def test_pallas_retention_kernel_gives_the_same_logits_and_gradients():
    """The fused Pallas kernel (interpreted on the CPU) inside the full model."""
    plain = make_model(small_config(SCHEDULES["hybrid"], d_model=64, value_dim=64,
                                    chunk_size=16), 9)
    with jax.default_matmul_precision("highest"):
        fused = with_config(plain, retention_kernel="pallas_interpret")
        assert_same_loss_and_gradients(plain, fused, random_tokens(9, 2, 37))


def test_pallas_decode_step_gives_the_same_logits_and_states(monkeypatch):
    """Decoding through kernels.retention_step_pallas (interpreted) against XLA's step, for
    fixed and gated retention, from a prefilled cache of uneven lengths; the kernel rotates
    q and k itself, at each sequence's position."""
    from retnet_jax import kernels
    calls = []
    step_kernel = kernels.retention_step_pallas
    monkeypatch.setattr(kernels, "retention_step_pallas",
                        lambda *a, **k: calls.append(k) or step_kernel(*a, **k))
    plain = make_model(small_config(SCHEDULES["hybrid"], d_model=64, value_dim=64,
                                    chunk_size=16), 11)
    fused = with_config(plain, retention_kernel="pallas_interpret")
    cache = plain.init_cache(2, 16)
    _, cache = prefill(plain, random_tokens(11, 2, 5), jnp.asarray([5, 3]), cache)
    cache_plain = cache_fused = cache
    with jax.default_matmul_precision("highest"):
        for step in range(3):
            tokens = random_tokens(12 + step, 2, 1)[:, 0]
            logits_plain, cache_plain = decode_step(plain, tokens, cache_plain)
            logits_fused, cache_fused = decode_step(fused, tokens, cache_fused)
            assert rel_err(logits_fused, logits_plain) <= RTOL, step
    assert len(calls) == 2          # traced once: the retention and gated retention blocks
    assert all(call["rotate_at"].shape == (2,) for call in calls)
    for a, b in zip(cache_fused.layers, cache_plain.layers, strict=True):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            assert rel_err(x, y) <= RTOL


@pytest.mark.parametrize("retention_kernel, decode_kernel, steps", [
    ("xla", "pallas_interpret", 2),       # the 1.3B presets: XLA's chunkwise, Pallas's step
    ("pallas_interpret", "xla", 0),
    ("pallas_interpret", None, 2),        # None follows retention_kernel
])
def test_decode_kernel_replaces_retention_kernel_in_decoding_steps_only(
        monkeypatch, retention_kernel, decode_kernel, steps):
    """decode_kernel picks the single-token step's implementation; the full-sequence
    forward and prefill keep retention_kernel's; logits match XLA's either way."""
    from retnet_jax import kernels
    calls = dict(step=0, chunkwise=0)
    for name, fn in (("step", "retention_step_pallas"), ("chunkwise",
                                                         "chunkwise_retention_pallas")):
        original = getattr(kernels, fn)
        monkeypatch.setattr(kernels, fn, lambda *a, _n=name, _f=original, **k: (
            calls.__setitem__(_n, calls[_n] + 1) or _f(*a, **k)))
    plain = make_model(small_config(SCHEDULES["hybrid"], d_model=64, value_dim=64,
                                    chunk_size=16), 15)
    mixed = with_config(plain, retention_kernel=retention_kernel, decode_kernel=decode_kernel)
    # Shapes no other test traces (batch 3, 7 tokens, 24 slots): calls are counted as the
    # jitted functions trace, which a cached trace of another test would skip.
    cache = plain.init_cache(3, 24)
    tokens = random_tokens(15, 3, 7)
    with jax.default_matmul_precision("highest"):
        assert rel_err(forward(mixed, tokens), forward(plain, tokens)) <= RTOL
        _, cache = prefill(mixed, tokens, jnp.asarray([7, 3, 5]), cache)
        chunkwise = calls["chunkwise"]
        assert chunkwise == (4 if retention_kernel != "xla" else 0)  # 2 blocks, 2 calls
        step_tokens = random_tokens(16, 3, 1)[:, 0]
        got, _ = decode_step(mixed, step_tokens, cache)
        want, _ = decode_step(plain, step_tokens, cache)
        assert rel_err(got, want) <= RTOL
    assert calls == dict(step=steps, chunkwise=chunkwise)


@pytest.mark.parametrize("batch, calls", [(1, 12), (2, 0)])
def test_pallas_decode_projections_give_the_same_logits_and_states(monkeypatch, batch, calls):
    """decode_projections='pallas_interpret': every block's projections (the norms inside)
    through kernels.projection_splits against XLA's, for retention, gated retention and
    attention, after a prefill; a batch of 2 (not in PROJECTION_KERNEL_BATCHES) uses XLA."""
    from retnet_jax.kernels import projections
    traced = []
    kernel = projections.projection_splits
    monkeypatch.setattr(projections, "projection_splits",
                        lambda *a, **k: traced.append(1) or kernel(*a, **k))
    plain = make_model(small_config(SCHEDULES["hybrid"], d_model=64, value_dim=64), 13)
    fused = with_config(plain, decode_projections="pallas_interpret")
    cache = plain.init_cache(batch, 16)
    _, cache = prefill(fused, random_tokens(13, batch, 5), jnp.asarray([5, 3, 4][:batch]), cache)
    assert not traced                      # prefill is a full sequence: XLA's GEMMs
    cache_plain = cache_fused = cache
    with jax.default_matmul_precision("highest"):
        for step in range(3):
            tokens = random_tokens(14 + step, batch, 1)[:, 0]
            logits_plain, cache_plain = decode_step(plain, tokens, cache_plain)
            logits_fused, cache_fused = decode_step(fused, tokens, cache_fused)
            assert rel_err(logits_fused, logits_plain) <= RTOL, step
    assert len(traced) == calls            # per block: the mixer's two, the FFN's two
    for x, y in zip(jax.tree.leaves(cache_fused), jax.tree.leaves(cache_plain), strict=True):
        assert rel_err(x, y) <= RTOL


# The hybrid schedule holds both retention mixers, so the single-mixer runs are slow extras.
@pytest.mark.parametrize("schedule", [pytest.param("retention", marks=pytest.mark.slow),
                                      pytest.param("gated", marks=pytest.mark.slow),
                                      "hybrid"])
def test_decoding_steps_read_q_k_and_v_from_split_partials(monkeypatch, schedule):
    """With the GEMV projections and the Pallas step both on, a retention block's decoding
    step feeds the projections' K-split partials straight to the step
    (`kernels.retention_step_from_splits`): logits and states as XLA's decode (float32),
    and in bfloat16 the very same logits and states as the two kernels with XLA adding
    the partials between them (the path the blocks took before)."""
    from retnet_jax import kernels
    steps = []
    step = kernels.retention_step_from_splits
    monkeypatch.setattr(kernels, "retention_step_from_splits",
                        lambda *a, **k: steps.append(1) or step(*a, **k))
    kernels_on = dict(decode_projections="pallas_interpret", decode_kernel="pallas_interpret")
    plain = make_model(small_config(SCHEDULES[schedule], d_model=64, value_dim=64), 23)
    narrow = make_model(small_config(SCHEDULES[schedule], d_model=64, value_dim=64,
                                     dtype="bfloat16", **kernels_on), 23)
    prompt, lengths = random_tokens(23, 1, 5), jnp.asarray([5])
    _, wide_cache = prefill(plain, prompt, lengths, plain.init_cache(1, 16))
    _, narrow_cache = prefill(narrow, prompt, lengths, narrow.init_cache(1, 16))

    def run(model, cache, step_fn=decode_step):
        logits = []
        for t in range(3):
            with jax.default_matmul_precision("highest"):
                step_logits, cache = step_fn(model, random_tokens(24 + t, 1, 1)[:, 0], cache)
            logits.append(step_logits)
        return logits, cache

    runs = {"xla": run(plain, wide_cache),
            "split": run(with_config(plain, **kernels_on), wide_cache),
            "bf16 split": run(narrow, narrow_cache)}
    assert len(steps) == 2 * 2          # the two retention blocks of each traced model
    monkeypatch.setattr(layers.RetentionBase, "_step_from_splits", lambda *a, **k: None)
    logits, caches = run(narrow, narrow_cache, nnx.jit(lambda model, tokens, cache:
                                                       model.decode_step(tokens, cache)))
    assert len(steps) == 2 * 2          # the partials added by XLA this time
    for t in range(3):
        assert rel_err(runs["split"][0][t], runs["xla"][0][t]) <= RTOL, t
        np.testing.assert_array_equal(runs["bf16 split"][0][t], logits[t])
    for x, y in zip(jax.tree.leaves(runs["split"][1]), jax.tree.leaves(runs["xla"][1]),
                    strict=True):
        assert rel_err(x, y) <= RTOL
    for x, y in zip(jax.tree.leaves(runs["bf16 split"][1]), jax.tree.leaves(caches),
                    strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kernel", ["xla", "pallas_interpret"])
def test_a_bfloat16_decode_state_halves_the_cache_and_tracks_float32(kernel):
    """state_dtype='bfloat16': the retention caches are bfloat16 (the attention cache is
    unchanged), and after prefill and 8 decoded tokens the logits and states stay within
    2 % of the float32-state model's (this random model: 0.2-1.1 % per step; the rounding
    errors accumulate, up to 4.8 % by step 30)."""
    plain = make_model(small_config(SCHEDULES["hybrid"], d_model=64, value_dim=64,
                                    chunk_size=16), 13)
    narrow = with_config(plain, state_dtype="bfloat16", retention_kernel=kernel)
    caches = [model.init_cache(2, 16) for model in (plain, narrow)]
    assert [c.state.dtype for c in caches[1].layers[:2]] == [jnp.bfloat16] * 2
    assert caches[1].layers[2].key.dtype == caches[0].layers[2].key.dtype
    prompt, lengths = random_tokens(13, 2, 6), jnp.asarray([6, 2])
    with jax.default_matmul_precision("highest"):
        (_, wide_cache), (_, narrow_cache) = (prefill(model, prompt, lengths, cache)
                                              for model, cache in zip((plain, narrow), caches))
        assert (jax.tree.map(lambda x: x.dtype, narrow_cache)
                == jax.tree.map(lambda x: x.dtype, caches[1]))        # prefill keeps bfloat16
        for step in range(8):
            tokens = random_tokens(14 + step, 2, 1)[:, 0]
            wide_logits, wide_cache = decode_step(plain, tokens, wide_cache)
            narrow_logits, narrow_cache = decode_step(narrow, tokens, narrow_cache)
            assert 0 < rel_err(narrow_logits, wide_logits) <= 2e-2, step
    for a, b in zip(narrow_cache.layers[:2], wide_cache.layers[:2], strict=True):
        assert a.state.dtype == jnp.bfloat16
        assert rel_err(a.state, b.state) <= 2e-2


def test_generate_with_a_bfloat16_state_tracks_float32():
    """`generate` (prefill and the jitted decode loop) runs with bfloat16 retention caches;
    greedy tokens over 6 steps match the float32-state model's on this model and prompt
    (a near-tie could flip one: bfloat16 moves logits by ~1e-3 here)."""
    from retnet_jax import generate as generate_lib
    plain = make_model(small_config(SCHEDULES["hybrid"], d_model=64, value_dim=64,
                                    chunk_size=16), 17)
    narrow = with_config(plain, state_dtype="bfloat16")
    prompts = [np.asarray(random_tokens(17, 1, 7)[0]), np.asarray(random_tokens(18, 1, 3)[0])]
    wide_tokens, narrow_tokens = (generate_lib.generate(model, prompts, max_new_tokens=6)
                                  for model in (plain, narrow))
    for a, b in zip(narrow_tokens, wide_tokens, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("sizes, reason", [
    (dict(d_model=64, value_dim=64, chunk_size=16), "backend 'cpu' is not a GPU"),
    (dict(), "value head dim 24 has no divisor that is a multiple of 16"),    # 48 / 2 heads
])
def test_pallas_kernel_falls_back_to_xla(sizes, reason, caplog):
    if jax.default_backend() == "gpu":
        pytest.skip("checks the CPU fallback")
    plain = make_model(small_config(SCHEDULES["retention"], **sizes), 10)
    tokens = random_tokens(10, 2, 19)

    layers._warn_fallback.cache_clear()
    with caplog.at_level("WARNING"):
        fallback = with_config(plain, retention_kernel="pallas")
        np.testing.assert_array_equal(forward(fallback, tokens), forward(plain, tokens))
    assert f"retention_kernel='pallas' falls back to XLA: {reason}" in caplog.text
    if not sizes:  # sizes the kernel cannot take: an error when it is asked for explicitly
        with pytest.raises(ValueError, match="retention_kernel='pallas_interpret': value head"):
            forward(with_config(plain, retention_kernel="pallas_interpret"), tokens)


def test_decode_kernel_checks_head_dims_only_and_names_itself(caplog):
    """The decoding step takes any chunk size (24 here: the chunkwise kernels refuse it);
    head dims it cannot take, and the CPU fallback, are reported under decode_kernel."""
    plain = make_model(small_config(SCHEDULES["retention"], d_model=64, value_dim=64,
                                    chunk_size=24), 17)
    cache = plain.init_cache(2, 8)
    tokens = random_tokens(17, 2, 1)[:, 0]
    with jax.default_matmul_precision("highest"):
        got = decode_step(with_config(plain, decode_kernel="pallas_interpret"), tokens, cache)
        assert rel_err(got[0], decode_step(plain, tokens, cache)[0]) <= RTOL
    narrow = make_model(small_config(SCHEDULES["retention"]), 17)      # Dv 24 a head
    with pytest.raises(ValueError, match="decode_kernel='pallas_interpret': value head dim"):
        decode_step(with_config(narrow, decode_kernel="pallas_interpret"), tokens,
                    narrow.init_cache(2, 8))
    if jax.default_backend() != "gpu":
        layers._warn_fallback.cache_clear()
        with caplog.at_level("WARNING"):
            decode_step(with_config(plain, decode_kernel="pallas"), tokens, cache)
        assert "decode_kernel='pallas' falls back to XLA: backend 'cpu'" in caplog.text
        assert "retention_kernel=" not in caplog.text


def test_pallas_decode_projections_fall_back_to_xla_off_gpu(caplog):
    if jax.default_backend() == "gpu":
        pytest.skip("checks the CPU fallback")
    plain = make_model(small_config(SCHEDULES["retention"]), 15)
    fallback = with_config(plain, decode_projections="pallas")
    cache = plain.init_cache(1, 8)
    tokens = random_tokens(15, 1, 1)[:, 0]
    layers._warn_projections_fallback.cache_clear()
    with caplog.at_level("WARNING"):
        got = decode_step(fallback, tokens, cache)[0]
    np.testing.assert_array_equal(got, decode_step(plain, tokens, cache)[0])
    assert ("decode_projections='pallas' falls back to XLA: backend 'cpu' is not a GPU"
            in caplog.text)


def test_gate_bias_reaches_every_gated_block():
    config = small_config(SCHEDULES["hybrid"], gate_bias=2.5)
    model = RetNetLM(config, rngs=nnx.Rngs(0))
    biases = [b.mixer.gt_bias[...] for b, kind in zip(model.blocks, config.mixers)
              if kind == "gated_retention"]
    assert biases and all(np.allclose(b, 2.5) and b.shape == (2,) for b in biases)
    assert all(getattr(b.mixer, "gt_bias", None) is None
               for b in RetNetLM(small_config(SCHEDULES["hybrid"]), rngs=nnx.Rngs(0)).blocks)


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_output_projection_gradients_against_float64(dtype, rtol):
    kx, kw, kc = jax.random.split(jax.random.PRNGKey(3), 3)
    x = jax.random.normal(kx, (2, 5, 32)).astype(dtype)
    kernel = (jax.random.normal(kw, (32, 48)) * 0.2).astype(dtype)
    d_logits = jax.random.normal(kc, (2, 5, 48))
    logits, vjp = jax.vjp(model_lib.output_projection, x, kernel)
    dx, d_kernel = vjp(d_logits)
    assert logits.dtype == jnp.float32 and dx.dtype == dtype and d_kernel.dtype == dtype
    x64, w64, c64 = (np.asarray(a, np.float64) for a in (x, kernel, d_logits))
    for got, want in ((logits, x64 @ w64), (dx, c64 @ w64.T),
                      (d_kernel, np.einsum("btd,btv->dv", x64, c64))):
        assert rel_err(np.asarray(got, np.float64), want) <= rtol


def test_a_bfloat16_model_backward_runs_no_float32_by_bfloat16_matmul():
    config = small_config(SCHEDULES["retention"], dtype="bfloat16", tie_embeddings=True)
    model = make_model(config, 2)
    tokens = random_tokens(2, 2, 12)
    graphdef, state = nnx.split(model)
    loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(tokens) ** 2)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(state)
    mixed = [[v.aval.dtype for v in e.invars] for e in equations(jaxpr.jaxpr)
             if e.primitive.name == "dot_general"
             and len({v.aval.dtype for v in e.invars}) > 1]
    assert not mixed        # autodiff's LM-head backward multiplied float32 by bf16


def test_output_projection_refuses_mixed_dtypes():
    x, kernel = jnp.ones((1, 2, 4), jnp.bfloat16), jnp.ones((4, 3), jnp.float32)
    with pytest.raises(ValueError, match="one dtype, got bfloat16 and float32"):
        model_lib.output_projection(x, kernel)
