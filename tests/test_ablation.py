"""The ablation runner trains every cell, resumes, and writes tables and plots."""

import csv
import os

import pytest

from retnet_jax import ablation, checkpoint, data
from retnet_jax.model import ModelConfig


def test_every_grid_builds_valid_configs_at_every_scale():
    for grid in ablation.GRIDS:
        for scale in ablation.SCALES:
            cells = ablation.make_cells(grid, scale)
            assert len({c.name for c in cells}) == len(cells)
            for cell in cells:
                config = ablation.cell_config(cell, scale, seed=0)
                model = ModelConfig.from_config(config.model)  # validates
                assert model.max_seq_len >= max((cell.data["seq_len"], *cell.evaluate_lengths,
                                                 *(t for t, _ in cell.evaluate_settings)))


def test_variants_change_what_they_say():
    cell = next(c for c in ablation.make_cells("paper", "tiny") if c.variant == "no_decay")
    assert ablation.cell_config(cell, "tiny", 0).model.decay_schedule == "none"
    decay = {c.variant: ablation.cell_config(c, "tiny", 0).model.layer_schedule
             for c in ablation.make_cells("decay_lm", "tiny")}
    assert set(decay["gated"]) == {"gated_retention"}
    assert set(decay["transformer"]) == {"attention"}
    assert set(decay["hybrid"]) == {"gated_retention", "attention"}
    mqar = {c.variant: ablation.cell_config(c, "tiny", 0).model
            for c in ablation.make_cells("decay_mqar", "tiny")}
    assert mqar["gated_bias3"].gate_bias == 3.0 and mqar["gated"].gate_bias is None
    assert set(mqar["gated_bias3"].layer_schedule) == {"gated_retention"}


def test_mqar_cells_use_the_scales_recall_model():
    mqar = ablation.make_cells("decay_mqar", "gpu")[0]
    lm = ablation.make_cells("decay_lm", "gpu")[0]
    assert ablation.cell_config(mqar, "gpu", 0).model.num_layers == 2
    assert ablation.cell_config(mqar, "gpu", 0).model.d_model == 256
    assert ablation.cell_config(lm, "gpu", 0).model.num_layers == 6


@pytest.mark.parametrize("scale", sorted(ablation.SCALES))
def test_mqar_trains_one_model_per_variant_on_the_mixture(scale):
    sizes = ablation.SCALES[scale]
    cells = ablation.make_cells("decay_mqar", scale)
    assert [c.variant for c in cells] == list(ablation.DECAY_VARIANTS)
    for cell in cells:
        config = ablation.cell_config(cell, scale, 0)
        task = data.make_task(config.data)
        assert isinstance(task, data.MQARMixture)
        assert task.seq_len == max(t for t, _ in task.settings)   # padded to the longest
        assert cell.evaluate_settings == sizes.mqar_test
        assert config.model.max_seq_len == max(t for t, _ in (*task.settings, *sizes.mqar_test))
        for t, kv in sizes.mqar_test:   # every test setting is a valid MQAR for the model
            data.MQAR(seq_len=t, num_kv_pairs=kv, vocab_size=config.model.vocab_size)


def test_gpu_mqar_is_zoologys_mixture():
    gpu = ablation.SCALES["gpu"]
    assert gpu.mqar_data["settings"] == ((64, 4), (128, 8), (256, 16), (256, 32), (256, 64))
    assert gpu.mqar_data["weights"] == (0.5, 0.125, 0.125, 0.125, 0.125)
    assert gpu.mqar_data["vocab_size"] == 8192
    assert max(t for t, _ in gpu.mqar_test) == 1024     # length generalisation to 4x
    for cell in ablation.make_cells("decay_mqar", "gpu"):
        assert ablation.cell_config(cell, "gpu", 0).model.tie_embeddings   # as in Zoology


def test_gpu_language_models_train_under_one_epoch_of_the_python_corpus():
    for scale, corpus in (("tiny", "stdlib"), ("colab", "stdlib"), ("gpu", "python")):
        for grid in ("decay_lm", "paper"):
            for cell in ablation.make_cells(grid, scale):
                assert ablation.cell_config(cell, scale, 0).data.name == corpus, (grid, scale)
    gpu = ablation.SCALES["gpu"]
    train_tokens = gpu.train["num_steps"] * gpu.lm["batch_size"] * gpu.lm["seq_len"]
    assert train_tokens < gpu.lm["max_bytes"] * 0.97  # the default val_fraction is 0.03


def test_unknown_grid_or_scale():
    with pytest.raises(ValueError, match="grid must be one of"):
        ablation.make_cells("decay", "tiny")
    with pytest.raises(ValueError, match="scale must be one of"):
        ablation.make_cells("paper", "huge")
    with pytest.raises(ValueError, match=r"variants \['gated'\] are not in grid 'paper'"):
        ablation.run_grid("paper", "/nonexistent", variants=("gated",))


