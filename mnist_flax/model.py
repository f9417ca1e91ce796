"""The classifiers: an ImageNet MobileNetV2, average pooling and a Dense head, with or without the
Keras notebook's trainable adapter in front.

This module owns `TransferClassifier`: the pipeline model (RGB images in [-1, 1] -> backbone ->
average pooling -> Dense) and the Keras notebook's own model (28x28 digits in [0, 1] ->
`NotebookAdapter`, i.e. UpSampling2D + Conv2D(3, relu) -> the same backbone and head), with
`preprocess_on_device` for uint8 batches (`--resize device`). Building one from `--weights` is
`build.py`'s; what trains in it, and how, is `freezing.py`'s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mnist_flax import cpu_chunks
from mnist_flax.convolutions import SAME_3X3, conv2d
from mnist_flax.keras_names import NUM_UNITS, unit_of_layer
from mnist_flax.mobilenet_v2 import MobileNetV2

# The points of the classifier's chain, in order (`TransferClassifier.__call__`). A batch holds an
# "image", or the values a stage cached at "activations" or "features", under that name.
POINTS = ("image", "activations", "features", "logits")


def resolve_resize(resize: str, model: str = "pipeline", platform: str | None = None) -> str:
    """Where the digits are resized: "auto" means "device" on GPU/TPU and "host" on the CPU
    (`platform`'s choice; default: JAX's default backend).

    The notebook model resizes nothing outside its step ("none": 28x28 digits in [0, 1]). On an
    accelerator tf.data's resize on a few host cores would starve the device (uint8 digits
    are 784 bytes, a float32 224 px image 602 KB); on the CPU both run on the same cores, and the
    step measured faster on tf.data's images (docs/benchmarks.md).
    """
    if model == "notebook":
        return "none"
    if resize == "auto":
        return "host" if (platform or jax.default_backend()) == "cpu" else "device"
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


class NotebookAdapter(nnx.Module):
    """The notebook's trainable input layers: `UpSampling2D(factor)`, `Conv2D(3, 3, "same", relu)`.

    [B, 28, 28, 1] digits in [0, 1] -> [B, 28 * factor, 28 * factor, 3]: nearest-neighbour
    upsampling (Keras' default interpolation) and a 3x3 convolution that learns the three channels
    the frozen backbone reads, with Keras' initialisers (Glorot-uniform kernel, zero bias).
    """

    def __init__(self, factor: int, *, conv_impl: str = "auto", rngs: nnx.Rngs):
        self.factor = factor
        self.conv_impl = conv_impl  # as the backbone's (`convolutions.py`)
        # An nnx.Conv for its parameters (Keras' layout); `__call__` computes it with `conv2d`.
        self.conv = nnx.Conv(
            1,
            3,
            kernel_size=(3, 3),
            padding="SAME",
            kernel_init=nnx.initializers.glorot_uniform(),
            rngs=rngs,
        )

    def __call__(self, digits: jax.Array) -> jax.Array:
        upsampled = jnp.repeat(jnp.repeat(digits, self.factor, axis=1), self.factor, axis=2)
        kernel, bias = self.conv.kernel[...], self.conv.bias[...]
        y = conv2d(upsampled, kernel, strides=1, padding=SAME_3X3, impl=self.conv_impl)
        return jax.nn.relu(y + bias)


class TransferClassifier(nnx.Module):
    """[adapter ->] MobileNetV2 (no top, average pooled) -> Dense(num_classes); returns logits.

    The Keras tutorial ends in Dense(10, activation="softmax") trained with categorical
    cross-entropy; here the head returns logits and the loss applies the softmax, which is the same
    function computed stably.

    adapter: the notebook model's `NotebookAdapter` (then the input is [B, 28, 28, 1] float32 in
        [0, 1]), or None for the pipeline model (RGB images in [-1, 1], or uint8 digits resized on
        the device).
    fine_tune_from: the Keras layer from which the backbone trains in the fine-tuning stage
        (`freezing.freeze_labels`), or None when the whole backbone stays frozen.
    batch_chunk: images per pass through the frozen backbone units: None, the CPU path's plan
        (`cpu_chunks.py`) on the CPU and the whole batch elsewhere; 0, the whole batch; N, N images.
    """

    def __init__(
        self,
        backbone: MobileNetV2,
        num_classes: int,
        *,
        image_size: int,
        adapter: NotebookAdapter | None = None,
        fine_tune_from: str | None = None,
        batch_chunk: int | None = None,
        rngs: nnx.Rngs,
    ):
        self.backbone = backbone
        self.adapter = adapter
        # Keras' Dense initialises its kernel with Glorot-uniform and its bias with zeros.
        self.head = nnx.Linear(
            backbone.num_features,
            num_classes,
            kernel_init=nnx.initializers.glorot_uniform(),
            rngs=rngs,
        )
        self.image_size = image_size
        self.fine_tune_from = fine_tune_from
        self.batch_chunk = batch_chunk
        # Backbone units [0, cut) stay frozen in every stage; fine-tuning trains those from `cut` on.
        self.cut = NUM_UNITS if fine_tune_from is None else unit_of_layer(fine_tune_from)

    def __call__(self, x: jax.Array, *, start: str = "image", stop: str = "logits") -> jax.Array:
        """The classifier's chain from point `start` to point `stop` (`POINTS`):

            "image" -> adapter (notebook model) or resize (uint8 digits) -> the backbone units
            no stage trains -> "activations" -> the units fine-tuning trains, average pooling
            -> "features" -> the Dense head -> "logits"

        `model(images)` is the classifier. A stage whose epochs run on cached values computes
        them once, `model(images, stop="features")` (the frozen stage) or `stop="activations"`
        (fine-tuning), and each step then runs `model(values, start=...)`: the rest of the chain.
        """
        for point in POINTS[POINTS.index(start) + 1 : POINTS.index(stop) + 1]:
            if point == "activations":
                x = self.frozen_units(x)
            elif point == "features":
                # Cached activations come as float32; the units compute in the backbone's dtype.
                x = x.astype(self.backbone.dtype or x.dtype)
                for unit in self.backbone.units[self.cut :]:
                    x = unit(x)
                x = self.backbone.output(x)
            else:
                # A bfloat16 backbone hands over bfloat16 features; the head and the softmax
                # stay float32.
                x = self.head(x.astype(jnp.float32))
        return x

    def frozen_units(self, images: jax.Array) -> jax.Array:
        """Images -> the activation entering unit `cut`: what the backbone reads (the adapter's
        output, or the images resized if uint8), through the units no stage trains.

        On the CPU path a few images at a time, so that each image's activations stay in cache
        (`cpu_chunks.py`); elsewhere the whole batch.
        """
        if self.adapter is not None:
            # In the gradient's chunks: the upsampled digits stay in cache.
            x = cpu_chunks.map_in_chunks(self.adapter, images, cpu_chunks.gradient_chunk(self))
        elif images.dtype == jnp.uint8:  # from `--resize device`: 28x28 gray digits
            x = preprocess_on_device(images, self.image_size)
        else:
            x = images
        self.backbone.check_input(x)
        chunks = cpu_chunks.unit_chunks(self, x.shape[1], x.shape[2])
        return cpu_chunks.run_units(self.backbone.units[: self.cut], x, chunks[: self.cut])
