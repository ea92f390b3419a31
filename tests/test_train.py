"""Training: config, optimizer, loss, sharded steps (8 CPU devices), the loop end to end."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxprs import equations
from retnet_jax import checkpoint, sharding, train
from retnet_jax.model import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = dict(d_model=32, num_layers=1, num_heads=2, chunk_size=16, max_seq_len=64)


def tiny_config(**train_fields) -> ml_collections.ConfigDict:
    """A run config: a 1-layer d=32 RetNet on 200 kB of the stdlib corpus, seq 32, batch 8."""
    config = ml_collections.ConfigDict(train.default_sections())
    config.model = ml_collections.ConfigDict(TINY_MODEL)
    config.data.update(seq_len=32, batch_size=8, max_bytes=200_000, eval_batches=2)
    config.train.update({**dict(num_steps=8, warmup_steps=2, eval_every=4, log_every=2,
                                sample_tokens=8, progress_bar=False), **train_fields})
    config.checkpoint.update(save_every=2, keep=2)
    return config


def make_trainer(mesh_config=sharding.MeshConfig(data=2, fsdp=2, tensor=2), devices=None,
                 model=None, **train_fields) -> train.Trainer:
    mesh = sharding.make_mesh(mesh_config, devices)
    model_config = ModelConfig.from_config({**TINY_MODEL, **(model or {})})
    return train.Trainer(model_config, train.TrainConfig(**train_fields), mesh)


def text_batch(batch_size=8, seq_len=32, seed=0):
    """A numpy batch of random bytes with some positions masked out."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, size=(batch_size, seq_len + 1)).astype(np.int32)
    mask = (rng.random((batch_size, seq_len)) < 0.8).astype(np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}


def rel_error(a, b) -> float:
    """Largest relative L2 error over the leaves of two pytrees."""
    errors = jax.tree.map(lambda x, y: float(np.linalg.norm(np.asarray(x, np.float64) - y)
                                             / max(np.linalg.norm(np.asarray(y, np.float64)),
                                                   1e-30)), a, b)
    return max(jax.tree.leaves(errors))


# ----------------------------------------------------------------------------- config


def test_default_sections_round_trip():
    sections = train.default_sections()
    assert set(sections) == {"train", "mesh", "checkpoint", "data"}
    assert train.from_section(train.TrainConfig, sections["train"]) == train.TrainConfig()
    assert train.from_section(sharding.MeshConfig, sections["mesh"]) == sharding.MeshConfig()
    assert (train.from_section(checkpoint.CheckpointConfig, sections["checkpoint"])
            == checkpoint.CheckpointConfig())
    config = ml_collections.ConfigDict(sections)
    config.data.num_kv_pairs = 4  # a placeholder takes a value from an override
    assert train.data_config(config) == {**{k: v for k, (_, v) in train.DATA_DEFAULTS.items()
                                            if v is not None}, "num_kv_pairs": 4}


def test_from_section_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \['learning_rat'\]"):
        train.from_section(train.TrainConfig, {"learning_rat": 1e-3})


# ----------------------------------------------------------------------------- optimizer


def test_decay_mask_skips_norms_biases_and_vectors():
    params = {"norm": {"scale": jnp.ones(4)}, "proj": {"kernel": jnp.ones((4, 4)),
                                                       "bias": jnp.ones(4)},
              "embed": {"embedding": jnp.ones((9, 4))}, "gate_bias": jnp.ones((2, 4)),
              "vector": jnp.ones(4)}
    assert train.decay_mask(params) == {
        "norm": {"scale": False}, "proj": {"kernel": True, "bias": False},
        "embed": {"embedding": True}, "gate_bias": False, "vector": False}


def test_weight_decay_only_on_masked_params():
    config = train.TrainConfig(learning_rate=0.0, warmup_steps=1, weight_decay=0.5,
                               end_lr_ratio=1.0)
    tx = train.make_optimizer(config, lambda step: 0.1)
    params = {"kernel": jnp.ones((2, 2)), "scale": jnp.ones(2)}
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["scale"], 0.0)


