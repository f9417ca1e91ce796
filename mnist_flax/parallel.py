"""Data parallelism: the device mesh, where batches and state live, and the multi-process runtime.

One code path serves a laptop CPU, a single-chip TPU and an 8-device host: jit compiles the step for
whatever shardings its inputs carry (SPMD), so the training code never says how many devices there
are. Batches are split along a 1-D mesh axis named "data"; the model and optimizer state are
replicated, and XLA inserts the gradient all-reduce where the batch mean needs it.

Beyond one host, JAX's multi-controller runtime runs one copy of the program per host: each process
reads its own shard of the data and contributes its rows to the global batch. Every process must
run the same jitted steps in the same order (each step is a collective over all devices), so every
process steps through the same number of batches, padding its shard where it is shorter. Joining
and the processes' meetings, each with a timeout, are `rendezvous.py`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mnist_flax import rendezvous
from mnist_flax.config import DISTRIBUTED_TIMEOUT_S

DATA_AXIS = "data"
# What `decided_by_process_0` tells the other processes when process 0's decision failed.
_FAILED = -1


class ShardingError(ValueError):
    """A batch that cannot be split evenly over the devices."""


class DistributedError(ValueError):
    """Incomplete or inconsistent multi-process options."""


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: float = DISTRIBUTED_TIMEOUT_S,
) -> None:
    """Starts JAX's multi-controller runtime; must run before anything touches a device.

    With no arguments JAX detects the cluster itself (Cloud TPU pod slices, SLURM, Open MPI, or
    the JAX_COORDINATOR_ADDRESS environment variable); elsewhere every process is given the
    coordinator's `host:port` (process 0 listens there), the process count and its own index.
    `timeout_s`: how long this process waits for the others to join, and at each meeting
    (`rendezvous.join`), before it stops with a line naming those that did not arrive.
    """
    manual = (coordinator_address, num_processes, process_id)
    if any(value is not None for value in manual) and None in manual:
        raise DistributedError(
            "--coordinator-address, --num-processes and --process-id go together; pass all three "
            "(or --distributed alone to detect a TPU pod / SLURM / MPI cluster)"
        )
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise DistributedError(
            f"--process-id {process_id} must be in 0..{num_processes - 1} (--num-processes "
            f"{num_processes})"
        )
    if not timeout_s > 0:
        raise DistributedError(
            f"--distributed-timeout {timeout_s:g} must be a positive number of seconds"
        )
    if not jax.distributed.is_initialized():
        rendezvous.join(coordinator_address, num_processes, process_id, timeout_s=timeout_s)


def decided_by_process_0(decide: Callable[[], int]) -> int:
    """`decide()` (a count, >= 0) as process 0 computed it, on every process.

    For what the processes must agree on and only one may do: take the workdir's lock, choose
    the checkpoint to resume from, set aside those that do not read. Every process waits here
    until all have arrived (`rendezvous.meet`: a process missing after the timeout is named in
    one line). Where process 0 fails, it raises its own error and the others stop with a line
    pointing at it, instead of waiting in the first collective for a process that left.
    """
    if jax.process_count() == 1:
        return decide()
    if jax.process_index() != 0:
        value = int(rendezvous.meet("at the workdir lock"))
        if value == _FAILED:
            raise DistributedError("process 0 stopped before training; its error line says why")
        return value
    try:
        value = decide()
    except BaseException:
        rendezvous.meet("at the workdir lock", str(_FAILED), leaving=True)
        raise
    rendezvous.meet("at the workdir lock", str(value))
    return value


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process), batch axis first."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


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
    """Places this process's rows of a global batch on its devices, split along the batch axis.

    The global batch is the processes' rows stacked in process order; each process only ever
    holds (and copies to its devices) its own rows.
    """
    sharding = batch_sharding(mesh)
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(rows))
        for name, rows in batch.items()
    }


def local_rows(array: jax.Array, mesh: Mesh) -> np.ndarray:
    """This process's rows of a batch-sharded global array: the inverse of `shard_batch`."""
    return np.asarray(multihost_utils.global_array_to_host_local_array(array, mesh, P(DATA_AXIS)))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of batches and of per-example outputs: rows split over the "data" axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of state every device holds whole (parameters, optimizer state, metrics)."""
    return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """A copy of the pytree `tree` on every device of `mesh`.

    Across processes every process passes its own, identical copy (same seed, same checkpoint),
    and each one fills its own devices.
    """
    return jax.device_put(tree, replicated(mesh))
