"""Mesh and sharding rules of `bitlaws.train`: data parallelism plus optional FSDP-style parameter sharding.

The mesh has two axes, ``("data", "params")``, both of `jax.sharding.AxisType.Auto` so that plain `jax.jit`
sharding propagation applies (``jax.make_mesh`` defaults to explicit axes in this jax). Rules:

* batch: every leaf sharded over ``data`` on its leading (batch) axis, replicated over ``params``;
* parameters, optimizer state, EMA and frozen values: replicated, except arrays of at least ``min_size``
  elements, which are sharded over ``params`` on their largest axis divisible by the axis size (the first such
  on ties; XLA inserts the all-gathers). Arrays with no divisible axis stay replicated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

if TYPE_CHECKING:
    from bitlaws.train.loop import TrainConfig

DATA = "data"
PARAMS = "params"


def make_mesh(config: "TrainConfig") -> Mesh:
    """The ``(data, params)`` mesh of ``config.mesh_data x config.mesh_params`` devices.

    ``mesh_data = -1`` takes all devices not used by the parameter axis. In a single process the mesh may
    use the first devices only (e.g. 1 of 4); across processes it must use all of them.

    Raises:
        ValueError: the sizes do not fit the devices (names ``mesh_data`` / ``mesh_params``).
    """
    devices = jax.devices()
    count = len(devices)
    if count % config.mesh_params:
        raise ValueError(f"TrainConfig.mesh_params={config.mesh_params} does not divide the {count} devices")
    data = count // config.mesh_params if config.mesh_data == -1 else config.mesh_data
    used = data * config.mesh_params
    if used > count or (used < count and jax.process_count() > 1):
        raise ValueError(f"TrainConfig.mesh_data={config.mesh_data} x mesh_params={config.mesh_params} = {used} "
                         f"devices, but there are {count}" + (" (multi-host meshes use all devices)"
                                                              if jax.process_count() > 1 else ""))
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((data, config.mesh_params), (DATA, PARAMS), auto, devices=devices[:used])


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over ``data``; the other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def param_spec(shape: tuple[int, ...], axis_size: int, min_size: int) -> PartitionSpec:
    """The `PartitionSpec` of one parameter-like array of `shape` (see the module docstring).

    Args:
        shape: The array's shape.
        axis_size: Devices on the ``params`` axis.
        min_size: Arrays with fewer elements stay replicated.
    """
    if axis_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    divisible = [axis for axis, size in enumerate(shape) if size % axis_size == 0]
    if not divisible:
        return PartitionSpec()
    axis = max(divisible, key=lambda a: (shape[a], -a))
    return PartitionSpec(*([None] * axis + [PARAMS]))


def param_shardings(tree: Any, mesh: Mesh, min_size: int) -> Any:
    """`NamedSharding` per leaf of `tree` (arrays or `jax.ShapeDtypeStruct`) by `param_spec`."""
    axis_size = mesh.shape[PARAMS]
    return jax.tree.map(lambda leaf: NamedSharding(mesh, param_spec(tuple(np.shape(leaf)), axis_size, min_size)),
                        tree)


def check_batch(batch: Any, mesh: Mesh) -> None:
    """Raises ValueError naming the batch size when a leaf's leading axis does not split over ``data``."""
    size = mesh.shape[DATA]
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = np.shape(leaf)
        if not shape or shape[0] % size:
            got = f"batch size {shape[0]}" if shape else "a scalar"
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path) or '<root>'} has {got}, not divisible by the "
                             f"{size} devices of the '{DATA}' mesh axis (TrainConfig.mesh_data)")


def put(tree: Any, shardings: Any, *, copy: bool = True) -> Any:
    """Places `tree` (host or device arrays) with `shardings` (a tree of them, or one for all leaves).

    Args:
        tree: The values. With several processes every process must hold the same global values (a
            deterministic `get_batch`, the same initial parameters); each places its addressable shards.
        shardings: `jax.sharding.Sharding` per leaf, or a prefix of `tree`.
        copy: Always make new buffers (so the caller's arrays survive donation); else arrays already
            placed as asked are kept.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings, may_alias=False if copy else None)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def place(leaf, sharding):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:  # already a global array
            return jax.device_put(leaf, sharding, may_alias=False if copy else None)
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree, shardings)
