"""Data parallelism: the device mesh, where batches and state live, and the multi-process runtime.

One code path serves a laptop CPU, a single-chip TPU and an 8-device host: jit compiles the step for
whatever shardings its inputs carry (SPMD), so the training code never says how many devices there
are. Batches are split along a 1-D mesh axis named "data"; the model and optimizer state are
replicated, and XLA inserts the gradient all-reduce where the batch mean needs it.

Beyond one host, JAX's multi-controller runtime runs one copy of the program per host: each process
reads its own shard of the data and contributes its rows to the global batch.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


class ShardingError(ValueError):
    """A batch that cannot be split evenly over the devices."""


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Starts JAX's multi-controller runtime; must run before anything touches a device.

    With no arguments JAX detects the cluster itself (Cloud TPU pod slices, SLURM, Open MPI);
    elsewhere, every process is given the coordinator's `host:port`, the process count and its own
    index (the README shows two processes on one machine).
    """
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(coordinator_address, num_processes, process_id)


def data_mesh() -> Mesh:
    """A 1-D mesh over every device of every process, batch axis first."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Fails early, with the numbers, when the global batch does not split evenly."""
    devices = mesh.devices.size
    if batch_size % devices:
        raise ShardingError(
            f"--batch-size {batch_size} does not split over {devices} devices; "
            f"use a multiple of {devices}"
        )


def local_batch_size(batch_size: int) -> int:
    """The rows of a global batch that this process loads (its devices' share)."""
    return batch_size // jax.process_count()


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places this process's rows of a global batch on its devices, split along the batch axis."""
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(rows))
        for name, rows in batch.items()
    }


def replicate(*nodes: nnx.Module | nnx.Object, mesh: Mesh) -> None:
    """Copies the state of NNX objects (model, optimizer, metrics) to every device, in place."""
    replicated = NamedSharding(mesh, P())
    for node in nodes:
        state = nnx.state(node)
        nnx.update(node, jax.device_put(state, replicated))
