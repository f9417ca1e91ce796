"""Data parallelism: 8 simulated CPU devices against 1, and two processes against one.

JAX fixes its device count when the backend starts, so each multi-device or multi-process case
runs in fresh Python processes (8 devices via XLA_FLAGS, 2 processes via the CLI's
--coordinator-address on the loopback address with JAX's gloo CPU collectives). The processes of a
multi-process run wait for one another with a timeout, and stop at once when told to
(`rendezvous.py`): a process alone, a process that hangs, SIGTERM and a second Ctrl-C.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import assert_same_history, block_digits, command_environment, run_code

from mnist_flax import cli, input_pipeline, parallel

TESTS_DIR = pathlib.Path(__file__).parent
EIGHT_DEVICES = "--xla_force_host_platform_device_count=8"

# Runs in a process with 8 CPU devices: the same train steps (and the backbone's feature step) on a
# 1-device mesh and on the 8-device mesh, from the same initial state and batches.
EIGHT_DEVICE_STEPS = """
import json, sys
import jax, numpy as np
from flax import nnx
sys.path.insert(0, sys.argv[1])
from helpers import he_initialise_backbone, quadrant_batches, tiny_model
from mnist_flax import parallel
from mnist_flax.freezing import make_optimizer
from mnist_flax.steps import StepRunner, make_metrics

assert len(jax.devices()) == 8, jax.devices()
batches = quadrant_batches(24, seed=0)
batches[-1]["mask"][5:] = False  # a padded last batch, as at the end of an epoch
results = {}
initial_kernel = None
for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
    mesh = parallel.data_mesh(devices)
    model = tiny_model()
    he_initialise_backbone(model)
    initial_kernel = np.asarray(model.head.kernel[...])
    steps = StepRunner(model, make_optimizer(model, 1e-2), make_metrics(), mesh=mesh)
    for batch in batches:
        placed = parallel.shard_batch(batch, mesh)
        steps.train(placed)
    features = parallel.local_rows(steps.forward(placed["image"], "features"), mesh)
    results[name] = {
        "train": steps.read_metrics(),
        "batch_devices": len(placed["image"].sharding.device_set),
        "state_replicated": all(leaf.sharding.is_fully_replicated
                                for leaf in jax.tree.leaves((steps.model_state, steps.optimizer_state,
                                                             steps.metrics_state))),
        "features_shape": list(features.shape),
    }
    steps.sync()
    results[name]["kernel"] = np.asarray(model.head.kernel[...]).tolist()
    results[name]["bias"] = np.asarray(model.head.bias[...]).tolist()
    results[name]["kernel_change"] = float(np.abs(model.head.kernel[...] - initial_kernel).max())
print(json.dumps(results))
"""


def run_python(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 300):
    result = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_eight_devices_train_like_one():
    """The step compiled for 8 devices (batch sharded, state replicated) matches 1 device."""
    result = run_python(
        ["-c", EIGHT_DEVICE_STEPS, str(TESTS_DIR)], env={"XLA_FLAGS": EIGHT_DEVICES}
    )
    results = json.loads(result.stdout.strip().splitlines()[-1])
    one, eight = results["one"], results["eight"]
    assert one["batch_devices"] == 1 and eight["batch_devices"] == 8
    assert one["state_replicated"] and eight["state_replicated"]
    assert eight["features_shape"] == [8, 1280]
    # The head must have moved, or equal results would prove nothing.
    assert one["kernel_change"] > 1e-3
    for key in ("kernel", "bias"):
        np.testing.assert_allclose(eight[key], one[key], rtol=1e-4, atol=1e-5)
    for metric in ("loss", "accuracy"):
        assert eight["train"][metric] == pytest.approx(one["train"][metric], rel=1e-5, abs=1e-6)


def test_a_batch_the_devices_do_not_divide_is_one_clear_error(tmp_path):
    input_pipeline.write_idx_split(tmp_path / "idx", "train", *block_digits(8, seed=0))
    input_pipeline.write_idx_split(tmp_path / "idx", "t10k", *block_digits(8, seed=1))
    command = [
        "-m", "mnist_flax", "train", "--image-size", "32", "--alpha", "0.35",
        "--weights", "none", "--batch-size", "12", "--data-dir", str(tmp_path / "idx"),
        "--workdir", str(tmp_path / "run"),
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, *command],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "XLA_FLAGS": EIGHT_DEVICES},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --batch-size 12 does not split over 8 devices; use a multiple of 8"
    )
    assert not (tmp_path / "run").exists()


def test_check_batch_size_names_the_flag_and_the_device_count():
    mesh = parallel.data_mesh()
    parallel.check_batch_size(len(jax.devices()) * 3, mesh)
    fake_mesh = jax.sharding.Mesh(np.asarray(jax.devices() * 4), (parallel.DATA_AXIS,))
    with pytest.raises(parallel.ShardingError, match="--batch-size 6 does not split over 4"):
        parallel.check_batch_size(6, fake_mesh)


def test_shard_batch_and_local_rows_round_trip():
    mesh = parallel.data_mesh()
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    placed = parallel.shard_batch({"x": rows}, mesh)["x"]
    assert placed.sharding == parallel.batch_sharding(mesh)
    np.testing.assert_array_equal(parallel.local_rows(placed, mesh), rows)


@pytest.mark.parametrize(
    "flags",
    [
        ["--coordinator-address", "127.0.0.1:1234"],
        ["--num-processes", "2", "--process-id", "0"],
        ["--coordinator-address", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
        [
            "--coordinator-address",
            "127.0.0.1:1234",
            "--num-processes",
            "2",
            "--process-id",
            "0",
            "--distributed-timeout",
            "0",
        ],
    ],
)
def test_incomplete_multi_process_flags_are_one_clear_error(flags, capsys):
    assert cli.main(["train", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --") and err.count("\n") == 1
    assert not jax.distributed.is_initialized()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# `mnist-flax train` with the random backbone He-initialised (informative features; the
# Glorot-initialised one's pooled features are ~1e-11), the same in every process.
HE_TRAIN = """
import sys
sys.path.insert(0, sys.argv[1])
import pytest
from helpers import use_he_backbone
from mnist_flax import cli