def test_schedule_warmup_then_cosine():
    config = train.TrainConfig(learning_rate=1e-3, warmup_steps=10, num_steps=110,
                               end_lr_ratio=0.1)
    schedule = train.make_schedule(config)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(60),
                                schedule(110)], [0, 5e-4, 1e-3, 5.5e-4, 1e-4], rtol=1e-5)


def test_clipping_bounds_the_update():
    tx = train.make_optimizer(train.TrainConfig(max_grad_norm=1.0, weight_decay=0.0),
                              lambda step: 1.0)
    params = {"w": jnp.zeros(4)}
    clipped = optax.clip_by_global_norm(1.0).update({"w": jnp.full(4, 100.0)}, None)[0]
    np.testing.assert_allclose(optax.tree.norm(clipped), 1.0, rtol=1e-6)
    updates, _ = tx.update({"w": jnp.full(4, 100.0)}, tx.init(params), params)
    assert np.all(np.isfinite(updates["w"]))


# ----------------------------------------------------------------------------- loss


def _reference_sums(logits, batch, z_loss):
    """float64 numpy reference of `loss_sums`."""
    logits = np.asarray(logits, np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = log_z - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"]
    return {"objective": ((nll + z_loss * log_z ** 2) * mask).sum(),
            "loss": (nll * mask).sum(), "tokens": mask.sum(),
            "correct": ((logits.argmax(-1) == batch["targets"]) * mask).sum()}


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_loss_sums_match_reference(z_loss):
    batch = text_batch(batch_size=3, seq_len=7)
    logits = np.random.default_rng(1).normal(size=(3, 7, 259)).astype(np.float32) * 4
    sums = train.loss_sums(jnp.asarray(logits), batch, z_loss=z_loss)
    expected = _reference_sums(logits, batch, z_loss)
    for key, value in expected.items():
        np.testing.assert_allclose(float(sums[key]), value, rtol=2e-6)


def test_loss_ignores_masked_positions():
    batch = text_batch(batch_size=2, seq_len=5)
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 259)), jnp.float32)
    garbage = jnp.where(batch["loss_mask"][..., None] > 0, logits, 1e4)
    for key in ("loss", "objective", "tokens"):
        np.testing.assert_allclose(train.loss_sums(garbage, batch)[key],
                                   train.loss_sums(logits, batch)[key], rtol=1e-6)


# ----------------------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def sharded_trainer():
    """Mesh data=2, fsdp=2, tensor=2 over the 8 CPU devices."""
    return make_trainer()


@pytest.fixture(scope="module")
def single_trainer():
    """The same model on one device."""
    return make_trainer(sharding.MeshConfig(data=1), devices=jax.devices()[:1])


def test_params_and_optimizer_state_are_sharded(sharded_trainer):
    """Every leaf's spec follows the rules table; shards have the expected local shapes."""
    state = sharded_trainer.init()
    mesh = sharded_trainer.mesh
    params = state.params
    spec_of = lambda x: x.sharding.spec  # noqa: E731
    assert spec_of(params["embed"]["embedding"]) == P(None, "fsdp")  # vocab 259 is odd
    assert spec_of(params["output_proj"]) == P("fsdp", None)
    assert spec_of(params["blocks"][0]["ffn"]["fc1"]["kernel"]) == P("fsdp", "tensor")
    assert spec_of(params["blocks"][0]["ffn"]["fc2"]["kernel"]) == P("tensor", "fsdp")
    assert spec_of(params["blocks"][0]["mixer"]["q_proj"]["kernel"]) == P("fsdp", "tensor")
    assert spec_of(params["final_norm"]["scale"]) == P(None)
    assert params["blocks"][0]["ffn"]["fc1"]["kernel"].addressable_shards[0].data.shape == (
        16, 32)

    def check(leaf):
        spec = leaf.sharding.spec
        assert len(spec) == leaf.ndim
        expected = tuple(
            size // math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str)
                                                       else axes or ()))
            for size, axes in zip(leaf.shape, spec))
        assert {s.data.shape for s in leaf.addressable_shards} == {expected}

    jax.tree.map(check, params)
    adam = state.opt_state[1][0]
    assert isinstance(adam, optax.ScaleByAdamState)
    for moments in (adam.mu, adam.nu):
        jax.tree.map(lambda m, p: (check(m), chex.assert_equal(m.sharding, p.sharding),
                                   chex.assert_equal(m.dtype, jnp.float32)), moments, params)
    assert state.step.sharding.spec == P() and state.rng.sharding.spec == P()


