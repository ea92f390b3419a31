"""Pallas retention kernels on a device mesh (8 CPU devices, interpret mode).

`layers.run_retention` runs the kernels under `jax.shard_map` when a multi-device mesh is in
context (the Trainer traces its steps under its mesh): each device computes its own
[B_local, T, H_local, D] block. Checked here: the loss and gradients equal the single-device
XLA path, the kernels see local shapes, the compiled step gathers no [B, T, H, D] activation,
and a mesh axis that does not divide the batch or the heads is replicated along.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from retnet_jax import layers, sharding, train
from retnet_jax.model import ModelConfig, RetNetLM

B, T, H, D = 8, 32, 4, 16          # batch, time, retention heads, key head dim (d_model / H)
TINY_MODEL = dict(d_model=H * D, num_heads=H, num_attention_heads=2, chunk_size=16,
                  max_seq_len=T)
SCHEDULES = {
    "fixed": ("retention",),
    "gated": ("gated_retention",),
    "hybrid": ("retention", "attention", "gated_retention"),
}
BATCH = ("data", "fsdp")


def text_batch(batch_size=B, seq_len=T, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, size=(batch_size, seq_len + 1)).astype(np.int32)
    mask = (rng.random((batch_size, seq_len)) < 0.8).astype(np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}


def trainer(schedule: str, kernel: str, mesh_config: sharding.MeshConfig,
            devices=None) -> train.Trainer:
    model = ModelConfig.from_config({**TINY_MODEL, "num_layers": len(SCHEDULES[schedule]),
                                     "layer_schedule": SCHEDULES[schedule],
                                     "retention_kernel": kernel})
    return train.Trainer(model, train.TrainConfig(), sharding.make_mesh(mesh_config, devices))


def rel_error(a, b) -> float:
    """Largest relative L2 error over the leaves of two pytrees."""
    errors = jax.tree.map(lambda x, y: float(np.linalg.norm(np.asarray(x, np.float64) - y)
                                             / max(np.linalg.norm(np.asarray(y, np.float64)),
                                                   1e-30)), a, b)
    return max(jax.tree.leaves(errors))


def shard_map_bodies(jaxpr) -> list:
    """The body jaxprs of every shard_map in `jaxpr`, nested calls included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "shard_map":
            found.append(eqn.params["jaxpr"])
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)          # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    found.extend(shard_map_bodies(sub))
    return found


def gathered_activations(hlo: str) -> list[str]:
    """Result shapes of all-gathers in optimized HLO text that are [*, T, *, *] activations
    (the [B, T, H, D] layout the kernels read and write)."""
    shapes = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", hlo)
    return [s for s in shapes if len(s.split(",")) == 4 and s.split(",")[1] == str(T)]


@pytest.fixture(scope="module")
def references():
    """Per schedule: (params, loss, grads) of the single-device XLA path."""
    out = {}
    for schedule in SCHEDULES:
        ref = trainer(schedule, "xla", sharding.MeshConfig(data=1), jax.devices()[:1])
        model = RetNetLM(ref.model_config, rngs=nnx.Rngs(0))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        grads, sums = ref.loss_and_grads(params, sharding.put_batch(text_batch(), ref.mesh))
        out[schedule] = jax.device_get((params, float(sums["loss"]), grads))
    return out


@pytest.mark.parametrize("schedule, mesh_config", [
    ("fixed", sharding.MeshConfig(data=2, fsdp=2, tensor=2)),
    ("gated", sharding.MeshConfig(data=1, fsdp=8, tensor=1)),
    ("hybrid", sharding.MeshConfig(data=4, fsdp=1, tensor=2)),
    ("hybrid", sharding.MeshConfig(data=2, fsdp=2, tensor=2)),
])
def test_sharded_kernels_match_single_device_xla(references, schedule, mesh_config):
    params, loss1, grads1 = references[schedule]
    sharded = trainer(schedule, "pallas_interpret", mesh_config)
    assert sharded.model_config.retention_kernel == "pallas_interpret"
    params = jax.device_put(params, sharded.state_shardings.params)
    batch = sharding.put_batch(text_batch(), sharded.mesh)

    # The kernels run per shard: every shard_map body sees [B / batch shards, ...,
    # H / 'tensor', ...] blocks.
    bodies = shard_map_bodies(sharded.loss_and_grads.trace(params, batch).jaxpr.jaxpr)
    retention_layers = sum(m != "attention" for m in SCHEDULES[schedule])
    assert len(bodies) >= 2 * retention_layers  # forward and backward of each layer
    mesh = sharded.mesh.shape
    local_b, local_h = B // (mesh["data"] * mesh["fsdp"]), H // mesh["tensor"]
    activations = [v.aval.shape for body in bodies for v in body.invars
                   if v.aval.ndim == 4 and v.aval.shape[1] == T]
    assert activations and all((s[0], s[2]) == (local_b, local_h) for s in activations)

    compiled = sharded.loss_and_grads.lower(params, batch).compile()
    assert gathered_activations(compiled.as_text()) == []
    grads, sums = jax.device_get(compiled(params, batch))
    assert abs(float(sums["loss"]) - loss1) <= 1e-5 * abs(loss1)
    assert rel_error(grads, grads1) <= 1e-5


def test_heads_not_divisible_by_tensor_are_replicated(references):
    """'tensor' = 8 does not divide 4 heads: the kernels see all heads, batch still split."""
    params, loss1, grads1 = references["gated"]
    sharded = trainer("gated", "pallas_interpret", sharding.MeshConfig(data=1, fsdp=1, tensor=8))
    params = jax.device_put(params, sharded.state_shardings.params)
    batch = sharding.put_batch(text_batch(), sharded.mesh)
    bodies = shard_map_bodies(sharded.loss_and_grads.trace(params, batch).jaxpr.jaxpr)
    assert bodies and all(v.aval.shape[2] == H for body in bodies for v in body.invars
                          if v.aval.ndim == 4 and v.aval.shape[1] == T)
    grads, sums = jax.device_get(sharded.loss_and_grads(params, batch))
    assert abs(float(sums["loss"]) - loss1) <= 1e-5 * abs(loss1)
    assert rel_error(grads, grads1) <= 1e-5


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))


