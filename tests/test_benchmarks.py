"""The benchmark scripts run end to end on the CPU at toy sizes (their numbers are GPU work).

Every code path a GPU run can take is run here first: a crash on the GPU wastes device time. The
script runs over ~20 s on two CPU cores are marked slow (CI runs them after the default suite).
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

from retnet_jax import kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOY_CONFIG = """
import ml_collections
def get_config():
    return ml_collections.ConfigDict(dict(model=dict(
        vocab_size=259, d_model=32, num_layers=1, num_heads=2, chunk_size=16, max_seq_len=64)))
"""


def run_script(name: str, *args: str, env: dict | None = None
               ) -> subprocess.CompletedProcess:
    """experiments/<name> run with args from the repo root, its output captured."""
    return subprocess.run([sys.executable, os.path.join(REPO, "experiments", name), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def toy_config(tmp_path):
    """TOY_CONFIG written to a config file; its path."""
    config = tmp_path / "toy.py"
    config.write_text(TOY_CONFIG)
    return config


@pytest.mark.slow
def test_bench_train_weak_scaling_over_device_counts(tmp_path, toy_config):
    out = tmp_path / "train.json"
    process = run_script("bench_train.py", f"--config={toy_config}", "--seq_lens=32",
                         "--tokens_per_step=128", "--steps=2", "--windows=2",
                         "--device_counts=1,2", "--models=retnet", "--data=corpus",
                         "--matmul_size=256", f"--out={out}",
                         env={"JAX_NUM_CPU_DEVICES": "2"})
    assert process.returncode == 0, process.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(r["devices"], r["batch"]) for r in rows] == [(1, 4), (2, 8)]  # 128 tokens/device
    assert rows[1]["mesh"] == {"data": 1, "fsdp": 2}
    assert "scaling_efficiency" not in rows[0]
    assert rows[1]["scaling_efficiency"] == pytest.approx(
        rows[1]["tokens_per_s"] / (2 * rows[0]["tokens_per_s"]))
    assert "| scaling efficiency |" in process.stdout


@pytest.mark.slow
def test_bench_train_times_retnet_per_kernel_and_transformer_once(tmp_path, toy_config):
    out = tmp_path / "train.json"
    process = run_script("bench_train.py", f"--config={toy_config}", "--seq_lens=32",
                         "--tokens_per_step=64", "--steps=1", "--windows=1",
                         "--retention_kernels=xla,pallas", "--matmul_size=256", f"--out={out}")
    assert process.returncode == 0, process.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(r["model"], r["retention_kernel"]) for r in rows] == [
        ("retnet", "xla"), ("retnet", "pallas"), ("transformer", None)]
    assert [r["remat"] for r in rows] == [False] * 3       # the toy config: no remat
    assert [r["mixers"] for r in rows] == ["retention", "retention", "attention"]
    # The CPU reports no memory statistics: the columns exist, empty.
    assert all(r["peak_gib_so_far"] is None and r["memory_limit_gib"] is None for r in rows)
    # Off a GPU the library runs XLA's form for 'pallas'; the row says so.
    assert [bool(r["pallas_fallback"]) for r in rows] == [False, True, False]
    assert "| retnet | pallas (XLA fallback) | 32 |" in process.stdout
    assert "| transformer | - | 32 |" in process.stdout


@pytest.mark.slow
def test_bench_train_records_a_failing_setting_and_times_the_rest(tmp_path):
    config = tmp_path / "toy_dk8.py"      # key head dim 8, value head dim 16
    config.write_text(TOY_CONFIG.replace("num_heads=2", "num_heads=4"))
    out = tmp_path / "train.json"
    process = run_script("bench_train.py", f"--config={config}", "--seq_lens=32",
                         "--tokens_per_step=64", "--steps=1", "--windows=1",
                         "--retention_kernels=pallas_interpret", "--matmul_size=256",
                         f"--out={out}")
    assert process.returncode == 0, process.stderr
    rows = json.loads(out.read_text())["results"]
    assert [r["model"] for r in rows] == ["retnet", "transformer"]
    reason = kernels.unsupported_reason(8, 16, 16)   # 'pallas_interpret' raises on it
    assert rows[0].get("error") == (f"ValueError: retention_kernel='pallas_interpret': {reason}"
                                    if reason else None)
    assert "tokens_per_s" in rows[1]


@pytest.mark.parametrize("script, flag, message", [
    ("bench_train.py", "--retention_kernels=xla,triton",
     "--retention_kernels must be distinct names from"),
    ("bench_retention.py", "--shapes=8x2048x16",
     "--shapes: '8x2048x16' is not BxTxHxD (Dk = Dv = D) or BxTxHxDkxDv"),
    ("bench_retention.py", "--pallas_block_v=64,48", "--pallas_block_v: '48' is not a power of two"),
    ("bench_retention.py", "--pallas_state_block_v=24",
     "--pallas_state_block_v: '24' is not a power of two"),
    ("bench_retention.py", "--pallas_segments=auto,0",
     "--pallas_segments: '0' is neither 'auto' nor a positive number"),
    ("bench_retention.py", "--pallas_num_warps=4,6",
     "--pallas_num_warps: '6' is neither 'auto' nor a power of two"),
    ("bench_retention.py", "--pallas_state_num_warps=3",
     "--pallas_state_num_warps: '3' is not a power of two"),
    ("bench_retention.py", "--pallas_state_num_stages=0",
     "--pallas_state_num_stages: '0' is not a positive number"),
    ("bench_decode.py", "--retention_kernels=xla,triton",
     "--retention_kernels must be distinct names from"),
    ("bench_decode.py", "--state_dtypes=float32,float16",
     "--state_dtypes must be distinct names from"),
    ("bench_decode.py", "--compiler_options=xla_gpu_enable_triton_gemm",
     "--compiler_options: 'xla_gpu_enable_triton_gemm' is not name=value"),
    ("kernel_resources.py", "--gemv_shapes=64x32+",
     "--gemv_shapes: '64x32+' is not KxN or KxN1+N2+..."),
    ("bench_decode_step.py", "--block_v=auto,wide", "--block_v takes 'auto' and/or whole numbers"),
    ("bench_decode.py", "--projection_kernel_batches=1,3",
     "--projection_kernel_batches must be powers of two <= 8"),
    ("bench_decode.py", "--gemv_tiles=16,128", "--gemv_tiles takes block_n,block_k,splits"),
    ("bench_decode.py", "--step_block_v=48", "--step_block_v must be a power of two >= 16"),
    ("profile_decode.py", "--retention_kernels=xla,triton",
     "--retention_kernels must be names from"),
    ("profile_decode.py", "--batches=1,0", "--batches must be positive integers"),
])
def test_bad_flags_are_refused_by_name(script, flag, message):
    process = run_script(script, flag)
    assert process.returncode != 0
    assert message in process.stderr


@pytest.mark.slow
def test_bench_retention_value_dim_differs_and_warm_up(tmp_path):
    out = tmp_path / "retention.json"
    shapes = {"1x64x2x32x64": (32, 64), "1x32x2x8x16": (8, 16)}   # Pallas refuses Dk 8 now
    process = run_script(
        "bench_retention.py", "--smoke", f"--shapes={','.join(shapes)}",
        "--impls=ours,pallas,cudnn", "--chunk_sizes=16", "--modes=fwdbwd",
        "--check_shape=1x32x2x8x16", "--runs=4", "--warmup=2",
        "--min_warmup_s=0.2", f"--out={out}")
    assert process.returncode == 0, process.stderr
    results = json.loads(out.read_text())
    rows = results["timings"]
    assert not [r for r in rows if "error" in r]
    for shape, (key_dim, value_dim) in shapes.items():
        by_impl = {(r["impl"], r["decay"]): r for r in rows if r["shape"] == shape}
        assert {(r["key_dim"], r["value_dim"]) for r in by_impl.values()} == {
            (key_dim, value_dim)}
        for decay in ("fixed", "gated"):
            ours = by_impl[("ours_c16", decay)]
            assert len(ours["runs_ms"]) == 4 and min(ours["runs_ms"]) <= ours["ms"]
            assert ours["warmup_calls"] >= 2 and ours["warmup_s"] >= 0.2
            reason = kernels.unsupported_reason(key_dim, value_dim, 16)
            pallas = by_impl[("pallas_c16", decay)]
            assert pallas.get("skipped") == reason
            assert ("runs_ms" in pallas) == (reason is None)
        # cuDNN (fixed decay only) is refused: JAX's API wants v shaped like k, and no GPU.
        assert by_impl[("cudnn", "fixed")]["skipped"].startswith(
            "jax.nn.dot_product_attention(implementation='cudnn') refuses")
        assert ("cudnn", "gated") not in by_impl
    checks = results["checks"]
    assert not [c for c in checks if "error" in c]
    reason = kernels.unsupported_reason(8, 16, 16)
    checked = {"ours_c16"} | (set() if reason else {"pallas_c16"})
    errors = [c for c in checks if "rms_rel" in c]
    assert {(c["impl"], c["decay"]) for c in errors} == {
        (impl, decay) for impl in checked for decay in ("fixed", "gated")}
    assert all(c["value_dim"] == 16 and c["finite"] and c["rms_rel"] < 2e-2 for c in errors)
    assert [c["skipped"] for c in checks if "skipped" in c] == ([reason] * 2 if reason else [])
    assert "min-max" in process.stdout


def test_bench_decode_records_xla_flags(tmp_path, toy_config):
    out = tmp_path / "decode.json"
    flags = "--xla_gpu_enable_command_buffer="
    process = run_script("bench_decode.py", f"--config={toy_config}", "--contexts=16",
                         "--batches=1", "--new_tokens=2", "--repeats=1",
                         "--copy_bytes=1048576", f"--out={out}", env={"XLA_FLAGS": flags})
    assert process.returncode == 0, process.stderr
    assert process.stdout.startswith(f"XLA_FLAGS={flags!r}")
    result = json.loads(out.read_text())
    assert result["xla_flags"] == flags
    assert {r["model"] for r in result["results"]} == {"retnet", "transformer"}


@pytest.mark.parametrize("kernels, retnets", [
    pytest.param("xla,pallas_interpret", ("retnet", "retnet-pallas_interpret"),
                 marks=pytest.mark.slow),
    pytest.param("pallas_interpret", ("retnet-pallas_interpret",),  # checked, not timed
                 marks=pytest.mark.slow),
    ("pallas", ("retnet-pallas",)),        # off GPU: XLA's step, and the rows say so
])
def test_bench_decode_times_each_retention_kernel(tmp_path, toy_config, kernels, retnets):
    out = tmp_path / "decode.json"
    process = run_script("bench_decode.py", f"--config={toy_config}", "--contexts=16",
                         "--batches=1,2", "--new_tokens=2", "--repeats=1",
                         "--copy_bytes=1048576", f"--retention_kernels={kernels}",
                         f"--out={out}")
    assert process.returncode == 0, process.stderr
    result = json.loads(out.read_text())
    rows = result["results"]
    assert [(r["batch"], r["model"]) for r in rows] == [
        (b, m) for b in (1, 2) for m in retnets + ("transformer",)]
    assert all(r["ms_per_token"] > 0 and "error" not in r for r in rows)
    fallback = "backend 'cpu' is not a GPU" if kernels == "pallas" else None
    assert [r["pallas_fallback"] for r in rows] == [
        fallback if r["model"] == "retnet-pallas" else None for r in rows]
    assert ("retnet-pallas (XLA step) |" in process.stdout) == (kernels == "pallas")
    # Checked against XLA's step before timing (same weights, the same random cache).
    checks = result["kernel_checks"]
    assert [c["model"] for c in checks] == [retnets[-1]]
    assert all(c["greedy_agreement"] == 1 and 0 <= c["state_rel_err"] < 2e-2 for c in checks)


def test_override_gemv_tiles_sets_the_kernels_choices(monkeypatch):
    """bench_decode's --gemv_tiles: every GEMV call that leaves its tiles to the kernel
    (as the models' do) gets the given block_n and splits; 'default' (None) keeps the
    kernel's block_k."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "experiments"))
    import decode_models
    import jax.numpy as jnp
    from retnet_jax.kernels import projections
    for name in ("default_block_n", "default_block_k", "default_splits"):
        monkeypatch.setattr(projections, name, getattr(projections, name))
    x, w = jnp.ones((1, 256)), jnp.ones((256, 64))
    (before,) = projections.projection_splits(x, [w], interpret=True)
    decode_models.override_gemv_tiles(16, None, 1)
    (after,) = projections.projection_splits(x, [w], interpret=True)
    assert before.partials.shape[0] > 1 and after.partials.shape == (1, 1, 64)
    assert projections.default_block_n(256, [64], block_k=64) == 16
    assert projections.default_block_k(256) == 64


def test_override_step_block_v_sets_the_steps_value_columns(monkeypatch):
    """bench_decode's --step_block_v: the Pallas step's default value columns become the
    given width (48 of Dv 48 in one group at 64, where the default takes 16), and the
    step's results do not change with it; a width that is no power of two, or below 16,
    is refused."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "experiments"))
    import decode_models
    import jax
    import jax.numpy as jnp
    import numpy as np
    from retnet_jax.kernels import decode_step
    monkeypatch.setattr(decode_step, "default_block_v", decode_step.default_block_v)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k = (jax.random.normal(key, (1, 2, 32)) for key in keys[:2])
    v = jax.random.normal(keys[2], (1, 2, 48))
    state = jax.random.normal(keys[3], (1, 2, 32, 48))
    log_decay = jnp.log(jnp.array([0.9, 0.99]))
    before = kernels.retention_step_pallas(q, k, v, log_decay, state, interpret=True)
    assert decode_step.default_block_v(1, 2, 48) == 16
    decode_models.override_step_block_v(64)
    assert decode_step.default_block_v(1, 2, 48) == 64
    assert decode_step._value_columns(1, 2, 32, 48, None) == 48   # what the step's grid uses
    after = kernels.retention_step_pallas(q, k, v, log_decay, state, interpret=True)
    for x, y in zip(before, after, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="block_v must be a power of two"):
        decode_models.override_step_block_v(48)
    with pytest.raises(ValueError, match="block_v must be at least 16"):
        decode_models.override_step_block_v(8)


def test_decode_configs_time_each_retention_kernel_in_the_decoding_step(monkeypatch):
    """bench_decode's --retention_kernels picks the decoding step even for a preset whose
    decode_kernel says otherwise (the 1.3B presets' 'pallas'), and the models still share
    one set of weights."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "experiments"))
    import decode_models
    from retnet_jax.model import ModelConfig
    base = ModelConfig(vocab_size=259, d_model=32, num_layers=1, num_heads=2,
                       decode_kernel="pallas")
    models = decode_models.decode_configs(base, ["xla", "pallas"], ["float32"], 64,
                                          transformer=False)
    assert [(m.retention_kernel, m.decode_kernel) for m in models.values()] == [
        ("xla", None), ("pallas", None)]
    first = next(iter(models.values()))
    assert len({decode_models.same_weights(m) for m in (
        *models.values(), dataclasses.replace(first, decode_kernel="pallas"))}) == 1


@pytest.mark.parametrize("kernel_batches, tiles", [(None, None), ("1,2", "16,default,1")])
@pytest.mark.slow
def test_bench_decode_times_the_gemv_projections_checked_against_xla(tmp_path, toy_config,
                                                                     kernel_batches, tiles):
    """The GEMV rows are checked against XLA's and timed, at the library's batches or the
    run's own, with the kernel's tiles or one K split of 16 columns (--gemv_tiles)."""
    out = tmp_path / "decode.json"
    process = run_script("bench_decode.py", f"--config={toy_config}", "--contexts=16",
                         "--batches=1,2", "--new_tokens=2", "--repeats=1",
                         "--copy_bytes=1048576", "--decode_projections=pallas_interpret,xla",
                         f"--out={out}", *([f"--projection_kernel_batches={kernel_batches}"]
                                           if kernel_batches else []),
                         *([f"--gemv_tiles={tiles}"] if tiles else []))
    assert process.returncode == 0, process.stderr
    result = json.loads(out.read_text())
    assert result["gemv_tiles"] == (tiles.split(",") if tiles else None)
    fused = ["retnet-pallas_interpret-projections", "transformer-pallas_interpret-projections"]
    rows = result["results"]
    assert [(r["batch"], r["model"]) for r in rows] == [
        (b, m) for b in (1, 2) for m in (fused[0], "retnet", fused[1], "transformer")]
    if kernel_batches is None:
        # Batch 2 runs XLA's GEMMs whatever the flag says: not reported under the kernel's
        # name.
        assert result["projection_kernel_batches"] == [1]
        assert [r["model"] for r in rows if "skipped" in r] == fused
        assert all(r["batch"] == 2 and "PROJECTION_KERNEL_BATCHES" in r["skipped"]
                   for r in rows if "skipped" in r)
    else:       # the run's own batches: the kernel is checked and timed at batch 2 too
        assert result["projection_kernel_batches"] == [1, 2]
        assert not [r for r in rows if "skipped" in r]
    assert all(r["ms_per_token"] > 0 for r in rows if "skipped" not in r)
    # 16 + 2 x (1 + 2) positions, the cache rounded up to a multiple of 128.
    assert {r["cache_len"] for r in rows} == {128}
    checks = result["kernel_checks"]
    check_batches = [1] if kernel_batches is None else [1, 2]
    assert [(c["model"], c["reference"], c["batch"]) for c in checks] == [
        (name, reference, b) for name, reference in ((fused[0], "retnet"),
                                                     (fused[1], "transformer"))
        for b in check_batches]
    assert all(c["greedy_agreement"] == 1 and c["state_rel_err"] < 2e-2 for c in checks)


def test_bench_decode_without_the_transformer_times_retnet_rows_only(tmp_path, toy_config):
    out = tmp_path / "decode.json"
    process = run_script("bench_decode.py", f"--config={toy_config}", "--contexts=16",
                         "--batches=1", "--new_tokens=2", "--repeats=1", "--notransformer",
                         "--copy_bytes=1048576", "--decode_projections=xla,pallas_interpret",
                         f"--out={out}")
    assert process.returncode == 0, process.stderr
    result = json.loads(out.read_text())
    assert [r["model"] for r in result["results"]] == [
        "retnet", "retnet-pallas_interpret-projections"]
    assert [c["model"] for c in result["kernel_checks"]] == [
        "retnet-pallas_interpret-projections"]


@pytest.mark.slow
def test_bench_decode_times_a_bfloat16_state_checked_against_its_own_dtype(tmp_path,
                                                                          toy_config):
    out = tmp_path / "decode.json"
    process = run_script("bench_decode.py", f"--config={toy_config}", "--contexts=16",
                         "--batches=2", "--new_tokens=2", "--repeats=1",
                         "--copy_bytes=1048576", "--retention_kernels=xla,pallas_interpret",
                         "--state_dtypes=bfloat16", f"--out={out}")
    assert process.returncode == 0, process.stderr
    result = json.loads(out.read_text())
    retnets = ["retnet-bfloat16-state", "retnet-pallas_interpret-bfloat16-state"]
    assert [r["model"] for r in result["results"]] == retnets + ["transformer"]
    rows = {r["model"]: r for r in result["results"]}
    # The toy config's one layer at batch 2: 2 heads x 16 x 32 bfloat16 values per row (half
    # a float32 state), and the int32 positions.
    assert rows[retnets[0]]["state_gib"] * 2**30 == 2 * 2 * 16 * 32 * 2 + 2 * 4
    checks = result["kernel_checks"]
    # The kernel against XLA with the same bfloat16 state (a kernel check), then XLA's
    # bfloat16 state against its float32 state (the rounding, recorded).
    assert [(c["model"], c["reference"]) for c in checks] == [
        (retnets[1], retnets[0]), (retnets[0], "retnet")]
    assert checks[0]["state_rel_err"] < 1e-2 and checks[1]["state_rel_err"] > 0


def test_bench_retention_records_the_triton_cache_it_was_given(tmp_path):
    cache = tmp_path / "triton"
    (cache / "abc").mkdir(parents=True)
    (cache / "abc" / "chunk_fwd.autotune.json").write_text("{}")   # one earlier fla autotune
    (cache / "abc" / "chunk_fwd.cubin").write_text("")
    out = tmp_path / "retention.json"
    process = run_script("bench_retention.py", "--smoke", "--impls=ours", "--check_shape=",
                         "--modes=fwd", "--decays=fixed", f"--triton_cache_dir={cache}",
                         f"--out={out}")
    assert process.returncode == 0, process.stderr
    env = json.loads(out.read_text())["env"]
    assert env["triton_cache_dir"] == str(cache)
    assert env["cached_autotune_results"] == 1


@pytest.mark.slow
def test_bench_decode_dumps_hlo_counts_launches_and_tries_compiler_options(tmp_path, toy_config):
    out, hlo = tmp_path / "decode.json", tmp_path / "hlo"
    process = run_script("bench_decode.py", f"--config={toy_config}", "--contexts=16",
                         "--batches=1,2", "--new_tokens=2", "--repeats=1",
                         "--copy_bytes=1048576", f"--out={out}", f"--hlo_dir={hlo}",
                         "--compiler_options=xla_backend_optimization_level=1",
                         "--compiler_options=xla_no_such_option=true",
                         "--compiler_options=xla_gpu_graph_min_graph_size=2,"
                         "xla_gpu_enable_command_buffer=FUSION,WHILE")
    assert process.returncode == 0, process.stderr
    rows = json.loads(out.read_text())["results"]
    options = [{}, {"xla_backend_optimization_level": 1}, {"xla_no_such_option": True},
               {"xla_gpu_graph_min_graph_size": 2,
                "xla_gpu_enable_command_buffer": "FUSION,WHILE"}]
    # The list-valued set compiles where this jaxlib takes it per compile (an error row if not).
    list_valued_compiled = all("error" not in r for r in rows
                               if r["compiler_options"] == options[3])
    suffixes = ["", "_xla_backend_optimization_level-1"] + list_valued_compiled * [
        "_xla_gpu_enable_command_buffer-FUSION_WHILE_xla_gpu_graph_min_graph_size-2"]
    assert sorted(os.listdir(hlo)) == sorted(
        f"{m}_batch{b}_context16{s}.txt" for m in ("retnet", "transformer") for b in (1, 2)
        for s in suffixes)
    assert [(r["batch"], r["compiler_options"], r["model"]) for r in rows] == [
        (b, o, m) for b in (1, 2) for o in options for m in ("retnet", "transformer")]
    for row in rows:
        if row["compiler_options"] == options[2]:      # XLA refuses it: an error row
            assert "xla_no_such_option" in row["error"]
            continue
        if "error" in row:        # a list-valued option this jaxlib cannot take per compile
            assert row["compiler_options"] == options[3], row
            continue
        kinds = row["hlo_launch_kinds"]
        assert sum(kinds.values()) == row["hlo_kernels_per_token"] > 0
        assert any(k.startswith("fusion:k") for k in kinds), kinds


@pytest.mark.slow
def test_bench_retention_times_each_pallas_tiling_side_by_side(tmp_path):
    out = tmp_path / "retention.json"
    process = run_script("bench_retention.py", "--smoke", "--shapes=1x64x2x16x64",
                         "--impls=pallas", "--chunk_sizes=16", "--pallas_block_v=16,64",
                         "--pallas_segments=auto", "--pallas_num_warps=4",
                         "--pallas_state_num_stages=1,3", "--modes=fwd", "--decays=fixed",
                         "--check_shape=1x32x2x16x64", f"--out={out}")
    assert process.returncode == 0, process.stderr
    results = json.loads(out.read_text())
    names = {f"pallas_c16_bv{b}_ss{n}" for b in (16, 64) for n in (1, 3)}
    assert {r["impl"] for r in results["timings"] if "ms" in r} == names
    assert {c["impl"] for c in results["checks"] if "rms_rel" in c} == {"ours_c16"} | names


@pytest.mark.slow
def test_bench_decode_step_checks_then_times_each_tile_setting(tmp_path):
    out = tmp_path / "step.json"
    process = run_script("bench_decode_step.py", "--heads=2", "--key_dim=16", "--value_dim=48",
                         "--batches=1,2", "--block_v=auto,16,24", "--num_warps=4",
                         "--steps=3", "--repeats=2", "--copy_bytes=1048576", f"--out={out}")
    assert process.returncode == 0, process.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(r["batch"], r["decay"], r["impl"]) for r in rows] == [
        (b, d, i) for b in (1, 2) for d in ("fixed", "gated")
        for i in ("xla", "pallas bvauto w4", "pallas bv16 w4", "pallas bv24 w4")]
    # 'auto' resolved: 16 columns a program at batch 1 and 2 (2 heads x 3 groups < 128)
    assert [r.get("columns") for r in rows[:4]] == [None, 16, 16, None]
    timed = [r for r in rows if r["impl"] != "pallas bv24 w4"]
    assert all(r["us_per_step"] > 0 and r["state_rel_err"] < 1e-4 and r["o_rel_err"] < 2e-2
               for r in timed)
    refused = [r for r in rows if r["impl"] == "pallas bv24 w4"]
    assert all("power of two" in r["error"] and "us_per_step" not in r for r in refused)
    assert "| pallas bv16 w4 | gated | 2 |" in process.stdout


def test_bench_decode_step_without_rotation_times_the_plain_step(tmp_path):
    out = tmp_path / "step.json"
    process = run_script("bench_decode_step.py", "--heads=2", "--key_dim=16", "--value_dim=48",
                         "--batches=1", "--decays=gated", "--block_v=auto", "--num_warps=4",
                         "--steps=3", "--repeats=2", "--copy_bytes=1048576", "--norotate",
                         f"--out={out}")
    assert process.returncode == 0, process.stderr
    result = json.loads(out.read_text())
    assert result["rotate"] is False
    assert [r["impl"] for r in result["results"]] == ["xla", "pallas bvauto w4"]
    assert all(r["us_per_step"] > 0 and r["state_rel_err"] < 1e-4 for r in result["results"])


@pytest.mark.parametrize("broken, error_range", [
    (lambda state: state * (1 + 1e-3), (5e-4, 2e-3)),     # off by 0.1 %
    (lambda state: state.at[0, 0, 0, 0].set(float("nan")), None),   # NaN compares False
])
def test_bench_decode_step_does_not_time_a_kernel_that_differs(monkeypatch, broken,
                                                               error_range):
    monkeypatch.syspath_prepend(os.path.join(REPO, "experiments"))
    import bench_decode_step
    from absl import flags

    kernel = kernels.retention_step_pallas

    def broken_kernel(*args, **kwargs):
        o, state = kernel(*args, **kwargs)
        return o, broken(state)

    monkeypatch.setattr(bench_decode_step.kernels, "retention_step_pallas", broken_kernel)
    flags.FLAGS(["bench", "--heads=2", "--key_dim=16", "--value_dim=32", "--block_v=16",
                 "--num_warps=4", "--steps=2", "--repeats=1"])
    try:
        rows = bench_decode_step.measure(1, "gated", bandwidth=1e9, interpret=True)
    finally:
        flags.FLAGS.unparse_flags()
    assert [r["impl"] for r in rows] == ["xla", "pallas bv16 w4"]
    assert "us_per_step" in rows[0]
    assert rows[1]["error"] == "differs from XLA's retention_step"
    assert "us_per_step" not in rows[1]
    if error_range:
        assert error_range[0] < rows[1]["state_rel_err"] < error_range[1]


@pytest.mark.slow
def test_bench_kernel_parts_times_every_part_per_setting(tmp_path):
    out = tmp_path / "parts.json"
    process = run_script("bench_kernel_parts.py", "--smoke", "--shapes=1x64x2x16x32",
                         "--decays=gated", "--segments=1,2,3", "--state_num_warps=4,8",
                         "--output_num_warps=4", "--grads_blocks=auto,fused,16x16", f"--out={out}")
    assert process.returncode == 0, process.stderr
    rows = json.loads(out.read_text())["rows"]
    per_segments = lambda s: [                                            # noqa: E731
        ("states_local", s), ("states_local", s)] + ([("join", s), ("output_fused", s)]
                                                      if s > 1 else []) + [
        ("forward", s), ("forward_train", s), ("states_reverse", s), ("states_reverse", s),
        ("train_step", s)]
    assert [(r["part"], r.get("segments")) for r in rows] == [
        ("decays", None), ("output", None), ("grads", None), ("grads", None), ("grads", None),
        *per_segments(1), *per_segments(2)]          # 3 does not divide the 4 chunks
    assert [r["state_num_warps"] for r in rows if r["part"] == "states_reverse"] == [4, 8] * 2
    assert [r["grads_blocks"] for r in rows if r["part"] == "grads"] == [
        "auto (fused)", "fused", "16x16"]                     # Dk 16, Dv 32: one group
    assert all(r["ms"] > 0 and r["bytes"] > 0 for r in rows)
    assert "does not divide N = 4" in process.stdout


@pytest.mark.parametrize("flag, error", [
    ("--state_num_warps=6", "--state_num_warps: '6' is not valid: a power of two"),
    ("--segments=auto,0", "--segments: '0' is not valid: a positive number or 'auto'"),
    ("--parts=forward,sideways", "--parts: ['forward', 'sideways'] is not a list"),
    ("--grads_blocks=fused,24x16", "--grads_blocks: '24x16' is not 'auto', 'fused' or KxV"),
])
def test_bench_kernel_parts_refuses_a_bad_setting(flag, error):
    process = run_script("bench_kernel_parts.py", "--smoke", flag)
    assert process.returncode != 0
    assert error in process.stderr


def test_kernel_resources_compiles_offline_or_says_what_it_needs(tmp_path):
    """With the triton package: one row per Triton module, resources from ptxas. Without
    it (CI): a usage error naming the package."""
    out = tmp_path / "resources.json"
    process = run_script("kernel_resources.py", "--kernels=grads,states", "--heads=16x32",
                         "--chunk_sizes=16", "--num_warps=4", "--grads_blocks=auto,fused,16x16",
                         f"--out={out}")
    try:
        import triton  # noqa: F401
    except ImportError:
        assert process.returncode != 0
        assert "needs the triton package: pip install triton" in process.stderr
        return
    assert process.returncode == 0, process.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kernel"], r["setting"]) for r in rows] == [
        ("retention_chunk_grads", "blocks fused"),        # 'auto' is the fused kernel here
        ("retention_chunk_value_grads", "blocks 16x16"),
        ("retention_chunk_key_grads", "blocks 16x16"),
        ("retention_chunk_states", "")]
    assert all(0 < r["registers"] <= 255 and r["spill_stores"] >= 0 and r["shared_bytes"] > 0
               for r in rows)