use_he_backbone(pytest.MonkeyPatch())
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    """Two CPU processes (one device each) on the loopback address reproduce a one-process run.

    Each process reads and shuffles its own half of the data, so the global batches hold other
    examples than a single process's would. The run is therefore one global batch per epoch (all
    15 training examples; the shards of 8 and 7 rows pad to 8 each), where the order cannot
    matter, and the test split (11 examples, shards of 6 and 5) takes several padded batches.
    """
    input_pipeline.write_idx_split(tmp_path / "idx", "train", *block_digits(15, seed=0))
    input_pipeline.write_idx_split(tmp_path / "idx", "t10k", *block_digits(11, seed=1))
    flags = [
        "train", "--image-size", "32", "--alpha", "0.35", "--weights", "none",
        "--learning-rate", "1e-3", "--epochs", "3", "--quiet", "--data-dir", str(tmp_path / "idx"),
    ]  # fmt: skip
    multi_process = [
        "--batch-size", "16", "--workdir", str(tmp_path / "two"),
        "--coordinator-address", f"127.0.0.1:{free_port()}", "--num-processes", "2",
    ]  # fmt: skip
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", HE_TRAIN, str(TESTS_DIR), *flags, *multi_process, *process_id],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for process_id in (["--process-id", "0"], ["--process-id", "1"])
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    assert "epoch 3/3" in outputs[0][0] and "epoch" not in outputs[1][0]  # process 0 talks
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["1", "2", "3"]

    one_process = ["--batch-size", "16", "--workdir", str(tmp_path / "one")]
    run_python(["-c", HE_TRAIN, str(TESTS_DIR), *flags, *one_process])
    one = json.loads((tmp_path / "one" / "history.json").read_text())

    # The head must have moved, or equal histories would prove nothing.
    assert abs(one["epochs"][-1]["train_loss"] / one["epochs"][0]["train_loss"] - 1) > 0.01
    assert_same_history(two, one, rel=1e-4, abs=1e-5)


# Two processes of a bare JAX program that meet in one collective, which each traces on the line
# the test says (so compiles with that Python call stack), sharing a persistent compilation cache.
# They join JAX's runtime as this project does (`rendezvous.join`) or as a plain JAX program does.
CALL_SITES = """
import sys
import jax, numpy as np
from jax.experimental import multihost_utils
from mnist_flax import rendezvous

port, me, cache, join, line = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
jax.config.update("jax_compilation_cache_dir", cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
if join == "project":
    rendezvous.join(f"127.0.0.1:{port}", 2, me, timeout_s=60)
else:
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, me)
if line == "a":
    value = multihost_utils.broadcast_one_to_all(np.int32(7 if me == 0 else 0))
else:
    value = multihost_utils.broadcast_one_to_all(np.int32(7 if me == 0 else 0))
print(int(value))
"""


