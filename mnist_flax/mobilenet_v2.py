"""MobileNetV2 in Flax NNX, layer for layer the network `keras.applications.MobileNetV2` builds.

This module owns the architecture and its forward pass; `convert.py` fills it with Keras weights,
`convolutions.py` computes its convolutions.

Every weighted Keras layer has exactly one NNX module here, at the path its name gives
(`keras_names.py`: `block_3_expand_BN` is `blocks[3].expand_BN`), so that conversion, freezing and
fine-tuning all speak in Keras' layer names.

Parameters keep Keras' shapes (conv kernels `(kh, kw, in, out)`, depthwise kernels `(kh, kw, channels, 1)`,
dense kernel `(in, out)`), so conversion is a copy with no transposes.

The backbone is frozen in the tutorial this project reproduces, and Keras calls it with `training=False`:
BatchNorm always normalises with its running statistics (`InferenceBatchNorm`), whatever
`model.train()` / `model.eval()` say. Because those statistics are constants inside one forward pass, each
BatchNorm is folded into the kernel of the convolution before it (scale the kernel's output channels, add a
shift), which is exact up to float32 rounding and saves one pass over every activation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mnist_flax.config import MIN_IMAGE_SIZE, ModelConfigError
from mnist_flax.convolutions import (
    SAME_3X3,
    conv2d,
    correct_pad,
    depthwise_conv2d,
    resolve_conv_impl,
)
from mnist_flax.cpu_ops import relu6
from mnist_flax.keras_names import backbone_layer_names, keras_layer_path

# Keras' MobileNetV2 uses this epsilon for every BatchNormalization layer (its momentum only matters
# in training mode, which this network never runs).
BN_EPSILON = 1e-3

# (filters, stride, expansion) of the 17 inverted residual blocks, block_id 0..16, as in Keras.
BLOCK_SPECS: tuple[tuple[int, int, int], ...] = (
    (16, 1, 1),
    (24, 2, 6),
    (24, 1, 6),
    (32, 2, 6),
    (32, 1, 6),
    (32, 1, 6),
    (64, 2, 6),
    (64, 1, 6),
    (64, 1, 6),
    (64, 1, 6),
    (96, 1, 6),
    (96, 1, 6),
    (96, 1, 6),
    (160, 2, 6),
    (160, 1, 6),
    (160, 1, 6),
    (320, 1, 6),
)

POOLINGS = (None, "avg", "max")
CLASSIFIER_ACTIVATIONS = (None, "softmax", "linear")


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Keras' channel rounding, verbatim: nearest multiple of `divisor`, never more than 10% below `v`."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def last_conv_filters(alpha: float) -> int:
    """Width of `Conv_1`: 1280, widened only when alpha > 1 (the paper keeps it for alpha <= 1)."""
    return _make_divisible(1280 * alpha, 8) if alpha > 1.0 else 1280


class InferenceBatchNorm(nnx.Module):
    """Keras `BatchNormalization` called with `training=False`, the only way this network calls it.

    The variables are `nnx.BatchNorm`'s (Params `scale`, `bias`; BatchStats `mean`, `var`, with
    Keras' initial values), so paths, freezing and checkpoints read the same. Nothing here draws a
    random number: a converted backbone is built under `nnx.eval_shape`, where every RNG-stream
    update `nnx.BatchNorm` makes is traced, and those traces are a noticeable part of start-up
    (docs/benchmarks.md, "Start-up").
    """

    def __init__(self, features: int):
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))

    def fold(self, kernel: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
        """The kernel with this BatchNorm folded in (output channels last), and the shift to add.

        `x * scale + shift` from the running statistics, like `tf.nn.batch_normalization`.
        """
        scale = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPSILON)
        shift = self.bias[...] - self.mean[...] * scale
        return (kernel * scale).astype(dtype), shift.astype(dtype)


class Conv2D(nnx.Module):
    """A bias-free Keras `Conv2D` with a Keras-shaped kernel `(kh, kw, in, out)`, followed by the
    frozen BatchNorm `__call__` folds in.

    Only Conv1 is larger than 1x1, and it has stride 2: Keras pads it with `correct_pad`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        strides: int,
        conv_impl: str,
        dtype,
        rngs: nnx.Rngs,
    ):
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = nnx.Param(nnx.initializers.glorot_uniform()(rngs.params(), shape))
        self.strides, self.conv_impl, self.dtype = strides, conv_impl, dtype

    def __call__(self, x: jax.Array, bn: InferenceBatchNorm) -> jax.Array:
        kernel, shift = bn.fold(self.kernel[...], self.dtype or x.dtype)
        kh = kernel.shape[0]
        padding = ((0, 0), (0, 0)) if kh == 1 else correct_pad(x.shape[1], x.shape[2], kh)
        y = conv2d(x, kernel, strides=self.strides, padding=padding, impl=self.conv_impl)
        return y + shift


