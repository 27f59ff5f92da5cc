"""Devices: the mesh, the shardings of state and batches, and multi-host start-up.

The mesh has two axes: `data` (data parallel) and `fsdp` (parameter sharding for large
models, size `config.mesh.fsdp`, 1 by default). A global batch is split over every device
(both axes); each parameter, optimizer-state and BatchNorm leaf of at least
`config.mesh.fsdp_min_size` elements is split along one of its dimensions over `fsdp` and
replicated over `data`; smaller leaves are replicated. The jitted steps see global arrays,
so XLA inserts the collectives: every loss is a mean over the global batch, hence the
per-objective gradients the aggregation combines are exactly the global-batch gradients,
and BatchNorm's batch statistics cover the global batch too.

Axis types are `Auto` (sharding propagated by the compiler from the inputs' and outputs'
shardings) rather than JAX's newer default `Explicit`, which would make every intermediate
sharding part of the program's types: the models and aggregators are written for any mesh
and need not know it.
"""

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mokd_jax.errors import invalid

AXES = ("data", "fsdp")


def make_mesh(fsdp: int, devices: list | None = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all of them, every process's)."""
    devices = jax.devices() if devices is None else devices
    if fsdp < 1 or len(devices) % fsdp:
        raise invalid("mesh.fsdp", fsdp, f"a divisor of the device count {len(devices)}")
    return jax.make_mesh(
        (len(devices) // fsdp, fsdp), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def leaf_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> PartitionSpec:
    """FSDP for one leaf: its largest dimension divisible by `fsdp` is split over the
    `fsdp` axis when the leaf has at least `min_size` elements; otherwise replicated.

    The largest dimension keeps the shards few and large (a conv kernel HWIO is split over
    its output channels, a Dense kernel over its wider side).
    """
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    candidates = [axis for axis, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda a: shape[a])
    return PartitionSpec(*([None] * axis), "fsdp")


def tree_shardings(mesh: Mesh, abstract_tree: Any, min_size: int) -> Any:
    """The NamedSharding of every leaf of `abstract_tree` (arrays or ShapeDtypeStructs)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, leaf_spec(tuple(leaf.shape), fsdp, min_size)),
        abstract_tree,
    )


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings: what Orbax restores each leaf onto."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_tree,
        shardings,
    )


def global_batch(local_batch: Any, sharding: NamedSharding) -> Any:
    """This process's rows of a batch (any pytree of arrays with the batch axis first: a
    tuple of arrays, a `DetectionBatch`) -> the same pytree of global arrays sharded over
    the mesh (an explicit host-to-device transfer, allowed under
    `jax.transfer_guard('disallow')`)."""
    return jax.tree.map(
        lambda array: jax.make_array_from_process_local_data(sharding, array), local_batch
    )


def check_batch_size(field: str, batch_size: int, mesh: Mesh) -> None:
    if batch_size % mesh.size:
        raise invalid(field, batch_size, f"a multiple of the device count {mesh.size}")


def variables_sharding(variables: Any) -> Any:
    """The shardings that placed `variables` (global jax arrays)."""
    return jax.tree.map(lambda leaf: leaf.sharding, variables)


def place_variables(variables: Mapping[str, Any], mesh: Mesh, min_size: int) -> dict:
    """Model variables onto the mesh, FSDP-sharded like the train state."""
    return jax.device_put(dict(variables), tree_shardings(mesh, variables, min_size))


def compiled_step(
    step_fn: Callable,
    state_shardings: Any,
    mesh: Mesh,
    extra_shardings=(),
    batch_arguments: int = 2,
):
    """`step_fn(state, *extra, *batch)` jitted over the mesh, state donated. `batch` is
    `batch_arguments` pytrees whose every leaf is split along its leading axis:
    classification's (images, labels), detection's one `DetectionBatch`."""
    batch = batch_sharding(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, *extra_shardings, *(batch,) * batch_arguments),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
    )


def device_batches(
    dataset, batch_size: int, seed: int, start_step: int, mesh: Mesh
) -> Iterator[tuple[jax.Array, ...]]:
    """Global training batches (each a pytree, as `dataset.train_batches` yields it)
    sharded over the mesh; each process reads and places only its part of each."""
    sharding = batch_sharding(mesh)
    local = dataset.train_batches(
        batch_size,
        seed,
        start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return (global_batch(batch, sharding) for batch in local)


# Environment variables that say this process is one of several: set by the Cloud TPU
# runtime on a pod slice (the worker list), by SLURM, or by hand (the coordinator address
# that `jax.distributed.initialize` reads, with the process count and this process's index).
_TPU_WORKERS = "TPU_WORKER_HOSTNAMES"
_SLURM_TASKS = "SLURM_NTASKS"
_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
_NUM_PROCESSES = "JAX_NUM_PROCESSES"
_PROCESS_ID = "JAX_PROCESS_ID"


def is_multi_process_launch(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process was launched as one of several hosts of one job."""
    if environ.get(_COORDINATOR):
        return True
    if len([h for h in environ.get(_TPU_WORKERS, "").split(",") if h]) > 1:
        return True
    return int(environ.get(_SLURM_TASKS, "1") or 1) > 1


def distributed_arguments(environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """The process count and index of a launch by hand (JAX_COORDINATOR_ADDRESS with
    JAX_NUM_PROCESSES and JAX_PROCESS_ID), which JAX cannot detect; {} otherwise, where
    `jax.distributed.initialize` finds them itself (TPU pod slices, SLURM)."""
    if not environ.get(_COORDINATOR):
        return {}
    arguments = {}
    for name, argument in ((_NUM_PROCESSES, "num_processes"), (_PROCESS_ID, "process_id")):
        value = environ.get(name, "")
        if not value.isdigit():
            raise invalid(name, value, f"a non-negative integer when {_COORDINATOR} is set")
        arguments[argument] = int(value)
    if arguments["process_id"] >= arguments["num_processes"]:
        raise invalid(
            _PROCESS_ID,
            arguments["process_id"],
            f"below {_NUM_PROCESSES}={arguments['num_processes']}",
        )
    return arguments


def initialize_distributed(environ: Mapping[str, str] = os.environ) -> None:
    """`jax.distributed.initialize()` on a multi-host launch, before any device is used; a
    single-host launch skips it."""
    if is_multi_process_launch(environ):
        jax.distributed.initialize(**distributed_arguments(environ))
