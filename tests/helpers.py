"""What several test modules build: tiny IDX files and tfds metadata, tiny models, configs and batches.

Plain functions (not fixtures), imported as `from helpers import ...`: pytest puts this folder on
`sys.path`. Fixtures live in `conftest.py`.
"""

import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from mnist_flax import build
from mnist_flax.build import create_model
from mnist_flax.config import DIGIT_SIZE, MIN_IMAGE_SIZE, TrainConfig
from mnist_flax.mobilenet_v2 import MobileNetV2
from mnist_flax.model import TransferClassifier

IMAGE_SIZE = MIN_IMAGE_SIZE  # the side of every tiny model's input
NOTEBOOK_IMAGE_SIZE = 2 * DIGIT_SIZE  # the tiny notebook model's backbone input (UpSampling2D(2))
BATCH = 8


def command_environment() -> dict[str, str]:
    """This process's environment less the TensorFlow log level that `import jax` set here, for
    the commands a test starts: they then quiet TensorFlow as they do for a user
    (`runtime.quiet_libraries`; TensorFlow 2.20 logs "failed call to cuInit" without a GPU)."""
    return {name: value for name, value in os.environ.items() if name != "TF_CPP_MIN_LOG_LEVEL"}


def run_code(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`code` run by a new interpreter in the commands' environment, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=command_environment(),
    )


def block_digits(num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Digit k is a bright block at position k of a 3x4 grid on a noisy background."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, num_examples).astype(np.uint8)
    images = rng.integers(0, 40, (num_examples, 28, 28)).astype(np.uint8)
    for image, label in zip(images, labels, strict=True):
        row, column = divmod(int(label), 4)
        image[row * 9 : row * 9 + 9, column * 7 : column * 7 + 7] = 255
    return images, labels


def write_tfds_metadata(tfds_dir: pathlib.Path, name: str, num_examples: int) -> None:
    """What a prepared tfds data dir holds besides the records, for `mock_data` to serve records."""
    builder = tfds.builder(name, data_dir=tfds_dir)
    builder.info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(name=split, shard_lengths=[num_examples], num_bytes=0)
                for split in ("train", "test")
            ]
        )
    )
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)


def tiny_config(idx_dir: pathlib.Path, workdir: pathlib.Path, **overrides) -> TrainConfig:
    options = dict(
        data_dir=str(idx_dir),
        image_size=IMAGE_SIZE,
        alpha=0.35,
        weights="none",
        batch_size=BATCH,
        epochs=4,
        quiet=True,
        workdir=str(workdir),
    )
    return TrainConfig(**{**options, **overrides})


def without_seconds(history: dict) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history["epochs"]]


def assert_same_history(a: dict, b: dict, *, rel: float = 1e-5, abs: float = 1e-6) -> None:
    """Epoch for epoch the same stage and the same numbers (up to `rel`/`abs`), seconds aside."""
    assert len(a["epochs"]) == len(b["epochs"])
    for record_a, record_b in zip(without_seconds(a), without_seconds(b), strict=True):
        assert record_a.pop("stage") == record_b.pop("stage"), record_a["epoch"]
        for key, value in record_a.items():
            assert value == pytest.approx(record_b[key], rel=rel, abs=abs), (record_a, key)


def tiny_model(
    num_classes: int = 4,
    *,
    dtype: str = "float32",
    conv_impl: str = "auto",
    model: str = "pipeline",
    fine_tune_from: str | None = None,
) -> TransferClassifier:
    """A random alpha-0.35 classifier; `fine_tune_from` gives it a fine-tuned group."""
    config = TrainConfig(
        image_size=NOTEBOOK_IMAGE_SIZE if model == "notebook" else IMAGE_SIZE,
        alpha=0.35,
        weights="none",
        dtype=dtype,
        conv_impl=conv_impl,
        model=model,
        fine_tune_epochs=0 if fine_tune_from is None else 1,
        fine_tune_from=fine_tune_from or TrainConfig.fine_tune_from,
    )
    return create_model(config, num_classes)


def he_initialise_backbone(model: TransferClassifier, seed: int = 0) -> None:
    """Gives the classifier's random backbone informative features (see `he_initialise`)."""
    he_initialise(model.backbone, seed)


def he_initialise(backbone: MobileNetV2, seed: int = 0) -> None:
    """Gives a random MobileNetV2 informative features.

    Keras' (and our) random MobileNetV2 uses Glorot-uniform kernels; with BatchNorm frozen at its
    initial statistics the activations shrink by orders of magnitude per block (1e-11 at the
    pooled output), so a head on top has nothing to learn from. He-normal kernels with the true
    fan-in (3x3 for a depthwise kernel) keep the activations near unit scale.
    """
    # NumPy draws: eager jax.random ops would compile once per kernel shape (~30 s in all).
    rng = np.random.default_rng(seed)
    for path, variable in nnx.to_flat_state(nnx.state(backbone, nnx.Param)):
        if path[-1] != "kernel":
            continue
        kh, kw, cin, _ = variable.shape
        fan_in = kh * kw if "depthwise" in path else kh * kw * cin
        kernel = rng.normal(size=variable.shape) * np.sqrt(2.0 / fan_in)
        variable.set_value(jnp.asarray(kernel, jnp.float32))


def use_he_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes every model built from a config (training, evaluation) get a He-initialised backbone."""
    build_backbone = build.build_backbone

    def he_backbone(config, rngs):
        backbone = build_backbone(config, rngs)
        he_initialise(backbone)
        return backbone

    monkeypatch.setattr(build, "build_backbone", he_backbone)


def quadrant_batches(num_examples: int, seed: int) -> list[dict[str, np.ndarray]]:
    """A learnable task: class k lights up quadrant k of a noisy dark image."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, num_examples).astype(np.int32)
    images = np.full((num_examples, IMAGE_SIZE, IMAGE_SIZE, 3), -1.0, np.float32)
    half = IMAGE_SIZE // 2
    for image, label in zip(images, labels, strict=True):
        row, column = divmod(int(label), 2)
        image[row * half : (row + 1) * half, column * half : (column + 1) * half] = 1.0
    images += rng.normal(0, 0.2, images.shape).astype(np.float32)
    return [
        {
            "image": images[i : i + BATCH],
            "label": labels[i : i + BATCH],
            "mask": np.ones(BATCH, bool),
        }
        for i in range(0, num_examples, BATCH)
    ]
