"""Mesh construction, the logical-axis rules table and batch placement (8 CPU devices)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from retnet_jax import sharding
from retnet_jax.sharding import MeshConfig


@pytest.mark.parametrize("config, sizes", [
    (MeshConfig(), (8, 1, 1)),
    (MeshConfig(data=-1, fsdp=2, tensor=2), (2, 2, 2)),
    (MeshConfig(data=1, fsdp=-1, tensor=4), (1, 2, 4)),
    (MeshConfig(data=2, fsdp=4, tensor=1), (2, 4, 1)),
])
def test_mesh_axis_sizes(config, sizes):
    mesh = sharding.make_mesh(config)
    assert mesh.axis_names == sharding.MESH_AXES
    assert tuple(mesh.shape.values()) == sizes
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("config, match", [
    (MeshConfig(data=-1, fsdp=-1), "at most one -1"),
    (MeshConfig(data=0), "positive"),
    (MeshConfig(data=3, fsdp=1, tensor=1), "3 devices"),
    (MeshConfig(data=-1, fsdp=3), "not divisible"),
])
def test_mesh_config_errors(config, match):
    with pytest.raises(ValueError, match=match):
        config.axis_sizes(8)


def test_mesh_over_given_devices():
    mesh = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    assert mesh.devices.size == 1


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


@pytest.mark.parametrize("logical, shape, spec", [
    (("embed", "mlp"), (32, 64), P("fsdp", "tensor")),
    (("mlp", "embed"), (64, 32), P("tensor", "fsdp")),
    (("vocab", "embed"), (259, 32), P(None, "fsdp")),  # 259 % 2 != 0: vocab replicated
    (("embed", "vocab"), (32, 260), P("fsdp", "tensor")),
    (("embed", "heads", None), (32, 4, 8), P("fsdp", "tensor", None)),
    (("heads", "mlp"), (4, 64), P("tensor", None)),  # 'tensor' is used once per array
    (("batch", None), (8, 16), P(("data", "fsdp"), None)),
    (("batch", None), (6, 16), P(None, None)),  # 6 % 4 != 0
    ((None,), (32,), P(None)),
    ((), (32,), P(None)),
    (None, (3, 5), P(None, None)),
])
def test_logical_to_mesh_spec(mesh, logical, shape, spec):
    assert sharding.logical_to_mesh_spec(logical, shape, mesh) == spec


def test_logical_to_mesh_spec_errors(mesh):
    with pytest.raises(ValueError, match="'experts' has no rule"):
        sharding.logical_to_mesh_spec(("experts", "embed"), (4, 32), mesh)
    with pytest.raises(ValueError, match="rank"):
        sharding.logical_to_mesh_spec(("embed",), (32, 4), mesh)


def test_every_model_logical_name_has_a_rule():
    from retnet_jax import model
    assert set(model.LOGICAL_AXIS_NAMES) <= set(sharding.LOGICAL_AXIS_RULES)


def test_tree_shardings(mesh):
    abstract = {"w": jax.ShapeDtypeStruct((32, 64), np.float32),
                "b": jax.ShapeDtypeStruct((64,), np.float32)}
    specs = {"w": P("embed", "mlp"), "b": P()}
    shardings = sharding.tree_shardings(abstract, specs, mesh)
    assert shardings["w"].spec == P("fsdp", "tensor")
    assert shardings["b"].spec == P(None)


def test_put_batch(mesh):
    batch = {"inputs": np.arange(8 * 5, dtype=np.int32).reshape(8, 5),
             "loss_mask": np.ones((8, 5), np.float32)}
    placed = sharding.put_batch(batch, mesh)
    for key, value in placed.items():
        assert value.sharding.spec == P(("data", "fsdp"))
        np.testing.assert_array_equal(np.asarray(value), batch[key])
        assert {s.data.shape for s in value.addressable_shards} == {(2, 5)}
    with pytest.raises(ValueError, match="not divisible"):
        sharding.put_batch({"inputs": np.zeros((6, 5), np.int32)}, mesh)


def test_constrain_is_a_no_op_without_a_mesh_in_context():
    x = jax.numpy.ones((8, 4, 6))
    assert sharding.mesh_in_context() is None
    assert sharding.constrain(x, ("batch", None, None)) is x


@pytest.mark.slow   # ~20 s each on 2 CPU cores
@pytest.mark.parametrize("mesh_config", [MeshConfig(data=1, fsdp=8, tensor=1),
                                         MeshConfig(data=2, fsdp=2, tensor=2)])
def test_train_step_keeps_activations_batch_sharded(mesh_config):
    """With FSDP-sharded weights, XLA's propagation alone split the residual stream along
    d_model: the compiled step all-gathered [B, T, d_model] activations around every block
    and, on (2, 2, 2), fell back to 'involuntary full rematerialization' of the embedding
    lookup. `sharding.constrain` on the residual stream and the table lookup stops both."""
    import re

    from retnet_jax import train
    from retnet_jax.model import ModelConfig
    d_model, seq_len = 64, 32
    model = ModelConfig(d_model=d_model, num_layers=3, num_heads=4, num_attention_heads=2,
                        chunk_size=16, max_seq_len=seq_len,
                        layer_schedule=("retention", "attention", "gated_retention"))
    trainer = train.Trainer(model, train.TrainConfig(), sharding.make_mesh(mesh_config))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (8, seq_len + 1)).astype(np.int32)
    batch = sharding.put_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                                "loss_mask": np.ones((8, seq_len), np.float32)}, trainer.mesh)
    hlo = trainer.train_step.lower(trainer.init(), batch).compile().as_text()
    gathered = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", hlo)
    assert gathered                                  # FSDP gathers its weights, so the regex works
    residual = [s for s in gathered if s.split(",")[1:] == [str(seq_len), str(d_model)]]
    assert residual == []