def test_kernel_resources_compiles_the_decoding_kernels(tmp_path):
    """step: plain, rotating and reading 8 splits' partials, per batch; gemv: each block_k
    dividing K, the first shape behind the norm. Skipped without the triton package (CI)."""
    pytest.importorskip("triton")
    out = tmp_path / "resources.json"
    process = run_script("kernel_resources.py", "--kernels=step,gemv", "--heads=16x32",
                         "--chunk_sizes=16,32", "--num_warps=4", "--step_batches=1,2",
                         "--gemv_shapes=64x32+16,96x32", "--gemv_block_k=32,64",
                         f"--out={out}")
    assert process.returncode == 0, process.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kernel"], r["setting"]) for r in rows] == [
        ("retention_decode_step", "batch 1"), ("retention_decode_step", "batch 1 rotate"),
        ("retention_decode_step", "batch 1 rotate from 8 splits"),
        ("retention_decode_step", "batch 2"), ("retention_decode_step", "batch 2 rotate"),
        ("retention_decode_step", "batch 2 rotate from 8 splits"),
        ("decode_projections", "64x32+16 norm bk32"),
        ("decode_projections", "64x32+16 norm bk64"),
        ("decode_projections", "96x32 bk32")]
    assert all(r["chunk"] is None and 0 < r["registers"] <= 255 for r in rows)


