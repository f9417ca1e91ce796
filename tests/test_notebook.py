"""The Colab notebook's code cells, executed on the CPU with a tiny run, so the notebook cannot rot.

The install cell (tagged "install") is run on its own, with `MNIST_FLAX_NOTEBOOK_SMOKE=1` (it then
shows the pip command instead of running it), for both of its sources; the other cells run in a
kernel against this checkout. The notebook shrinks itself when `MNIST_FLAX_NOTEBOOK_SMOKE=1` and
reads offline IDX files from `MNIST_FLAX_DATA_DIR`.
"""

import json
import pathlib

import nbformat
import pytest
from helpers import block_digits
from nbclient import NotebookClient

from mnist_flax import input_pipeline

NOTEBOOK = pathlib.Path(__file__).parents[1] / "notebooks" / "mnist_transfer_learning.ipynb"


def install_cell() -> str:
    (cell,) = [
        cell
        for cell in nbformat.read(NOTEBOOK, as_version=4).cells
        if "install" in cell.metadata.get("tags", [])
    ]
    return cell.source


def run_install_cell(repo_url: str, upload_dir, monkeypatch, capsys) -> dict:
    """The install cell as Colab runs it, REPO_URL typed into its form field; returns its names."""
    source = install_cell()
    assert 'REPO_URL = ""  # @param' in source, "the form field starts empty"
    monkeypatch.setenv("MNIST_FLAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("MNIST_FLAX_UPLOAD_DIR", str(upload_dir))
    names: dict = {}
    exec(source.replace('REPO_URL = ""', f"REPO_URL = {repo_url!r}"), names)
    assert capsys.readouterr().out == f"installing {names['source']}\n"
    return names


def test_install_cell_installs_from_a_typed_repository_url(tmp_path, monkeypatch, capsys):
    url = "https://example.org/someone/mnist_flax"
    names = run_install_cell(url, tmp_path, monkeypatch, capsys)
    assert names["command"][-2:] == ["jax[tpu]", f"mnist-flax @ git+{url}"]
    assert names["command"][1:4] == ["-m", "pip", "install"]


def test_install_cell_installs_an_uploaded_wheel_and_refuses_nothing(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match="type the repository URL into REPO_URL, or upload"):
        run_install_cell("", tmp_path, monkeypatch, capsys)
    wheel = tmp_path / "mnist_flax-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")  # the cell picks the file; pip (not run here) installs it
    names = run_install_cell("", tmp_path, monkeypatch, capsys)
    assert names["command"][-1] == str(wheel)


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
