"""Figures of a run: training curves (the Keras tutorial's plot), confusion matrix, misclassified digits.

`mnist-flax plot` draws the curves of any history.json: the same figure `mnist-flax train` draws at
the end of a run.

Drawn with Matplotlib's object API (`Figure`, no pyplot), so nothing depends on or changes the
global backend: this works the same in a terminal, a test and a notebook. Every figure has a fixed
size in pixels (`figsize * DPI`).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

DPI = 100
CURVES_FIGSIZE = (8, 8)  # 800 x 800 px, as the tutorial's plt.figure(figsize=(8, 8))
CONFUSION_FIGSIZE = (7, 6)
MISCLASSIFIED_SHOWN = 25  # a 5 x 5 grid


class HistoryError(ValueError):
    """A history.json that is missing or not one this project wrote."""


def load_history(workdir_or_file: str | os.PathLike) -> dict:
    """Reads `{"config": ..., "epochs": [...]}` from a history.json or the workdir holding one."""
    path = pathlib.Path(workdir_or_file)
    if path.is_dir():
        path = path / "history.json"
    try:
        history = json.loads(path.read_text())
    except FileNotFoundError:
        raise HistoryError(f"{path} does not exist; give a workdir or its history.json") from None
    except (OSError, ValueError) as error:
        raise HistoryError(f"{path} cannot be read as JSON ({error})") from None
    if not isinstance(history, dict) or not isinstance(history.get("epochs"), list):
        raise HistoryError(f"{path} has no 'epochs' list; it is not a history.json of mnist-flax")
    return history


def plot_history(history: dict, path: str | os.PathLike) -> pathlib.Path:
    """Accuracy (y from 0 to 1, legend lower right), loss and learning rate per epoch.

    Train and test curves as in the tutorial (which passes its test set as `validation_data`),
    plus the validation split's where the run has one, and a line where fine-tuning starts in a
    run with a fine-tuning stage.
    """
    epochs = history["epochs"]
    if not epochs:
        raise HistoryError("the history has no epochs yet; nothing to plot")
    x = [record["epoch"] for record in epochs]
    roles = [role for role in ("train", "validation", "test") if f"{role}_loss" in epochs[0]]
    has_rate = "learning_rate" in epochs[0]
    figure = Figure(figsize=CURVES_FIGSIZE, dpi=DPI)
    axes = figure.subplots(
        3 if has_rate else 2, 1, sharex=True, height_ratios=[2, 2, 1] if has_rate else [1, 1]
    )
    accuracy, loss = axes[0], axes[1]
    for role in roles:
        label = {"train": "Training", "validation": "Validation", "test": "Test"}[role]
        accuracy.plot(x, [r[f"{role}_accuracy"] for r in epochs], "o-", label=f"{label} Accuracy")
        loss.plot(x, [r[f"{role}_loss"] for r in epochs], "o-", label=f"{label} Loss")
    accuracy.set_ylim(0, 1)
    accuracy.set_ylabel("Accuracy")
    accuracy.set_title("Training and Test Accuracy")
    accuracy.legend(loc="lower right")
    highest = max(r[f"{role}_loss"] for r in epochs for role in roles)
    loss.set_ylim(0, max(1.0, highest * 1.05))
    loss.set_ylabel("Cross Entropy")
    loss.set_title("Training and Test Loss")
    loss.legend(loc="upper right")
    if has_rate:
        rate = axes[2]
        rate.plot(x, [r["learning_rate"] for r in epochs], "o-", color="gray")
        rate.set_ylabel("Learning rate")
        rate.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    # Where fine-tuning starts, as Keras' transfer-learning guide marks it: after the last epoch
    # of the frozen stage.
    frozen = [r["epoch"] for r in epochs if r.get("stage", "frozen") == "frozen"]
    if len(frozen) < len(epochs):
        for ax in axes:
            ax.axvline(
                max(frozen, default=0), color="green", linestyle="--", label="Start Fine Tuning"
            )
        accuracy.legend(loc="lower right")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("epoch (learning rate: at its last step)" if has_rate else "epoch")
    # Whole epochs only on the x axis.
    axes[-1].xaxis.get_major_locator().set_params(integer=True)

    config = history.get("config") or {}
    if config:
        # A weights path is shortened to its file name so the title fits the figure.
        weights = pathlib.Path(str(config.get("weights", "?"))).name
        model = "notebook model, " if config.get("model") == "notebook" else ""
        figure.suptitle(
            f"{config.get('dataset', '?')}: {model}MobileNetV2 alpha {config.get('alpha', '?')}, "
            f"{config.get('image_size', '?')} px, weights {weights}",
            wrap=True,
        )
    figure.tight_layout()
    return _save(figure, path)


def plot_confusion(confusion: np.ndarray, path: str | os.PathLike) -> pathlib.Path:
    """The confusion matrix (rows: true class, columns: predicted), counts written in each cell."""
    confusion = np.asarray(confusion)
    num_classes = confusion.shape[0]
    names = [str(i) for i in range(num_classes)]
    figure = Figure(figsize=CONFUSION_FIGSIZE, dpi=DPI)
    axes = figure.subplots()
    image = axes.imshow(confusion, cmap="Blues")
    figure.colorbar(image, ax=axes)
    axes.set_xticks(range(num_classes), names)
    axes.set_yticks(range(num_classes), names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    total = confusion.sum()
    correct = np.trace(confusion)
    axes.set_title(f"Confusion matrix: {correct}/{total} correct ({correct / max(total, 1):.2%})")
    threshold = confusion.max() / 2 if confusion.size else 0
    for true in range(num_classes):
        for predicted in range(num_classes):
            count = confusion[true, predicted]
            axes.text(
                predicted,
                true,
                str(count),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if count > threshold else "black",
            )
    figure.tight_layout()
    return _save(figure, path)


def _as_gray(image: np.ndarray) -> np.ndarray:
    """A batch image as a 2-D array in [0, 1]: uint8 digits or [-1, 1] floats, gray or RGB."""
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[..., 0]  # the three channels are copies of the gray one
    if image.dtype == np.uint8:
        return image / 255.0
    return np.clip((image.astype(np.float32) + 1.0) / 2.0, 0.0, 1.0)


def plot_misclassified(
    images: Sequence[np.ndarray],
    predicted: Sequence[int],
    true: Sequence[int],
    path: str | os.PathLike,
) -> pathlib.Path:
    """A grid of up to MISCLASSIFIED_SHOWN wrongly classified digits, titled "pred P / true T"."""
    shown = min(len(images), MISCLASSIFIED_SHOWN)
    columns = 5
    rows = max(1, math.ceil(shown / columns))
    figure = Figure(figsize=(columns * 1.6, rows * 1.8), dpi=DPI)
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for index, ax in enumerate(axes):
        ax.set_axis_off()
        if index < shown:
            ax.imshow(_as_gray(images[index]), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"pred {predicted[index]} / true {true[index]}", fontsize=9, color="red")
    if shown == 0:
        axes[0].text(0.5, 0.5, "no misclassified examples", ha="center", va="center")
    figure.suptitle(f"Misclassified test digits (first {shown})")
    figure.tight_layout()
    return _save(figure, path)


def _save(figure: Figure, path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path