@pytest.mark.slow
def test_grid_runs_resumes_and_reports(tmp_path, monkeypatch):
    out = str(tmp_path)
    run = lambda: ablation.run_grid("decay_lm", out, scale="tiny", progress=False,
                                    variants=("retnet", "gated"))
    rows = run()
    assert [r["variant"] for r in rows] == ["retnet", "gated"]
    for row in rows:
        assert row["steps"] == ablation.SCALES["tiny"].train["num_steps"]
        assert {"bpb@32", "bpb@64", "bpb@128"} <= set(row)
        assert all(0 < row[k] < 9 for k in ("bpb@32", "bpb@64", "bpb@128"))
        # the best evaluation during training (every 30 steps at tiny scale: only the last)
        assert row["best_eval_bits_per_byte"] == pytest.approx(row["eval_bits_per_byte"])
    with open(os.path.join(out, "decay_lm.csv")) as f:
        assert len(list(csv.DictReader(f))) == 2
    table = open(os.path.join(out, "decay_lm.md")).read()
    assert "| retnet | trained at T=32 |" in table and "bpb@128" in table
    assert "one seed: no spread" in table and "±" not in table
    for plot in ("decay_lm", "decay_lm_curves", "decay_lm_extrapolation"):
        assert os.path.getsize(os.path.join(out, f"{plot}.png")) > 1000

    # The paper grid's plain RetNet is the same run as decay_lm's: shared, not retrained.
    monkeypatch.setattr(ablation, "_run_cell", lambda *a: pytest.fail("retrained a cell"))
    paper = ablation.run_grid("paper", out, scale="tiny", progress=False, variants=("retnet",))
    assert paper == rows[:1]

    # Resuming: finished cells are read back, not retrained.
    assert run() == rows


@pytest.mark.parametrize("grid,scale", [("decay_lm", "colab"), ("decay_mqar", "gpu")])
def test_transformer_variant_is_parameter_matched(grid, scale):
    from flax import nnx
    from retnet_jax.model import RetNetLM
    counts = {}
    # The first setting's cells, one per variant.
    for cell in ablation.make_cells(grid, scale)[:len(ablation.DECAY_VARIANTS)]:
        config = ModelConfig.from_config(ablation.cell_config(cell, scale, 0).model)
        counts[cell.variant] = nnx.eval_shape(
            lambda: RetNetLM(config, rngs=nnx.Rngs(0))).count_params()
    assert set(counts) == set(ablation.DECAY_VARIANTS)
    for variant in ("transformer", "hybrid", "gated", "gated_bias3"):
        assert abs(counts[variant] - counts["retnet"]) / counts["retnet"] < 0.01, variant


@pytest.mark.slow
def test_mqar_grid_reports_accuracy_per_test_setting(tmp_path):
    out = str(tmp_path)
    rows = ablation.run_grid("decay_mqar", out, scale="tiny", progress=False,
                             variants=("retnet", "transformer"))
    keys = ["acc@T16-kv2", "acc@T32-kv4", "acc@T64-kv8"]    # T=64: twice the training length
    assert [r["variant"] for r in rows] == ["retnet", "transformer"]
    for row in rows:
        assert row["setting"] == "T16-kv2 + T32-kv4"
        assert all(0 <= row[k] <= 1 for k in keys)
    with open(os.path.join(out, "decay_mqar.csv")) as f:
        header = next(csv.reader(f))
    assert set(keys) <= set(header)
    table = open(os.path.join(out, "decay_mqar.md")).read()
    assert "| eval_accuracy | eval_loss | " + " | ".join(keys) + " |" in table
    assert "| transformer | T16-kv2 + T32-kv4 |" in table
    assert os.path.getsize(os.path.join(out, "decay_mqar.png")) > 1000


def test_shards_split_the_runs_seed_by_seed(tmp_path, monkeypatch):
    ran = []
    def fake_run(cell, scale, seed, workdir):
        ran.append((cell.variant, seed))
        os.makedirs(workdir)
        return {"cell": cell.name, "variant": cell.variant, "task": cell.task,
                "setting": cell.setting, "seed": seed, "num_params": 1, "eval_loss": 1.0,
                "eval_accuracy": 0.5, "eval_bits_per_byte": 1.0, "acc@T32-kv4": 0.5}
    monkeypatch.setattr(ablation, "_run_cell", fake_run)
    for i in range(2):
        ablation.run_grid("decay_mqar", str(tmp_path), seeds=(0, 1), shard=(i, 2),
                          variants=("retnet", "gated", "hybrid"), progress=False)
        assert not os.path.exists(tmp_path / "decay_mqar.md")   # shards write no tables
    assert ran == [("retnet", 0), ("hybrid", 0), ("gated", 1),
                   ("gated", 0), ("retnet", 1), ("hybrid", 1)]
    assert ablation.run_grid("decay_mqar", str(tmp_path), shard=(5, 8),
                             progress=False) == []               # an empty shard is fine
    rows = ablation.run_grid("decay_mqar", str(tmp_path), seeds=(0, 1),
                             variants=("retnet", "gated", "hybrid"), progress=False)
    assert len(rows) == 6 and len(ran) == 6               # the last call only reads back
    assert os.path.getsize(tmp_path / "decay_mqar.png") > 1000
    with pytest.raises(ValueError, match="shard must be"):
        ablation.run_grid("decay_mqar", str(tmp_path), shard=(2, 2))


