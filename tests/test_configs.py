"""Presets in configs/: load through ml_collections flags, build valid ModelConfigs, and have
the stated parameter counts (counted with nnx.eval_shape, nothing allocated)."""

import dataclasses
import pathlib
import runpy

import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from retnet_jax import data
from retnet_jax.model import ModelConfig, RetNetLM

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"

# Exact counts, and the size each preset is named after (within 3%).
PARAM_COUNTS = {
    "tiny": (132_800, None),
    "small": (1_889_088, None),
    "gated_small": (1_891_392, None),          # + gt_proj, d_model x heads per layer
    "transformer_small": (1_889_088, None),    # FFN widened to match small
    "hybrid_small": (1_663_296, None),
    "ablation_gpu": (22_291_968, None),        # the gpu-scale ablation grid's RetNet
    "retnet_125m": (124_472_064, 125e6),
    "retnet_350m": (356_697_088, 350e6),
    "retnet_1_3b": (1_323_665_408, 1.3e9),
    "gated_retnet_1_3b": (1_324_058_624, 1.3e9),  # + gt_proj, d_model x heads per block
    "retnet_2_7b": (2_652_080_640, 2.7e9),
    "retnet_6_7b": (6_715_871_232, 6.7e9),
}


def load(name: str, *overrides: str):
    """The config of configs/<name>.py parsed as a command line would be."""
    argv = ["prog", f"--config={CONFIGS / name}.py", *overrides]
    flag_values = flags.FlagValues()
    # config_flags finds the override flags in sys_argv (default: sys.argv).
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def test_every_preset_file_is_listed():
    files = {p.stem for p in CONFIGS.glob("*.py")} - {"base", "__init__"}
    assert files == set(PARAM_COUNTS)


@pytest.mark.parametrize("name", PARAM_COUNTS)
def test_preset_parameter_counts(name):
    config = ModelConfig.from_config(load(name).model)
    abstract = nnx.eval_shape(lambda: RetNetLM(config, rngs=nnx.Rngs(0)))
    count, nominal = PARAM_COUNTS[name]
    assert abstract.count_params() == count
    if nominal is not None:
        assert abs(count / nominal - 1) < 0.03


def test_base_model_section_matches_model_config_defaults():
    base = runpy.run_path(str(CONFIGS / "base.py"))["get_base_config"]()
    assert ModelConfig.from_config(base.model) == ModelConfig()
    assert set(base.model) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert base.model.vocab_size == data.VOCAB_SIZE


@pytest.mark.parametrize("name", [n for n, (_, nominal) in PARAM_COUNTS.items() if nominal])
def test_paper_presets_unroll_their_blocks(name):
    # A scan re-stacks the weights every step, which made the 1.3B's step 12 % longer on an
    # H100 (BENCHMARKS.md, "Training", session 19).
    assert load(name).model.scan_layers is False


@pytest.mark.parametrize("name", ["retnet_1_3b", "gated_retnet_1_3b"])
def test_1_3b_presets_train_with_xla_and_decode_with_the_pallas_step(name):
    # BENCHMARKS.md: XLA's chunkwise form trains faster at these heads (session 6), the
    # Pallas step decodes faster at batches 1-64 (session 19).
    model = ModelConfig.from_config(load(name).model)
    assert (model.retention_kernel, model.decode_kernel) == ("xla", "pallas")


def test_command_line_overrides_keep_types():
    config = ModelConfig.from_config(load(
        "hybrid_small", "--config.model.value_dim=384", "--config.model.num_layers=2",
        "--config.model.layer_schedule=('gated_retention','attention')",
        "--config.model.attention_impl=xla", "--config.model.dtype=bfloat16").model)
    assert config.value_dim == 384 and config.mixers == ("gated_retention", "attention")
    assert config.attention_impl == "xla" and config.dtype == "bfloat16"
    assert load("small").model.value_dim == 324
    assert ModelConfig.from_config(load("small", "--config.model.num_layers=5").model).mixers \
        == ("retention",) * 5                          # no schedule: follows num_layers


def test_variants_differ_from_small_only_in_mixers():
    small = load("small").model.to_dict()
    for name, mixers in [("gated_small", {"gated_retention"}), ("transformer_small", {"attention"}),
                         ("hybrid_small", {"retention", "attention"})]:
        variant = load(name).model.to_dict()
        assert set(variant["layer_schedule"]) == mixers
        changed = {k for k in small if small[k] != variant[k]}
        assert changed <= {"layer_schedule", "num_attention_heads", "ffn_dim"}, name


def test_bad_override_names_the_field():
    with pytest.raises(ValueError, match="layer_schedule"):
        ModelConfig.from_config(load("hybrid_small", "--config.model.num_layers=5").model)