def test_sharded_loss_and_grads_equal_single_device(single_trainer, sharded_trainer):
    batch = text_batch()
    results = []
    for trainer in (single_trainer, sharded_trainer):
        state = trainer.init()
        grads, sums = trainer.loss_and_grads(state.params, sharding.put_batch(batch,
                                                                              trainer.mesh))
        results.append((jax.device_get(state.params), jax.device_get(grads),
                        float(sums["loss"] / sums["tokens"])))
    (params1, grads1, loss1), (params8, grads8, loss8) = results
    assert rel_error(params8, params1) == 0.0  # same initialisation on any mesh
    assert abs(loss8 - loss1) <= 1e-5 * abs(loss1)
    assert rel_error(grads8, grads1) <= 1e-5


def test_grad_accumulation_equals_one_big_batch(sharded_trainer):
    accumulating = make_trainer(grad_accum_steps=4)
    batch = text_batch(batch_size=16)
    state = sharded_trainer.init()
    placed = sharding.put_batch(batch, sharded_trainer.mesh)
    grads1, sums1 = sharded_trainer.loss_and_grads(state.params, placed)
    grads4, sums4 = accumulating.loss_and_grads(state.params, placed)
    np.testing.assert_allclose(sums4["tokens"], batch["loss_mask"].sum())
    assert abs(float(sums4["loss"] - sums1["loss"])) <= 1e-5 * float(sums1["loss"])
    assert rel_error(grads4, grads1) <= 1e-5
    with pytest.raises(ValueError, match="grad_accum_steps=4"):
        accumulating.check_batch_size(8)  # micro-batches of 2 rows over 4 batch shards


def test_train_step_reduces_loss_and_reports_metrics(sharded_trainer):
    state = sharded_trainer.init()
    batch = sharding.put_batch(text_batch(), sharded_trainer.mesh)
    losses = []
    for _ in range(4):
        state, metrics = sharded_trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 4
    assert set(metrics) == {"loss", "accuracy", "grad_norm", "update_norm", "learning_rate"}
    assert losses[-1] < losses[0]
    assert state.params["output_proj"].sharding.spec == P("fsdp", None)  # kept by out_shardings


def test_bf16_compute_keeps_float32_params_and_moments(single_trainer):
    trainer = make_trainer(sharding.MeshConfig(data=1), devices=jax.devices()[:1],
                           model={"dtype": "bfloat16"})
    abstract = trainer.abstract_state
    adam = abstract.opt_state[1][0]
    for tree in (abstract.params, adam.mu, adam.nu):
        assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype(jnp.float32)}
    params = single_trainer.init().params  # same shapes and dtypes
    batch = sharding.put_batch(text_batch(), trainer.mesh)
    grads, sums = trainer.loss_and_grads(params, batch)
    assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    _, sums32 = single_trainer.loss_and_grads(params, batch)
    np.testing.assert_allclose(sums["loss"], sums32["loss"], rtol=2e-2)


def test_bf16_embedding_gradient_scatters_in_float32(single_trainer):
    """The lookup's gradient (a scatter-add of every token's row) accumulates in float32: a
    bf16 scatter rounds sums of thousands of rows and made an H100 train step 3.2x slower."""
    trainer = make_trainer(sharding.MeshConfig(data=1), devices=jax.devices()[:1],
                           model={"dtype": "bfloat16"})
    params = single_trainer.init().params
    jaxpr = jax.make_jaxpr(trainer._loss_and_grads)(params, text_batch()).jaxpr
    scatters = [eqn.outvars[0].aval for eqn in equations(jaxpr)
                if eqn.primitive.name.startswith("scatter")]
    table = params["embed"]["embedding"].shape
    assert [aval.dtype for aval in scatters if aval.shape == table] == [jnp.float32]


