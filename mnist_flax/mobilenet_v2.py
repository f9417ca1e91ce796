"""MobileNetV2 in Flax NNX, layer for layer the network `keras.applications.MobileNetV2` builds.

This module owns the architecture and its forward pass; `convert.py` fills it with Keras weights,
`convolutions.py` computes its convolutions.

Every weighted Keras layer has exactly one NNX module here, reachable by an obvious path:

    Keras layer name                 NNX path (see `keras_layer_path`)
    Conv1, bn_Conv1                  Conv1, bn_Conv1
    expanded_conv_depthwise          blocks[0].depthwise        (block 0 has no expand layer)
    expanded_conv_project_BN         blocks[0].project_BN
    block_<i>_expand                 blocks[i].expand           (i = 1..16)
    block_<i>_depthwise_BN           blocks[i].depthwise_BN
    Conv_1, Conv_1_bn                Conv_1, Conv_1_bn
    predictions                      predictions                (only with include_top)

Parameters keep Keras' shapes (conv kernels `(kh, kw, in, out)`, depthwise kernels `(kh, kw, channels, 1)`,
dense kernel `(in, out)`), so conversion is a copy with no transposes.

The backbone is frozen in the tutorial this project reproduces, and Keras calls it with `training=False`:
BatchNorm always normalises with its running statistics (`InferenceBatchNorm`), whatever
`model.train()` / `model.eval()` say. Because those statistics are constants inside one forward pass, each
BatchNorm is folded into the kernel of the convolution before it (scale the kernel's output channels, add a
shift), which is exact up to float32 rounding and saves one pass over every activation.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from mnist_flax.config import (
    MIN_IMAGE_SIZE,
    ModelConfigError,
    block_keras_prefix,
)
from mnist_flax.convolutions import (
    SAME_3X3,
    conv2d,
    correct_pad,
    depthwise_conv2d,
    resolve_conv_impl,
)
from mnist_flax.cpu_ops import images_per_chunk, map_in_chunks, relu6

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
# On the CPU path each unit runs a few images at a time, as many as `cpu_ops.images_per_chunk`
# allows for its widest activation; a gradient through the backbone goes CPU_BATCH_CHUNK images at a
# time (`model.TransferClassifier.gradient_chunk`).
CPU_BATCH_CHUNK = 2
# The network as a chain of units, each ending in a named activation: the stem (Conv1, bn_Conv1),
# the 17 blocks, the top (Conv_1, Conv_1_bn). `prefix(x, cut)` runs units [0, cut), `suffix(x, cut)`
# the rest: fine-tuning from a layer cuts before the unit that holds it.
NUM_UNITS = len(BLOCK_SPECS) + 2


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


_BLOCK_LAYER = re.compile(
    r"^(?:expanded_conv_|block_(\d+)_)(expand|expand_BN|depthwise|depthwise_BN|project|project_BN)$"
)
_TOP_LEVEL_LAYERS = ("Conv1", "bn_Conv1", "Conv_1", "Conv_1_bn", "predictions")
_BLOCK_MEMBERS = ("expand", "expand_BN", "depthwise", "depthwise_BN", "project", "project_BN")


def keras_layer_path(keras_layer_name: str) -> tuple[str | int, ...] | None:
    """The NNX module path of a weighted Keras MobileNetV2 layer, or None for a name that is not one.

    >>> keras_layer_path("block_3_expand_BN")
    ('blocks', 3, 'expand_BN')
    >>> keras_layer_path("expanded_conv_project")
    ('blocks', 0, 'project')
    """
    if keras_layer_name in _TOP_LEVEL_LAYERS:
        return (keras_layer_name,)
    match = _BLOCK_LAYER.match(keras_layer_name)
    if match is None:
        return None
    block_id = int(match.group(1)) if match.group(1) is not None else 0
    if keras_layer_name.startswith("block_") and block_id == 0:
        return None  # Keras names block 0 "expanded_conv_", never "block_0_"
    return ("blocks", block_id, match.group(2))


class MobileNetV2(nnx.Module):
    """`keras.applications.MobileNetV2(alpha, include_top, classes, classifier_activation, pooling)`.

    Call it on an NHWC float batch scaled to [-1, 1] (Keras' `mobilenet_v2.preprocess_input`), any
    height and width >= 32. Returns the last feature map `[N, h, w, num_features]` (pooling None), pooled
    features `[N, num_features]` ("avg" / "max"), or class scores `[N, classes]` (include_top).

    conv_impl: "auto" | "xla" | "cpu", how convolutions are computed (`convolutions.py`); same results.
    dtype: compute dtype of activations (e.g. jnp.bfloat16); parameters stay float32.
    batch_chunk: images per pass through the network; None = chosen per unit by activation size on
        the CPU path (`cpu_ops.images_per_chunk`), the whole batch otherwise; 0 = the whole batch.
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
        batch_chunk: int | None = None,
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
        self.batch_chunk = batch_chunk

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

    def keras_layers(self) -> dict[str, nnx.Module]:
        """Every weighted Keras layer name of this configuration -> the NNX module holding its weights."""
        layers: dict[str, nnx.Module] = {"Conv1": self.Conv1, "bn_Conv1": self.bn_Conv1}
        for block_id, block in enumerate(self.blocks):
            for member in _BLOCK_MEMBERS:
                module = getattr(block, member)
                if module is not None:
                    layers[block_keras_prefix(block_id) + member] = module
        layers["Conv_1"] = self.Conv_1
        layers["Conv_1_bn"] = self.Conv_1_bn
        if self.predictions is not None:
            layers["predictions"] = self.predictions
        return layers

    def __call__(self, x: jax.Array) -> jax.Array:
        self._check_input(x)
        return self._output(self._chunked_units(x, 0, NUM_UNITS))

    def feature_maps(self, x: jax.Array) -> list[jax.Array]:
        """Activations after Conv1's ReLU, after each of the 17 blocks and after `out_relu` (19 maps).

        Keras names these `Conv1_relu`, `expanded_conv_project_BN`, `block_<i>_add` or
        `block_<i>_project_BN`, and `out_relu`; the parity tests compare them one by one.
        """
        self._check_input(x)
        outputs = [x.astype(self.dtype or x.dtype)]
        for unit in range(NUM_UNITS):
            outputs.append(self._unit(unit, outputs[-1]))
        return outputs[1:]

    def prefix(self, x: jax.Array, cut: int) -> jax.Array:
        """The activation entering unit `cut` (`NUM_UNITS`): units [0, cut) on images `x`."""
        self._check_input(x)
        return self._chunked_units(x, 0, cut)

    def suffix(self, x: jax.Array, cut: int) -> jax.Array:
        """The model's output from the activation entering unit `cut`, on the whole batch at once.

        These are the layers that fine-tuning trains. `batch_chunk` applies to the frozen prefix
        only: their activations are small (at most 14x14 at 224 px from block 11 on), and a
        backward pass through a `lax.map` over chunks measured slower on the CPU
        (docs/cpu_path.md).
        """
        return self._output(self._units(x, cut, NUM_UNITS))

    def unit_of_layer(self, keras_layer_name: str) -> int:
        """The unit (`NUM_UNITS`) holding a Keras layer: 0 for Conv1, block_id + 1, 18 for Conv_1."""
        path = keras_layer_path(keras_layer_name)
        if path is None or path[0] == "predictions":
            raise ModelConfigError(f"{keras_layer_name!r} is not a layer of MobileNetV2's backbone")
        if path[0] == "blocks":
            return path[1] + 1
        return 0 if path[0] in ("Conv1", "bn_Conv1") else NUM_UNITS - 1

    def chunk_size(self) -> int:
        """Images per pass of a gradient through the network (`batch_chunk` resolved), and of
        what runs before it (the notebook's adapter); 0 = the whole batch."""
        if self.batch_chunk is not None:
            return self.batch_chunk
        return CPU_BATCH_CHUNK if resolve_conv_impl(self.conv_impl) == "cpu" else 0

    def in_chunks(self, fn, x: jax.Array) -> jax.Array:
        """`fn(x)` computed `chunk_size()` images at a time (`cpu_ops.map_in_chunks`)."""
        return map_in_chunks(fn, x, self.chunk_size())

    def unit_chunks(self, height: int, width: int) -> list[int]:
        """Images per pass through each unit for `height` x `width` inputs (0 = whole batch)."""
        if self.batch_chunk is not None or resolve_conv_impl(self.conv_impl) != "cpu":
            return [self.batch_chunk or 0] * NUM_UNITS
        itemsize = jnp.dtype(self.dtype or jnp.float32).itemsize
        h, w = -(-height // 2), -(-width // 2)  # after Conv1 (stride 2)
        # Conv1's widest: its output, or its im2col windows (27 values a pixel).
        widest = [h * w * max(self.Conv1.kernel.shape[-1], 27)]
        for block in self.blocks:
            widest.append(h * w * block.depthwise.kernel.shape[2])  # the expanded activation
            if block.depthwise.strides == 2:
                h, w = -(-h // 2), -(-w // 2)
        widest.append(h * w * self.num_features)
        return [images_per_chunk(values * itemsize) for values in widest]

    def _chunked_units(self, x: jax.Array, start: int, stop: int) -> jax.Array:
        """Units [start, stop) on images `x`, each run of units with the same chunk in one
        `map_in_chunks` (`unit_chunks`)."""
        chunks = self.unit_chunks(x.shape[1], x.shape[2])
        x = x.astype(self.dtype or x.dtype)
        while start < stop:
            end = start + 1
            while end < stop and chunks[end] == chunks[start]:
                end += 1
            x = map_in_chunks(lambda x, a=start, b=end: self._units(x, a, b), x, chunks[start])
            start = end
        return x

    def _units(self, x: jax.Array, start: int, stop: int) -> jax.Array:
        x = x.astype(self.dtype or x.dtype)
        for unit in range(start, stop):
            x = self._unit(unit, x)
        return x

    def _unit(self, unit: int, x: jax.Array) -> jax.Array:
        if unit == 0:
            return relu6(self.Conv1(x, self.bn_Conv1))
        if unit <= len(self.blocks):
            return self.blocks[unit - 1](x)
        return relu6(self.Conv_1(x, self.Conv_1_bn))

    def _output(self, x: jax.Array) -> jax.Array:
        if self.include_top:
            x = self.predictions(jnp.mean(x, axis=(1, 2)))
            if self.classifier_activation == "softmax":
                x = jax.nn.softmax(x, axis=-1)
            return x
        if self.pooling == "avg":
            return jnp.mean(x, axis=(1, 2))
        if self.pooling == "max":
            return jnp.max(x, axis=(1, 2))
        return x

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ModelConfigError(
                f"MobileNetV2 expects an NHWC batch with 3 channels, got shape {tuple(x.shape)}"
            )
        if min(x.shape[1], x.shape[2]) < MIN_IMAGE_SIZE:
            raise ModelConfigError(
                f"input {x.shape[1]}x{x.shape[2]} is smaller than MobileNetV2's minimum "
                f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}; resize the images up"
            )