def test_profile_decode_splits_each_token_into_kernels_and_gaps(tmp_path, toy_config):
    out, traces = tmp_path / "profile.json", tmp_path / "traces"
    process = run_script("profile_decode.py", f"--config={toy_config}", "--context=16",
                         "--new_tokens=4", "--batches=1,2", "--copy_bytes=1048576",
                         f"--trace_dir={traces}", f"--out={out}")
    assert process.returncode == 0, process.stderr
    profiles = json.loads(out.read_text())["profiles"]
    assert [(p["model"], p["batch"]) for p in profiles] == [
        (m, b) for m in ("retnet", "transformer") for b in (1, 2)]
    for p in profiles:
        assert p["busy_us_per_token"] + p["idle_us_per_token"] == pytest.approx(
            p["span_us_per_token"])
        assert 0 < p["busy_us_per_token"] <= p["span_us_per_token"]
        by_kind = {r["kind"]: r for r in p["by_kind"]}
        assert sum(r["launches_per_token"] for r in by_kind.values()) == pytest.approx(
            p["kernels_per_token"])
        assert any(kind.startswith("fusion:") for kind in by_kind), by_kind
        # Each instruction was found in the compiled HLO, with its bytes.
        assert all(r["kind"] != "other" and r["mb_per_token"] > 0 for r in p["top_ops"])
    assert len(os.listdir(traces)) == 4                  # one raw trace per profile
    assert "kernels" in process.stdout and "| instruction |" in process.stdout


