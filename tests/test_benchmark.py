"""The benchmark: its protocol (warm-up excluded, interleaved) and tiny runs of `mnist-flax benchmark`.

No timing thresholds: a shared 2-core machine makes any figure noisy. The runs check that every
measurement is present and is a positive, finite number, in the printed table and in the JSON file.
"""

import importlib.metadata
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from mnist_flax import cli
from mnist_flax.benchmark import protocol

TINY = ["--image-size", "32", "--steps", "2", "--repeats", "2", "--warmup", "1"]
TINY += ["--pipeline-batches", "2"]
OUR_MEASUREMENTS = ("pipeline", "step", "forward", "end-to-end")
# Trainable parameters: the Dense(10) head on MobileNetV2's 1280 features (any alpha <= 1), and the
# notebook adapter's Conv2D(3, 3x3) on one channel.
HEAD_PARAMETERS = 1280 * 10 + 10
ADAPTER_PARAMETERS = 3 * 3 * 1 * 3 + 3


def numbers(tree) -> list[float]:
    """Every number in a JSON tree (booleans excluded)."""
    if isinstance(tree, dict):
        return [n for value in tree.values() for n in numbers(value)]
    if isinstance(tree, list):
        return [n for value in tree for n in numbers(value)]
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return [tree]
    return []


def assert_positive_finite(tree) -> None:
    found = numbers(tree)
    assert found
    assert all(math.isfinite(n) and n > 0 for n in found), tree


def run_benchmark(args: list[str]) -> dict:
    """`mnist-flax benchmark ARGS`, as the command line parses it; returns the results."""
    return protocol.report(cli.build_parser().parse_args(["benchmark", *args]))


def test_warm_up_is_untimed_and_measurements_interleave():
    calls = []

    def measurement(name):
        return protocol.StepMeasurement(
            lambda: calls.append(name),
            lambda _: None,
            images_per_step=4,
            steps=2,
            warmup=1,
            asynchronous=False,
        )

    first, second = measurement("a"), measurement("b")
    protocol.run_interleaved([first, second], repeats=2)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2
    assert len(first.times.seconds) == 4  # 2 repetitions x 2 steps; the warm-up call is not timed
    summary = first.summary()
    assert summary["images_per_second"] == pytest.approx(4 / summary["median_seconds"])
    assert summary["median_seconds"] <= summary["p90_seconds"]


def check_our_row(row: dict, *, timed_steps: int) -> None:
    for name in OUR_MEASUREMENTS:
        assert_positive_finite(row[name])
    assert {"images_per_second", "median_seconds"} <= row["pipeline"].keys()
    assert {"p90_seconds", "dispatch_median_seconds", "dispatch_share"} <= row["step"].keys()
    assert len(row["step"]["seconds"]) == timed_steps
    assert row["compile_seconds"] > 0


def test_the_notebooks_call_measures_everything(tmp_path, capsys):
    json_file = tmp_path / "bench.json"
    notebook_args = ["--batch-size", "8", "--image-size", "32", "--alpha", "0.35"]
    notebook_args += ["--weights", "none", "--steps", "2", "--repeats", "1"]
    results = run_benchmark([*notebook_args, "--json", str(json_file)])
    saved = json.loads(json_file.read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    assert "synthetic" in saved["data"]
    (row,) = saved["rows"]
    check_our_row(row, timed_steps=2)
    # The default is the pipeline model: RGB images, only the head trains.
    assert row["model"] == "pipeline"
    assert row["input"] == "float32 [32, 32, 3]"
    assert row["parameters"]["trainable"] == HEAD_PARAMETERS
    assert len(saved["load_average"]["start"]) == 3
    table_rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()]
    assert table_rows.count(["ours", "pipeline"]) == 1


@pytest.mark.slow
def test_resize_modes_are_compared(tmp_path, capsys):
    json_file = tmp_path / "bench.json"
    run_benchmark(
        [
            *["--batch-size", "4", "--alpha", "0.35", "--weights", "none", *TINY],
            *["--resize", "host", "device", "--json", str(json_file)],
        ]
    )
    saved = json.loads(json_file.read_text())
    assert [row["resize"] for row in saved["rows"]] == ["host", "device"]
    for row in saved["rows"]:
        check_our_row(row, timed_steps=2 * 2)
    (comparison,) = saved["resize_comparisons"]
    ratios = {k: v for k, v in comparison.items() if k.endswith("_device_over_host")}
    assert ratios.keys() == {"pipeline_device_over_host", "end-to-end_device_over_host"}
    assert_positive_finite(ratios)
    table = capsys.readouterr().out
    assert "--resize device / host" in table
    assert table.count("\nours ") == 2