class DepthwiseConv2D(nnx.Module):
    """A bias-free Keras `DepthwiseConv2D` (3x3, multiplier 1), kernel shaped `(3, 3, channels, 1)` as in Keras."""

    def __init__(self, channels: int, *, strides: int, conv_impl: str, dtype, rngs: nnx.Rngs):
        shape = (3, 3, channels, 1)
        self.kernel = nnx.Param(nnx.initializers.glorot_uniform()(rngs.params(), shape))
        self.strides, self.conv_impl, self.dtype = strides, conv_impl, dtype

    def __call__(self, x: jax.Array, bn: InferenceBatchNorm) -> jax.Array:
        kernel, shift = bn.fold(self.kernel[...][..., 0], self.dtype or x.dtype)  # (3, 3, channels)
        # Keras: padding="same" for stride 1; ZeroPadding2D(correct_pad) + "valid" for stride 2.
        padding = SAME_3X3 if self.strides == 1 else correct_pad(x.shape[1], x.shape[2], 3)
        y = depthwise_conv2d(x, kernel, strides=self.strides, padding=padding, impl=self.conv_impl)
        return y + shift


class InvertedResidual(nnx.Module):
    """Keras `_inverted_res_block`: 1x1 expand (not in block 0), 3x3 depthwise, linear 1x1 project.

    Each conv is followed by BatchNorm; expand and depthwise by ReLU6; project by nothing (the "linear
    bottleneck"). The input is added back only when the stride is 1 and the channel count is unchanged.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        filters: int,
        alpha: float,
        stride: int,
        expansion: int,
        block_id: int,
        conv_impl: str,
        dtype,
        rngs: nnx.Rngs,
    ):
        out_channels = _make_divisible(int(filters * alpha), 8)
        options = dict(conv_impl=conv_impl, dtype=dtype, rngs=rngs)
        hidden = in_channels
        if block_id:
            hidden = expansion * in_channels
            self.expand = Conv2D(in_channels, hidden, 1, strides=1, **options)
            self.expand_BN = InferenceBatchNorm(hidden)
        else:
            self.expand = None
            self.expand_BN = None
        self.depthwise = DepthwiseConv2D(hidden, strides=stride, **options)
        self.depthwise_BN = InferenceBatchNorm(hidden)
        self.project = Conv2D(hidden, out_channels, 1, strides=1, **options)
        self.project_BN = InferenceBatchNorm(out_channels)
        self.out_channels = out_channels
        self.use_residual = stride == 1 and in_channels == out_channels

    def __call__(self, inputs: jax.Array) -> jax.Array:
        x = inputs
        if self.expand is not None:
            x = relu6(self.expand(x, self.expand_BN))
        x = relu6(self.depthwise(x, self.depthwise_BN))
        x = self.project(x, self.project_BN)
        return inputs + x if self.use_residual else x


class MobileNetV2(nnx.Module):
    """`keras.applications.MobileNetV2(alpha, include_top, classes, classifier_activation, pooling)`.

    Call it on an NHWC float batch scaled to [-1, 1] (Keras' `mobilenet_v2.preprocess_input`), any
    height and width >= 32. Returns the last feature map `[N, h, w, num_features]` (pooling None), pooled
    features `[N, num_features]` ("avg" / "max"), or class scores `[N, classes]` (include_top).

    conv_impl: "auto" | "xla" | "cpu", how convolutions are computed (`convolutions.py`); same results.
    dtype: compute dtype of activations (e.g. jnp.bfloat16); parameters stay float32.
    """

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        include_top: bool = True,
        classes: int = 1000,
        classifier_activation: str | None = "softmax",
        pooling: str | None = None,
        conv_impl: str = "auto",
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        if alpha <= 0:
            raise ModelConfigError(f"alpha={alpha} must be positive (Keras ships 0.35 .. 1.4)")
        if pooling not in POOLINGS:
            raise ModelConfigError(f"pooling={pooling!r} is not one of None, 'avg', 'max'")
        if classifier_activation not in CLASSIFIER_ACTIVATIONS:
            raise ModelConfigError(
                f"classifier_activation={classifier_activation!r} is not one of None, 'softmax', 'linear'"
            )
        resolve_conv_impl(conv_impl)  # validates the name early
        self.alpha = alpha
        self.include_top = include_top
        self.classes = classes
        self.classifier_activation = classifier_activation
        self.pooling = pooling
        self.conv_impl = conv_impl
        self.dtype = dtype

        options = dict(conv_impl=conv_impl, dtype=dtype, rngs=rngs)
        first_filters = _make_divisible(32 * alpha, 8)
        self.Conv1 = Conv2D(3, first_filters, 3, strides=2, **options)
        self.bn_Conv1 = InferenceBatchNorm(first_filters)
        blocks = []
        channels = first_filters
        for block_id, (filters, stride, expansion) in enumerate(BLOCK_SPECS):
            block = InvertedResidual(
                channels,
                filters=filters,
                alpha=alpha,
                stride=stride,
                expansion=expansion,
                block_id=block_id,
                **options,
            )
            blocks.append(block)
            channels = block.out_channels
        self.blocks = nnx.List(blocks)
        self.num_features = last_conv_filters(alpha)
        self.Conv_1 = Conv2D(channels, self.num_features, 1, strides=1, **options)
        self.Conv_1_bn = InferenceBatchNorm(self.num_features)
        if include_top:
            self.predictions = nnx.Linear(
                self.num_features,
                classes,
                kernel_init=nnx.initializers.glorot_uniform(),
                dtype=dtype,
                rngs=rngs,
            )
        else:
            self.predictions = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """Keras' MobileNetV2 on images in [-1, 1]: the stem, the 17 inverted residual blocks, the
        top, then the classifier or the pooling that `include_top` and `pooling` ask for."""
        self.check_input(x)
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = self.top(x)
        return self.output(x)

    def stem(self, x: jax.Array) -> jax.Array:
        """Conv1: a 3x3 stride-2 convolution, BatchNorm, ReLU6 (in the compute dtype)."""
        x = x.astype(self.dtype or x.dtype)
        return relu6(self.Conv1(x, self.bn_Conv1))

    def top(self, x: jax.Array) -> jax.Array:
        """Conv_1: a 1x1 convolution to `num_features` channels, BatchNorm, ReLU6."""
        return relu6(self.Conv_1(x, self.Conv_1_bn))

    def output(self, x: jax.Array) -> jax.Array:
        """The last feature map -> class scores (include_top), pooled features, or itself."""
        if self.include_top:
            x = self.predictions(jnp.mean(x, axis=(1, 2)))
            return jax.nn.softmax(x, axis=-1) if self.classifier_activation == "softmax" else x
        if self.pooling == "avg":
            return jnp.mean(x, axis=(1, 2))
        if self.pooling == "max":
            return jnp.max(x, axis=(1, 2))
        return x

    @property
    def units(self) -> list:
        """The network as a chain of 19 units (`keras_names.NUM_UNITS`): the stem, the 17 blocks,
        the top. Fine-tuning trains the units from one on; the CPU path runs them in chunks."""
        return [self.stem, *self.blocks, self.top]

    def feature_maps(self, x: jax.Array) -> list[jax.Array]:
        """Activations after Conv1's ReLU, after each of the 17 blocks and after `out_relu` (19 maps).

        Keras names these `Conv1_relu`, `expanded_conv_project_BN`, `block_<i>_add` or
        `block_<i>_project_BN`, and `out_relu`; the parity tests compare them one by one.
        """
        self.check_input(x)
        outputs = [x]
        for unit in self.units:
            outputs.append(unit(outputs[-1]))
        return outputs[1:]

    def keras_layers(self) -> dict[str, nnx.Module]:
        """Every weighted Keras layer name of this configuration -> the NNX module holding its weights."""
        names = backbone_layer_names() + (("predictions",) if self.include_top else ())
        layers = {}
        for name in names:
            module = self
            for part in keras_layer_path(name):
                module = module[part] if isinstance(part, int) else getattr(module, part)
            layers[name] = module
        return layers

    def check_input(self, x: jax.Array) -> None:
        """Refuses what is not an NHWC RGB batch of at least `MIN_IMAGE_SIZE` a side."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ModelConfigError(
                f"MobileNetV2 expects an NHWC batch with 3 channels, got shape {tuple(x.shape)}"
            )
        if min(x.shape[1], x.shape[2]) < MIN_IMAGE_SIZE:
            raise ModelConfigError(
                f"input {x.shape[1]}x{x.shape[2]} is smaller than MobileNetV2's minimum "
                f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}; resize the images up"
            )
