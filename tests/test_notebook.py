"""The Colab notebook: its install cell's choices, every cell run on the CPU, its committed outputs.

The install cell is executed on its own (as a dry run: it shows its pip command) and its functions
are called with what each Colab runtime has installed as inputs (notebooks/colab_runtime.py runs
it for real in rebuilt runtimes). The whole notebook runs, install cell
included, in smoke mode (a tiny random model from a Keras weights file, block digits as IDX files)
through `notebooks/execute.py`, the script that made the committed outputs; the same checks of what
each key cell prints and draws then hold for the committed notebook, whose every code cell must
still have the source (by hash) that made its outputs.
"""

import importlib.metadata
import importlib.util
import json
import pathlib
import re
import sys

import nbformat
import pytest
from helpers import block_digits

from mnist_flax import input_pipeline

ROOT = pathlib.Path(__file__).parents[1]
NOTEBOOK = ROOT / "notebooks" / "mnist_transfer_learning.ipynb"
_spec = importlib.util.spec_from_file_location(
    "notebook_execute", ROOT / "notebooks" / "execute.py"
)
execute = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute)

WHEEL = "mnist_flax-0.1.0-py3-none-any.whl"


def tagged(notebook: nbformat.NotebookNode, tag: str) -> nbformat.NotebookNode:
    (cell,) = [cell for cell in notebook.cells if tag in cell.metadata.get("tags", [])]
    return cell


def run_install_cell(repo_url: str, upload_dir, monkeypatch, capsys) -> tuple[dict, str]:
    """The install cell as Colab runs it, REPO_URL typed into its form field; its names and output."""
    source = tagged(nbformat.read(NOTEBOOK, as_version=4), "install").source
    assert 'REPO_URL = ""  # @param' in source, "the form field starts empty"
    monkeypatch.setenv("MNIST_FLAX_NOTEBOOK_DRY_INSTALL", "1")
    monkeypatch.setenv("MNIST_FLAX_UPLOAD_DIR", str(upload_dir))
    names: dict = {}
    exec(source.replace('REPO_URL = ""', f"REPO_URL = {repo_url!r}"), names)
    return names, capsys.readouterr().out


# What Colab's runtimes have installed (../shared/colab/pip-freeze*.txt) of what the cell reads.
COLAB_CPU = {"numpy": "2.1.3", "pillow": "11.3.0", "tensorflow": "2.20.0", "protobuf": "5.29.6",
             "h5py": "3.16.0", "jax": "0.7.2"}  # fmt: skip
COLAB_GPU = {**COLAB_CPU, "jax-cuda12-plugin": "0.7.2"}
COLAB_TPU = {"numpy": "2.1.3", "pillow": "11.3.0", "protobuf": "7.35.1", "h5py": "3.16.0",
             "jax": "0.7.2", "libtpu": "0.0.21.1"}  # fmt: skip
KEPT = ["numpy==2.1.3", "pillow==11.3.0", "tensorflow==2.20.0", "protobuf==5.29.6", "h5py==3.16.0"]


@pytest.mark.parametrize(
    ("installed", "build", "kept"),
    [
        # Colab's protobuf 5.29 on CPU and GPU: tensorflow-metadata must stay below 1.18.
        (COLAB_CPU, "jax", [*KEPT, "tensorflow-metadata<1.18"]),
        (COLAB_GPU, "jax[cuda12]", [*KEPT, "tensorflow-metadata<1.18"]),
        # No TensorFlow on the TPU runtime: pip adds one that fits the versions kept.
        (
            COLAB_TPU,
            "jax[tpu]",
            ["numpy==2.1.3", "pillow==11.3.0", "protobuf==7.35.1", "h5py==3.16.0"],
        ),
        ({}, "jax", []),  # a bare Python: everything is missing
    ],
)
def test_install_cell_upgrades_jax_with_the_runtimes_build_and_keeps_the_rest(
    installed, build, kept, tmp_path, monkeypatch, capsys
):
    (tmp_path / WHEEL).write_bytes(b"")
    names, _ = run_install_cell("", tmp_path, monkeypatch, capsys)
    source = str(tmp_path / WHEEL)
    assert names["install_command"](source, installed.get) == [
        *[sys.executable, "-m", "pip", "install", "-q", build, source],
        *kept,
    ]


def test_install_cell_reads_what_this_python_has_installed(tmp_path, monkeypatch, capsys):
    (tmp_path / WHEEL).write_bytes(b"")
    names, _ = run_install_cell("", tmp_path, monkeypatch, capsys)
    assert names["version"]("numpy") == importlib.metadata.version("numpy")
    assert names["version"]("no-such-distribution") is None
    command = names["install_command"](str(tmp_path / WHEEL))
    assert f"numpy=={importlib.metadata.version('numpy')}" in command


def test_install_cell_installs_a_typed_url_or_an_uploaded_wheel_and_says_so(
    tmp_path, monkeypatch, capsys
):
    with pytest.raises(SystemExit, match="type the repository URL into REPO_URL, or upload"):
        run_install_cell("", tmp_path, monkeypatch, capsys)
    url = "https://example.org/someone/mnist_flax"
    _, out = run_install_cell(url, tmp_path, monkeypatch, capsys)
    assert f"'mnist-flax @ git+{url}'" in out
    (tmp_path / WHEEL).write_bytes(b"")  # the cell picks the file; pip (not run here) installs it
    _, out = run_install_cell("", tmp_path, monkeypatch, capsys)
    assert re.match(rf"\$ pip install -q jax\S* {re.escape(str(tmp_path / WHEEL))} ", out), out


def outputs_of(cell) -> tuple[str, int]:
    """A cell's printed text (stdout and stderr) and how many images it drew."""
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    images = sum("image/png" in o.get("data", {}) for o in cell.outputs)
    return text, images


def _parity(text: str) -> bool:
    found = re.search(r"max \|ours - Keras\| = \S+, (\S+) of the largest feature", text)
    return found is not None and float(found.group(1)) < 1e-4


def _losses(text: str) -> list[float]:
    return [float(loss) for loss in re.findall(r"step \d: loss ([\d.]+)", text)]


def _train_step(text: str) -> bool:
    """Three steps of the notebook's own step on one batch: the loss falls."""
    losses = _losses(text)
    return len(losses) == 3 and losses[-1] < losses[0]


def _same_step(text: str) -> bool:
    """The package's step: every state donated, not the batch, and the notebook's step's losses
    and head after three steps."""
    counts = re.findall(r"(\w+ state|batch): +(\d+) arrays, +(\d+) donated", text)
    donated = {name: (arrays, given) for name, arrays, given in counts}
    difference = re.search(r"the two heads differ by at most (\S+)", text)
    return (
        all(arrays == given for name, (arrays, given) in donated.items() if name != "batch")
        and donated.get("batch", ("", ""))[1] == "0"
        and len(donated) == 4
        and len(_losses(text)) == 3
        and difference is not None
        and float(difference.group(1)) < 1e-5
    )


def _benchmark(text: str) -> bool:
    """Ours and Keras on JAX, both measured in the notebook's own process."""
    return (
        "img/s" in text
        and "keras-jax" in text
        and "ours / keras-jax" in text
        and "process of its own" not in text
    )


# What each key cell must print (its text) and draw (its image count), in every size.
CHECKS = {
    "install": lambda t, i: t.startswith("$ pip install -q jax") and WHEEL in t,
    "devices": lambda t, i: re.search(r"JAX \S+ sees \d+ \w+ device", t) is not None,
    "config": lambda t, i: t.startswith("size ") and " px, MobileNetV2 alpha " in t,
    "data": lambda t, i: "batch['image']" in t and "real rows" in t,
    "digits": lambda t, i: i == 1,
    "backbone": lambda t, i: "def __call__" in t and "Keras layers with weights" in t and "pooled features" in t,
    "parity": lambda t, i: _parity(t) and "(jax backend, this process)" in t,
    "classifier": lambda t, i: "head: Dense" in t and "logits (8, 10)" in t,
    "freeze": lambda t, i: "frozen:" in t and "set_to_zero" in t and "head:" in t and "Adam" in t,
    "train-step": lambda t, i: _train_step(t),
    "same-step": lambda t, i: _same_step(t),
    "epoch-loop": lambda t, i: re.search(r"one epoch on \d+ digits .* test accuracy [\d.]+%", t) is not None,
    "train": lambda t, i: "cached the backbone features" in t and "test accuracy after" in t,
    "curves": lambda t, i: i == 1,
    "evaluate": lambda t, i: "test accuracy" in t and i == 2,
    "fine-tune": lambda t, i: "cached the fine-tuned layers' input" in t and "fine-tune" in t and i == 1,
    "notebook-model": lambda t, i: "not caching" in t and "the notebook's model: test accuracy" in t,
    "your-digit-input": lambda t, i: "wrote my_digit.png" in t,
    "your-digit": lambda t, i: re.search(r"\d: [\d.]+%, \d: [\d.]+%, \d: [\d.]+%", t) and i == 1,
    "sharding": lambda t, i: "NamedSharding" in t and "rows 0-" in t,
    "benchmark": lambda t, i: _benchmark(t),
}  # fmt: skip