def test_remat_gives_the_same_gradients(single_trainer):
    trainer = make_trainer(sharding.MeshConfig(data=1), devices=jax.devices()[:1],
                           model={"remat": True})
    params = single_trainer.init().params
    batch = sharding.put_batch(text_batch(), trainer.mesh)
    grads = [jax.device_get(t.loss_and_grads(params, batch)[0])
             for t in (single_trainer, trainer)]
    assert rel_error(grads[1], grads[0]) <= 1e-6


def test_scan_layers_gives_the_same_sharded_loss_and_gradients(sharded_trainer):
    trainer = make_trainer(model={"scan_layers": True})
    params = sharded_trainer.init().params
    batch = sharding.put_batch(text_batch(), trainer.mesh)
    results = [t.loss_and_grads(params, batch) for t in (sharded_trainer, trainer)]
    (grads_a, sums_a), (grads_b, sums_b) = (jax.device_get(r) for r in results)
    assert abs(sums_b["loss"] - sums_a["loss"]) <= 1e-6 * abs(sums_a["loss"])
    assert rel_error(grads_b, grads_a) <= 1e-6
    jax.tree.map(lambda g, p: chex.assert_equal(g.sharding, p.sharding), results[1][0], params)


def test_pallas_kernel_is_kept_on_a_multi_device_mesh():
    # The kernels run per device shard (layers.run_retention; tests/test_kernels_sharded.py).
    trainer = make_trainer(model={"retention_kernel": "pallas"})
    assert trainer.model_config.retention_kernel == "pallas"


# ----------------------------------------------------------------------------- the loop


