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

from mnist_flax.keras_names import NUM_BLOCKS, backbone_layer_names, block_prefix

# MobileNetV2's smallest input side (five stride-2 stages leave 1x1 at 32 px).
MIN_IMAGE_SIZE = 32
DTYPES = ("float32", "bfloat16")
# How convolutions are computed (`convolutions.py`): "xla", XLA's native convolutions; "cpu", the
# forms XLA:CPU runs fast; "auto": "cpu" on the CPU backend, "xla" on GPU/TPU.
CONV_IMPLS = ("auto", "xla", "cpu")
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
# "pipeline": tf.data makes the digits RGB, --image-size square and [-1, 1] for a frozen MobileNetV2,
# pooling and a Dense head. "notebook": the Keras notebook's own model, 28x28 digits in [0, 1] through
# a trainable UpSampling2D + Conv2D(3, relu) adapter in front of the frozen backbone.
MODELS = ("pipeline", "notebook")
# MNIST's side; the notebook model upsamples it by a whole factor (8 for its 224 px).
DIGIT_SIZE = 28
# A run's two stages: --epochs with the whole backbone frozen, then --fine-tune-epochs in which the
# layers from --fine-tune-from on train too. history.json records each epoch's stage by these names.
FROZEN_STAGE = "frozen"
FINE_TUNE_STAGE = "fine-tune"
STAGES = (FROZEN_STAGE, FINE_TUNE_STAGE)
# Which checkpoint of a run `mnist-flax evaluate` restores: "best" by validation accuracy (a run
# with --validation-split), "latest", or "auto": best where there is a validation split, else latest.
EVALUATE_CHECKPOINTS = ("auto", "best", "latest")
# What `mnist-flax export` writes (`export.py`): a .keras file, a LiteRT .tflite, an ONNX model, or
# jax.export's serialized StableHLO; and the quantization LiteRT can apply.
EXPORT_FORMATS = ("keras", "litert", "onnx", "stablehlo")
EXPORT_QUANTIZATIONS = ("int8",)
# Seconds a process of a multi-process run waits for the others to join, and at a meeting, before
# it stops with a line naming those that did not arrive (--distributed-timeout, `rendezvous.py`).
DISTRIBUTED_TIMEOUT_S = 300.0


class ConfigError(ValueError):
    """An invalid training option (named by its command-line flag)."""


class ModelConfigError(ValueError):
    """An invalid MobileNetV2 option (alpha, pooling, conv_impl, input size...)."""


