"""Where the processes of a multi-process run wait for one another, and how such a wait ends.

Before it trains, a multi-process run waits for its other processes twice: while it joins JAX's
distributed runtime (`join`: every process registers with the coordinator, process 0) and where
process 0 decides for all what only one may do, such as taking the workdir's lock (`meet`, for
`parallel.decided_by_process_0`). Each wait ends after `--distributed-timeout` seconds with one
line that names the processes that did not arrive, instead of lasting forever. A meeting goes
through the coordination service's key-value store rather than an XLA collective, which cannot
time out: once it is over, every process is known to be there, and the first meeting ends in a
collective that connects them (`_first_collective`) for those that follow (the replicated state,
every train step).

From `join` on, a SIGTERM (what a scheduler's cancel sends first) or a second Ctrl-C ends the
process at once with one line, exit status 143 or 130, even while it waits inside XLA for a
process that is gone (`_end_at_once_on_stop_requests`); the workdir locks it holds are released
first. (The first Ctrl-C of a training run asks the epoch loop to stop after the batch:
`housekeeping.stop_on_ctrl_c`.) JAX's preemption service takes SIGTERM for a handler of its own
as the process joins (for preemption sync points, which this project does not use); `join` takes
it back. A process that gave up waiting exits without JAX's shutdown, whose barrier would wait for
the missing process once more.

jaxlib 0.12.1 workaround (`_same_program_on_every_process`): there a collective's processes meet
only if their executables have the same fingerprint, and the fingerprint covers the Python call
stack that JAX records in the program (source locations); jaxlib 0.12.0 and older meet regardless.
docs/design.md ("Several devices and hosts") has the cause and the evidence.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import distributed as jax_distributed
from jax._src.lib import version as jaxlib_version  # a tuple of ints
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mnist_flax import workdir_lock
from mnist_flax.config import DISTRIBUTED_TIMEOUT_S

EXIT_NOT_ARRIVED = 2  # as the command's other one-line errors
EXIT_CTRL_C = 130
EXIT_SIGTERM = 143
_KEYS = "mnist_flax/meetings"
# JAX aborts the process (a C++ fatal error with its stack) when its own join timeout expires, so
# it is given this much longer than ours.
_JAX_JOIN_MARGIN_S = 60

_timeout_s = DISTRIBUTED_TIMEOUT_S  # this run's, set by `join`
# Meetings are numbered in the order each process holds them: the same on every process.
_meetings = itertools.count()
_connected = False  # whether `_first_collective` ran
# The signals' wakeup descriptor and its reading end (`_end_at_once_on_stop_requests`), kept open
# while the process runs.
_stop_requests: tuple[socket.socket, socket.socket] | None = None
_interrupts = 0  # Ctrl-Cs read from that descriptor


class NotArrived(ValueError):
    """A process did not join, or did not arrive at a meeting, within the timeout."""


def join(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: float,
) -> None:
    """`jax.distributed.initialize`, given up after `timeout_s` seconds with NotArrived.

    Arguments as `jax.distributed.initialize`'s (all None: JAX detects the cluster). From here on
    the process ends at once on SIGTERM or a second Ctrl-C, and `timeout_s` is every meeting's.
    """
    global _timeout_s
    _timeout_s = timeout_s
    _same_program_on_every_process()
    _end_at_once_on_stop_requests()
    joined = threading.Event()
    failed: list[BaseException] = []

    def connect() -> None:
        try:
            jax.distributed.initialize(
                coordinator_address,
                num_processes,
                process_id,
                initialization_timeout=int(timeout_s) + _JAX_JOIN_MARGIN_S,
            )
        except BaseException as error:  # raised again in the main thread
            failed.append(error)
        joined.set()

    # The main thread waits in Python, where Ctrl-C reaches it; JAX waits in its own thread.
    threading.Thread(target=connect, name="mnist-flax join", daemon=True).start()
    if not _wait_until(joined.is_set, timeout_s):
        _exit_without_jax_shutdown(EXIT_NOT_ARRIVED)
        raise NotArrived(_not_joined(coordinator_address, num_processes, process_id, timeout_s))
    if failed:
        raise failed[0]
    _take_sigterm()  # back from JAX's preemption service, which took it as it joined


def meet(subject: str, announcement: str | None = None, *, leaving: bool = False) -> str:
    """Waits until every process has arrived here; returns what process 0 announced.

    Process 0 passes `announcement`, the others None. With `leaving`, process 0 announces and
    goes on at once, and the others return as soon as they read it (process 0 is stopping).
    A process still missing after the timeout is named in NotArrived's line; `subject` says
    where they were to meet.
    """
    client = jax_distributed.global_state.client
    me, count = jax.process_index(), jax.process_count()
    keys = f"{_KEYS}/{next(_meetings)}/"
    if me == 0:
        client.key_value_set(keys + "announced", announcement)
        if leaving:
            client.key_value_set(keys + "leaving", "")
            return announcement
    client.key_value_set(keys + f"arrived/{me}", "")
    found: dict[str, str] = {}

    def arrived() -> list[int]:
        found.clear()
        found.update(client.key_value_dir_get(keys))
        return [int(key.rsplit("/", 1)[1]) for key in found if key.startswith(keys + "arrived/")]

    if not _wait_until(lambda: len(arrived()) == count or keys + "leaving" in found, _timeout_s):
        missing = sorted(set(range(count)) - set(arrived()))
        _exit_without_jax_shutdown(EXIT_NOT_ARRIVED)
        raise NotArrived(
            f"process {me} of {count} waited {_timeout_s:g} s (--distributed-timeout) {subject} "
            f"for {_processes(missing)}, which did not arrive; see the output of "
            f"{_processes(missing)}, or raise --distributed-timeout"
        )
    _first_collective()
    return found[keys + "announced"]


def _first_collective() -> None:
    """A sum over every device of every process, once, right after every process arrived.

    XLA:CPU connects the processes' gloo collectives in their first collective, where a process
    waits at most 30 s for the others and then fails with a traceback; left to the replicated
    state, that wait would include the slowest process's model build. Later collectives wait as
    long as they must.
    """
    global _connected
    if not _connected:
        mesh = Mesh(np.asarray(jax.devices()), ("all",))
        ones = jax.make_array_from_process_local_data(
            NamedSharding(mesh, P("all")), np.ones(jax.local_device_count(), np.int32)
        )
        jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(ones).block_until_ready()
        _connected = True


def _wait_until(done: Callable[[], bool], timeout_s: float) -> bool:
    """Whether `done()` came true within `timeout_s`; asks ever less often, up to twice a second.

    The wait is in Python, so Ctrl-C raises KeyboardInterrupt here; the process then exits
    without JAX's shutdown too. It is raised by this loop, from the count the stop watch keeps,
    not by Python's handler: that one raises it wherever the main thread is, and inside a garbage
    collection's callback (JAX has one) the interrupt is printed as ignored and lost."""
    deadline = time.monotonic() + timeout_s
    pause = 0.01
    seen = _interrupts
    with _ctrl_c_counted_only():
        try:
            while not done():
                if _interrupts > seen:
                    raise KeyboardInterrupt
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                time.sleep(min(pause, left))
                pause = min(2 * pause, 0.5)
        except KeyboardInterrupt:
            _exit_without_jax_shutdown(EXIT_CTRL_C)
            raise
    return True