def test_profile_busy_time_counts_overlapping_kernels_once(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "experiments"))
    from trace_kernels import Kernel, summarize
    from hlo_text import Launch

    # Two tokens: a 10 ns GEMM overlapping a 4 ns fusion, gap 6 ns, then the GEMM alone.
    kernels_ = [Kernel("gemm", 0, 10), Kernel("fusion.1", 5, 4), Kernel("gemm", 16, 10)]
    costs = {"gemm": Launch("gemm", "fusion:kCustom", 100, "dot_general @ layers.py:7"),
             "fusion.1": Launch("fusion.1", "fusion:kLoop", 8)}
    s = summarize(kernels_, units=2, costs=costs, bandwidth=1e9, top=5)
    assert s["span_us_per_token"] == pytest.approx(13e-3)
    assert s["busy_us_per_token"] == pytest.approx(10e-3)
    assert s["idle_us_per_token"] == pytest.approx(3e-3)
    assert s["mean_gap_us"] == pytest.approx(3e-3)          # gaps 0 (overlap) and 6 ns
    gemm = next(r for r in s["by_kind"] if r["kind"] == "fusion:kCustom")
    assert gemm["launches_per_token"] == 1 and gemm["mb_per_token"] == pytest.approx(1e-4)
    assert gemm["bandwidth_fraction"] == pytest.approx(200 / 20e-9 / 1e9)
    assert [(r["op"], r["source"]) for r in s["top_ops"]] == [
        ("gemm", "dot_general @ layers.py:7"), ("fusion.1", "")]


