"""The classifiers and what trains in them: a frozen ImageNet MobileNetV2, pooling, a Dense head.

This module owns
- `TransferClassifier` and `create_model`: the pipeline model (RGB images in [-1, 1] -> backbone ->
  average pooling -> Dense) and the Keras notebook's own model (28x28 digits in [0, 1] ->
  `NotebookAdapter`, i.e. UpSampling2D + Conv2D(3, relu) -> the same backbone and head), with
  `preprocess_on_device` for uint8 batches (`--resize device`);
- what trains: `freeze_labels` names every parameter's group from its path ("frozen" backbone,
  "fine-tuned" backbone layers from `--fine-tune-from` on, "adapter", "head"), and
  `make_optimizer` turns those labels into one `optax.multi_transform` per stage, the one place
  that says what trains (`set_to_zero` for frozen groups, Adam for the others);
- the learning-rate schedules.

Why freezing costs no backward pass through the backbone: the train step differentiates only what
the optimizer's stage trains (`trained_filter`), and `set_to_zero` never reads the zero gradients
the frozen parameters get. In the pipeline model nothing trainable sits before the backbone, so the
head's gradient needs only the pooled features (the train step costs 1.00x the forward at 224 px,
`scripts/step_flops.py`). The notebook model's adapter does sit
before it: its gradient travels back through the frozen backbone's activations (not its weights),
about twice the forward. Fine-tuning from layer L adds the backward pass of the layers after L
only. `tests/test_steps.py` checks these from the compiled steps' cost analysis.

BatchNorm in the backbone always normalises with its running statistics (Keras `training=False`,
also while fine-tuning, as Keras' guide does), and those statistics are `nnx.BatchStat`s, which
the optimizer (`wrt=nnx.Param`) never sees; a fine-tuned BatchNorm trains its scale and offset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mnist_flax.config import DIGIT_SIZE, STAGES, TrainConfig, fine_tune_layer
from mnist_flax.mobilenet_v2 import MobileNetV2, keras_layer_path, resolve_depthwise, taps_conv

# The parameter groups of `freeze_labels`, each with its own transformation in `make_optimizer`.
FROZEN = "frozen"
FINE_TUNED = "fine-tuned"
ADAPTER = "adapter"
HEAD = "head"
# The groups each stage's optimizer trains (Adam); the others get `set_to_zero`'s zero update.
TRAINED_GROUPS = {STAGES[0]: (ADAPTER, HEAD), STAGES[1]: (FINE_TUNED, ADAPTER, HEAD)}
# `config.dtype` names -> compute dtypes.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Keras' Adam: epsilon 1e-7 (optax's default is 1e-8), the usual betas.
ADAM_EPSILON = 1e-7
ADAM_BETAS = (0.9, 0.999)


def resolve_resize(resize: str, model: str = "pipeline") -> str:
    """Where the digits are resized: "auto" means "device" on GPU/TPU and "host" on the CPU.

    The notebook model resizes nothing outside its step ("none": 28x28 digits in [0, 1]). On an
    accelerator tf.data's resize on a few host cores would starve the device (uint8 digits
    are 784 bytes, a float32 224 px image 602 KB); on the CPU both run on the same cores, and the
    step is faster on tf.data's images (README, "Speed").
    """
    if model == "notebook":
        return "none"
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


class NotebookAdapter(nnx.Module):
    """The notebook's trainable input layers: `UpSampling2D(factor)`, `Conv2D(3, 3, "same", relu)`.

    [B, 28, 28, 1] digits in [0, 1] -> [B, 28 * factor, 28 * factor, 3]: nearest-neighbour
    upsampling (Keras' default interpolation) and a 3x3 convolution that learns the three channels
    the frozen backbone reads, with Keras' initialisers (Glorot-uniform kernel, zero bias).
    """

    def __init__(self, factor: int, *, rngs: nnx.Rngs):
        self.factor = factor
        self.conv = nnx.Conv(
            1,
            3,
            kernel_size=(3, 3),
            padding="SAME",
            kernel_init=nnx.initializers.glorot_uniform(),
            rngs=rngs,
        )

    def __call__(self, digits: jax.Array, depthwise: str = "auto") -> jax.Array:
        """depthwise: how the backbone computes its convolutions (`MobileNetV2`); the adapter's
        follows, with the same parameters either way."""
        upsampled = jnp.repeat(jnp.repeat(digits, self.factor, axis=1), self.factor, axis=2)
        if resolve_depthwise(depthwise) == "taps":
            # XLA:CPU's convolution with one input channel is slow: at 224 px it took 7 ms an
            # image, as nine multiply-adds on two images at a time it takes ~0.2 ms.
            kernel, bias = self.conv.kernel[...], self.conv.bias[...]
            return jax.nn.relu(taps_conv(upsampled, kernel, ((1, 1), (1, 1)), 1) + bias)
        return jax.nn.relu(self.conv(upsampled))


class TransferClassifier(nnx.Module):
    """[adapter ->] MobileNetV2 (no top, average pooled) -> Dense(num_classes); returns logits.

    The Keras tutorial ends in Dense(10, activation="softmax") trained with categorical
    cross-entropy; here the head returns logits and the loss applies the softmax, which is the same
    function computed stably.

    adapter: the notebook model's `NotebookAdapter` (then the input is [B, 28, 28, 1] float32 in
        [0, 1]), or None for the pipeline model (RGB images in [-1, 1], or uint8 digits resized on
        the device).
    fine_tune_from: the Keras layer from which the backbone trains in the fine-tuning stage
        (`freeze_labels`), or None when the whole backbone stays frozen. The activation entering
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
            depthwise = self.backbone.depthwise
            return self.backbone.in_chunks(lambda digits: self.adapter(digits, depthwise), images)
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
                config.image_size // DIGIT_SIZE, rngs=nnx.Rngs(params=jax.random.fold_in(key, 2))
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


