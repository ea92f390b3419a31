"""Device mesh and the one table that maps logical axis names to mesh axes.

Parameters carry logical names per dimension (`nnx.Param(..., sharding_names=('embed', 'mlp'))`,
see `model.LOGICAL_AXIS_NAMES`). `LOGICAL_AXIS_RULES` turns each name into mesh axes; nothing
else in the library names a mesh axis for a parameter. A dimension whose size is not divisible
by its mesh axes' total size is replicated instead (the byte vocabulary, 259, is odd), and a
mesh axis already used by an earlier dimension of the same array is not used twice.

The mesh has the axes `MESH_AXES = ('data', 'fsdp', 'tensor')`:
- data:   pure data parallelism; parameters replicated.
- fsdp:   data parallelism with parameters (and optimizer state) sharded over 'embed'.
- tensor: tensor (Megatron-style) parallelism over heads, MLP hidden units and vocabulary.
Batches are sharded over `BATCH_AXES = ('data', 'fsdp')` on their leading dimension.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "MESH_AXES", "BATCH_AXES", "LOGICAL_AXIS_RULES", "MeshConfig", "make_mesh",
    "logical_to_mesh_spec", "tree_shardings", "batch_sharding", "replicated",
    "put_batch", "mesh_in_context", "constrain",
]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis, tuple of mesh axes, or None (replicated).
LOGICAL_AXIS_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 to take all remaining devices.

    Attributes:
        data: size of the 'data' axis.
        fsdp: size of the 'fsdp' axis.
        tensor: size of the 'tensor' axis.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    @classmethod
    def from_config(cls, config: Any) -> MeshConfig:
        """From a mapping or ConfigDict with (a subset of) the fields above."""
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})

    def axis_sizes(self, num_devices: int) -> tuple[int, int, int]:
        """Sizes of (data, fsdp, tensor) with -1 resolved; their product is `num_devices`.

        Raises:
            ValueError: naming the fields, if more than one is -1, one is 0 or below -1, or
                the sizes do not multiply to `num_devices`.
        """
        sizes = dataclasses.asdict(self)
        fill = [name for name, size in sizes.items() if size == -1]
        bad = [f"{name}={size}" for name, size in sizes.items() if size == 0 or size < -1]
        if bad or len(fill) > 1:
            raise ValueError(f"mesh sizes must be positive, with at most one -1; got {sizes}")
        fixed = math.prod(size for size in sizes.values() if size != -1)
        if fill:
            if num_devices % fixed:
                raise ValueError(f"mesh {sizes}: {num_devices} devices are not divisible by "
                                 f"the fixed axes' product {fixed}")
            sizes[fill[0]] = num_devices // fixed
        if math.prod(sizes.values()) != num_devices:
            raise ValueError(f"mesh {sizes} has {math.prod(sizes.values())} devices, but "
                             f"{num_devices} are available; set one axis to -1 to fill")
        return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes `MESH_AXES` over `devices` (default: all devices of all processes).

    Axes are `Auto`: shardings are given explicitly at jit boundaries and the compiler
    propagates them inside.
    """
    devices = jax.devices() if devices is None else list(devices)
    sizes = config.axis_sizes(len(devices))
    return jax.make_mesh(sizes, MESH_AXES, (jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def logical_to_mesh_spec(logical: Sequence[str | None] | None, shape: Sequence[int],
                         mesh: Mesh | AbstractMesh,
                         rules: Mapping[str, Any] = LOGICAL_AXIS_RULES) -> P:
    """The mesh PartitionSpec of an array from its logical names.

    Args:
        logical: one logical name (or None) per dimension, e.g. ('embed', 'mlp'); None or ()
            for a replicated array.
        shape: the array's shape; same length as `logical` unless `logical` is empty.
        mesh: the mesh (or abstract mesh), for axis sizes.
        rules: logical name -> mesh axis name, tuple of names, or None.

    Returns:
        A PartitionSpec of mesh axes with one entry per dimension. A dimension not divisible
        by its mesh axes' total size is replicated (None), as is one whose mesh axes an earlier
        dimension already uses.

    Raises:
        ValueError: if a logical name has no rule, or `logical` and `shape` differ in length.
    """
    if not logical:
        return P(*(None,) * len(shape))
    if len(logical) != len(shape):
        raise ValueError(f"logical names {tuple(logical)} do not match the rank of shape "
                         f"{tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, size in zip(logical, shape):
        axes = _mesh_axes(name, rules)
        if not axes or used & set(axes) or size % math.prod(mesh.shape[a] for a in axes):
            spec.append(None)
            continue
        used |= set(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def mesh_in_context() -> AbstractMesh | None:
    """The multi-device mesh in context (`jax.set_mesh`, `jax.sharding.use_abstract_mesh`;
    the Trainer traces its steps under its mesh) with this library's `MESH_AXES`, or None:
    no mesh, one device, other axis names, or inside a shard_map (some axis Manual: the
    arrays there are already local)."""
    mesh = jax.sharding.get_abstract_mesh()
    if (mesh.empty or mesh.size <= 1 or mesh.manual_axes
            or not set(MESH_AXES) <= set(mesh.axis_names)):
        return None
    return mesh


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """x with its sharding pinned to its logical names on the mesh in context (a no-op
    without one, see `mesh_in_context`).

    Activations need this where XLA's propagation would otherwise follow the FSDP-sharded
    weights: without it, on a mesh with fsdp > 1 the residual stream ends up split along
    d_model and [B, T, D] activations are all-gathered around every block.
    """
    mesh = mesh_in_context()
    if mesh is None:
        return x
    spec = logical_to_mesh_spec(logical, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _mesh_axes(name: str | None, rules: Mapping[str, Any]) -> tuple[str, ...]:
    """Mesh axes of one logical name, as a tuple (empty for replicated)."""
    if name is None:
        return ()
    if name not in rules:
        raise ValueError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES "
                         f"{dict(rules)}; add one there")
    axes = rules[name]
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def tree_shardings(abstract: Any, logical_specs: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree of arrays from a matching pytree of logical specs.

    Args:
        abstract: pytree of arrays or `jax.ShapeDtypeStruct`s.
        logical_specs: the same structure with a PartitionSpec (or tuple) of logical names, or
            None, at each leaf (e.g. `nnx.to_pure_dict(nnx.get_partition_spec(state))`).
        mesh: the mesh.

    Returns:
        The same structure with a `NamedSharding` at each leaf.
    """
    def one(spec, leaf):
        return NamedSharding(mesh, logical_to_mesh_spec(spec, leaf.shape, mesh))

    return jax.tree.map(one, logical_specs, abstract,
                        is_leaf=lambda x: x is None or isinstance(x, (P, tuple)))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of an array copied to every device of `mesh`."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of [B, ...] batch arrays: B split over `BATCH_AXES`, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global arrays sharded by `batch_sharding`.

    Args:
        batch: arrays [B / process_count, ...], this process's rows in process order (as
            `data.BatchIterator` gives them).
        mesh: the mesh.

    Returns:
        Global arrays [B, ...].

    Raises:
        ValueError: if B is not divisible by the size of the batch axes.
    """
    sharding = batch_sharding(mesh)
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    out = {}
    for key, value in batch.items():
        global_rows = value.shape[0] * jax.process_count()
        if global_rows % shards:
            raise ValueError(f"batch size {global_rows} is not divisible by the mesh's batch "
                             f"axes {BATCH_AXES} of total size {shards}")
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out
