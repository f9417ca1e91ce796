"""The classifiers: an ImageNet MobileNetV2, average pooling and a Dense head, with or without the
Keras notebook's trainable adapter in front.

This module owns `TransferClassifier` and `create_model`: the pipeline model (RGB images in [-1, 1]
-> backbone -> average pooling -> Dense) and the Keras notebook's own model (28x28 digits in [0, 1]
-> `NotebookAdapter`, i.e. UpSampling2D + Conv2D(3, relu) -> the same backbone and head), built from
the weights `--weights` names (random, Keras ImageNet, an H5 file, a converted directory), with
`preprocess_on_device` for uint8 batches (`--resize device`). What trains in them, and how, is
`freezing.py`'s.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mnist_flax.config import DIGIT_SIZE, TrainConfig, fine_tune_layer
from mnist_flax.convolutions import SAME_3X3, conv2d
from mnist_flax.mobilenet_v2 import Conv2D, DepthwiseConv2D, MobileNetV2

# `config.dtype` names -> compute dtypes.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
        (`freezing.freeze_labels`), or None when the whole backbone stays frozen. The activation entering
        the unit that holds it (`cut`) is what the fine-tuning stage caches.
    """

    def __init__(
        self,
        backbone: MobileNetV2,
        num_classes: int,
        *,
        image_size: int,
        adapter: NotebookAdapter | None = None,
        fine_tune_from: str | None = None,
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
        self.cut = None if fine_tune_from is None else backbone.unit_of_layer(fine_tune_from)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.classify_features(self.features(images))

    @property
    def gradient_chunk(self) -> int:
        """Examples per chunk of the train step's gradient (`steps.train_step`); 0 = whole batch.

        The notebook model's gradient crosses the frozen backbone's activations, so on the CPU
        path it is computed in the backbone's chunks (`MobileNetV2.batch_chunk`) and summed.
        The pipeline model differentiates only layers after the frozen ones: whole batch.
        """
        return self.backbone.chunk_size() if self.adapter is not None else 0

    def backbone_input(self, images: jax.Array) -> jax.Array:
        """What the backbone reads: the adapter's output, or the images (resized if uint8)."""
        if self.adapter is not None:
            # In the backbone's chunks: the upsampled digits stay in cache (`MobileNetV2.in_chunks`).
            return self.backbone.in_chunks(self.adapter, images)
        # uint8 batches come from `resize="device"`: 28x28 gray digits, resized here on the device.
        if images.dtype == jnp.uint8:
            return preprocess_on_device(images, self.image_size)
        return images

    def features(self, images: jax.Array) -> jax.Array:
        """Images -> pooled backbone features [B, num_features] (what the frozen stage caches)."""
        if self.cut:
            # The frozen prefix as the CPU path runs a frozen backbone (in chunks), the layers
            # that fine-tuning trains on the whole batch (`MobileNetV2.suffix`).
            return self.backbone.suffix(self.cut_activations(images), self.cut)
        return self.backbone(self.backbone_input(images))

    def cut_activations(self, images: jax.Array) -> jax.Array:
        """Images -> the activation entering the fine-tuned layers (what fine-tuning caches)."""
        return self.backbone.prefix(self.backbone_input(images), self.cut)

    def classify_cut_activations(self, activations: jax.Array) -> jax.Array:
        """The fine-tuned layers and the head, on `cut_activations` (also cached ones)."""
        return self.classify_features(self.backbone.suffix(activations, self.cut))

    def classify_features(self, features: jax.Array) -> jax.Array:
        """The head alone, on pooled backbone features [B, num_features] (also cached ones)."""
        # A bfloat16 backbone hands over bfloat16 features; the head and the softmax stay float32.
        return self.head(features.astype(jnp.float32))


def with_computation(
    model: TransferClassifier, *, conv_impl: str, batch_chunk: int
) -> TransferClassifier:
    """A copy of `model` sharing its arrays that computes in float32, its convolutions by
    `conv_impl` (`convolutions.py`), `batch_chunk` images at a time (0: the whole batch).

    What the exports trace (`export.py`): the same parameters whatever `--dtype`, `--conv-impl`
    and chunking the run used, so that every format computes the same float32 function.
    """
    copy = nnx.clone(model)
    for _, module in nnx.iter_modules(copy):
        if isinstance(module, (MobileNetV2, Conv2D, DepthwiseConv2D, NotebookAdapter)):
            module.conv_impl = conv_impl
        if isinstance(module, (MobileNetV2, Conv2D, DepthwiseConv2D)):
            module.dtype = None  # the input's: float32
    copy.backbone.batch_chunk = batch_chunk
    return copy


def build_backbone(config: TrainConfig, rngs: nnx.Rngs) -> MobileNetV2:
    """The backbone `config.weights` names: random ("none"), Keras ImageNet, an H5 file or a converted dir."""
    options = dict(
        alpha=config.alpha,
        include_top=False,
        pooling="avg",
        conv_impl=config.conv_impl,
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
    """The classifier `config.model` names, initialised from `config.seed`.

    The backbone, the head and the notebook's adapter draw from separate keys (the pipeline
    model's head draws what it drew before the adapter existed). A `config.weights` directory
    holding a whole converted classifier (`mnist-flax convert --keras-model`) fills every
    parameter, trained head and adapter included.
    """
    # Imported here: the converter pulls in h5py (and Orbax for converted directories).
    from mnist_flax import convert

    classifier_dir = convert.is_converted_classifier(config.weights)

    def build() -> TransferClassifier:
        key = jax.random.key(config.seed)
        backbone_key, head_key = jax.random.split(key)
        backbone_config = dataclasses.replace(config, weights="none") if classifier_dir else config
        backbone = build_backbone(backbone_config, nnx.Rngs(params=backbone_key))
        adapter = None
        if config.model == "notebook":
            adapter = NotebookAdapter(
                config.image_size // DIGIT_SIZE,
                conv_impl=config.conv_impl,
                rngs=nnx.Rngs(params=jax.random.fold_in(key, 2)),
            )
        fine_tune_from = fine_tune_layer(config.fine_tune_from) if config.fine_tune_epochs else None
        return TransferClassifier(
            backbone,
            num_classes,
            image_size=config.image_size,
            adapter=adapter,
            fine_tune_from=fine_tune_from,
            rngs=nnx.Rngs(params=head_key),
        )

    if classifier_dir:
        # Shapes only: every array comes from the directory, nothing is drawn to be overwritten.
        model = nnx.eval_shape(build)
        convert.restore_classifier(config.weights, model)
        return model
    return build()