def freeze_labels(model: TransferClassifier) -> nnx.State:
    """A tree like `nnx.state(model, nnx.Param)` holding each parameter's group.

    The group comes from the parameter's path: the adapter's and the head's are their own groups;
    a backbone parameter is "fine-tuned" when its Keras layer is `model.fine_tune_from` or comes
    after it, else "frozen". A parameter outside the known submodules is an error rather than
    silently trained or frozen, and so is a fine-tuned layer that matched no parameter.
    """
    names = list(model.backbone.keras_layers())
    fine_tuned_layers = (
        set() if model.fine_tune_from is None else set(names[names.index(model.fine_tune_from) :])
    )
    fine_tuned_paths = {keras_layer_path(name) for name in fine_tuned_layers}

    def label(path, _):
        if path[0] == "backbone":
            return FINE_TUNED if tuple(path[1:-1]) in fine_tuned_paths else FROZEN
        return {"adapter": ADAPTER, "head": HEAD}.get(path[0])

    labels = nnx.map_state(label, nnx.state(model, nnx.Param))
    flat = nnx.to_flat_state(labels)
    unlabelled = ["/".join(map(str, path)) for path, group in flat if group is None]
    if unlabelled:
        raise AssertionError(f"parameters without a freeze label: {', '.join(unlabelled)}")
    unvisited = fine_tuned_paths - {
        tuple(path[1:-1]) for path, group in flat if group == FINE_TUNED
    }
    if unvisited:
        raise AssertionError(f"fine-tuned layers without parameters: {sorted(unvisited)}")
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


def keras_adam(learning_rate: float | optax.Schedule) -> optax.GradientTransformation:
    """Adam exactly as Keras computes it; the same state as `optax.adam` (`ScaleByAdamState`).

    Keras adds epsilon to the square root of the uncorrected second moment,
    `lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)`, where optax adds it after the bias
    correction. The two differ by an effective epsilon of eps / sqrt(1 - b2^t) (3.2e-6 at the first
    step), enough to move parameters with tiny gradients differently: after 5 steps the loss would
    differ from Keras' `train_on_batch` by 4.6e-4 (tests/test_classifier_convert.py).
    """
    b1, b2 = ADAM_BETAS

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        correction = jnp.sqrt(1 - b2**count) / (1 - b1**count)
        updates = jax.tree.map(lambda m, v: correction * m / (jnp.sqrt(v) + ADAM_EPSILON), mu, nu)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    moments = optax.GradientTransformation(optax.scale_by_adam(b1, b2).init, update)
    return optax.chain(moments, optax.scale_by_learning_rate(learning_rate))


def make_optimizer(
    model: TransferClassifier, learning_rate: float | optax.Schedule, *, stage: str = STAGES[0]
) -> nnx.Optimizer:
    """The optimizer of one stage (`config.STAGES`), one `optax.multi_transform` over `freeze_labels`.

    Frozen stage: Adam (`keras_adam`) on the adapter and the head, a zero update for the whole
    backbone. Fine-tune stage: Adam also on the fine-tuned layers; like Keras' guide (which
    recompiles the model with a new Adam) it is a new optimizer, its moments and step count
    starting from zero, and the head trains at the same (small) rate.
    """
    adam = keras_adam(learning_rate)
    transforms = {
        group: adam if group in TRAINED_GROUPS[stage] else optax.set_to_zero()
        for group in (FROZEN, FINE_TUNED, ADAPTER, HEAD)
    }
    optimizer = nnx.Optimizer(
        model, optax.multi_transform(transforms, freeze_labels(model)), wrt=nnx.Param
    )
    optimizer.stage = stage  # static: which parameters the train step differentiates
    return optimizer


def trained_filter(model: TransferClassifier, stage: str) -> Callable[[tuple, Any], bool]:
    """An NNX filter selecting the parameters `stage` trains (those the step differentiates)."""
    trained = {
        path
        for path, group in nnx.to_flat_state(freeze_labels(model))
        if group in TRAINED_GROUPS[stage]
    }
    return lambda path, _: tuple(path) in trained


def trainable_filter(model: TransferClassifier) -> Callable[[tuple, Any], bool]:
    """An NNX filter selecting every parameter that some stage trains (what checkpoints keep)."""
    trainable_paths = {
        path for path, group in nnx.to_flat_state(freeze_labels(model)) if group != FROZEN
    }
    return lambda path, _: tuple(path) in trainable_paths