def test_tables_only_reads_finished_runs_and_names_the_missing(tmp_path, monkeypatch):
    def fake_run(cell, scale, seed, workdir):
        os.makedirs(workdir)
        return {"cell": cell.name, "variant": cell.variant, "task": cell.task,
                "setting": cell.setting, "seed": seed, "num_params": 1, "eval_loss": 1.0,
                "eval_accuracy": 0.5, "eval_bits_per_byte": 1.0, "acc@T32-kv4": 0.25 + seed / 2}
    monkeypatch.setattr(ablation, "_run_cell", fake_run)
    ablation.run_grid("decay_mqar", str(tmp_path), seeds=(0, 1), variants=("retnet",),
                      progress=False)
    ablation.run_grid("decay_mqar", str(tmp_path), seeds=(0,), variants=("gated",),
                      progress=False)
    monkeypatch.setattr(ablation, "_run_cell", lambda *a: pytest.fail("trained a run"))
    rows = ablation.run_grid("decay_mqar", str(tmp_path), seeds=(0, 1),
                             variants=("retnet", "gated"), progress=False, train=False)
    assert sorted((r["variant"], r["seed"]) for r in rows) == [
        ("gated", 0), ("retnet", 0), ("retnet", 1)]
    table = open(tmp_path / "decay_mqar.md").read()
    assert "| retnet | T16-kv2 + T32-kv4 | 1 | 2 | 0.5000 ± 0.0000 | 1.0000 ± 0.0000 | " \
           "0.5000 ± 0.2500 |" in table
    assert "| gated | T16-kv2 + T32-kv4 | 1 | 1 | 0.5000 | 1.0000 | 0.2500 |" in table
    assert "Not finished yet (1 of 4 runs): gated@mqar-mixture seed 1." in table
    with pytest.raises(ValueError, match="give no shard"):
        ablation.run_grid("decay_mqar", str(tmp_path), shard=(0, 2), train=False)


def test_a_stopped_run_is_not_recorded_and_stops_the_grid(tmp_path, monkeypatch):
    """SIGTERM mid-run (train_and_evaluate returns completed=False): no result.json for that
    run, no later runs, no tables; the next call resumes that run."""
    calls = []
    def fake_train(config, workdir):
        calls.append(workdir)
        return {"completed": False, "step": 7}
    monkeypatch.setattr(ablation.train_lib, "train_and_evaluate", fake_train)
    with pytest.raises(ablation.GridStopped, match=r"0 of 2 runs finished"):
        ablation.run_grid("decay_lm", str(tmp_path), scale="tiny", progress=False,
                          variants=("retnet", "gated"))
    assert len(calls) == 1
    assert not any(name == ablation.RESULT_FILE for _, _, files in os.walk(tmp_path)
                   for name in files)
    assert not os.path.exists(tmp_path / "decay_lm.md")
    with pytest.raises(ablation.GridStopped):
        ablation.run_grid("decay_lm", str(tmp_path), scale="tiny", progress=False,
                          variants=("retnet", "gated"))
    assert calls[1] == calls[0]                       # the same run again, not the next


def test_a_run_recorded_with_other_settings_is_not_reused(tmp_path, monkeypatch):
    """A run folder whose config.json differs from the cell's (here: the corpus) stops the
    grid with an error naming the field, before anything is read back or trained."""
    cell = ablation.make_cells("decay_lm", "tiny")[0]
    config = ablation.cell_config(cell, "tiny", 0)
    config.data.name = "python"
    checkpoint.save_config(str(tmp_path / cell.name / "seed0"), config)
    monkeypatch.setattr(ablation, "_run_cell", lambda *a: pytest.fail("trained over it"))
    with pytest.raises(ValueError, match="data config of .*name: checkpoint 'python' vs "
                                         "config 'stdlib'"):
        ablation.run_grid("decay_lm", str(tmp_path), scale="tiny", progress=False)
    # Logging fields may differ.
    config = ablation.cell_config(cell, "tiny", 0)
    checkpoint.save_config(str(tmp_path / cell.name / "seed0"), config)
    config.train.log_every = 1
    ablation.check_recorded_config(str(tmp_path / cell.name / "seed0"), config)
