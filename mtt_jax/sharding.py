"""Mesh, logical axis rules and shardings for the train state and the batch.

The mesh has three axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with parameters,
gradients and optimizer state sharded, ZeRO-3 style) and ``tensor`` (Megatron-style model parallelism
over MLP hidden units, attention heads and the vocabulary). Modules name their axes logically
(`mtt_jax.models.layers`); the rules below map logical names to mesh axes. A mesh axis is used at most
once per array: flax skips a rule whose mesh axis is already taken, so activations ``(batch, length,
embed)`` put ``fsdp`` on the batch and replicate ``embed``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mtt_jax.specs import example_axis

MESH_AXES = ("data", "fsdp", "tensor")
DATA_AXIS = "data"
BATCH_AXES = (DATA_AXIS, "fsdp")

# In the manner of T5X's standard_logical_axis_rules. Flax applies the rules in order and skips one whose
# mesh axes are already taken in the array, so ``mlp -> (fsdp, tensor)`` shards the MLP bias over both
# axes, while in the kernels ``embed`` has claimed ``fsdp`` first and ``mlp`` falls back to ``tensor``.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("task", None),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", ("fsdp", "tensor")),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),       # the stacked blocks of model.scan_layers
)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Resolves ``-1`` (at most one) so that the product of the axes is ``num_devices``."""
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: use positive sizes and at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"but {num_devices} are available")
    return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh over all devices, or the first ``mesh_config.num_devices``."""
    devices = list(devices if devices is not None else jax.devices())
    if mesh_config.get("num_devices", -1) > 0:
        devices = devices[:mesh_config["num_devices"]]
    shape = mesh_shape(mesh_config, len(devices))
    # Auto axes: shardings are propagated by the compiler from the constraints we give (GSPMD).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def logical_rules(rules: Sequence[Sequence[Any]] | None = None) -> tuple[tuple[str, Any], ...]:
    """Rules as a tuple of ``(logical_name, mesh_axes)``; config lists become tuples. A rule that is not
    such a pair, or names an axis the mesh does not have, is a one-line ValueError."""
    if not rules:
        return DEFAULT_RULES
    checked = []
    for rule in rules:
        if isinstance(rule, str) or len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"axis_rules entry {rule!r} is not a (logical name, mesh axes) pair, e.g. "
                             "('embed', 'fsdp')")
        name, axes = rule
        axes = tuple(axes) if isinstance(axes, list) else axes
        for axis in (axes,) if axes is None or isinstance(axes, str) else axes:
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"axis_rules entry {rule!r} names mesh axis {axis!r}; the mesh axes are "
                                 f"{', '.join(MESH_AXES)} (or None: replicated)")
        checked.append((name, axes))
    return tuple(checked)


def tree_shardings(abstract_boxed_tree: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree whose leaves may be flax logically partitioned boxes.

    Leaves without logical names (step counters, scalars) are replicated.
    """
    specs = nn.get_partition_spec(abstract_boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def check_divisible(abstract_tree: Any, shardings: Any) -> None:
    """Raises a one-line ValueError naming the first leaf with a dimension that its mesh axes do not
    divide (e.g. 4 attention heads over ``tensor`` = 8), before anything is initialised or compiled."""
    def check(path, leaf, leaf_sharding):
        for axis, (size, names) in enumerate(zip(leaf.shape, leaf_sharding.spec)):
            names = (names,) if isinstance(names, str) else tuple(names or ())
            devices = math.prod(leaf_sharding.mesh.shape[name] for name in names)
            if size % devices:
                raise ValueError(
                    f"{jax.tree_util.keystr(path, simple=True, separator='/')} of shape {list(leaf.shape)} "
                    f"splits axis {axis} (size {size}) over {' x '.join(names)} = {devices} devices, "
                    f"which does not divide it; choose mesh sizes that divide the model's dimensions")
    jax.tree_util.tree_map_with_path(check, nn.unbox(abstract_tree), shardings)


def batch_partition_specs(batch: Mapping[str, Any], layout: str, axes: Sequence[str] = BATCH_AXES) -> Any:
    """The example axis of every leaf over ``axes``; multi-input inputs keep the task axis whole."""
    def spec(path, leaf):
        axis = batch_axis(path, layout)
        return P(*([None] * axis), tuple(axes), *([None] * (np.ndim(leaf) - axis - 1)))
    return jax.tree_util.tree_map_with_path(spec, batch)


def batch_shardings(host_batch: Mapping[str, Any], mesh: Mesh, layout: str) -> Any:
    """Examples are split over ``data`` x ``fsdp``."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), batch_partition_specs(host_batch, layout),
                        is_leaf=lambda x: isinstance(x, P))


def data_is_manual() -> bool:
    """Whether the code is being traced inside a `jax.shard_map` manual over ``data`` (the data-parallel
    microbatch loop, `train_step.scan_microbatches`)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and DATA_AXIS in mesh.manual_axes


def rules_without(rules: Sequence[Sequence[Any]], axis: str) -> tuple[tuple[str, Any], ...]:
    """``rules`` with mesh axis ``axis`` removed: the rules inside a `jax.shard_map` manual over it."""
    def drop(axes):
        if isinstance(axes, (tuple, list)):
            kept = tuple(a for a in axes if a != axis)
            return kept or None
        return None if axes == axis else axes
    return tuple((name, drop(axes)) for name, axes in rules)


def batch_axis(path, layout: str) -> int:
    """The example axis of the batch leaf at ``path`` (`specs.example_axis` of its top-level field)."""
    return example_axis(path[0].key, layout)


def process_slice(host_batch: Any, layout: str) -> Any:
    """This process's contiguous share of the global batch's examples."""
    count, index = jax.process_count(), jax.process_index()

    def take(path, leaf):
        axis = batch_axis(path, layout)
        size = leaf.shape[axis] // count
        return np.take(leaf, np.arange(index * size, (index + 1) * size), axis=axis)
    return jax.tree_util.tree_map_with_path(take, host_batch)


def shard_local_batch(local_batch: Any, shardings: Any, layout: str) -> Any:
    """Global jax.Arrays from this process's rows (``Source.train_batch(..., shard=process_shard())``)."""
    count = jax.process_count()

    def global_array(path, sharding, leaf):
        axis = batch_axis(path, layout)
        shape = leaf.shape[:axis] + (leaf.shape[axis] * count,) + leaf.shape[axis + 1:]
        return jax.make_array_from_process_local_data(sharding, leaf, shape)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf, sharding: global_array(path, sharding, leaf), local_batch, shardings)


def process_shard() -> tuple[int, int]:
    """``(index, count)`` of this process, the ``shard`` argument of ``Source.train_batch``."""
    return jax.process_index(), jax.process_count()


def shard_batch(global_host_batch: Any, shardings: Any, layout: str) -> Any:
    """Global jax.Arrays from each process's slice of a global numpy batch."""
    local = process_slice(global_host_batch, layout)
    return jax.tree.map(
        lambda sharding, local_leaf, global_leaf: jax.make_array_from_process_local_data(
            sharding, local_leaf, global_leaf.shape),
        shardings, local, global_host_batch)


def check_batch_divisible(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
        raise ValueError(f"{what}={batch_size} is not divisible by data x fsdp = {shards} shards")