def versions() -> dict[str, str]:
    """The installed versions of Keras and of each backend's library."""
    return {name: importlib.metadata.version(name) for name in ("keras", "jax", "tensorflow")}


@pytest.mark.slow
@pytest.mark.parametrize("model, size", [("pipeline", "32"), ("notebook", "56")])
def test_each_keras_backend_builds_our_model_on_the_shared_weights(
    model, size, tmp_path, capsys, mnist_idx_dir, imagenet_h5_keras2
):
    """Keras on TensorFlow and on JAX (in a process of its own) hold the same parameters as ours
    and, with ours' head copied in, compute the same outputs from the real weights."""
    json_file = tmp_path / "bench.json"
    tiny = [arg if arg != "32" else size for arg in TINY]
    run_benchmark(
        [
            *["--model", model, "--batch-size", "2", "--weights", str(imagenet_h5_keras2), *tiny],
            *["--keras-baseline", "tensorflow", "jax", "--data-dir", str(mnist_idx_dir)],
            *["--split", "test", "--measure", "step", "forward", "--json", str(json_file)],
        ]
    )
    saved = json.loads(json_file.read_text())
    assert "IDX files" in saved["data"]
    assert [keras["backend"] for keras in saved["keras"]] == ["tensorflow", "jax"]
    for keras in saved["keras"]:
        backend = keras["backend"]
        (row,) = [row for row in saved["rows"] if row["keras_backend"] == backend]
        for name in ("step", "forward"):
            assert_positive_finite(keras[name])
            assert_positive_finite(row[name])
        assert "pipeline" not in row
        assert keras["model"] == row["model"] == model
        assert keras["input"] == row["input"]
        assert keras["keras"] == versions()["keras"]
        assert keras["backend_version"] == versions()[backend]
        assert (keras["platform"], keras["device"]) == ("cpu", "cpu")
        assert keras["layers"][-3].startswith(f"mobilenetv2_1.00_{size}")
        assert keras["layers"][-2:] == ["GlobalAveragePooling2D", "Dense(10, softmax)"]
        if model == "notebook":
            assert keras["layers"][:2] == ["UpSampling2D(2, 2)", "Conv2D(3, 3x3, relu)"]
            assert row["parameters"]["trainable"] == ADAPTER_PARAMETERS + HEAD_PARAMETERS
        else:
            assert len(keras["layers"]) == 3
            assert row["parameters"]["trainable"] == HEAD_PARAMETERS
        assert keras["parameters"] == row["parameters"]
        assert keras["output_difference"] <= 1e-4
        # The ratio comes from the rows of one process: ours beside that backend's Keras.
        assert row["ours_over_keras"]["step"] == pytest.approx(
            row["step"]["images_per_second"] / keras["step"]["images_per_second"]
        )
    out = capsys.readouterr().out
    jax_version = versions()["jax"]
    assert f": Keras {versions()['keras']} on jax {jax_version}, cpu; " in out
    assert f"\nours / keras-jax, {model} model, batch 2 {size}x{size} float32" in out
    assert f"\nours / keras-tf, {model} model, batch 2 {size}x{size} float32" in out
    if model == "notebook":
        assert f"UpSampling2D(2, 2) > Conv2D(3, 3x3, relu) > mobilenetv2_1.00_{size}" in out
    table_rows = [line.split()[:3] for line in out.splitlines()]
    for who in ("ours", "keras-tf", "keras-jax"):
        assert table_rows.count([who, model, "2"]) == (2 if who == "ours" else 1)


@pytest.mark.slow
def test_cache_measurement_times_both_runs(tmp_path):
    json_file = tmp_path / "bench.json"
    run_benchmark(
        [
            *["--batch-size", "8", "--image-size", "32", "--alpha", "0.35", "--weights", "none"],
            *["--measure", "cache", "--epochs", "2", "--cache-examples", "16", "8"],
            *["--json", str(json_file)],
        ]
    )
    cache = json.loads(json_file.read_text())["cache"]
    assert_positive_finite({k: cache[k] for k in ("without_cache", "with_cache", "speedup")})
    assert cache["speedup"] == pytest.approx(
        cache["without_cache"]["median_seconds"] / cache["with_cache"]["median_seconds"]
    )
    # The two runs train the same model on the same batches.
    assert cache["history_max_abs_difference"] < 1e-4