def _restored_params(workdir, step):
    trainer = train.make_trainer(checkpoint.load_config(workdir))
    return jax.device_get(train.restore_params(trainer, workdir, step=step)[0])


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two workdirs of the tiny config: 8 steps in one go, and 4 steps then resumed to 8."""
    root = tmp_path_factory.mktemp("runs")
    whole, resumed = str(root / "whole"), str(root / "resumed")
    summaries = {"whole": train.train_and_evaluate(tiny_config(), whole),
                 "first_half": train.train_and_evaluate(tiny_config(), resumed, stop_at_step=4),
                 "resumed": train.train_and_evaluate(tiny_config(), resumed)}
    return whole, resumed, summaries


def test_resume_is_exact(runs):
    whole, resumed, summaries = runs
    assert not summaries["first_half"]["completed"] and summaries["first_half"]["step"] == 4
    assert summaries["resumed"]["completed"] and summaries["resumed"]["step"] == 8
    assert rel_error(_restored_params(resumed, 8), _restored_params(whole, 8)) <= 1e-6
    for key in ("eval_loss", "sample"):
        assert summaries["resumed"][key] == summaries["whole"][key]
    losses = [{r["step"]: r["loss"] for r in _read_jsonl(os.path.join(d, "metrics.jsonl"))
               if "loss" in r} for d in (whole, resumed)]
    assert losses[0] == losses[1] and sorted(losses[0]) == [2, 4, 6, 8]


def test_run_outputs(runs):
    whole, _, summaries = runs
    summary = summaries["whole"]
    with open(os.path.join(whole, "summary.json")) as f:
        assert json.load(f) == summary
    assert summary["completed"] and summary["tokens_per_s"] > 0
    assert summary["eval_bits_per_byte"] == pytest.approx(summary["eval_loss"] / math.log(2))
    assert 0 < summary["unigram_entropy_bits"] < 8
    # 8 steps of 8 x 32 tokens over the 200 kB corpus's 194,000 training tokens
    assert summary["epochs"] == pytest.approx(8 * 8 * 32 / 194_000)
    assert summary["sample"].startswith("def ")
    records = _read_jsonl(os.path.join(whole, "metrics.jsonl"))
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_s"} <= set(records[0])
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8] and all("sample" in r for r in evals)
    assert os.listdir(os.path.join(whole, "tensorboard"))
    # keep=2 plus the best evaluation (step 8 is both latest and best here)
    assert sorted(os.listdir(os.path.join(whole, "checkpoints"))) == ["6", "8"]


def test_rerun_of_a_finished_run_returns_its_summary(runs, tmp_path, monkeypatch):
    whole, _, summaries = runs
    again = str(tmp_path / "again")
    shutil.copytree(whole, again)
    metrics_path = os.path.join(again, "metrics.jsonl")
    records = _read_jsonl(metrics_path)
    assert train.train_and_evaluate(tiny_config(), again) == summaries["whole"]
    # Stopped between its last checkpoint and its summary: the final state is evaluated again,
    # and no throughput is made up for a call that trained nothing.
    os.remove(os.path.join(again, train.SUMMARY_FILE))
    summary = train.train_and_evaluate(tiny_config(), again)
    assert summary["completed"] and summary["step"] == 8 and summary["tokens_per_s"] is None
    assert summary["eval_loss"] == pytest.approx(summaries["whole"]["eval_loss"], rel=1e-6)
    assert _read_jsonl(metrics_path) == records  # nothing logged twice
    # Checkpoints deleted to retrain: the old summary goes with them, so a retrain that dies
    # before writing its own leaves none behind for a rerun to mistake for its result.
    shutil.rmtree(os.path.join(again, "checkpoints"))
    def crash(*args):
        raise RuntimeError("stopped before the summary")
    monkeypatch.setattr(train._Loop, "summary", crash)
    with pytest.raises(RuntimeError, match="before the summary"):
        train.train_and_evaluate(tiny_config(), again)
    assert not os.path.exists(os.path.join(again, train.SUMMARY_FILE))


def test_eval_line_says_bits_per_byte_for_text_and_accuracy_for_tasks():
    metrics = {"eval_loss": 0.5, "eval_bits_per_byte": 0.7213, "eval_perplexity": 1.6487,
               "eval_accuracy": 0.25}
    assert train._eval_line(metrics, 4.4) == (
        "loss 0.5000, 0.721 bits/byte vs unigram entropy 4.400, perplexity 1.65")
    assert train._eval_line(metrics, None) == "loss 0.5000, accuracy 0.2500"   # e.g. MQAR


def test_evaluate_and_sample_from_workdir(runs):
    whole, _, summaries = runs
    metrics = train.evaluate_checkpoint(whole)
    assert metrics["step"] == 8
    assert metrics["eval_loss"] == pytest.approx(summaries["whole"]["eval_loss"], rel=1e-6)
    model, config, step = train.load_model(whole, best=True)
    assert step == 8 and config.model.d_model == 32
    greedy = train.sample_text(model, "import ", max_new_tokens=6, temperature=0.0,
                               rng=jax.random.PRNGKey(0), num_samples=2)
    assert len(greedy) == 2 and greedy[0] == greedy[1] and greedy[0].startswith("import ")


def test_evaluate_checkpoint_computes_the_same_parameters_another_way(runs):
    whole, _, summaries = runs
    want = summaries["whole"]["eval_loss"]
    kernel = train.evaluate_checkpoint(whole, model_overrides={
        "retention_kernel": "pallas_interpret"})
    assert kernel["eval_loss"] == pytest.approx(want, rel=1e-5)
    half = train.evaluate_checkpoint(whole, model_overrides={"dtype": "bfloat16"})
    assert half["eval_loss"] != want and half["eval_loss"] == pytest.approx(want, rel=2e-2)
    with pytest.raises(ValueError, match=r"model_overrides \['num_heads'\]"):
        train.evaluate_checkpoint(whole, model_overrides={"num_heads": 1})


def test_load_model_takes_inference_switches_and_refuses_the_rest(runs):
    whole, _, _ = runs
    model, config, _ = train.load_model(whole, model_overrides={"state_dtype": "bfloat16"})
    assert config.model.state_dtype == "bfloat16"
    cache = model.init_cache(2, 16)
    states = [leaf for leaf in jax.tree.leaves(cache) if leaf.ndim == 4]
    assert states and all(s.dtype == jnp.bfloat16 for s in states)
    text = train.sample_text(model, "import ", max_new_tokens=4, temperature=0.0,
                             rng=jax.random.PRNGKey(0))
    assert text[0].startswith("import ")
    with pytest.raises(ValueError, match=r"model_overrides \['d_model'\] would change"):
        train.load_model(whole, model_overrides={"d_model": 64, "state_dtype": "float32"})
    with pytest.raises(ValueError, match="state_dtype"):
        train.load_model(whole, model_overrides={"state_dtype": "float16"})
    with pytest.raises(ValueError, match="ModelConfig.dtype: must be one of"):
        train.load_model(whole, model_overrides={"dtype": jnp.bfloat16})   # a name, not a type
    with pytest.raises(ValueError, match=r"model_overrides\['chunk_size'\] = 'big'"):
        train.load_model(whole, model_overrides={"chunk_size": "big"})
    # The run saved decode_kernel unset (None): an override reaches every retention block.
    model, config, _ = train.load_model(whole, model_overrides={"decode_kernel": "pallas"})
    assert config.model.decode_kernel == "pallas"
    mixers = [block.mixer for block in model.blocks if hasattr(block.mixer, "decode_kernel")]
    assert mixers and all(m.decode_kernel == "pallas" for m in mixers)


def test_resume_with_a_different_model_fails_clearly(runs):
    _, resumed, _ = runs
    config = tiny_config()
    config.model.d_model = 64
    config.model.num_layers = 2
    with pytest.raises(ValueError, match="d_model: checkpoint 32 vs config 64.*"
                                         "num_layers: checkpoint 1 vs config 2"):
        train.train_and_evaluate(config, resumed)


def test_resume_with_different_data_fails_clearly(runs):
    # Another corpus or sequence length would silently continue a different training stream.
    _, resumed, _ = runs
    config = tiny_config()
    config.data.max_bytes = 300_000
    config.data.eval_batches = 3                    # free to change: evaluation only
    with pytest.raises(ValueError, match="data config differs.*max_bytes: checkpoint 200000 "
                                         "vs config 300000") as error:
        train.train_and_evaluate(config, resumed)
    assert "eval_batches" not in str(error.value)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(runs, tmp_path):
    whole, _, _ = runs
    workdir = str(tmp_path / "nan")
    shutil.copytree(whole, workdir)
    config = tiny_config(learning_rate=float("nan"), num_steps=12)
    with pytest.raises(train.NonFiniteLossError, match="step 9: .*last good checkpoint, step 8"):
        train.train_and_evaluate(config, workdir)
    assert checkpoint.Checkpointer(workdir, read_only=True).latest_step() == 8
    params = _restored_params(workdir, 8)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


SUBPROCESS_CONFIG = """
import ml_collections
from retnet_jax import train

