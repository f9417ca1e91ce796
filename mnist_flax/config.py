"""The run configuration: every option of a training run, its default, its flag and its validation.

`TrainConfig` is the one place a default lives. `mnist-flax train`'s flags are generated from its
fields (`cli.py`), each field's metadata holding its flag group and help text, so `--help` shows
every default and a new field is a new flag. This module imports neither JAX nor TensorFlow, so that
`--help` and flag errors answer at once; the constants the other modules share with it (choices,
the smallest input size) are defined here for the same reason.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any

# MobileNetV2's smallest input side (five stride-2 stages leave 1x1 at 32 px).
MIN_IMAGE_SIZE = 32
DTYPES = ("float32", "bfloat16")
# "auto": "taps" on the CPU backend, "conv" on GPU/TPU (see mobilenet_v2.py).
DEPTHWISE_IMPLS = ("auto", "conv", "taps")
# "host": tf.data resizes the digits; "device": uint8 digits are shipped and the jitted step resizes;
# "auto": device on GPU/TPU, host on the CPU (where both run on the same cores and host is faster).
RESIZE_PLACES = ("host", "device")
RESIZE_MODES = ("auto", *RESIZE_PLACES)
# How the head's learning rate moves over the run (optax schedules, stepped once per batch).
LR_SCHEDULES = ("constant", "cosine", "warmup-cosine")
# "auto": cache the frozen backbone's features when that is exact and they fit --cache-budget-mb.
CACHE_FEATURES = ("auto", "always", "never")
# Bytes one image of one batch occupies at its widest in the backbone, per input pixel: the float32
# RGB input (3 channels) and block 1's expanded activation (96 channels at half the side: 24).
_BYTES_PER_PIXEL = 4 * (3 + 24)
# Which checkpoint of a run `mnist-flax evaluate` restores: "best" by validation accuracy (a run
# with --validation-split), "latest", or "auto": best where there is a validation split, else latest.
EVALUATE_CHECKPOINTS = ("auto", "best", "latest")


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
    validation_split: str | None = _option(
        None,
        "data",
        'tfds split syntax, e.g. "train[50000:]": evaluated every epoch and the one that chooses '
        "the best checkpoint (default: none; then nothing is chosen, evaluate uses the final one)",
        type=str,
    )
    image_size: int = _option(224, "data", f"input side in pixels, >= {MIN_IMAGE_SIZE}")
    resize: str = _option(
        "auto",
        "data",
        "resize in tf.data (host) or inside the jitted step (device); auto: device on GPU/TPU, "
        "host on CPU",
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
    learning_rate: float = _option(
        3e-3, "training", "Adam's (peak) learning rate for the head; the tutorial's is 1e-3"
    )
    lr_schedule: str = _option(
        "cosine",
        "training",
        "cosine: decays to 0 over the run; warmup-cosine: rises for --warmup-epochs first; "
        "constant: the tutorial's",
        choices=LR_SCHEDULES,
    )
    warmup_epochs: int = _option(1, "training", "epochs of linear warm-up for warmup-cosine")
    seed: int = _option(0, "training", "initialisation of the head and the data order")
    cache_features: str = _option(
        "auto",
        "training",
        "compute the frozen backbone's features once and train the head on them; auto: whenever "
        "that is exact and they fit --cache-budget-mb",
        choices=CACHE_FEATURES,
    )
    cache_budget_mb: int = _option(
        2048, "training", "most memory (MB) cached features may take with --cache-features auto"
    )
    quiet: bool = _option(
        False, "output", "no progress bars, one line per epoch", action="store_true"
    )
    workdir: str | None = _option(
        None, "output", "run directory (default: runs/<dataset>)", type=str, metavar="DIR"
    )
    compilation_cache: str = _option(
        "auto",
        "output",
        "JAX's persistent compilation cache: DIR, none, or auto (JAX_COMPILATION_CACHE_DIR if "
        "set, else ~/.cache/mnist_flax/jax)",
        metavar="DIR",
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
                math.isfinite(self.learning_rate) and self.learning_rate > 0,
                f"--learning-rate must be a positive number, got {self.learning_rate}",
            ),
            (
                math.isfinite(self.alpha) and self.alpha > 0,
                f"--alpha must be a positive number, got {self.alpha}",
            ),
            (
                self.lr_schedule != "warmup-cosine" or 0 <= self.warmup_epochs < self.epochs,
                f"--warmup-epochs must be in 0..{self.epochs - 1} (fewer than --epochs), "
                f"got {self.warmup_epochs}",
            ),
            (
                self.cache_budget_mb >= 0,
                f"--cache-budget-mb must be at least 0, got {self.cache_budget_mb}",
            ),
        ]
        for name in ("dtype", "depthwise", "resize", "cache_features", "lr_schedule"):
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
        needed, available = self.batch_bytes(), physical_memory_bytes()
        if available and needed > available:
            raise ConfigError(
                f"--image-size {self.image_size} with --batch-size {self.batch_size}: one batch "
                f"needs about {needed / 2**30:,.1f} GiB (its images and the backbone's widest "
                f"activation), more than this machine's {available / 2**30:,.1f} GiB; use a "
                "smaller --image-size or --batch-size"
            )

    def batch_bytes(self) -> int:
        """About the most memory one batch takes at its widest point in the backbone."""
        return self.batch_size * self.image_size**2 * _BYTES_PER_PIXEL

    def resolved_workdir(self) -> pathlib.Path:
        return pathlib.Path(self.workdir or os.path.join("runs", self.dataset))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The config recorded in a checkpoint or history.json (extra keys, e.g. num_classes, ignored)."""
        return cls(**{name: value for name, value in values.items() if name in fields()})


def physical_memory_bytes() -> int | None:
    """This machine's memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def fields() -> dict[str, dataclasses.Field]:
    """`TrainConfig`'s fields by name, in declaration order."""
    return {field.name: field for field in dataclasses.fields(TrainConfig)}
