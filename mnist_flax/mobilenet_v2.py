"""MobileNetV2 in Flax NNX, layer for layer the network `keras.applications.MobileNetV2` builds.

This module owns the architecture and its forward pass; `convert.py` owns filling it with Keras weights.

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

Two implementations of the convolutions share the same parameters (`depthwise=`):
- "conv": XLA's native convolution (`lax.conv_general_dilated`, depthwise via `feature_group_count`),
  the fastest choice on GPU and TPU.
- "taps": the 3x3 depthwise convolution as nine shifted multiply-adds, every 1x1 convolution as a matrix
  product over the channel axis and Conv1 as one over its 3x3x3 input windows (im2col). XLA's CPU backend
  runs a grouped convolution 10-20x and a 1x1 convolution 2-4x slower than these equivalent forms, so this
  is the fast path on CPU.
- "auto" picks "taps" when JAX's default backend is the CPU and "conv" otherwise.

The "taps" convolutions carry a hand-written gradient (`taps_conv`, `im2col_conv`), and ReLU6
TensorFlow's (`_relu6`): what JAX derives from the forward's strided slices and `jnp.clip` ran the
backward pass 5-18x slower than the forward on XLA:CPU. Both matter where a gradient crosses the
backbone (the notebook model's adapter, fine-tuning); a frozen backbone's forward pass is unchanged.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mnist_flax.config import (
    DEPTHWISE_IMPLS,
    MIN_IMAGE_SIZE,
    block_keras_prefix,
)

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
# On CPU the network runs this many images at a time (see `_map_in_chunks`).
CPU_BATCH_CHUNK = 2
# The network as a chain of units, each ending in a named activation: the stem (Conv1, bn_Conv1),
# the 17 blocks, the top (Conv_1, Conv_1_bn). `prefix(x, cut)` runs units [0, cut), `suffix(x, cut)`
# the rest: fine-tuning from a layer cuts before the unit that holds it.
NUM_UNITS = len(BLOCK_SPECS) + 2


class ModelConfigError(ValueError):
    """An invalid MobileNetV2 option (alpha, pooling, depthwise, input size...)."""


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Keras' channel rounding, verbatim: nearest multiple of `divisor`, never more than 10% below `v`."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def correct_pad(height: int, width: int, kernel_size: int = 3) -> tuple[tuple[int, int], ...]:
    """Zero padding Keras puts before a stride-2 "valid" conv (`imagenet_utils.correct_pad`).

    An even side gets one pixel at the bottom/right only, an odd side one on each end. This equals
    TensorFlow's "SAME" padding for a 3x3 stride-2 conv, which is what Keras uses for `Conv1`.
    """
    correct = kernel_size // 2
    adjust_h, adjust_w = 1 - height % 2, 1 - width % 2
    return ((correct - adjust_h, correct), (correct - adjust_w, correct))


def last_conv_filters(alpha: float) -> int:
    """Width of `Conv_1`: 1280, widened only when alpha > 1 (the paper keeps it for alpha <= 1)."""
    return _make_divisible(1280 * alpha, 8) if alpha > 1.0 else 1280


def resolve_depthwise(depthwise: str) -> str:
    """The implementation to trace: "auto" means "taps" on the CPU backend and "conv" on GPU/TPU."""
    if depthwise not in DEPTHWISE_IMPLS:
        raise ModelConfigError(
            f"depthwise={depthwise!r} is not one of {', '.join(DEPTHWISE_IMPLS)}; pick one of those"
        )
    if depthwise == "auto":
        return "taps" if jax.default_backend() == "cpu" else "conv"
    return depthwise


@jax.custom_jvp
def _relu6(x: jax.Array) -> jax.Array:
    return jnp.clip(x, 0, 6)


@_relu6.defjvp
def _relu6_jvp(primals, tangents):
    # TensorFlow's Relu6Grad: the gradient passes where 0 < x < 6. `jnp.clip`'s own derivative
    # keeps two float32 masks per activation for the backward pass (and halves the gradient at
    # ties); this keeps one boolean mask, a quarter of one mask's memory traffic.
    (x,), (t,) = primals, tangents
    return _relu6(x), jnp.where((x > 0) & (x < 6), t, jnp.zeros_like(t))


class InferenceBatchNorm(nnx.Module):
    """Keras `BatchNormalization` called with `training=False`, the only way this network calls it.

    The variables are `nnx.BatchNorm`'s (Params `scale`, `bias`; BatchStats `mean`, `var`, with
    Keras' initial values), so paths, freezing and checkpoints read the same. Nothing here draws a
    random number: building the network under `nnx.eval_shape` (every converted model) then traces
    one RNG-stream update per convolution only; `nnx.BatchNorm` adds two per layer, each of which
    under a trace costs JAX an error message it never shows (`getattr(tracer, "sharding")`), time
    that grows with the traced program (`model.create_model` of the notebook model at 224 px took
    0.97 s with `nnx.BatchNorm`, 0.61 s with this; medians of 3, warm compilation cache, 2-core CPU).
    """

    def __init__(self, features: int):
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))

    def affine(self) -> tuple[jax.Array, jax.Array]:
        """`x * scale + shift` from the running statistics (like tf.nn.batch_normalization)."""
        scale = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPSILON)
        shift = self.bias[...] - self.mean[...] * scale
        return scale, shift


class Conv2D(nnx.Module):
    """A bias-free Keras `Conv2D` with a Keras-shaped kernel `(kh, kw, in, out)`.

    It is always followed by a frozen BatchNorm, which `__call__` folds in (`bn`).
    """

    def __init__(
        self, in_features: int, out_features: int, kernel_size: int, *, strides: int, rngs: nnx.Rngs
    ):
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = nnx.Param(nnx.initializers.glorot_uniform()(rngs.params(), shape))
        self.strides = strides

    def __call__(self, x: jax.Array, bn: InferenceBatchNorm, impl: str, dtype) -> jax.Array:
        scale, shift = bn.affine()
        kernel = (self.kernel[...] * scale).astype(dtype)
        kh, kw = kernel.shape[:2]
        if kh == 1 and kw == 1 and self.strides == 1 and impl == "taps":
            # A 1x1 conv is a matrix product over the channel axis; XLA:CPU runs it as one GEMM.
            y = jnp.einsum("nhwc,cd->nhwd", x, kernel[0, 0])
        elif kh == 1 and kw == 1 and self.strides == 1:
            y = _native_conv(x, kernel, ((0, 0), (0, 0)), 1, groups=1)
        elif impl == "taps":
            # Conv1 (3x3, stride 2, 3 input channels): one matrix product over its 27 window
            # values (`im2col_conv`), whose output XLA writes once. As 27 fused multiply-adds
            # (`taps_conv`) it looked cheap enough for XLA to recompute inside each of block 0's
            # fusions that read it, forward and backward (71 ms of a 615 ms notebook train step);
            # the product made that step and the forward pass 5% faster. XLA:CPU's convolution
            # was ~8x slower than the multiply-adds.
            y = im2col_conv(x, kernel, correct_pad(x.shape[1], x.shape[2], kh), self.strides)
        else:
            # The only conv larger than 1x1 is Conv1, stride 2: Keras' "same" padding for it is
            # `correct_pad` (a stride-1 3x3 conv would need ((1, 1), (1, 1)) instead).
            padding = correct_pad(x.shape[1], x.shape[2], kh)
            y = _native_conv(x, kernel, padding, self.strides, groups=1)
        return y + shift.astype(dtype)


class DepthwiseConv2D(nnx.Module):
    """A bias-free Keras `DepthwiseConv2D` (3x3, multiplier 1), kernel shaped `(3, 3, channels, 1)` as in Keras."""

    def __init__(self, channels: int, *, strides: int, rngs: nnx.Rngs):
        shape = (3, 3, channels, 1)
        self.kernel = nnx.Param(nnx.initializers.glorot_uniform()(rngs.params(), shape))
        self.strides = strides

    def __call__(self, x: jax.Array, bn: InferenceBatchNorm, impl: str, dtype) -> jax.Array:
        scale, shift = bn.affine()
        kernel = (self.kernel[...][..., 0] * scale).astype(dtype)  # (3, 3, channels)
        # Keras: padding="same" for stride 1; ZeroPadding2D(correct_pad) + "valid" for stride 2.
        padding = ((1, 1), (1, 1)) if self.strides == 1 else correct_pad(x.shape[1], x.shape[2], 3)
        if impl == "taps":
            y = taps_conv(x, kernel, padding, self.strides)
        else:
            y = _native_conv(x, kernel[:, :, None, :], padding, self.strides, groups=x.shape[-1])
        return y + shift.astype(dtype)


def _map_in_chunks(fn, x: jax.Array, chunk: int) -> jax.Array:
    """`fn(x)` computed `chunk` images at a time with `lax.map` (0 = all at once).

    Every image is independent (BatchNorm uses running statistics), so the result is the same. On CPU
    the forward pass is limited by memory traffic: at batch 32 and 224x224 an expanded activation is
    150 MB, while a few images' worth stays in cache between one layer and the next.
    """
    batch = x.shape[0]
    if chunk <= 0 or batch <= chunk:
        return fn(x)
    whole = batch - batch % chunk
    y = jax.lax.map(fn, x[:whole].reshape(whole // chunk, chunk, *x.shape[1:]))
    y = y.reshape(whole, *y.shape[2:])
    if whole < batch:
        y = jnp.concatenate([y, fn(x[whole:])])
    return y


def _taps(kh: int, kw: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(kh) for j in range(kw)]


def _shifted_views(x: jax.Array, kh: int, kw: int, strides: int) -> list[jax.Array]:
    """The kh*kw input windows of a "valid" conv over an already padded NHWC `x`, in (i, j) order."""
    out_h = (x.shape[1] - kh) // strides + 1
    out_w = (x.shape[2] - kw) // strides + 1
    return [
        jax.lax.slice(
            x,
            (0, i, j, 0),
            (x.shape[0], i + strides * (out_h - 1) + 1, j + strides * (out_w - 1) + 1, x.shape[3]),
            (1, strides, strides, 1),
        )
        for i, j in _taps(kh, kw)
    ]


def _tap_terms(view: jax.Array, w: jax.Array) -> list[jax.Array]:
    """One tap's products: depthwise `w` (C,) scales each channel; dense `w` (Cin, Cout) broadcasts
    each input channel (the notebook adapter has only 1) over the output channels."""
    if w.ndim == 1:
        return [view * w]
    return [view[..., c : c + 1] * w[c] for c in range(w.shape[0])]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def taps_conv(
    x: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], ...], strides: int
) -> jax.Array:
    """A "valid" conv over `x` zero-padded by `padding`, as one multiply-add per tap (the CPU path).

    kernel: depthwise `(kh, kw, C)` or dense `(kh, kw, Cin, Cout)` with a small Cin and Cout (the
    notebook adapter's 1 -> 3 channels; Conv1's 3 -> 32 is `im2col_conv`).

    The gradient is written by hand (`_taps_conv_bwd`). Differentiating the forward's strided
    slices gives one zero-padded, full-size copy of the cotangent per tap, summed: on XLA:CPU
    that ran 5-18x slower than the forward (block by block at 224 px), and it made the notebook
    model's train step, whose gradient crosses the whole frozen backbone, 3x slower than Keras'.
    """
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    kh, kw = kernel.shape[:2]
    views = _shifted_views(xp, kh, kw, strides)
    return sum(
        term
        for (i, j), view in zip(_taps(kh, kw), views, strict=True)
        for term in _tap_terms(view, kernel[i, j])
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def im2col_conv(
    x: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], ...], strides: int
) -> jax.Array:
    """`taps_conv` with a dense kernel `(kh, kw, Cin, Cout)` as one matrix product (CPU path).

    The input windows go side by side on the channel axis (im2col: kh * kw * Cin values per output
    pixel, tap-major like the kernel's reshape), then one product with the kernel. The gradient is
    `taps_conv`'s.
    """
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    kh, kw, cin, cout = kernel.shape
    columns = jnp.concatenate(_shifted_views(xp, kh, kw, strides), axis=-1)
    return jnp.einsum("nhwk,kd->nhwd", columns, kernel.reshape(kh * kw * cin, cout))


def _taps_conv_fwd(x, kernel, padding, strides):
    return taps_conv(x, kernel, padding, strides), (x, kernel)


def _im2col_conv_fwd(x, kernel, padding, strides):
    return im2col_conv(x, kernel, padding, strides), (x, kernel)


def _taps_conv_bwd(padding, strides, residuals, g):
    """Input gradient as a stride-1 correlation of the cotangent with the flipped kernel, one per
    stride phase; kernel gradient as one reduction per tap (dropped by XLA when nothing asks).
    Shared by `taps_conv` and `im2col_conv`, two ways to compute the same function."""
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    views = _shifted_views(xp, kh, kw, strides)
    if kernel.ndim == 3:
        dk = jnp.stack([jnp.sum(view * g, axis=(0, 1, 2)) for view in views])
    else:
        # Every tap's in one matrix product over the stacked views (im2col, taps leading: a
        # copy of whole views). The notebook adapter's kernel (1 -> 3 channels) as nine products
        # of 1 x 3 over 100,352 rows each took 4.3 ms a chunk of 2 images at 224 px; the views
        # side by side on the channel axis 2.4 ms, stacked in front 1.8 ms (the train step -4%).
        dk = jnp.einsum("knhwc,nhwd->kcd", jnp.stack(views), g)
    dk = dk.reshape(kernel.shape).astype(kernel.dtype)

    # Padded input row p = s*i + ky receives g[i] * w[ky]. Split p by phase p = s*q + a: the taps
    # ky = a + s*m reach it from g[q - m], a stride-1 correlation over a zero-padded cotangent.
    s = strides
    n, hp, wp, cin = xp.shape
    qh, qw = -(-hp // s), -(-wp // s)  # rows and columns per phase
    mh, mw = -(-kh // s), -(-kw // s)  # most taps in one phase, per axis
    # Depthwise: each tap's product g * w is formed in the fused sum below. Dense (Conv1, the
    # adapter): every tap's product g @ w.T from one matrix product, [n, h, w, kh, kw, Cin].
    products = g if kernel.ndim == 3 else jnp.einsum("nhwd,ijcd->nhwijc", g, kernel)
    pad = ((0, 0), (mh - 1, qh - g.shape[1]), (mw - 1, qw - g.shape[2]))
    products = jnp.pad(products, pad + ((0, 0),) * (products.ndim - 3))

    def tap(row_shift: int, column_shift: int, ky: int, kx: int) -> jax.Array:
        top, left = mh - 1 - row_shift, mw - 1 - column_shift
        view = products[:, top : top + qh, left : left + qw]
        return view * kernel[ky, kx] if kernel.ndim == 3 else view[..., ky, kx, :]

    phases = []
    for a in range(s):
        row = []
        for b in range(s):
            terms = [
                tap(row_shift, column_shift, ky, kx)
                for row_shift, ky in enumerate(range(a, kh, s))
                for column_shift, kx in enumerate(range(b, kw, s))
            ]
            row.append(sum(terms) if terms else jnp.zeros((n, qh, qw, cin), g.dtype))
        phases.append(row)
    if s == 1:
        dxp = phases[0][0]
    else:
        # Interleave the phases: dxp[:, s*q + a, s*r + b] = phases[a][b][:, q, r].
        dxp = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)
        dxp = dxp.reshape(n, qh * s, qw * s, cin)
    (top, _), (left, _) = padding
    dx = dxp[:, top : top + x.shape[1], left : left + x.shape[2]]
    return dx.astype(x.dtype), dk


taps_conv.defvjp(_taps_conv_fwd, _taps_conv_bwd)
im2col_conv.defvjp(_im2col_conv_fwd, _taps_conv_bwd)


def _native_conv(
    x: jax.Array, kernel: jax.Array, padding: Sequence[tuple[int, int]], strides: int, groups: int
) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(strides, strides),
        padding=tuple(padding),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


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
        rngs: nnx.Rngs,
    ):
        out_channels = _make_divisible(int(filters * alpha), 8)
        hidden = in_channels
        if block_id:
            hidden = expansion * in_channels
            self.expand = Conv2D(in_channels, hidden, 1, strides=1, rngs=rngs)
            self.expand_BN = InferenceBatchNorm(hidden)
        else:
            self.expand = None
            self.expand_BN = None
        self.depthwise = DepthwiseConv2D(hidden, strides=stride, rngs=rngs)
        self.depthwise_BN = InferenceBatchNorm(hidden)
        self.project = Conv2D(hidden, out_channels, 1, strides=1, rngs=rngs)
        self.project_BN = InferenceBatchNorm(out_channels)
        self.out_channels = out_channels
        self.use_residual = stride == 1 and in_channels == out_channels

    def __call__(self, inputs: jax.Array, impl: str, dtype) -> jax.Array:
        x = inputs
        if self.expand is not None:
            x = _relu6(self.expand(x, self.expand_BN, impl, dtype))
        x = _relu6(self.depthwise(x, self.depthwise_BN, impl, dtype))
        x = self.project(x, self.project_BN, impl, dtype)
        return inputs + x if self.use_residual else x


_BLOCK_LAYER = re.compile(
    r"^(?:expanded_conv_|block_(\d+)_)(expand|expand_BN|depthwise|depthwise_BN|project|project_BN)$"
)
_TOP_LEVEL_LAYERS = ("Conv1", "bn_Conv1", "Conv_1", "Conv_1_bn", "predictions")


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

    depthwise: "auto" | "conv" | "taps", how convolutions are computed (module docstring); same results.
    dtype: compute dtype of activations (e.g. jnp.bfloat16); parameters stay float32.
    batch_chunk: images per pass through the network; None = `CPU_BATCH_CHUNK` on the "taps" (CPU)
        path, the whole batch otherwise; 0 = the whole batch.
    """

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        include_top: bool = True,
        classes: int = 1000,
        classifier_activation: str | None = "softmax",
        pooling: str | None = None,
        depthwise: str = "auto",
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
        resolve_depthwise(depthwise)  # validates the name early
        self.alpha = alpha
        self.include_top = include_top
        self.classes = classes
        self.classifier_activation = classifier_activation
        self.pooling = pooling
        self.depthwise = depthwise
        self.dtype = dtype
        self.batch_chunk = batch_chunk

        first_filters = _make_divisible(32 * alpha, 8)
        self.Conv1 = Conv2D(3, first_filters, 3, strides=2, rngs=rngs)
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
                rngs=rngs,
            )
            blocks.append(block)
            channels = block.out_channels
        self.blocks = nnx.List(blocks)
        self.num_features = last_conv_filters(alpha)
        self.Conv_1 = Conv2D(channels, self.num_features, 1, strides=1, rngs=rngs)
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
            prefix = block_keras_prefix(block_id)
            for member in (
                "expand",
                "expand_BN",
                "depthwise",
                "depthwise_BN",
                "project",
                "project_BN",
            ):
                module = getattr(block, member)
                if module is not None:
                    layers[prefix + member] = module
        layers["Conv_1"] = self.Conv_1
        layers["Conv_1_bn"] = self.Conv_1_bn
        if self.predictions is not None:
            layers["predictions"] = self.predictions
        return layers

    def features(self, x: jax.Array) -> list[jax.Array]:
        """Activations after Conv1's ReLU, after each of the 17 blocks and after `out_relu` (19 maps).

        Keras names these `Conv1_relu`, `expanded_conv_project_BN`, `block_<i>_add` or
        `block_<i>_project_BN`, and `out_relu`; the parity tests compare them one by one.
        """
        self._check_input(x)
        impl, dtype = resolve_depthwise(self.depthwise), self.dtype or x.dtype
        outputs = [x.astype(dtype)]
        for unit in range(NUM_UNITS):
            outputs.append(self._unit(unit, outputs[-1], impl, dtype))
        return outputs[1:]

    def __call__(self, x: jax.Array) -> jax.Array:
        self._check_input(x)
        return self.in_chunks(lambda x: self._output(self._units(x, 0, NUM_UNITS)), x)

    def prefix(self, x: jax.Array, cut: int) -> jax.Array:
        """The activation entering unit `cut` (`NUM_UNITS`): units [0, cut) on images `x`."""
        self._check_input(x)
        return self.in_chunks(lambda x: self._units(x, 0, cut), x)

    def suffix(self, x: jax.Array, cut: int) -> jax.Array:
        """The model's output from the activation entering unit `cut`, on the whole batch at once.

        These are the layers that fine-tuning trains. Their activations are small (at most 14x14
        at 224 px from block 11 on), and the backward pass through a `lax.map` over chunks of
        images is slow on the CPU (a train step from block 13 at 96 px: 530 ms chunked, 184 ms
        whole, measured before `taps_conv` had its own gradient), so `batch_chunk` applies to the
        frozen prefix only.
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
        """Images per pass through the network (`batch_chunk` resolved); 0 = the whole batch."""
        if self.batch_chunk is not None:
            return self.batch_chunk
        return CPU_BATCH_CHUNK if resolve_depthwise(self.depthwise) == "taps" else 0

    def in_chunks(self, fn, x: jax.Array) -> jax.Array:
        """`fn(x)` computed `chunk_size()` images at a time (`_map_in_chunks`)."""
        return _map_in_chunks(fn, x, self.chunk_size())

    def _units(self, x: jax.Array, start: int, stop: int) -> jax.Array:
        impl, dtype = resolve_depthwise(self.depthwise), self.dtype or x.dtype
        x = x.astype(dtype)
        for unit in range(start, stop):
            x = self._unit(unit, x, impl, dtype)
        return x

    def _unit(self, unit: int, x: jax.Array, impl: str, dtype) -> jax.Array:
        if unit == 0:
            return _relu6(self.Conv1(x, self.bn_Conv1, impl, dtype))
        if unit <= len(self.blocks):
            return self.blocks[unit - 1](x, impl, dtype)
        return _relu6(self.Conv_1(x, self.Conv_1_bn, impl, dtype))

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
