"""The Colab notebook's code cells, executed on the CPU with a tiny run, so the notebook cannot rot.

The install cell (tagged "install") is left out: the test runs against this checkout. The notebook
shrinks itself when `MNIST_FLAX_NOTEBOOK_SMOKE=1` and reads offline IDX files from
`MNIST_FLAX_DATA_DIR`.
"""

import json
import pathlib

import nbformat
import pytest
from helpers import block_digits
from nbclient import NotebookClient

from mnist_flax import input_pipeline

NOTEBOOK = pathlib.Path(__file__).parents[1] / "scripts" / "colab_tpu.ipynb"


@pytest.mark.slow
def test_colab_notebook_trains_plots_and_benchmarks(tmp_path, monkeypatch):
    input_pipeline.write_idx_split(tmp_path / "idx", "train", *block_digits(64, seed=0))
    input_pipeline.write_idx_split(tmp_path / "idx", "t10k", *block_digits(32, seed=1))
    monkeypatch.setenv("MNIST_FLAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("MNIST_FLAX_DATA_DIR", str(tmp_path / "idx"))
    monkeypatch.setenv("MNIST_FLAX_WORKDIR", str(tmp_path / "run"))

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    cells = len(notebook.cells)
    notebook.cells = [
        cell for cell in notebook.cells if "install" not in cell.metadata.get("tags", [])
    ]
    assert len(notebook.cells) == cells - 1, "exactly one cell, the install cell, is left out"
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()

    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [record["epoch"] for record in history["epochs"]] == [1]
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    text = "".join(output.get("text", "") for output in outputs)
    assert "test accuracy after 1 epochs" in text
    assert any("image/png" in output.get("data", {}) for output in outputs), "curves shown"
    assert "img/s" in text and "ours" in text, "benchmark table printed"