@contextlib.contextmanager
def _ctrl_c_counted_only() -> Iterator[None]:
    """Inside, SIGINT's Python handler does nothing: the stop watch counts it (where there is one)."""
    if _stop_requests is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _exit_without_jax_shutdown(status: int) -> None:
    """Makes the process exit with `status` once its error line is out, before JAX's shutdown,
    whose barrier would wait for the missing process once more (registered last, this exit
    handler runs before every other)."""

    def exit_now() -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(status)

    atexit.register(exit_now)


def _not_joined(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    timeout_s: float,
) -> str:
    """Who did not join, as far as this process can tell: JAX names no one."""
    waited = f"waited {timeout_s:g} s (--distributed-timeout)"
    if num_processes is None:  # --distributed: the cluster says who is who
        return (
            f"this process {waited} to join the cluster's run; start every process of the job, "
            "or check the cluster's settings"
        )
    others = [index for index in range(num_processes) if index != process_id]
    at = f"at {coordinator_address}"
    if process_id == 0:
        return (
            f"process 0 of {num_processes} {waited} for {_processes(others)} to join {at}; start "
            f"{_processes(others)} with the same --coordinator-address and --num-processes "
            f"{num_processes}"
        )
    if not _reachable(coordinator_address):
        return (
            f"process {process_id} of {num_processes} {waited} for process 0, the coordinator, "
            f"{at}, which does not answer; start it there, or check --coordinator-address"
        )
    others.remove(0)
    return (
        f"process {process_id} of {num_processes} {waited} to join {at}: process 0 answers, but "
        f"not all of {_processes(others)} joined; start {_processes(others)} with the same "
        f"--coordinator-address and --num-processes {num_processes}"
    )


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def _processes(indices: list[int]) -> str:
    if len(indices) == 1:
        return f"process {indices[0]}"
    return f"processes {', '.join(map(str, indices))}"