def get_config():
    config = ml_collections.ConfigDict(train.default_sections())
    config.model = ml_collections.ConfigDict({model})
    config.data.update(seq_len=32, batch_size=8, max_bytes=200_000, eval_batches=2)
    config.train.update(num_steps=100_000, log_every=1, eval_every=0, progress_bar=False)
    config.checkpoint.save_every = 0
    return config
"""


def test_sigterm_in_process_saves_its_step_and_stops(tmp_path, monkeypatch):
    """The loop's SIGTERM path in this process (the entry point's run below is slow): the
    handler's flag, the agreed stop at the next log step, the save, an incomplete summary."""
    write = train.MetricsWriter.write

    def write_then_signal(self, step, values):
        write(self, step, values)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train.MetricsWriter, "write", write_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    config = tiny_config()
    config.checkpoint.save_every = 4            # step 2's checkpoint can only be the stop's
    workdir = str(tmp_path / "run")
    summary = train.train_and_evaluate(config, workdir)
    assert not summary["completed"] and summary["step"] == 2
    assert checkpoint.Checkpointer(workdir, read_only=True).latest_step() == 2
    assert signal.getsignal(signal.SIGTERM) == before       # the handler was put back


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    config_path = tmp_path / "config.py"
    config_path.write_text(SUBPROCESS_CONFIG.format(model=TINY_MODEL))
    workdir = tmp_path / "workdir"
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "experiments", "train.py"),
         f"--config={config_path}", f"--workdir={workdir}",
         f"--compilation_cache={tmp_path / 'xla'}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None, process.communicate()[0]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    assert "SIGTERM: saved step" in output
    assert any((tmp_path / "xla").iterdir())  # the compiled train step was kept
    summary = json.loads((workdir / "summary.json").read_text())
    assert not summary["completed"]
    assert checkpoint.Checkpointer(str(workdir), read_only=True).latest_step() == summary["step"]