def test_collectives_meet_whatever_the_call_site(tmp_path):
    """jaxlib 0.12.1 runs a collective only where every process's executable has the same
    fingerprint, Python call stack included (`rendezvous._same_program_on_every_process`).

    A plain JAX run (on one line in both processes, which any JAX runs) fills the compilation
    cache. Then, joined as this project joins, process 0 traces the collective on that line, where
    it finds the plain run's entry (its key leaves the call stack out), and process 1 on another
    line, where it compiles (JAX writes entries from process 0 only, under keys of its own).
    """
    for join, lines in (("plain", "aa"), ("project", "ab")):
        port = str(free_port())
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", CALL_SITES, port, str(me), str(tmp_path), join, line],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for me, line in enumerate(lines)
        ]
        try:
            outputs = [process.communicate(timeout=120) for process in processes]
        finally:
            for process in processes:
                process.kill()
        for process, (out, err) in zip(processes, outputs, strict=True):
            assert process.returncode == 0, (join, lines, err[-3000:])
            # After gloo's "connected" line.
            assert out.strip().splitlines()[-1] == "7", (join, lines)


def train_command(workdir: pathlib.Path, port: int, process_id: int, timeout_s: float) -> list[str]:
    return [
        "train", "--image-size", "32", "--alpha", "0.35", "--weights", "none", "--epochs", "1",
        "--batch-size", "16", "--quiet", "--workdir", str(workdir),
        "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
        "--process-id", str(process_id), "--distributed-timeout", str(timeout_s),
    ]  # fmt: skip


def a_workdir_with_a_file(tmp_path: pathlib.Path) -> pathlib.Path:
    """A workdir that holds a file of an earlier run, which nothing may change."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("an earlier run's\n")
    return workdir


def assert_left_as_it_was(workdir: pathlib.Path) -> None:
    """Only the earlier file, unchanged: no lock left behind, nothing half written."""
    assert sorted(path.name for path in workdir.iterdir()) == ["notes.txt"]
    assert (workdir / "notes.txt").read_text() == "an earlier run's\n"


@pytest.mark.parametrize("process_id", [0, 1])
def test_a_process_started_alone_stops_with_one_line_after_the_timeout(
    tmp_path, idx_dir, process_id
):
    workdir = a_workdir_with_a_file(tmp_path)
    port = free_port()
    command = train_command(workdir, port, process_id, timeout_s=2)
    result = subprocess.run(
        [sys.executable, "-m", "mnist_flax", *command, "--data-dir", str(idx_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env=command_environment(),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    waited = "waited 2 s (--distributed-timeout) for"
    expected = (
        f"error: process 0 of 2 {waited} process 1 to join at 127.0.0.1:{port}; start process 1 "
        "with the same --coordinator-address and --num-processes 2"
        if process_id == 0
        else f"error: process 1 of 2 {waited} process 0, the coordinator, at 127.0.0.1:{port}, "
        "which does not answer; start it there, or check --coordinator-address"
    )
    assert result.stderr.splitlines() == [expected]
    assert_left_as_it_was(workdir)


@pytest.mark.parametrize(
    ("number", "status", "line"),
    [
        (signal.SIGTERM, 143, "stopped at once by SIGTERM (process 0 of 2)"),
        (signal.SIGINT, 130, "interrupted"),
    ],
    ids=["SIGTERM", "Ctrl-C"],
)
def test_a_stop_request_ends_a_process_waiting_to_join_at_once(
    tmp_path, idx_dir, number, status, line
):
    """Process 0 alone, the timeout far off, waits for process 1 to join (its coordinator port
    answers); a stop request ends it at once with one line (Ctrl-C: there the main thread waits
    in Python, so the first one is enough)."""
    workdir = a_workdir_with_a_file(tmp_path)
    port = free_port()
    command = train_command(workdir, port, 0, timeout_s=600)
    process = subprocess.Popen(
        [sys.executable, "-m", "mnist_flax", *command, "--data-dir", str(idx_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=command_environment(),
    )
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        time.sleep(1)  # well inside the join
        start = time.monotonic()
        process.send_signal(number)
        _, err = process.communicate(timeout=30)
        seconds = time.monotonic() - start
    finally:
        process.kill()
    assert process.returncode == status, err[-3000:]
    assert err.splitlines() == [line]
    assert seconds < 5
    assert_left_as_it_was(workdir)


# A wait of `rendezvous` whose first Ctrl-C Python delivered inside code that swallows
# KeyboardInterrupt, as a garbage collection's callback does (JAX has one: "Exception ignored in
# _xla_gc_callback").
SWALLOWED_CTRL_C = """
import os, signal, sys, time
from mnist_flax import rendezvous
rendezvous._end_at_once_on_stop_requests()
sent = []

def done():
    if not sent:
        sent.append(True)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        except KeyboardInterrupt:
            pass
    return False