def test_hlo_text_reads_launches_and_their_bytes(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "experiments"))
    from hlo_text import array_bytes, hlo_launches, launches

    hlo = """HloModule m

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element((s32[], f32[4,8]{1,0}) %p), index=1
  %gemm.1 = f32[4,8]{1,0} fusion(f32[4,8]{1,0} %x, bf16[8,8]{1,0} %w), kind=kCustom, calls=%c, metadata={op_name="jit(f)/jvp(g)/dot_general" source_file="/src/retnet_jax/layers.py" source_line=42}
  %i = s32[] get-tuple-element((s32[], f32[4,8]{1,0}) %p), index=0
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(s32[] %i, f32[4,8]{1,0} %gemm.1)
}

ENTRY %main (a: f32[4,8]) -> f32[4,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %c.2 = f32[4,8]{1,0} custom-call(f32[4,8]{1,0} %a), custom_call_target="__gpu$xla.gpu.triton"
  %add.4 = f32[4,8]{1,0} fusion(%a, %c.2, /*index=2*/%a), kind=kLoop, calls=%f
  %w.3 = (s32[], f32[4,8]{1,0}) while((s32[], f32[4,8]{1,0}) %t0), condition=%cond, body=%body
  ROOT %r = f32[4,8]{1,0} get-tuple-element((s32[], f32[4,8]{1,0}) %w.3), index=1
}
"""
    found = {launch.name: launch for launch in launches(hlo)}
    assert set(found) == {"gemm.1", "c.2", "add.4"}
    assert found["add.4"].bytes == 4 * 128    # operands by name only (GPU text), /*index=*/
    assert found["gemm.1"].kind == "fusion:kCustom"
    assert found["gemm.1"].source == "jvp(g)/dot_general @ retnet_jax/layers.py:42"
    assert found["c.2"].source == found["add.4"].source == ""          # no metadata
    assert found["gemm.1"].bytes == 128 + 128 + 128          # result, x, bf16 weight
    assert found["c.2"].kind == "custom-call:__gpu$xla.gpu.triton"
    assert hlo_launches(hlo) == {"fusion:kCustom": 1, "fusion:kLoop": 1,
                                 "custom-call:__gpu$xla.gpu.triton": 1}
    assert array_bytes("pred[3] s32[] f8e4m3fn[4] bf16[2,3]{1,0}") == 3 + 4 + 4 + 12


def test_hlo_text_names_each_launch_source_from_its_stack_frame(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "experiments"))
    from hlo_text import launches

    hlo = """HloModule m

FileNames
1 "/src/retnet_jax/retention.py"
2 "/src/retnet_jax/layers.py"
3 "/venv/lib/python3.11/site-packages/flax/nnx/nn/linear.py"

FunctionNames
1 "chunkwise"

FileLocations
1 {file_name_id=1 function_name_id=1 line=120 end_line=120 column=4 end_column=9}
2 {file_name_id=2 function_name_id=1 line=33 end_line=33 column=4 end_column=9}
3 {file_name_id=3 function_name_id=1 line=422 end_line=422 column=4 end_column=9}

StackFrames
1 {file_location_id=2 parent_frame_id=1}
2 {file_location_id=1 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=2}

ENTRY %main (a: f32[4,8]) -> f32[4,8] {
  %a = f32[4,8]{1,0} parameter(0), metadata={op_name="a"}
  %gemm = f32[4,8]{1,0} fusion(%a, %a), kind=kCustom, calls=%c, metadata={op_name="jit(step)/jvp(block)/dot_general" stack_frame_id=2}
  %proj = f32[4,8]{1,0} fusion(%gemm), kind=kCustom, calls=%c, metadata={op_name="jit(step)/dot_general" stack_frame_id=3}
  ROOT %add = f32[4,8]{1,0} fusion(%proj), kind=kLoop, calls=%f, metadata={op_name="jit(step)/add" stack_frame_id=9}
}
"""
    found = {launch.name: launch.source for launch in launches(hlo)}
    # Frame 2 is retention.py's line 120 (its parent, printed as 2, is frame 1: layers.py).
    # Frame 3 is inside flax: named by its parent, frame 1, the library's caller. Frame 9
    # is not in the table: the op name only.
    assert found == {"gemm": "jvp(block)/dot_general @ retnet_jax/retention.py:120",
                     "proj": "dot_general @ retnet_jax/layers.py:33", "add": "add"}


