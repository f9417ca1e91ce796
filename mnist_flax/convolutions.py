"""How a convolution is computed: the one way the models call one, and Keras' padding rules.

`conv2d` and `depthwise_conv2d` take Keras-shaped kernels (`(kh, kw, in, out)` and
`(kh, kw, channels)`) and NHWC inputs, and compute them by `impl` (`--conv-impl`):
- "xla": XLA's native convolution (`lax.conv_general_dilated`, depthwise through
  `feature_group_count`), the fast form on GPU and TPU;
- "cpu": the same arithmetic in the forms XLA:CPU runs fast (`cpu_ops.py`): a 1x1 convolution as a
  matrix product over the channel axis, a depthwise one as nine shifted multiply-adds, a dense one
  as one matrix product over its input windows (im2col) or, with a single input channel (the
  notebook adapter's), as nine multiply-adds;
- "auto": "cpu" when JAX's default backend is the CPU, "xla" otherwise.
Both give the same results to float32 rounding, from the same parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mnist_flax import cpu_ops
from mnist_flax.config import CONV_IMPLS, ModelConfigError

Padding = cpu_ops.Padding
SAME_3X3: Padding = ((1, 1), (1, 1))  # Keras' padding="same" for a 3x3 stride-1 convolution


def resolve_conv_impl(impl: str, platform: str | None = None) -> str:
    """The implementation to trace: "auto" means "cpu" on the CPU backend and "xla" elsewhere.

    platform: the backend to decide for ("cpu", "cuda", "tpu"...; default: JAX's default backend).
    """
    if impl not in CONV_IMPLS:
        raise ModelConfigError(
            f"conv_impl={impl!r} is not one of {', '.join(CONV_IMPLS)}; pick one of those"
        )
    if impl == "auto":
        return "cpu" if (platform or jax.default_backend()) == "cpu" else "xla"
    return impl


def correct_pad(height: int, width: int, kernel_size: int = 3) -> Padding:
    """Zero padding Keras puts before a stride-2 "valid" conv (`imagenet_utils.correct_pad`).

    An even side gets one pixel at the bottom/right only, an odd side one on each end. This equals
    TensorFlow's "SAME" padding for a 3x3 stride-2 conv, which is what Keras uses for `Conv1`.
    """
    correct = kernel_size // 2
    adjust_h, adjust_w = 1 - height % 2, 1 - width % 2
    return ((correct - adjust_h, correct), (correct - adjust_w, correct))


def conv2d(
    x: jax.Array, kernel: jax.Array, *, strides: int, padding: Padding, impl: str
) -> jax.Array:
    """A dense convolution, kernel `(kh, kw, in, out)`, over `x` zero-padded by `padding`."""
    kh, kw, cin, _ = kernel.shape
    if resolve_conv_impl(impl) == "xla":
        return _xla_conv(x, kernel, padding, strides, groups=1)
    if kh == kw == 1 and strides == 1:
        # A 1x1 conv is a matrix product over the channel axis: one GEMM for XLA:CPU.
        return jnp.einsum("nhwc,cd->nhwd", x, kernel[0, 0])
    if cin == 1:
        # One input channel: nine multiply-adds, fused; as a product it gained nothing.
        return cpu_ops.taps_conv(x, kernel, padding, strides)
    return cpu_ops.im2col_conv(x, kernel, padding, strides)


def depthwise_conv2d(
    x: jax.Array, kernel: jax.Array, *, strides: int, padding: Padding, impl: str
) -> jax.Array:
    """A depthwise convolution (multiplier 1), kernel `(kh, kw, channels)`, over padded `x`."""
    if resolve_conv_impl(impl) == "xla":
        return _xla_conv(x, kernel[:, :, None, :], padding, strides, groups=x.shape[-1])
    return cpu_ops.taps_conv(x, kernel, padding, strides)


def _xla_conv(
    x: jax.Array, kernel: jax.Array, padding: Padding, strides: int, groups: int
) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(strides, strides),
        padding=tuple(padding),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )
