"""The run configuration: every option of a training run, its default, its flag and its validation.

`TrainConfig` is the one place a default lives. `mnist-flax train`'s flags are generated from its
fields (`cli.py`), each field's metadata holding its flag group and help text, so `--help` shows
every default and a new field is a new flag. This module imports neither JAX nor TensorFlow, so that
`--help` and flag errors answer at once; the constants the other modules share with it (choices,
the smallest input size) are defined here for the same reason.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

# MobileNetV2's smallest input side (five stride-2 stages leave 1x1 at 32 px).
MIN_IMAGE_SIZE = 32
DTYPES = ("float32", "bfloat16")
# "auto": "taps" on the CPU backend, "conv" on GPU/TPU (see mobilenet_v2.py).
DEPTHWISE_IMPLS = ("auto", "conv", "taps")
# "host": tf.data resizes the digits; "device": uint8 digits are shipped and the jitted step resizes.
RESIZE_MODES = ("host", "device")
# Which checkpoint of a run `mnist-flax evaluate` restores.
EVALUATE_CHECKPOINTS = ("best", "latest")


class ConfigError(ValueError):
    """An invalid training option (named by its command-line flag)."""


def _option(default: Any, group: str, help: str, **flag: Any) -> Any:
    """A `TrainConfig` field whose metadata says how `cli.py` shows it (group, help, argparse kwargs)."""
    return dataclasses.field(default=default, metadata={"group": group, "help": help, **flag})


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on; each field is the CLI flag of the same name."""

    dataset: str = _option(
        "mnist", "data", "tfds dataset name (with --data-dir only the name shown)"
    )
    data_dir: str | None = _option(
        None,
        "data",
        "read IDX files (train-*-ubyte, t10k-*-ubyte, gzipped or not) from DIR instead of tfds "
        "(default: tfds)",
        type=str,
        metavar="DIR",
    )
    train_split: str = _option("train", "data", 'tfds split syntax, e.g. "train[:80%%]"')
    test_split: str = _option("test", "data", 'tfds split syntax, e.g. "test[8000:]"')
    image_size: int = _option(224, "data", f"input side in pixels, >= {MIN_IMAGE_SIZE}")
    resize: str = _option(
        "host",
        "data",
        "resize in tf.data (host) or inside the jitted step (device)",
        choices=RESIZE_MODES,
    )
    alpha: float = _option(1.0, "model", "MobileNetV2 width multiplier")
    weights: str = _option(
        "imagenet",
        "model",
        "imagenet | none (random) | PATH.h5 (Keras weights) | DIR (from `mnist-flax convert`)",
    )
    depthwise: str = _option(
        "auto",
        "model",
        "convolution implementation (auto: taps on CPU, conv on GPU/TPU)",
        choices=DEPTHWISE_IMPLS,
    )
    dtype: str = _option(
        "float32", "model", "backbone compute dtype (parameters stay float32)", choices=DTYPES
    )
    batch_size: int = _option(32, "training", "global batch (a multiple of the device count)")
    epochs: int = _option(10, "training", "epochs to train (a resumed run continues to this)")
    learning_rate: float = _option(1e-3, "training", "Adam's learning rate for the head")
    seed: int = _option(0, "training", "initialisation of the head and the data order")
    cache_features: bool = _option(
        False,
        "training",
        "compute the frozen backbone's features once and train the head on them",
        action="store_true",
    )
    quiet: bool = _option(
        False, "output", "no progress bars, one line per epoch", action="store_true"
    )
    workdir: str | None = _option(
        None, "output", "run directory (default: runs/<dataset>)", type=str, metavar="DIR"
    )

    def validate(self) -> None:
        """Raises ConfigError naming the first invalid flag."""
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (
                self.image_size >= MIN_IMAGE_SIZE,
                f"--image-size must be at least {MIN_IMAGE_SIZE} (MobileNetV2's smallest input), "
                f"got {self.image_size}",
            ),
            (
                self.learning_rate > 0,
                f"--learning-rate must be positive, got {self.learning_rate}",
            ),
            (self.alpha > 0, f"--alpha must be positive, got {self.alpha}"),
        ]
        for name in ("dtype", "depthwise", "resize"):
            choices = fields()[name].metadata["choices"]
            value = getattr(self, name)
            checks.append(
                (
                    value in choices,
                    f"--{name} must be one of {', '.join(choices)}, got {value!r}",
                )
            )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def resolved_workdir(self) -> pathlib.Path:
        return pathlib.Path(self.workdir or os.path.join("runs", self.dataset))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The config recorded in a checkpoint or history.json (extra keys, e.g. num_classes, ignored)."""
        return cls(**{name: value for name, value in values.items() if name in fields()})


def fields() -> dict[str, dataclasses.Field]:
    """`TrainConfig`'s fields by name, in declaration order."""
    return {field.name: field for field in dataclasses.fields(TrainConfig)}