@pytest.mark.slow
def test_notebook_model_is_timed(tmp_path, capsys):
    """--model notebook times the notebook's model: 28x28 digits in [0, 1] into UpSampling2D(image
    size / 28) + Conv2D(3, relu) + the frozen backbone; adapter and head train. Its Keras side, on
    both backends: test_each_keras_backend_builds_our_model_on_the_shared_weights."""
    json_file = tmp_path / "bench.json"
    tiny = [arg if arg != "32" else "56" for arg in TINY]
    run_benchmark(
        [
            *["--model", "notebook", "--batch-size", "2", "--alpha", "0.35", "--weights", "none"],
            *[*tiny, "--json", str(json_file)],
        ]
    )
    saved = json.loads(json_file.read_text())
    (row,) = saved["rows"]
    check_our_row(row, timed_steps=2 * 2)
    assert (row["model"], row["resize"]) == ("notebook", "none")
    assert row["input"] == "float32 [28, 28, 1]"
    assert row["parameters"]["trainable"] == ADAPTER_PARAMETERS + HEAD_PARAMETERS
    assert saved["keras"] == [] and saved["resize_comparisons"] == []
    table_rows = [line.split()[:3] for line in capsys.readouterr().out.splitlines()]
    assert table_rows.count(["ours", "notebook", "2"]) == 1


@pytest.mark.parametrize(
    "flags, error",
    [
        (["--measure", "cache"], "--measure cache cannot be used with --model notebook"),
        (["--resize", "host", "device"], "--resize host device applies to --model pipeline"),
        (["--image-size", "56", "100"], "--image-size 100: --model notebook upsamples"),
    ],
)
def test_notebook_model_rejects_pipeline_only_measures(flags, error, capsys):
    assert cli.main(["benchmark", "--model", "notebook", "--weights", "none", *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"error: {error}")


def test_keras_baseline_names_its_backends():
    def backends(*flags: str) -> list[str]:
        return cli.build_parser().parse_args(["benchmark", *flags]).keras_baseline

    assert backends() == []
    assert backends("--keras-baseline") == ["tensorflow"]  # the flag alone, as before backends
    assert backends("--keras-baseline", "jax", "tensorflow", "jax") == ["jax", "tensorflow"]


def test_keras_baseline_errors_answer_before_measuring(tmp_path, capsys):
    assert cli.main(["benchmark", "--keras-baseline", "torch"]) == 2
    assert "invalid choice: 'torch'" in capsys.readouterr().err
    # Keras cannot read a converted directory: said at once, before any process of its own.
    flags = ["--weights", str(tmp_path), "--keras-baseline", "tensorflow", "jax", *TINY]
    assert cli.main(["benchmark", *flags]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: --keras-baseline: Keras cannot load the converted directory")


def test_missing_weights_file_is_one_line_error(tmp_path, capsys):
    assert cli.main(["benchmark", "--weights", str(tmp_path / "missing.h5"), *TINY]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: --weights") and "missing.h5" in error


def test_the_benchmark_is_a_subcommand_with_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["benchmark", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--keras-baseline" in out and "--cache-examples" in out and "--conv-impl" in out


@pytest.mark.slow
def test_keras_tutorial_job_runs_on_the_jax_backend(idx_dir):
    """scripts/keras_tutorial_job.py, what the whole-process rounds time, with --backend jax."""
    script = pathlib.Path(__file__).parents[1] / "scripts" / "keras_tutorial_job.py"
    flags = ["--backend", "jax", "--weights", "none", "--data-dir", str(idx_dir)]
    flags += ["--train-split", "train[:8]", "--test-split", "test[:4]", "--image-size", "32"]
    done = subprocess.run(
        [sys.executable, str(script), *flags, "--batch-size", "4", "--epochs", "1"],
        capture_output=True,
        text=True,
        env={name: value for name, value in os.environ.items() if name != "KERAS_BACKEND"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"Keras {versions()['keras']} on jax {versions()['jax']}, cpu")
    assert lines[1].startswith("epoch 1/1  test accuracy ")
    assert lines[-1].startswith("fit: ")