def test_hlo_text_charges_sliced_reads_and_in_place_updates_their_slices(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "experiments"))
    from hlo_text import launches

    # A scan over 4 stacked layers, as XLA prints it (operands by name): one fusion reads
    # layer i's [64, 64] weight out of the [4, 64, 64] stack, one writes the [8, 64] output
    # into the [4, 8, 64] stack in place, one reads and writes a whole buffer.
    hlo = """HloModule m

%slice_body (param_0.3: f32[4,64,64], param_1.3: s32[]) -> f32[64,64] {
  %param_0.3 = f32[4,64,64]{2,1,0} parameter(0)
  %param_1.3 = s32[] parameter(1)
  %constant.3 = s32[] constant(0)
  %dynamic_slice.2 = f32[1,64,64]{2,1,0} dynamic-slice(%param_0.3, %param_1.3, %constant.3, %constant.3), dynamic_slice_sizes={1,64,64}
  ROOT %bitcast.1 = f32[64,64]{1,0} bitcast(%dynamic_slice.2)
}

%update_body (param_0.1: f32[4,8,64], param_1.2: s32[], param_2.1: f32[8,64]) -> f32[4,8,64] {
  %param_0.1 = f32[4,8,64]{2,1,0} parameter(0)
  %param_2.1 = f32[8,64]{1,0} parameter(2)
  %bitcast.2 = f32[1,8,64]{2,1,0} bitcast(%param_2.1)
  %param_1.2 = s32[] parameter(1)
  %constant.2 = s32[] constant(0)
  ROOT %dynamic_update_slice.2 = f32[4,8,64]{2,1,0} dynamic-update-slice(%param_0.1, %bitcast.2, %param_1.2, %constant.2, %constant.2)
}

%scale_body (param_0.9: f32[4,8,64]) -> f32[4,8,64] {
  %param_0.9 = f32[4,8,64]{2,1,0} parameter(0)
  ROOT %multiply.1 = f32[4,8,64]{2,1,0} multiply(%param_0.9, %param_0.9)
}

ENTRY %main (w: f32[4,64,64], ys: f32[4,8,64], y: f32[8,64], i: s32[]) -> f32[4,8,64] {
  %w = f32[4,64,64]{2,1,0} parameter(0)
  %ys = f32[4,8,64]{2,1,0} parameter(1)
  %y = f32[8,64]{1,0} parameter(2)
  %i = s32[] parameter(3)
  %read = f32[64,64]{1,0} fusion(%w, %i), kind=kLoop, calls=%slice_body
  %write = f32[4,8,64]{2,1,0} fusion(%ys, %i, %y), kind=kLoop, calls=%update_body
  ROOT %whole = f32[4,8,64]{2,1,0} fusion(%write), kind=kLoop, calls=%scale_body
}
"""
    found = {launch.name: launch.bytes for launch in launches(hlo)}
    assert found == {
        "read": 64 * 64 * 4 + 4 + 64 * 64 * 4,         # the layer's slice, index, result
        "write": 0 + 4 + 8 * 64 * 4 + 8 * 64 * 4,      # buffer in place, index, update in, out
        "whole": 2 * 4 * 8 * 64 * 4,                   # the whole buffer read and written
    }


def test_hlo_text_fusion_bytes_in_multi_output_and_mixed_bodies(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "experiments"))
    from hlo_text import launches

    # Multi-output: one root tuple writes a slice into p0 in place (update from a constant)
    # and returns a sum that also reads p1 whole, while p1 is sliced too; p2 is sliced only.
    # Operands by name with /*index=N*/ marks, as long GPU operand lists print them.
    hlo = """HloModule m

%both (p0: f32[16,8], p1: f32[16,8], p2: f32[16,8], i: s32[]) -> (f32[16,8], f32[16,8]) {
  %p0 = f32[16,8]{1,0} parameter(0)
  %p1 = f32[16,8]{1,0} parameter(1)
  %p2 = f32[16,8]{1,0} parameter(2)
  %i = s32[] parameter(3)
  %zero = s32[] constant(0)
  %ones = f32[1,8]{1,0} constant({...})
  %dus = f32[16,8]{1,0} dynamic-update-slice(%p0, %ones, %i, %zero)
  %s1 = f32[1,8]{1,0} dynamic-slice(%p1, %i, %zero), dynamic_slice_sizes={1,8}
  %s2 = f32[2,8]{1,0} slice(%p2), slice={[0:2], [0:8]}
  %b1 = f32[16,8]{1,0} broadcast(%s1), dimensions={0,1}
  %add = f32[16,8]{1,0} add(%p1, %b1)
  ROOT %t = (f32[16,8]{1,0}, f32[16,8]{1,0}) tuple(%dus, %add)
}

%short (q0: f32[16,8]) -> f32[16,8] {
  %q0 = f32[16,8]{1,0} parameter(0)
  ROOT %n = f32[16,8]{1,0} negate(%q0)
}

ENTRY %main (a: f32[16,8], b: f32[16,8], c: f32[16,8], j: s32[]) -> f32[16,8] {
  %a = f32[16,8]{1,0} parameter(0)
  %b = f32[16,8]{1,0} parameter(1)
  %c = f32[16,8]{1,0} parameter(2)
  %j = s32[] parameter(3)
  %f = (f32[16,8]{1,0}, f32[16,8]{1,0}) fusion(%a, %b, %c, /*index=3*/%j), kind=kLoop, calls=%both
  ROOT %g = f32[16,8]{1,0} fusion(%a, %b), kind=kLoop, calls=%short
}
"""
    whole, row = 16 * 8 * 4, 8 * 4
    found = {launch.name: launch.bytes for launch in launches(hlo)}
    # f: p0 in place (0 read; the constant row written), p1 read whole (also sliced), p2's
    # slice, the index; the sum written whole. g: two operands for one parameter, so the
    # body is not trusted and everything counts.
    assert found == {"f": 0 + whole + 2 * row + 4 + row + whole, "g": 3 * whole}


@pytest.mark.slow
def test_bench_gemv_checks_then_times_xla_and_each_pallas_tiling(tmp_path):
    out = tmp_path / "gemv.json"
    process = run_script("bench_gemv.py", "--shapes=192x64,192x32+64+32", "--layers=2",
                         "--block_n=16,32",
                         "--programs=4,8", "--block_k=32", "--repeats=1",
                         "--copy_bytes=1048576", "--traced_calls=2",
                         f"--trace_dir={tmp_path / 'trace'}",
                         f"--out={out}")
    assert process.returncode == 0, process.stderr
    rows = json.loads(out.read_text())["results"]
    # K = 192 is 6 steps of 32 rows, so K splits divide 6. 16 columns: 4 groups, 1 split for
    # 4 programs, 2 for 8; 32 columns: 2 groups, 2 splits for 4, 6 (3 gives 6 < 8) for 8.
    assert [r["impl"] for r in rows if r["shape"] == "192x64"] == [
        "xla", "pallas bn16 bk32 s1 w4 st3", "pallas bn16 bk32 s2 w4 st3",
        "pallas bn32 bk32 s2 w4 st3", "pallas bn32 bk32 s6 w4 st3"]
    # Three weights apart, 128 columns: 8 groups of 16 (1 split reaches 8 programs), 4 of 32
    # (2 splits); 32 | 32, 64, 32. One kernel reads all three, checked against float64.
    assert [r["impl"] for r in rows if r["shape"] == "192x32+64+32"] == [
        "xla", "pallas bn16 bk32 s1 w4 st3", "pallas bn32 bk32 s1 w4 st3",
        "pallas bn32 bk32 s2 w4 st3"]
    for r in rows:
        assert r["rel_err"] < 2e-2 and r["us"] > 0, r
        assert r["kernel_us"] > 0 and r["kernels_per_product"] >= 1, r   # the traced call


def test_bench_gemv_normalises_x_inside_the_kernel_when_asked(tmp_path):
    # x is drawn at 3x unit scale, so a kernel that skipped the RMSNorm would be ~3x off
    # the float64 reference and its rows would be errors.
    out = tmp_path / "gemv.json"
    process = run_script("bench_gemv.py", "--shapes=192x32+64+32", "--layers=2",
                         "--block_n=32", "--programs=4", "--block_k=32,64", "--repeats=1",
                         "--traced_calls=1", "--norm_prologue",
                         "--copy_bytes=1048576", f"--trace_dir={tmp_path / 'trace'}",
                         f"--out={out}")
    assert process.returncode == 0, process.stderr
    rows = json.loads(out.read_text())["results"]
    assert [r["impl"] for r in rows] == [
        "xla", "pallas bn32 bk32 s1 w4 st3", "pallas bn32 bk64 s1 w4 st3"]
    for r in rows:
        assert r["norm_prologue"] and "error" not in r and r["rel_err"] < 2e-2, r


def test_bench_gemv_chain_keeps_every_weights_product():
    # The chain must use every output: XLA drops a dot whose result nothing reads, and the
    # row's bytes count every weight.
    code = """
import sys; sys.argv = ["x"]
from absl import flags; flags.FLAGS(sys.argv)
import jax, jax.numpy as jnp, bench_gemv
w = [(None, [jnp.ones((256, n), jnp.bfloat16) for n in (128, 128, 256)]) for _ in range(2)]
x = jnp.ones(256, jnp.bfloat16)
text = jax.jit(bench_gemv.chain(bench_gemv.xla_product)).lower(x, w).compile().as_text()
print(text.count(" dot("))
"""
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=os.path.join(REPO, "experiments"), timeout=300)
    assert process.returncode == 0, process.stderr
    assert int(process.stdout.split()[-1]) == 2 * 3