try:
    rendezvous._wait_until(done, 30)
    print("waited to the end", file=sys.stderr)
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
"""


def test_a_ctrl_c_that_library_code_swallows_still_ends_a_wait():
    start = time.monotonic()
    result = run_code(SWALLOWED_CTRL_C)
    assert (result.returncode, result.stderr) == (130, "interrupted\n")
    assert time.monotonic() - start < 25  # the wait's own timeout is 30 s


# `mnist-flax train`, made to hang before the step the test names as `module.name` (a process stuck
# in a slow file system, a deadlock): it prints "stalling" there. Every process prints "replicating"
# before it places the model's state, the first collective after the meeting at the workdir lock.
STALLING_TRAIN = """
import sys, time
from mnist_flax import runtime

runtime.quiet_libraries()
from mnist_flax import cli, housekeeping, parallel, train

stall_before, argv = sys.argv[1], sys.argv[2:]


def stall(*args, **kwargs):
    print("stalling", flush=True)
    time.sleep(3600)


if stall_before != "nothing":
    module, name = stall_before.split(".")
    setattr({"housekeeping": housekeeping, "train": train}[module], name, stall)
replicate = parallel.replicate


def announced(*args, **kwargs):
    print("replicating", flush=True)
    return replicate(*args, **kwargs)


parallel.replicate = announced
sys.exit(cli.main(argv))
"""


def start_a_pair(tmp_path, idx_dir, *, stall_before: str, timeout_s: float):
    """Processes 0 and 1 of a run; process 1 hangs before `stall_before` (`module.name`)."""
    workdir = a_workdir_with_a_file(tmp_path)
    port = free_port()
    processes = [
        subprocess.Popen(
            [
                sys.executable, "-c", STALLING_TRAIN, stall,
                *train_command(workdir, port, process_id, timeout), "--data-dir", str(idx_dir),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=command_environment(),
        )
        for process_id, stall, timeout in ((0, "nothing", timeout_s), (1, stall_before, 600))
    ]  # fmt: skip
    return processes, workdir


def read_until(process: subprocess.Popen, text: str) -> None:
    for line in process.stdout:
        if line.strip() == text:
            return
    raise AssertionError(f"the process ended before it printed {text!r}: {process.stderr.read()}")


@pytest.mark.slow
def test_a_process_that_does_not_reach_the_workdir_lock_is_named_after_the_timeout(
    tmp_path, idx_dir
):
    (first, second), workdir = start_a_pair(
        tmp_path, idx_dir, stall_before="housekeeping.warn_about_overlaps", timeout_s=3
    )
    try:
        read_until(second, "stalling")
        _, err = first.communicate(timeout=120)
    finally:
        for process in (first, second):
            process.kill()
    assert first.returncode == 2, err[-3000:]
    assert err.splitlines() == [
        "error: process 0 of 2 waited 3 s (--distributed-timeout) at the workdir lock for "
        "process 1, which did not arrive; see the output of process 1, or raise "
        "--distributed-timeout"
    ]
    assert_left_as_it_was(workdir)  # process 0 took the lock, and released it


@pytest.mark.slow
@pytest.mark.parametrize(
    ("waited_s", "signals", "status", "line"),
    [
        (35, [signal.SIGTERM], 143, "stopped at once by SIGTERM (process 0 of 2)"),
        (
            2,
            [signal.SIGINT, signal.SIGINT],
            130,
            "stopped at once by a second Ctrl-C (process 0 of 2)",
        ),
    ],
    ids=["SIGTERM", "second Ctrl-C"],
)
def test_a_stop_request_ends_a_process_waiting_in_a_collective_at_once(
    tmp_path, idx_dir, waited_s, signals, status, line
):
    """With the timeout far off, process 0 waits inside XLA for process 1, which hangs after the
    meeting; a stop request ends it at once, with one line, and releases the workdir's lock.

    35 s is past the 30 s that gloo's first collective waits for a missing process: process 0
    still waits, because the processes connected at the meeting (`rendezvous._first_collective`).
    """
    (first, second), workdir = start_a_pair(
        tmp_path, idx_dir, stall_before="train.create_model", timeout_s=600
    )
    try:
        read_until(second, "stalling")
        read_until(first, "replicating")
        time.sleep(waited_s)  # inside the collective
        start = time.monotonic()
        for number in signals:
            first.send_signal(number)
            time.sleep(0.2)
        _, err = first.communicate(timeout=30)
        seconds = time.monotonic() - start
    finally:
        for process in (first, second):
            process.kill()
    assert first.returncode == status, err[-3000:]
    assert err.splitlines() == [line]
    assert seconds < 5
    assert_left_as_it_was(workdir)
