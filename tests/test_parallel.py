"""Data parallelism: 8 simulated CPU devices against 1, and two processes against one.

JAX fixes its device count when the backend starts, so each multi-device or multi-process case
runs in fresh Python processes (8 devices via XLA_FLAGS, 2 processes via the CLI's
--coordinator-address on the loopback address with JAX's gloo CPU collectives).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import assert_same_history, block_digits

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
