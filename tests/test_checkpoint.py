"""Checkpointer: round trip onto shardings, keep last N + best, interrupted saves, configs."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from retnet_jax import checkpoint, sharding
from retnet_jax.checkpoint import CheckpointConfig, Checkpointer


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=2))


def _state(mesh, value: float):
    """(params, train) pytrees like a run's: a sharded matrix, a replicated step and key."""
    w = jax.device_put(jnp.full((8, 4), value), NamedSharding(mesh, P("data", "fsdp")))
    step = jax.device_put(jnp.asarray(int(value), jnp.int32), sharding.replicated(mesh))
    return {"blocks": {0: {"w": w}}}, {"step": step, "rng": jax.random.PRNGKey(0)}


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)


def _save(checkpointer, mesh, step, metrics=None):
    params, train = _state(mesh, float(step))
    checkpointer.save(step, params=params, train=train, data={"seed": 0, "step": step},
                      metrics=metrics)


def test_round_trip_onto_shardings(tmp_path, mesh):
    ckpt = Checkpointer(str(tmp_path))
    _save(ckpt, mesh, 3)
    ckpt.wait()
    params, train = _state(mesh, 0.0)
    restored_params, restored_train, data = ckpt.restore(
        3, params=_abstract(params), train=_abstract(train))
    ckpt.close()
    w = restored_params["blocks"][0]["w"]
    np.testing.assert_array_equal(np.asarray(w), np.full((8, 4), 3.0))
    assert w.sharding.spec == P("data", "fsdp")
    assert {s.data.shape for s in w.addressable_shards} == {(2, 2)}
    assert int(restored_train["step"]) == 3 and data == {"seed": 0, "step": 3}


def test_keeps_last_n_plus_best(tmp_path, mesh):
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(keep=2))
    losses = {1: 5.0, 2: 1.0, 3: None, 4: 3.0, 5: None, 6: None}
    for step, loss in losses.items():
        _save(ckpt, mesh, step, None if loss is None else {checkpoint.BEST_METRIC: loss})
        ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.best_step() == 2 and ckpt.latest_step() == 6
    ckpt.close()


def test_interrupted_save_keeps_last_good_step(tmp_path, mesh):
    ckpt = Checkpointer(str(tmp_path))
    for step in (1, 2):
        _save(ckpt, mesh, step)
    ckpt.close()
    # A crash while writing step 3 leaves Orbax's temporary directory, half written.
    partial = os.path.join(ckpt.directory, "3.orbax-checkpoint-tmp-1700000000000000")
    os.makedirs(os.path.join(partial, "params"))
    with open(os.path.join(partial, "params", "half_written"), "wb") as f:
        f.write(b"\x00" * 100)

    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.latest_step() == 2 and ckpt.all_steps() == [1, 2]
    params, train = _state(mesh, 0.0)
    restored, _, data = ckpt.restore(2, params=_abstract(params), train=_abstract(train))
    np.testing.assert_array_equal(np.asarray(restored["blocks"][0]["w"]), 2.0)
    assert data["step"] == 2
    _save(ckpt, mesh, 3)  # the interrupted step can be saved again
    ckpt.wait()
    assert ckpt.latest_step() == 3
    assert sorted(os.listdir(ckpt.directory)) == ["1", "2", "3"]  # the partial one is gone
    ckpt.close()


def test_restore_params_alone(tmp_path, mesh):
    ckpt = Checkpointer(str(tmp_path))
    _save(ckpt, mesh, 7)
    ckpt.close()
    params, _ = _state(mesh, 0.0)
    reader = Checkpointer(str(tmp_path), read_only=True)
    restored = reader.restore_params(7, _abstract(params))
    np.testing.assert_array_equal(np.asarray(restored["blocks"][0]["w"]), 7.0)
    reader.close()


def test_config_round_trip(tmp_path):
    path = ml_collections.config_dict.placeholder(str)
    config = ml_collections.ConfigDict({"model": {"d_model": 32, "layer_schedule": ("a", "b")},
                                        "data": {"path": path}})
    checkpoint.save_config(str(tmp_path), config)
    loaded = checkpoint.load_config(str(tmp_path))
    assert loaded.model.d_model == 32 and list(loaded.model.layer_schedule) == ["a", "b"]
    assert loaded.data.path is None
    with pytest.raises(FileNotFoundError, match="training workdir"):
        checkpoint.load_config(str(tmp_path / "missing"))


def test_check_resumable_names_fields():
    saved = {"d_model": 32, "num_layers": 1, "dtype": "float32", "layer_schedule": ["retention"]}
    checkpoint.check_resumable(saved, {**saved, "layer_schedule": ("retention",)})
    checkpoint.check_resumable(saved, {**saved, "dtype": "bfloat16"}, frozenset({"dtype"}))
    with pytest.raises(ValueError) as error:
        checkpoint.check_resumable(saved, {**saved, "d_model": 64, "num_layers": 2})
    message = str(error.value)
    assert "d_model: checkpoint 32 vs config 64" in message
    assert "num_layers: checkpoint 1 vs config 2" in message
    assert "dtype" not in message