def test_bench_gemv_refuses_a_malformed_shape_by_name():
    process = run_script("bench_gemv.py", "--shapes=192x64+", "--copy_bytes=1048576")
    assert process.returncode != 0
    assert "--shapes: '192x64+' is not KxN or KxN1+N2+..." in process.stderr


def test_bench_grid_barrier_checks_then_times_both_forms(tmp_path):
    out = tmp_path / "barrier.json"
    process = run_script("bench_grid_barrier.py", "--rounds=3", "--tile_rows=0,128",
                         "--ahead=0,2,3", "--num_warps=4", "--repeats=1",
                         "--copy_bytes=1048576", f"--out={out}")
    assert process.returncode == 0, process.stderr
    rows = json.loads(out.read_text())["results"]
    # Without weights nothing can be loaded ahead; a 128-row tile holds 2 row blocks, not 3.
    # One program (the CPU), so no control row: without a barrier one program is still right.
    assert [(r["form"], r["tile_rows"], r["ahead"]) for r in rows] == [
        ("chain", 0, 0), ("persistent", 0, 0),
        ("chain", 128, 0), ("persistent", 128, 0), ("persistent", 128, 2)]
    for r in rows:   # one weight tile of 128 x 128 bf16 a round
        assert "error" not in r and r["us_per_round"] > 0 and r["num_warps"] == 4, r
        assert r["rel_err"] <= 1e-5 and r["rel_err_after"] <= 1e-5, r
        assert r["mb_per_round"] == pytest.approx(r["tile_rows"] * 128 * 2 / 1e6), r


def lowers_for_cuda(code: str) -> str:
    """Script lines that run `code` (lowering to Triton for `cuda`) and print "lowering
    done", or "lowering skipped" where this jaxlib cannot lower for a GPU."""
    return ("try:\n" + textwrap.indent(code.strip("\n"), "    ") + "\n"
            '    print("lowering done")\n'
            "except RuntimeError as e:\n"
            '    print("lowering skipped" if "No supported GPU" in str(e) '
            'else f"lowering failed {e}")\n')


def test_bench_grid_barrier_rounds_read_the_neighbours_values():
    # Each round reads another program's value from the round before: the chain at four
    # interpreted programs must match float64 (in reversed program order it would not: x and
    # the weights are random), and the control (no barrier) at four programs must fail the
    # check. The persistent kernel at one program must match, with a row block of each
    # round loaded before its barrier, and its counter must show one arrival a barrier and
    # no give-up (nothing without the barrier), for each way of polling. At four programs
    # it must lower for Triton, and its IR must poll as asked: "atomic" with atomic adds
    # (arrival, first poll, loop, give-up: 4), "load" with volatile loads and one acquiring
    # atomic after the loop (3).
    code = """
import functools, jax, numpy as np, bench_grid_barrier as b
from jax._src.pallas.triton import lowering
x, w = b.inputs(4, 64, rounds=3)
want = b.reference(x, w, 3)
got = np.stack(b.chain(x, w, rounds=3, interpret=True))
print("chain", float(np.abs(got - want).max() / np.abs(want).max()))
print("reversed", float(np.abs(want - b.reference(x[::-1], w, 3)).max()))
control = functools.partial(b.persistent, rounds=3, barrier=None, interpret=True)
print("control", b.errors(control, x, w, want, 0)[1])
x1, w1 = b.inputs(1, 128, rounds=3)
want = b.reference(x1, w1, 3)
for barrier in ("atomic", "load", None):
    got, counter = b.persistent(x1, w1, rounds=3, ahead=1, barrier=barrier, interpret=True)
    print(f"persistent_{barrier}", float(np.abs(np.asarray(got) - want).max()
                                         / np.abs(want).max()), *np.asarray(counter))
lower = lowering.lower_jaxpr_to_triton_module
def capture(*args, **kwargs):
    module = lower(*args, **kwargs)
    text = module.module.operation.get_asm(enable_debug_info=False)
    print("ir_" + poll, text.count("tt.atomic_rmw"), text.count("isVolatile = true"))
    return module
lowering.lower_jaxpr_to_triton_module = capture
""" + lowers_for_cuda("""
for poll in ("atomic", "load"):
    jax.jit(functools.partial(b.persistent, rounds=3, ahead=1, barrier=poll)).trace(
        x, w).lower(lowering_platforms=("cuda",))
""")
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=os.path.join(REPO, "experiments"), timeout=300)
    assert process.returncode == 0, process.stderr
    found = dict(line.split(" ", 1) for line in process.stdout.splitlines())
    assert float(found["chain"]) <= 1e-5, found
    assert float(found["reversed"]) > 1e-2, found     # the programs' order matters
    assert found["control"] == "differs from the float64 rounds", found
    for barrier, arrivals in (("atomic", 2), ("load", 2), ("None", 0)):   # two barriers
        err, arrived, gave_up = found[f"persistent_{barrier}"].split()
        assert float(err) <= 1e-5 and (int(arrived), int(gave_up)) == (arrivals, 0), found
    assert found["lowering"] in ("done", "skipped"), found
    if found["lowering"] == "done":   # atomic adds, volatile loads
        assert found["ir_atomic"] == "4 0" and found["ir_load"] == "3 2", found


def test_bench_grid_barrier_phases_cycle_uneven_tiles_and_read_only_their_rows(tmp_path):
    # --phases: rounds cycle through uneven tiles (a decode block's phases). Each form reads
    # exactly its round's rows: the rows past a round's tile are NaN, so the chain and the
    # persistent kernel made to read whole tiles (no cycle) fail the float64 check, and the
    # script's rows match it, with a cycle's time and the rounds' mean bytes. At 528
    # programs the persistent kernel's traced row counts must lower for Triton.
    code = """
import functools, jax, jax.numpy as jnp, numpy as np, bench_grid_barrier as b
x, w = b.inputs(1, (128, 64), rounds=4)
want = b.reference(x, w, 4)
print("nan_rows", *np.isnan(np.asarray(w, np.float32)[:, 0, :, 0]).sum(axis=1))
for name, form in (("chain", b.chain), ("persistent", functools.partial(b.persistent, ahead=1))):
    for cycle in ((128, 64), None):
        fn = functools.partial(form, rounds=4, cycle=cycle, interpret=True)
        print(name, cycle is not None, b.errors(fn, x, w, want, None if name == "chain" else 3)[1])
try:
    b.persistent(x, w, rounds=3, cycle=(128, 64), interpret=True)
except ValueError as e:
    print(e)
shapes = (jax.ShapeDtypeStruct((528, 128), jnp.float32),
          jax.ShapeDtypeStruct((6, 528, 320, 128), jnp.bfloat16))
""" + lowers_for_cuda("""
jax.jit(functools.partial(b.persistent, rounds=6, cycle=(320, 64, 128), ahead=1)).trace(
    *shapes).lower(lowering_platforms=("cuda",))
""")
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=os.path.join(REPO, "experiments"), timeout=300)
    assert process.returncode == 0, process.stderr
    lines = process.stdout.splitlines()
    assert lines[:-1] == [
        "nan_rows 0 64 0 64", "chain True None", "chain False differs from the float64 rounds",
        "persistent True None", "persistent False differs from the float64 rounds",
        "3 rounds are no whole number of 2-tile cycles"], process.stdout
    assert lines[-1] in ("lowering done", "lowering skipped"), process.stdout
    out = tmp_path / "phases.json"
    process = run_script("bench_grid_barrier.py", "--rounds=4", "--tile_rows=",
                         "--phases=128,64", "--ahead=0,1,2", "--num_warps=4", "--repeats=1",
                         "--copy_bytes=1048576", f"--out={out}")
    assert process.returncode == 0, process.stderr
    rows = json.loads(out.read_text())["results"]
    # The smallest tile holds one row block, so 2 ahead is skipped.
    assert [(r["form"], r["tile_rows"], r["ahead"]) for r in rows] == [
        ("chain", [128, 64], 0), ("persistent", [128, 64], 0), ("persistent", [128, 64], 1)]
    for r in rows:   # rounds of 128, 64, 128, 64 rows of 128 bf16
        assert "error" not in r and r["rel_err"] <= 1e-5 and r["rel_err_after"] <= 1e-5, r
        assert r["mb_per_round"] == pytest.approx(96 * 128 * 2 / 1e6), r
        assert r["us_per_cycle"] == pytest.approx(2 * r["us_per_round"]), r