def fine_tune_layer(value: str) -> str:
    """--fine-tune-from as the Keras layer it names: a layer name, or a block number (its first layer)."""
    names = backbone_layer_names()
    if value.isdigit() and int(value) < NUM_BLOCKS:
        block_id = int(value)
        return block_prefix(block_id) + ("depthwise" if block_id == 0 else "expand")
    if value in names:
        return value
    raise ConfigError(
        f"--fine-tune-from {value!r} is neither a block number 0..{NUM_BLOCKS - 1} nor a layer of "
        f"MobileNetV2 (e.g. block_13_expand, block_16_project_BN, Conv_1; {len(names)} in all)"
    )


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
    model: str = _option(
        "pipeline",
        "model",
        "pipeline: RGB [-1, 1] images, frozen MobileNetV2, pooling, Dense; notebook: the Keras "
        "notebook's model, 28x28 digits in [0, 1] upsampled by a trainable "
        "UpSampling2D + Conv2D(3, relu) adapter (--image-size a multiple of 28; no feature cache)",
        choices=MODELS,
    )
    alpha: float = _option(1.0, "model", "MobileNetV2 width multiplier")
    weights: str = _option(
        "imagenet",
        "model",
        "imagenet | none (random) | PATH.h5 (Keras weights) | DIR (from `mnist-flax convert`)",
    )
    conv_impl: str = _option(
        "auto",
        "model",
        "how convolutions are computed, with the same results: xla (XLA's native convolutions) "
        "or cpu (matrix products and multiply-adds, the fast forms on a CPU); auto: cpu on the "
        "CPU backend, xla on GPU/TPU",
        choices=CONV_IMPLS,
    )
    dtype: str = _option(
        "float32", "model", "backbone compute dtype (parameters stay float32)", choices=DTYPES
    )
    batch_size: int = _option(32, "training", "global batch (a multiple of the device count)")
    epochs: int = _option(
        10,
        "training",
        "epochs with the backbone frozen, before any --fine-tune-epochs (a resumed run continues "
        "to this)",
    )
    learning_rate: float = _option(
        3e-3,
        "training",
        "Adam's (peak) learning rate for the head (and the notebook model's adapter); the "
        "tutorial's is 1e-3",
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
        "compute what the frozen layers compute once (the pooled features; while fine-tuning, the "
        "fine-tuned layers' input) and train on that; auto: whenever that is exact and it fits "
        "--cache-budget-mb",
        choices=CACHE_FEATURES,
    )
    cache_budget_mb: int = _option(
        2048, "training", "most memory (MB) a cache may take with --cache-features auto"
    )
    feature_cache: str = _option(
        "auto",
        "training",
        "where cached features are kept for the next run on the same data and weights (a rerun, "
        "a resumed run, another recipe): DIR, none, or auto (~/.cache/mnist_flax/features)",
        metavar="DIR",
    )
    fine_tune_epochs: int = _option(
        0,
        "fine-tuning",
        "epochs of a second stage after --epochs that also trains the top of the backbone "
        "(from --fine-tune-from on; BatchNorm keeps its running statistics)",
    )
    fine_tune_from: str = _option(
        "13",
        "fine-tuning",
        "the first layer that trains in the second stage: a block number (its first layer) or a "
        "Keras layer name such as block_13_expand or Conv_1; every layer after it trains too",
        metavar="LAYER",
    )
    fine_tune_learning_rate: float = _option(
        1e-4,
        "fine-tuning",
        "Adam's (peak) learning rate in the second stage, for the fine-tuned layers and the head "
        "alike, following --lr-schedule (and --warmup-epochs) over --fine-tune-epochs",
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
                self.fine_tune_epochs >= 0,
                f"--fine-tune-epochs must be at least 0, got {self.fine_tune_epochs}",
            ),
            (
                math.isfinite(self.fine_tune_learning_rate) and self.fine_tune_learning_rate > 0,
                f"--fine-tune-learning-rate must be a positive number, got "
                f"{self.fine_tune_learning_rate}",
            ),
            (
                self.lr_schedule != "warmup-cosine"
                or self.fine_tune_epochs == 0
                or self.warmup_epochs < self.fine_tune_epochs,
                f"--warmup-epochs {self.warmup_epochs} also warms the fine-tuning stage up, so it "
                f"must be fewer than --fine-tune-epochs {self.fine_tune_epochs}",
            ),
            (
                self.model != "notebook" or self.image_size % DIGIT_SIZE == 0,
                f"--model notebook upsamples the {DIGIT_SIZE}x{DIGIT_SIZE} digits by a whole "
                f"factor (UpSampling2D): --image-size must be a multiple of {DIGIT_SIZE} (224 is "
                f"the notebook's 8x), got {self.image_size}",
            ),
            (
                self.model != "notebook" or self.resize == "auto",
                f"--resize {self.resize} applies to --model pipeline; the notebook model takes "
                "28x28 digits in [0, 1] and upsamples them inside its step (leave --resize auto)",
            ),
            (
                self.model != "notebook" or self.cache_features != "always",
                "--cache-features always cannot be used with --model notebook: its adapter "
                "trains in front of the backbone, so the backbone's features change with every "
                "step and no cache of them is exact; use --cache-features auto or never",
            ),
            (
                self.cache_budget_mb >= 0,
                f"--cache-budget-mb must be at least 0, got {self.cache_budget_mb}",
            ),
        ]
        for name in ("model", "dtype", "conv_impl", "resize", "cache_features", "lr_schedule"):
            choices = fields()[name].metadata["choices"]
            value = getattr(self, name)
            checks.append(
                (
                    value in choices,
                    f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}",
                )
            )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        fine_tune_layer(self.fine_tune_from)
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

    @property
    def total_epochs(self) -> int:
        """Both stages' epochs: the run's last epoch number."""
        return self.epochs + self.fine_tune_epochs

    def stage(self, epoch: int) -> str:
        """The stage (`STAGES`) epoch `epoch` (1-based) belongs to."""
        return FROZEN_STAGE if epoch <= self.epochs else FINE_TUNE_STAGE

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