# What a progress bar leaves in saved outputs (a carriage return, tqdm's bar or rate), a path of
# the machine that made them, and a warning.
PROGRESS_BAR = re.compile(r"\r|\d+%\|[^|\n]*\||\d+/\d+ \[\d|(it|step)/s\]")
ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~])/[\w.-]+/[\w.-]+")


def output_texts(cell) -> list[str]:
    """Everything a cell printed or showed as text."""
    return [
        output.get("text", "") + output.get("data", {}).get("text/plain", "")
        for output in cell.outputs
    ]


def check_outputs(notebook: nbformat.NotebookNode, size: str) -> None:
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.metadata["tags"][0] for cell in code] == list(CHECKS), "a cell without its check"
    for cell in code:
        tag = cell.metadata["tags"][0]
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, (tag, errors)
        for text in output_texts(cell):
            assert not PROGRESS_BAR.search(text), (tag, "a progress bar's fragment", text)
            assert not ABSOLUTE_PATH.search(text), (tag, "a path of the machine", text)
            assert "Warning" not in text, (tag, text)
        text, images = outputs_of(cell)
        assert CHECKS[tag](text, images), (tag, text, images)
    config_text, _ = outputs_of(tagged(notebook, "config"))
    assert config_text.startswith(f"size {size!r}: "), config_text


def check_hashes(notebook: nbformat.NotebookNode) -> None:
    for cell in notebook.cells:
        if cell.cell_type == "code":
            recorded = cell.metadata.get(execute.METADATA_KEY, {}).get("source_sha256")
            assert recorded == execute.source_hash(cell.source), (
                f"the outputs of cell {cell.metadata['tags']} were made by other source; "
                "run notebooks/execute.py (see its docstring) to make them again"
            )


@pytest.mark.slow
def test_every_cell_runs_in_smoke_mode(tmp_path):
    from keras_helpers import random_keras_mobilenet

    input_pipeline.write_idx_split(tmp_path / "idx", "train", *block_digits(64, seed=0))
    input_pipeline.write_idx_split(tmp_path / "idx", "t10k", *block_digits(32, seed=1))
    # A Keras weights file as the notebook's smaller sizes read one (random, alpha 0.35).
    weights = tmp_path / "random.weights.h5"
    random_keras_mobilenet(alpha=0.35, input_shape=(32, 32, 3)).save_weights(weights)
    (tmp_path / "upload").mkdir()
    (tmp_path / "upload" / WHEEL).write_bytes(b"")
    (tmp_path / "run").mkdir()

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    execute.execute(
        notebook,
        size="smoke",
        cwd=tmp_path / "run",
        data_dir=tmp_path / "idx",
        weights=weights,
        upload_dir=tmp_path / "upload",
        timeout=900,
    )
    check_outputs(notebook, "smoke")
    check_hashes(notebook)
    history = json.loads((tmp_path / "run" / "runs" / "mnist" / "history.json").read_text())
    assert [record["epoch"] for record in history["epochs"]] == [1, 2]
    assert (tmp_path / "run" / "my_digit.png").is_file()


def test_committed_outputs_were_made_by_these_cells():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    check_hashes(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    # One kernel, top to bottom, each cell once.
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    check_outputs(notebook, "small")
    # The real run's accuracy, as its first cell describes it.
    train_text, _ = outputs_of(tagged(notebook, "train"))
    accuracy = float(re.search(r"test accuracy after 10 epochs: ([\d.]+)%", train_text).group(1))
    assert accuracy > 90, train_text
    assert "--size small" in notebook.cells[0].source
