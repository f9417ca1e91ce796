"""The classifier and what trains: a frozen ImageNet MobileNetV2, average pooling, a Dense head.

This module owns
- `TransferClassifier` and `create_model` (the backbone from `config.weights`, the head from
  `config.seed`), with `preprocess_on_device` for uint8 batches (`--resize device`);
- what trains: `freeze_labels` names every parameter "frozen" or "trainable" from its path, and
  `make_optimizer` turns those labels into `optax.multi_transform`, the one place that says what
  is frozen (`set_to_zero` for the backbone, Adam for the head).

Why freezing costs no backward pass through the backbone: `set_to_zero` never reads the gradient
it is given, so every backbone gradient is dead code, and XLA removes it while compiling. The head
sits after the backbone, so its own gradient needs only the pooled features. `tests/test_steps.py`
checks this from the compiled step's cost analysis.

BatchNorm in the backbone always normalises with its running statistics (Keras `training=False`),
and those statistics are `nnx.BatchStat`s, which the optimizer (`wrt=nnx.Param`) never sees.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mnist_flax.config import TrainConfig
from mnist_flax.mobilenet_v2 import MobileNetV2

FROZEN = "frozen"
TRAINABLE = "trainable"
# Every parameter lives under one of these submodules of TransferClassifier; the label says what
# the optimizer does with it.
LABEL_OF_SUBMODULE = {"backbone": FROZEN, "head": TRAINABLE}
# `config.dtype` names -> compute dtypes.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Keras' Adam uses epsilon 1e-7 (optax defaults to 1e-8).
ADAM_EPSILON = 1e-7


def resolve_resize(resize: str) -> str:
    """Where the digits are resized: "auto" means "device" on GPU/TPU and "host" on the CPU.

    On an accelerator tf.data's resize on a few host cores would starve the device (uint8 digits
    are 784 bytes, a float32 224 px image 602 KB); on the CPU both run on the same cores, and the
    step is faster on tf.data's images (README, "Speed").
    """
    if resize == "auto":
        return "host" if jax.default_backend() == "cpu" else "device"
    return resize


def preprocess_on_device(images_uint8: jax.Array, image_size: int) -> jax.Array:
    """[B, 28, 28, 1] uint8 -> [B, S, S, 3] float32 in [-1, 1], inside the jitted step.

    The same arithmetic as the tf.data path (`input_pipeline.preprocess_images`): bilinear resize
    with half-pixel centres and no antialiasing (what `tf.image.resize` does), then MobileNetV2's
    scaling `x / 127.5 - 1`. Resizing the single gray channel before copying it to RGB gives the
    same numbers for a third of the work.
    """
    images = images_uint8.astype(jnp.float32)
    batch, _, _, channels = images.shape
    images = jax.image.resize(
        images, (batch, image_size, image_size, channels), method="bilinear", antialias=False
    )
    images = jnp.broadcast_to(images, (batch, image_size, image_size, 3))
    return images / 127.5 - 1.0


class TransferClassifier(nnx.Module):
    """MobileNetV2 (no top, average pooled) -> Dense(num_classes); returns logits.

    The Keras tutorial ends in Dense(10, activation="softmax") trained with categorical
    cross-entropy; here the head returns logits and the loss applies the softmax, which is the same
    function computed stably.
    """

    def __init__(self, backbone: MobileNetV2, num_classes: int, *, image_size: int, rngs: nnx.Rngs):
        self.backbone = backbone
        # Keras' Dense initialises its kernel with Glorot-uniform and its bias with zeros.
        self.head = nnx.Linear(
            backbone.num_features,
            num_classes,
            kernel_init=nnx.initializers.glorot_uniform(),
            rngs=rngs,
        )
        self.image_size = image_size

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.classify_features(self.features(images))

    def features(self, images: jax.Array) -> jax.Array:
        """The frozen backbone alone: images -> pooled features [B, num_features] (what gets cached)."""
        # uint8 batches come from `resize="device"`: 28x28 gray digits, resized here on the device.
        if images.dtype == jnp.uint8:
            images = preprocess_on_device(images, self.image_size)
        return self.backbone(images)

    def classify_features(self, features: jax.Array) -> jax.Array:
        """The head alone, on pooled backbone features [B, num_features] (also cached ones)."""
        # A bfloat16 backbone hands over bfloat16 features; the head and the softmax stay float32.
        return self.head(features.astype(jnp.float32))


def build_backbone(config: TrainConfig, rngs: nnx.Rngs) -> MobileNetV2:
    """The backbone `config.weights` names: random ("none"), Keras ImageNet, an H5 file or a converted dir."""
    options = dict(
        alpha=config.alpha,
        include_top=False,
        pooling="avg",
        depthwise=config.depthwise,
        dtype=COMPUTE_DTYPES[config.dtype],
    )
    if config.weights == "none":
        return MobileNetV2(**options, rngs=rngs)
    # Imported here: the converter pulls in h5py and, for "imagenet", the Keras download cache.
    from mnist_flax import convert

    return convert.mobilenet_v2_from_keras(
        config.weights, input_shape=(config.image_size, config.image_size, 3), **options
    )


def create_model(config: TrainConfig, num_classes: int) -> TransferClassifier:
    """The classifier, initialised from `config.seed` (backbone and head draw from separate keys)."""
    backbone_key, head_key = jax.random.split(jax.random.key(config.seed))
    backbone = build_backbone(config, nnx.Rngs(params=backbone_key))
    return TransferClassifier(
        backbone, num_classes, image_size=config.image_size, rngs=nnx.Rngs(params=head_key)
    )


def freeze_labels(model: TransferClassifier) -> nnx.State:
    """A tree like `nnx.state(model, nnx.Param)` holding "frozen" or "trainable" for each parameter.

    The label comes from the parameter's path (its first component is the submodule); a parameter
    outside the known submodules is an error rather than silently trained or frozen.
    """
    params = nnx.state(model, nnx.Param)
    labels = nnx.map_state(lambda path, _: LABEL_OF_SUBMODULE.get(path[0]), params)
    unlabelled = [
        "/".join(map(str, path)) for path, label in nnx.to_flat_state(labels) if label is None
    ]
    if unlabelled:
        raise AssertionError(f"parameters without a freeze label: {', '.join(unlabelled)}")
    return labels


def learning_rate_schedule(
    name: str, peak: float, *, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0
) -> optax.Schedule:
    """The head's learning rate at each optimizer step (`config.LR_SCHEDULES`).

    "constant" is the tutorial's; "cosine" decays from `peak` to 0 over the whole run;
    "warmup-cosine" first rises linearly from 0 to `peak` over `warmup_epochs`. The schedule's
    position is Adam's step count, which the optimizer state (and so every checkpoint) holds:
    a resumed run continues where it stopped.
    """
    total = epochs * steps_per_epoch
    if name == "constant":
        return optax.constant_schedule(peak)
    if name == "cosine":
        return optax.cosine_decay_schedule(peak, decay_steps=total)
    if name == "warmup-cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup_steps=warmup_epochs * steps_per_epoch, decay_steps=total
        )
    raise ValueError(f"unknown learning-rate schedule {name!r}")


def make_optimizer(
    model: TransferClassifier, learning_rate: float | optax.Schedule
) -> nnx.Optimizer:
    """Adam on the trainable parameters, a zero update for the frozen ones, split by `freeze_labels`."""
    tx = optax.multi_transform(
        {FROZEN: optax.set_to_zero(), TRAINABLE: optax.adam(learning_rate, eps=ADAM_EPSILON)},
        freeze_labels(model),
    )
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def trainable_filter(model: TransferClassifier) -> Callable[[tuple, Any], bool]:
    """An NNX filter selecting the parameters `freeze_labels` calls trainable (what checkpoints keep)."""
    trainable_paths = {
        path for path, label in nnx.to_flat_state(freeze_labels(model)) if label == TRAINABLE
    }
    return lambda path, _: tuple(path) in trainable_paths