@pytest.mark.parametrize("poll", ["atomic", "load"])
def test_bench_grid_barrier_gives_up_on_programs_that_never_arrive(poll):
    # A barrier waiting for 5 arrivals in a grid of one program polls MAX_POLLS times,
    # counts one give-up and returns (a program that is never resident gives a reported
    # failure, not a hang); its own arrival is the counter's only one, and the check that
    # `errors` makes of the persistent kernel reports the give-up. With the wait unbounded
    # this times out.
    code = """
import jax, jax.numpy as jnp, numpy as np, bench_grid_barrier as b
from jax.experimental import pallas as pl
b.MAX_POLLS = 64
def kernel(counter_in, out_ref, counter_ref):
    b.grid_barrier(counter_ref, pl.program_id(0) + 5, on_gpu=False, poll="%s")
    out_ref[...] = jnp.ones((8,), jnp.float32)
def barrier_of_five(x, weights):
    return pl.pallas_call(kernel, grid=(1,), interpret=True,
                          in_specs=[pl.BlockSpec((2,), lambda p: (0,))],
                          out_shape=[jax.ShapeDtypeStruct((8,), jnp.float32),
                                     jax.ShapeDtypeStruct((2,), jnp.int32)],
                          input_output_aliases={0: 1})(jnp.zeros((2,), jnp.int32))
out, counter = barrier_of_five(None, None)
print(float(out.sum()), *np.asarray(counter))
print(b.errors(barrier_of_five, None, None, np.ones(8), arrivals=1)[1])
""" % poll
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=os.path.join(REPO, "experiments"), timeout=60)
    assert process.returncode == 0, process.stderr
    assert process.stdout.splitlines() == ["8.0 1 1",
                                           "1 barrier waits gave up after 64 polls"], \
        process.stdout


def test_bench_grid_barrier_allows_a_few_programs_a_sm_and_no_more():
    # Up to 4 programs a SM pass the check (132 SMs: 528), one more is refused by name. On
    # the CPU the script never sees a SM count, so check_flags is called directly.
    code = """
import bench_grid_barrier as b
b.flags.FLAGS(["bench_grid_barrier"])
print(b.check_flags(528, False, 132)[0])
try:
    b.check_flags(529, False, 132)
except ValueError as e:
    print(e)
"""
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=os.path.join(REPO, "experiments"), timeout=120)
    assert process.returncode == 0, process.stderr
    assert process.stdout.splitlines() == [
        "[0, 64, 512]", "--programs must be 1..528 (at most 4 a SM, so that every program of the "
        "persistent kernel can be resident), got 529"], process.stdout


@pytest.mark.parametrize("flag, message", [
    ("--programs=2", "--programs must be 1 when Pallas is interpreted"),
    ("--tile_rows=0,96", "--tile_rows must be multiples of 64, got [0, 96]"),
    ("--ahead=-1", "--ahead must be row blocks >= 0, got [-1]"),
    ("--tile_rows=64,x", "--tile_rows must be integers, got ['64', 'x']"),
    ("--num_warps=4,6", "--num_warps must be powers of two, got [4, 6]"),
    ("--phases=128,0", "--phases must be multiples of 64 above 0, got [128, 0]"),
    ("--tile_rows=", "--tile_rows and --phases are both empty: nothing to time"),
    ("--phases=128,64,64,64,64", "--rounds must be a multiple of the 5 --phases, got 96"),
])
def test_bench_grid_barrier_refuses_flags_it_cannot_run_by_name(flag, message):
    process = run_script("bench_grid_barrier.py", flag, "--copy_bytes=1048576")
    assert process.returncode != 0
    assert message in process.stderr


def test_bench_train_profiles_a_step_when_asked(tmp_path, toy_config):
    out = tmp_path / "train.json"
    process = run_script("bench_train.py", f"--config={toy_config}", "--seq_lens=32",
                         "--tokens_per_step=64", "--steps=1", "--windows=1", "--models=retnet",
                         "--matmul_size=256", "--profile_top=3", "--copy_bytes=1048576",
                         f"--out={out}")
    assert process.returncode == 0, process.stderr
    (row,) = json.loads(out.read_text())["results"]
    profile = row["profile"]
    assert 0 < profile["busy_us_per_step"] <= profile["span_us_per_step"]
    assert len(profile["top_ops"]) == 3 and profile["copy_bandwidth"] > 0
    assert all(r["kind"] != "other" for r in profile["top_ops"])    # matched to the HLO
    assert any(".py:" in r["source"] for r in profile["top_ops"])   # from its metadata
    assert "| instruction | kind | us/step |" in process.stdout
    assert "x copy bandwidth | source |" in process.stdout


def test_plot_benchmarks_draws_decode_and_training_figures(tmp_path):
    decode = tmp_path / "decode.json"
    decode.write_text(json.dumps({"device": "cpu", "jax": "x", "results": [
        {"model": m, "batch": b, "context": c, "compiler_options": {}, "ms_per_token": 1.0 + c /
         1e4 * (m == "transformer"), "tokens_per_s": b * 100.0, "total_gib": 1.0}
        for m in ("retnet", "transformer") for b in (1, 8) for c in (1024, 8192)]
        + [{"model": "transformer", "batch": 64, "context": 8192, "skipped": "does not fit"}]}))
    train = [tmp_path / f"train_{i}.json" for i in range(2)]
    for i, path in enumerate(train):
        path.write_text(json.dumps({"device": "cpu", "results": [
            {"model": "retnet", "seq_len": t, "tokens_per_s": 1e3 + i, "mfu_datasheet": 0.4,
             "remat": "projections", "mixers": "gated_retention", "retention_kernel": "xla"}
            for t in (2048, 8192)] + [{"model": "transformer", "seq_len": 2048, "error": "x"}]}))
    out = tmp_path / "plots"
    process = run_script("plot_benchmarks.py", f"--decode={decode}",
                         f"--train={train[0]},{train[1]}", f"--out_dir={out}")
    assert process.returncode == 0, process.stderr
    assert sorted(p.name for p in out.iterdir()) == ["decode.png", "train.png"]
    # Decode: 8 points against context, 4 at 8192 against batch (the skipped row left out).
    # Training: one label ('retnet (gated_retention), remat projections'), two lengths, the
    # two files' rows of each length in one bar (the error row left out).
    assert f"{out / 'decode.png'}: 12 points" in process.stdout
    assert f"{out / 'train.png'}: 2 bars" in process.stdout
    repeated = tmp_path / "repeated.json"
    repeated.write_text(json.dumps({"results": [
        {"model": "retnet", "seq_len": 8, "tokens_per_s": 1.0, "mfu_datasheet": 0.1}] * 2}))
    process = run_script("plot_benchmarks.py", f"--train={repeated}", f"--out_dir={out}")
    assert process.returncode != 0
    assert "several rows of the same setting [('retnet', 8)]" in process.stderr


def test_plot_benchmarks_refuses_bad_input_by_name(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"results": [{"model": "retnet", "error": "oom"}]}))
    process = run_script("plot_benchmarks.py", f"--train={empty}", f"--out_dir={tmp_path}")
    assert process.returncode != 0 and f"{empty}: no timed rows" in process.stderr
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"results": [{"model": "retnet", "seq_len": 8}]}))
    process = run_script("plot_benchmarks.py", f"--train={partial}", f"--out_dir={tmp_path}")
    assert process.returncode != 0
    assert "a row lacks ['tokens_per_s', 'mfu_datasheet']" in process.stderr
    process = run_script("plot_benchmarks.py", f"--train={partial}", "--train_labels=a,b",
                         f"--out_dir={tmp_path}")
    assert process.returncode != 0
    assert "--train_labels has 2 names for 1 --train files" in process.stderr