@pytest.mark.parametrize("shape, decay_ndim, expected", [
    ((8, 32, 4, 16), 3, (P(BATCH, None, "tensor", None), P(BATCH, None, "tensor"),
                         P(BATCH, "tensor", None, None))),
    ((8, 32, 4, 16), 1, (P(BATCH, None, "tensor", None), P("tensor"),
                         P(BATCH, "tensor", None, None))),
    ((6, 32, 4, 16), 3, (P(None, None, "tensor", None), P(None, None, "tensor"),
                         P(None, "tensor", None, None))),       # 6 % 4: batch replicated
    ((8, 32, 3, 16), 1, (P(BATCH, None, None, None), P(None),
                         P(BATCH, None, None, None))),          # 3 % 2: heads replicated
])
def test_retention_kernel_specs(mesh, shape, decay_ndim, expected):
    assert layers.retention_kernel_specs(mesh, shape, decay_ndim) == expected


@pytest.mark.parametrize("batch, heads, gated", [(6, 4, True), (8, 3, False)])
def test_indivisible_batch_or_heads_give_the_xla_result(mesh, batch, heads, gated):
    """run_retention under the mesh, with a batch or head count that 2 x 2 x 2 does not
    divide, forward and gradients (initial state included) against retention.py."""
    keys = jax.random.split(jax.random.PRNGKey(1), 5)
    q, k, v = (jax.random.normal(key, (batch, T, heads, D)) for key in keys[:3])
    if gated:
        log_decay = jax.nn.log_sigmoid(jax.random.normal(keys[3], (batch, T, heads)) + 2) / 4
    else:
        log_decay = jnp.log1p(-(2.0 ** -jnp.arange(5, 5 + heads, dtype=jnp.float32)))
    state = jax.random.normal(keys[4], (batch, heads, D, D))
    args = (q, k, v, log_decay, state)

    def loss(kernel, q, k, v, log_decay, state):
        o, final = layers.run_retention("chunkwise", q, k, v, log_decay, chunk_size=16,
                                        initial_state=state, kernel=kernel)
        return jnp.sum(o * jnp.cos(o)) + 0.1 * jnp.sum(final**2)

    def sharded(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return jax.value_and_grad(loss, argnums=(1, 2, 3, 4, 5))("pallas_interpret", *args)

    repl = NamedSharding(mesh, P())
    value, grads = jax.jit(sharded, in_shardings=repl)(*args)
    value1, grads1 = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3, 4, 5)),
                             static_argnums=0)("xla", *args)
    np.testing.assert_allclose(value, value1, rtol=1e-5)
    assert rel_error(grads, grads1) <= 1e-5


@pytest.mark.parametrize("gated", [False, True])
def test_sharded_decode_step_matches_xla(mesh, gated):
    """One decoding token (recurrent form, T = 1) through the Pallas step kernel under the
    mesh: a shard_map of [B / 4, 1, H / 2, D] blocks, same output and state as XLA's step;
    q and k rotated at per-sequence positions (by XLA under the mesh, before the shard_map)."""
    keys = jax.random.split(jax.random.PRNGKey(3), 5)
    q, k, v = (jax.random.normal(key, (B, 1, H, D)) for key in keys[:3])
    log_decay = (jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, 1, H)) + 2) / 4 if gated
                 else jnp.log1p(-(2.0 ** -jnp.arange(5, 5 + H, dtype=jnp.float32))))
    state = jax.random.normal(keys[4], (B, H, D, D))
    at = jnp.arange(B, dtype=jnp.int32) * 37 + 5

    def step(kernel, *args):
        return layers.run_retention("recurrent", *args[:4], chunk_size=16,
                                    initial_state=args[4], kernel=kernel, rotate_at=at)

    def sharded(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step("pallas_interpret", *args)

    args = (q, k, v, log_decay, state)
    traced = jax.jit(sharded, in_shardings=NamedSharding(mesh, P())).trace(*args)
    bodies = shard_map_bodies(traced.jaxpr.jaxpr)
    assert [v.aval.shape for v in bodies[0].invars][0] == (B // 4, 1, H // 2, D)
    with jax.default_matmul_precision("highest"):
        o, final = traced.lower().compile()(*args)
        o1, final1 = jax.jit(step, static_argnums=0)("xla", *args)
    assert rel_error((o, final), (o1, final1)) <= 1e-6


def test_without_a_mesh_in_context_the_kernel_inputs_are_gathered(mesh):
    """What the shard_map avoids: XLA cannot split a pallas_call, so on sharded inputs it
    gathers [B, T, H, D] activations (this is what makes the HLO check above meaningful)."""
    act = NamedSharding(mesh, P(BATCH, None, "tensor", None))
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    q, k, v = (jax.device_put(jax.random.normal(key, (B, T, H, D)), act) for key in keys)
    log_decay = jnp.log1p(-(2.0 ** -jnp.arange(5, 5 + H, dtype=jnp.float32)))

    def loss(q, k, v):
        o, _ = layers.run_retention("chunkwise", q, k, v, log_decay, chunk_size=16,
                                    initial_state=None, kernel="pallas_interpret")
        return jnp.sum(o**2)

    def with_mesh(q, k, v):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    plain = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
    assert gathered_activations(plain)
    assert gathered_activations(jax.jit(with_mesh).lower(q, k, v).compile().as_text()) == []
