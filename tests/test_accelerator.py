"""The accelerator run (`scripts/accelerator.sh`) as its dry run: every step on the CPU at tiny
sizes, each step's files, the table, and a failing step that loses nothing written before it."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

SCRIPT = pathlib.Path(__file__).parents[1] / "scripts" / "accelerator.sh"
# The dry run's steps, in order: its one batch size is 2.
STEPS = ["environment", "train", "bench-pipeline-2", "bench-notebook-2"]


def accelerator_run(*flags: str) -> subprocess.CompletedProcess:
    """`scripts/accelerator.sh FLAGS --dry-run` with this interpreter; its output captured."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("OUT", "MNIST_FLAX_WEIGHTS", "MNIST_FLAX_DATA_DIR")
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *flags, "--dry-run"],
        capture_output=True,
        text=True,
        env=env | {"PYTHON": sys.executable},
        timeout=1800,
    )


def status(out: pathlib.Path, step: str) -> dict:
    return json.loads((out / f"{step}.status.json").read_text())


def check_benchmark(results: dict, model: str, our_rows: int) -> None:
    assert len(results["rows"]) == our_rows
    for row in results["rows"]:
        assert row["model"] == model and row["batch_size"] == 2
        for name in ("pipeline", "step", "forward", "end-to-end"):
            assert row[name]["images_per_second"] > 0
        # Each ratio against the Keras-on-JAX row of its own dtype, measured beside it.
        assert row["keras_backend"] == "jax"
        assert row["ours_over_keras"].keys() == {"step", "forward"}
    assert [(keras["backend"], keras["dtype"]) for keras in results["keras"]] == [
        ("jax", "float32"),
        ("jax", "bfloat16"),
    ]
    for keras in results["keras"]:
        assert keras["step"]["images_per_second"] > 0
        assert keras["parameters"] == results["rows"][0]["parameters"]


@pytest.mark.slow
def test_dry_run_writes_every_steps_files_and_the_table(tmp_path):
    out = tmp_path / "out"
    done = accelerator_run(str(out))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    for step in STEPS:
        assert status(out, step)["status"] == "ok", step
        assert (out / f"{step}.log").stat().st_size > 0

    environment = json.loads((out / "environment.json").read_text())
    assert environment["dry_run"] is True
    assert (environment["platform"], environment["jax"]) == ("cpu", jax.__version__)

    history = json.loads((out / "train" / "history.json").read_text())
    assert [record["epoch"] for record in history["epochs"]] == [1, 2]
    assert (history["config"]["alpha"], history["config"]["weights"]) == (0.35, "none")
    assert (out / "train" / "curves.png").exists()

    pipeline = json.loads((out / "bench-pipeline-2.json").read_text())
    check_benchmark(pipeline, "pipeline", our_rows=4)  # float32, bfloat16 x host, device resize
    assert {(row["dtype"], row["resize"]) for row in pipeline["rows"]} == {
        (dtype, resize) for dtype in ("float32", "bfloat16") for resize in ("host", "device")
    }
    notebook = json.loads((out / "bench-notebook-2.json").read_text())
    check_benchmark(notebook, "notebook", our_rows=2)
    assert notebook["rows"][0]["image_size"] == 56

    table = (out / "table.md").read_text()
    assert table == done.stdout[-len(table) - 1 : -1], "the table is printed last"
    assert "(dry run: tiny sizes on the CPU)" in table
    for step in STEPS:
        assert f"\n| {step} | ok | " in table
    for model, dtype in (("pipeline", "bfloat16"), ("notebook", "float32")):
        assert f"\n| {model} | 2 | {dtype} | ours | auto=cpu |" in table
        assert f"\n| {model} | 2 | {dtype} | Keras on jax |" in table
    assert "\n| 2 | 4 | 32 | " in table  # the run: 2 epochs, batch 4, 32 px

    # A failing step (the run on missing data) is recorded; what the others wrote stays.
    written = {path: path.read_bytes() for path in out.glob("bench-*")}
    failed = accelerator_run(str(out), "--data-dir", str(tmp_path / "missing"), "--only", "train")
    assert failed.returncode == 1
    train = status(out, "train")
    assert (train["status"], train["exit_status"]) == ("failed", 2)
    assert train["last_line"].startswith("error: ") and "missing" in train["last_line"]
    assert {path: path.read_bytes() for path in out.glob("bench-*")} == written
    table = (out / "table.md").read_text()
    assert "\n| train | failed (exit 2) | " in table
    assert "No history.json: the train step failed." in table
    assert "\n| bench-pipeline-2 | ok | " in table
    assert "\n| pipeline | 2 | float32 | Keras on jax |" in table


@pytest.mark.parametrize(
    "flags, error",
    [
        ([], "error: no output folder: pass OUT_DIR or set OUT"),
        (["OUT", "--only", "bench"], "error: --only bench: the steps are environment train"),
        (["OUT", "--fast"], "error: unknown option --fast"),
    ],
)
def test_bad_arguments_are_one_line_errors(flags, error, tmp_path):
    flags = [str(tmp_path / "out") if flag == "OUT" else flag for flag in flags]
    done = accelerator_run(*flags)
    assert done.returncode == 2
    assert done.stderr.strip().startswith(error), done.stderr
    assert not list(tmp_path.glob("out/*.status.json")), "nothing ran"


def test_help_describes_the_run():
    done = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    assert "accelerator.sh [OUT_DIR] [--dry-run]" in done.stdout
    assert "bench-MODEL-BATCH" in done.stdout and "#" not in done.stdout.splitlines()[0]
