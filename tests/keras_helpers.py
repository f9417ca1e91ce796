"""Random Keras MobileNetV2s and the parity check against them, for the parity and converter tests.

Kept apart from `helpers.py` so that test modules without Keras do not import it.
"""

from __future__ import annotations

import keras
import numpy as np

RTOL = 1e-4  # relative to max |keras|


def random_keras_mobilenet(
    *,
    alpha: float = 1.0,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    include_top: bool = False,
    pooling: str | None = None,
    classes: int = 1000,
    classifier_activation: str | None = "softmax",
    seed: int = 0,
) -> keras.Model:
    """A Keras MobileNetV2 with random weights, including BatchNorm statistics and biases.

    Keras initialises moving mean/variance to 0/1, gamma to 1 and beta to 0, under which a BatchNorm
    implementation that ignored them would pass; random values make every one of them count.
    """
    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNetV2(
        input_shape=input_shape,
        alpha=alpha,
        include_top=include_top,
        weights=None,
        pooling=pooling,
        classes=classes,
        classifier_activation=classifier_activation,
    )
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for weight in layer.weights:
            name = weight.path.rsplit("/", 1)[-1]
            if name in ("gamma", "moving_variance"):
                value = rng.uniform(0.5, 1.5, weight.shape)
            elif name in ("beta", "moving_mean", "bias"):
                value = rng.normal(0.0, 0.3, weight.shape)
            else:
                continue  # kernels keep Keras' glorot-uniform draw
            weight.assign(value.astype(np.float32))
    return model


def random_images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


def assert_close_to_keras(ours, theirs, what: str = "output") -> None:
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != Keras {theirs.shape}"
    scale = np.abs(theirs).max()
    error = np.abs(ours - theirs).max()
    assert error <= RTOL * scale, f"{what}: max |flax - keras| = {error:.3g} > {RTOL} x {scale:.3g}"