@pytest.mark.slow
def test_entry_points_eval_generate_and_state_precision(runs, tmp_path):
    whole, _, summaries = runs
    commands = {
        "eval": ["experiments/eval.py", f"--workdir={whole}", "--best",
                 "--retention_kernel=pallas_interpret"],
        "generate": ["experiments/generate.py", f"--workdir={whole}", "--prompt=class ",
                     "--max_new_tokens=5", "--num_samples=2", "--top_p=0.9",
                     "--state_dtype=bfloat16", "--retention_kernel=xla",
                     "--decode_kernel=pallas_interpret"],
        # One greedy sample (batch 1, where the projections kernel runs) with and without it.
        **{f"greedy_{impl}": ["experiments/generate.py", f"--workdir={whole}",
                              "--prompt=class ", "--max_new_tokens=8", "--temperature=0",
                              f"--decode_projections={impl}"]
           for impl in ("xla", "pallas_interpret")},
        "state_precision": ["experiments/state_precision.py", f"--workdir={whole}",
                            "--sequences=3", "--drift_tokens=40", f"--out={tmp_path}"],
    }
    processes = {name: subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, cwd=REPO)
                 for name, args in commands.items()}
    outputs = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        outputs[name] = stdout
    metrics = json.loads(outputs["eval"])
    assert metrics["step"] == 8
    assert metrics["eval_loss"] == pytest.approx(summaries["whole"]["eval_loss"], rel=1e-5)
    assert outputs["generate"].count("--- sample") == 2 and "class " in outputs["generate"]
    assert outputs["greedy_pallas_interpret"] == outputs["greedy_xla"]
    assert outputs["greedy_xla"].count("--- sample") == 1
    # Decoding token by token reproduces the parallel forward with a float32 state; a
    # bfloat16 state moves the logits, by less than its rounding compounds to here.
    precision = json.loads((tmp_path / "state_precision.json").read_text())
    assert precision["shape"] == [3, 32] and (tmp_path / "state_precision.png").exists()
    wide, narrow = precision["state_dtypes"]["float32"], precision["state_dtypes"]["bfloat16"]
    assert precision["parallel"]["loss_change"] == 0
    assert abs(wide["loss_change"]) < 1e-5 and wide["max_logit_deviation"] < 1e-4
    assert 1e-4 < narrow["max_logit_deviation"] < 5e-2
    assert len(narrow["logit_deviation_by_position"]) == 32
    drift = narrow["state_drift_by_head"]            # 2 heads, at tokens 1, 2, 4, ..., 32, 40
    assert list(drift) == ["1", "2", "4", "8", "16", "32", "40"]
    assert all(len(heads) == 2 and all(0 <= e < 5e-2 for e in heads) for heads in drift.values())
    assert max(drift["40"]) > 0 and "state_drift_by_head" not in wide