def _same_program_on_every_process() -> None:
    """Keeps the Python call stack out of compiled programs, where jaxlib 0.12.1 needs it out.

    There a collective's processes meet only if their executables' fingerprints are equal, and
    the fingerprint covers the call stack JAX records in the program: processes that reach one
    collective through different lines, or a process 0 that loads it from the persistent
    compilation cache (keyed without that stack) where the others compile it, wait for each
    other forever. With no stack recorded the programs are equal; keying the cache on what is
    recorded keeps out entries compiled before this setting.
    """
    if tuple(jaxlib_version) >= (0, 12, 1):
        jax.config.update("jax_traceback_in_locations_limit", 0)
        jax.config.update("jax_compilation_cache_include_metadata_in_key", True)


def _end_at_once_on_stop_requests() -> None:
    """From here on SIGTERM, or a second Ctrl-C, ends the process at once, wherever it waits.

    Python runs a signal's handler in the main thread between two bytecodes, never while that
    thread waits inside XLA (a collective whose other process is gone). Python's own C-level
    handler also writes the signal's number to the wakeup file descriptor, at once; a thread
    reading it releases the workdir locks this process holds, prints the line and exits.
    """
    global _stop_requests
    if _stop_requests is not None or threading.current_thread() is not threading.main_thread():
        return
    _stop_requests = reader, writer = socket.socketpair()
    writer.setblocking(False)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    _take_sigterm()
    threading.Thread(target=_watch, args=(reader,), name="mnist-flax stop", daemon=True).start()


def _take_sigterm() -> None:
    """Gives SIGTERM a handler of Python's own, so that it reaches the wakeup descriptor."""
    if _stop_requests is not None:  # only the main thread sets handlers
        signal.signal(signal.SIGTERM, lambda signum, frame: None)


def _watch(reader: socket.socket) -> None:
    global _interrupts
    while True:
        for number in reader.recv(64):
            if number == signal.SIGTERM:
                _end_at_once("SIGTERM", EXIT_SIGTERM)
            if number == signal.SIGINT:
                _interrupts += 1
                if _interrupts >= 2:
                    _end_at_once("a second Ctrl-C", EXIT_CTRL_C)


def _end_at_once(cause: str, status: int) -> None:
    # From JAX's own record: during the join, `jax.process_count()` would start the backend, which
    # asks the coordinator for what it does not have yet and aborts the process.
    state = jax_distributed.global_state
    who = ""
    if state.client is not None:
        who = f" (process {state.process_id} of {state.num_processes})"
    workdir_lock.release_held()
    _flush_within(1.0)
    os.write(2, f"stopped at once by {cause}{who}\n".encode())
    os._exit(status)


def _flush_within(seconds: float) -> None:
    """Flushes what this process printed, unless the main thread holds a stream's lock."""

    def flush() -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()

    flusher = threading.Thread(target=flush, daemon=True)
    flusher.start()
    flusher.join(seconds)
