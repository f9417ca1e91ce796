"""The CPU path's kernels compute what XLA's convolution and ReLU6 compute, gradients included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_flax import convolutions
from mnist_flax.convolutions import SAME_3X3, correct_pad
from mnist_flax.cpu_ops import im2col_conv, relu6, taps_conv

# (input shape, kernel shape, stride): depthwise (kh, kw, C) and dense (kh, kw, Cin, Cout) kernels,
# stride 1 and 2, even and odd sides (stride 2 pads like Keras' correct_pad: one or two sides).
TAPS_CASES = [
    ((2, 9, 8, 5), (3, 3, 5), 1),
    ((2, 9, 8, 5), (3, 3, 5), 2),
    ((1, 10, 11, 4), (3, 3, 4), 2),
    ((2, 12, 12, 3), (3, 3, 3, 7), 2),
    ((1, 7, 9, 1), (3, 3, 1, 3), 1),
]


@pytest.mark.parametrize(("shape", "kernel_shape", "stride"), TAPS_CASES)
def test_taps_convolution_and_its_hand_written_gradient_equal_xlas_convolution(
    shape, kernel_shape, stride
):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
    padding = SAME_3X3 if stride == 1 else correct_pad(shape[1], shape[2], 3)
    depthwise = kernel.ndim == 3

    def reference(x, kernel):  # XLA's convolution, differentiated by JAX
        rhs = kernel[:, :, None, :] if depthwise else kernel
        return jax.lax.conv_general_dilated(
            x,
            rhs,
            (stride, stride),
            padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=shape[-1] if depthwise else 1,
        )

    y_ref, reference_vjp = jax.vjp(reference, x, kernel)
    cotangent = jnp.asarray(rng.normal(size=y_ref.shape), jnp.float32)
    # A dense kernel also runs as one matrix product over the windows (Conv1's path).
    for conv in (taps_conv,) if depthwise else (taps_conv, im2col_conv):
        y, ours_vjp = jax.vjp(lambda x, kernel: conv(x, kernel, padding, stride), x, kernel)  # noqa: B023
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5, err_msg=conv.__name__)
        for name, got, want in zip(
            ("input", "kernel"), ours_vjp(cotangent), reference_vjp(cotangent), strict=True
        ):
            np.testing.assert_allclose(
                got, want, rtol=1e-5, atol=1e-4, err_msg=f"{conv.__name__} {name}"
            )


def test_relu6_gradient_is_tensorflows():
    # Relu6Grad passes the gradient where 0 < x < 6 only (jnp.clip's own would give 0.5 at 0 and 6).
    x = jnp.array([-1.0, 0.0, 3.0, 6.0, 7.0])
    np.testing.assert_array_equal(jax.grad(lambda x: relu6(x).sum())(x), [0, 0, 1, 0, 0])
    np.testing.assert_array_equal(relu6(x), [0, 0, 3, 6, 6])


@pytest.mark.parametrize(
    ("shape", "kernel_shape", "stride"),
    [
        ((2, 9, 8, 1), (3, 3, 1, 3), 1),
        ((2, 9, 8, 3), (3, 3, 3, 4), 2),
        ((2, 5, 6, 8), (1, 1, 8, 6), 1),
    ],
)
def test_conv2d_computes_the_same_on_both_paths(shape, kernel_shape, stride):
    """Every dense form the CPU path picks (taps, im2col, the 1x1 product) equals XLA's convolution."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
    if kernel_shape[0] == 1:
        padding = ((0, 0), (0, 0))
    else:
        padding = SAME_3X3 if stride == 1 else correct_pad(shape[1], shape[2], 3)
    outputs = {
        impl: convolutions.conv2d(x, kernel, strides=stride, padding=padding, impl=impl)
        for impl in ("xla", "cpu")
    }
    np.testing.assert_allclose(outputs["cpu"], outputs["xla"], rtol=1e-5, atol=1e-5)
