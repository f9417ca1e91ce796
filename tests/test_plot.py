"""The figures of `mnist_flax.plotting` and its command line, `mnist-flax plot`."""

import json
import pathlib
import struct

import matplotlib.image
import numpy as np
import pytest

from mnist_flax import cli, plotting


def png_size(path: pathlib.Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def write_history(path: pathlib.Path, epochs: int = 3, frozen: int | None = None) -> None:
    """A history of `epochs` epochs, the ones after `frozen` in the fine-tuning stage."""
    records = [
        {
            "epoch": epoch,
            "stage": "frozen" if frozen is None or epoch <= frozen else "fine-tune",
            "learning_rate": 1e-3 / epoch,
            "train_loss": 1.0 / epoch,
            "train_accuracy": 0.8 + 0.05 * epoch,
            "test_loss": 1.1 / epoch,
            "test_accuracy": 0.78 + 0.05 * epoch,
            "seconds": 1.0,
        }
        for epoch in range(1, epochs + 1)
    ]
    config = {"dataset": "mnist", "alpha": 1.0, "image_size": 224, "weights": "imagenet"}
    path.write_text(json.dumps({"config": config, "epochs": records}))


def test_plot_command_writes_an_800x800_png(tmp_path, capsys):
    write_history(tmp_path / "history.json")
    assert cli.main(["plot", str(tmp_path / "history.json"), "-o", str(tmp_path / "out.png")]) == 0
    assert png_size(tmp_path / "out.png") == (800, 800)
    assert capsys.readouterr().out == f"wrote {tmp_path / 'out.png'}\n"

    # A workdir works too, and the default output is its curves.png.
    assert cli.main(["plot", str(tmp_path)]) == 0
    assert png_size(tmp_path / "curves.png") == (800, 800)


def test_curves_mark_where_fine_tuning_starts(tmp_path):
    """The same numbers with and without a fine-tuning stage differ only by the marked start."""
    pixels = {}
    for frozen in (None, 2):
        history = tmp_path / f"history-{frozen}.json"
        write_history(history, epochs=4, frozen=frozen)
        image = plotting.plot_history(plotting.load_history(history), tmp_path / f"{frozen}.png")
        pixels[frozen] = np.asarray(matplotlib.image.imread(image))
    assert pixels[None].shape == pixels[2].shape
    # Green (the start line and its legend entry) appears only in the fine-tuned run's figure.
    green = lambda rgb: (rgb[..., 1] > 0.4) & (rgb[..., 0] < 0.2) & (rgb[..., 2] < 0.2)  # noqa: E731
    assert not green(pixels[None]).any() and green(pixels[2]).sum() > 100


def test_plot_command_reports_a_missing_history(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {tmp_path / 'history.json'} does not exist; give a workdir or its history.json\n"
    )


def test_an_empty_history_is_refused(tmp_path):
    with pytest.raises(plotting.HistoryError, match="no epochs"):
        plotting.plot_history({"config": {}, "epochs": []}, tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_confusion_and_misclassified_figures(tmp_path):
    confusion = np.diag(np.full(10, 5)) + 1
    plotting.plot_confusion(confusion, tmp_path / "confusion.png")
    assert png_size(tmp_path / "confusion.png") == (700, 600)
    digits = [np.full((28, 28, 1), 200, np.uint8), np.zeros((32, 32, 3), np.float32)]
    plotting.plot_misclassified(digits, [3, 5], [8, 6], tmp_path / "misclassified.png")
    assert png_size(tmp_path / "misclassified.png") == (800, 180)
