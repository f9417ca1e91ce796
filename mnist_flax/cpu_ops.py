"""The CPU path's kernels: convolutions as multiply-adds and matrix products, with their gradients.

XLA:CPU runs a grouped (depthwise) convolution and a 1x1 convolution far slower than the same
arithmetic written as shifted multiply-adds or one matrix product, so on the CPU backend
`convolutions.py` computes MobileNetV2's convolutions with the functions here (the figures, and what
else was tried: docs/cpu_path.md). Each computes exactly what `lax.conv_general_dilated` computes,
to float32 rounding; `tests/test_mobilenet_v2.py` checks outputs and gradients against it.

- `taps_conv`: a "valid" convolution over a zero-padded input as one multiply-add per kernel tap
  (depthwise kernels; dense kernels with one input channel, the notebook adapter's).
- `im2col_conv`: a dense convolution as one matrix product over its input windows (Conv1).
- Both carry a hand-written gradient (`_taps_conv_bwd`): what JAX derives from the forward's strided
  slices is one zero-padded, full-size copy of the cotangent per tap, slow on XLA:CPU.
- `relu6`: ReLU6 with TensorFlow's gradient, kept as one boolean mask.

How many images run through these at once is the chunk plan's (`cpu_chunks.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Padding = tuple[tuple[int, int], tuple[int, int]]


@jax.custom_jvp
def relu6(x: jax.Array) -> jax.Array:
    """min(max(x, 0), 6), Keras' `ReLU(6.)`."""
    return jnp.clip(x, 0, 6)


@relu6.defjvp
def _relu6_jvp(primals, tangents):
    # TensorFlow's Relu6Grad: the gradient passes where 0 < x < 6. `jnp.clip`'s own derivative
    # keeps two float32 masks per activation for the backward pass (and halves the gradient at
    # ties); this keeps one boolean mask.
    (x,), (t,) = primals, tangents
    return relu6(x), jnp.where((x > 0) & (x < 6), t, jnp.zeros_like(t))


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
    each input channel over the output channels."""
    if w.ndim == 1:
        return [view * w]
    return [view[..., c : c + 1] * w[c] for c in range(w.shape[0])]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def taps_conv(x: jax.Array, kernel: jax.Array, padding: Padding, strides: int) -> jax.Array:
    """A "valid" conv over `x` zero-padded by `padding`, as one multiply-add per tap.

    kernel: depthwise `(kh, kw, C)`, or dense `(kh, kw, Cin, Cout)` with a small Cin (every input
    channel costs Cout multiply-adds per tap).
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
def im2col_conv(x: jax.Array, kernel: jax.Array, padding: Padding, strides: int) -> jax.Array:
    """`taps_conv` with a dense kernel `(kh, kw, Cin, Cout)` as one matrix product.

    The input windows go side by side on the channel axis (im2col: kh * kw * Cin values per output
    pixel, tap-major like the kernel's reshape), then one product with the kernel. XLA writes the
    product's output once; the same function as fused multiply-adds looked cheap enough for XLA to
    recompute inside every fusion that reads it.
    """
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    kh, kw, cin, cout = kernel.shape
    columns = jnp.concatenate(_shifted_views(xp, kh, kw, strides), axis=-1)
    return jnp.einsum("nhwk,kd->nhwd", columns, kernel.reshape(kh * kw * cin, cout))


def _conv_fwd(conv, x, kernel, padding, strides):
    return conv(x, kernel, padding, strides), (x, kernel)


def _taps_conv_bwd(padding: Padding, strides: int, residuals, g: jax.Array):
    """The gradient of `taps_conv` and `im2col_conv` (two ways to compute one function).

    Input gradient: a stride-1 correlation of the cotangent with the flipped kernel, one per stride
    phase. Kernel gradient: one reduction per tap for a depthwise kernel, one matrix product over
    the stacked views for a dense one (XLA drops it when nothing trains the kernel).
    """
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    views = _shifted_views(xp, kh, kw, strides)
    if kernel.ndim == 3:
        dk = jnp.stack([jnp.sum(view * g, axis=(0, 1, 2)) for view in views])
    else:
        # The views stacked in front (taps leading) make every tap's product one contraction.
        dk = jnp.einsum("knhwc,nhwd->kcd", jnp.stack(views), g)
    dk = dk.reshape(kernel.shape).astype(kernel.dtype)

    # Padded input row p = s*i + ky receives g[i] * w[ky]. Split p by phase p = s*q + a: the taps
    # ky = a + s*m reach it from g[q - m], a stride-1 correlation over a zero-padded cotangent.
    s = strides
    n, hp, wp, cin = xp.shape
    qh, qw = -(-hp // s), -(-wp // s)  # rows and columns per phase
    mh, mw = -(-kh // s), -(-kw // s)  # most taps in one phase, per axis
    # Depthwise: each tap's product g * w is formed in the fused sum below. Dense: every tap's
    # product g @ w.T from one matrix product, [n, h, w, kh, kw, Cin].
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


taps_conv.defvjp(functools.partial(_conv_fwd, taps_conv), _taps_conv_bwd)
im2col_conv.defvjp(functools.partial(_conv_fwd, im2col_conv), _taps_conv_bwd)
