"""The CPU path's chunk plan: how many images go through the backbone, and through a gradient, at once.

On the CPU the forward pass is bound by memory traffic: a whole batch's expanded activation does not
fit in cache, a few images' does. So on the CPU path (`--conv-impl` resolving to "cpu") the
classifier runs its frozen backbone units a few images at a time (`unit_chunks`, `run_units`), and
the notebook model's gradient, which crosses the backbone's activations, is summed over chunks of
`GRADIENT_CHUNK` examples (`value_and_grad_in_chunks`). Every image is independent (BatchNorm uses
its running statistics), so the results are those of the whole batch; on GPU and TPU everything
runs on the whole batch. What was measured, and why these sizes: docs/cpu_path.md.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from mnist_flax.convolutions import resolve_conv_impl

# A chunk's widest activation should fit about CHUNK_BYTES, with at most `max_chunk()` images: up to
# 8 on a CPU whose cores have 1 MiB of L2 cache or more, 2 below. Larger chunks were faster than 2
# on a CPU with 2 MiB of L2 a core and slower on one with 512 KiB (docs/cpu_path.md#chunks-per-unit).
# Larger inputs get 1 where 2 do not fit.
CHUNK_BYTES = 10 * 2**20
LARGE_L2_BYTES = 2**20
MAX_CHUNK_LARGE_L2, MAX_CHUNK_SMALL_L2 = 8, 2
# Examples per chunk of a gradient that crosses the backbone (the notebook model's), and of the
# notebook adapter's pass in front of it: each chunk's forward and backward pass stays in cache.
GRADIENT_CHUNK = 2
_SIZE_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}


def unit_chunks(model, height: int, width: int) -> list[int]:
    """Images per pass through each backbone unit of `model` (a `TransferClassifier`) for
    `height` x `width` inputs (0: the whole batch): its `batch_chunk` where that is set, else as
    many as fit `CHUNK_BYTES` on the CPU path and the whole batch elsewhere."""
    backbone = model.backbone
    if model.batch_chunk is not None or not _on_cpu_path(backbone):
        return [model.batch_chunk or 0] * len(backbone.units)
    itemsize = jnp.dtype(backbone.dtype or jnp.float32).itemsize
    h, w = -(-height // 2), -(-width // 2)  # after Conv1 (stride 2)
    # Conv1's widest: its output, or its im2col windows (27 values a pixel).
    widest = [h * w * max(backbone.Conv1.kernel.shape[-1], 27)]
    for block in backbone.blocks:
        widest.append(h * w * block.depthwise.kernel.shape[2])  # the expanded activation
        if block.depthwise.strides == 2:
            h, w = -(-h // 2), -(-w // 2)
    widest.append(h * w * backbone.num_features)
    return [images_per_chunk(values * itemsize) for values in widest]


def gradient_chunk(model) -> int:
    """Examples per chunk of `model`'s train-step gradient (0: the whole batch).

    The notebook model's gradient crosses the frozen backbone's activations to reach its
    adapter: `GRADIENT_CHUNK` on the CPU path. The pipeline model differentiates only layers
    after the frozen ones: the whole batch.
    """
    if model.adapter is None:
        return 0
    if model.batch_chunk is not None:
        return model.batch_chunk
    return GRADIENT_CHUNK if _on_cpu_path(model.backbone) else 0


def _on_cpu_path(backbone) -> bool:
    return resolve_conv_impl(backbone.conv_impl) == "cpu"


def run_units(units: Sequence[Callable], x: jax.Array, chunks: Sequence[int]) -> jax.Array:
    """`units` one after the other on `x`, each run of units with the same chunk in one
    `map_in_chunks`."""
    start = 0
    while start < len(units):
        end = start + 1
        while end < len(units) and chunks[end] == chunks[start]:
            end += 1

        def run(x, run_units=units[start:end]):
            for unit in run_units:
                x = unit(x)
            return x

        x = map_in_chunks(run, x, chunks[start])
        start = end
    return x


def map_in_chunks(fn: Callable, x: jax.Array, chunk: int) -> jax.Array:
    """`fn(x)` computed `chunk` images at a time with `lax.map` (0 = all at once).

    `fn` must treat every image independently (MobileNetV2 does: BatchNorm uses running
    statistics), so the result is the same.
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


def value_and_grad_in_chunks(value_and_grad: Callable, params, batch: dict, chunk: int):
    """`value_and_grad(params, batch)` ((summed loss, per-example outputs), gradient) computed
    `chunk` examples at a time (0: the whole batch at once).

    The summed loss of a batch is the sum of its chunks' summed losses, so the chunks' gradients
    add up to the batch's. Each `lax.scan` iteration runs one chunk's forward and backward pass
    while its activations are still in cache, and nothing is carried between iterations but the
    sums: backpropagating through the backbone's own chunked `lax.map` instead saved every
    chunk's residuals into stacked buffers (docs/cpu_path.md).
    """
    size = batch["mask"].shape[0]
    if chunk <= 0 or size <= chunk:
        return value_and_grad(params, batch)
    whole = size - size % chunk

    def chunks(x):
        return x[:whole].reshape(whole // chunk, chunk, *x.shape[1:])

    def add_chunk(total, chunk_batch):
        (loss, outputs), grads = value_and_grad(params, chunk_batch)
        return jax.tree.map(jnp.add, total, (loss, grads)), outputs

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), outputs = jax.lax.scan(add_chunk, zeros, jax.tree.map(chunks, batch))
    outputs = jax.tree.map(lambda x: x.reshape(whole, *x.shape[2:]), outputs)
    if whole < size:
        rest = jax.tree.map(lambda x: x[whole:], batch)
        (rest_loss, rest_outputs), rest_grads = value_and_grad(params, rest)
        loss, grads = loss + rest_loss, jax.tree.map(jnp.add, grads, rest_grads)
        outputs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), outputs, rest_outputs)
    return (loss, outputs), grads


def l2_cache_bytes(
    cache_dir: pathlib.Path = pathlib.Path("/sys/devices/system/cpu/cpu0/cache"),
) -> int:
    """One core's L2 cache in bytes, as Linux reports it (sysfs); 0 where it does not say."""
    for index in sorted(cache_dir.glob("index*")):
        try:
            if (index / "level").read_text().strip() != "2":
                continue
            size = (index / "size").read_text().strip()  # e.g. "2048K"
            return int(size[:-1]) * _SIZE_UNITS[size[-1]] if size[-1] in _SIZE_UNITS else int(size)
        except (OSError, ValueError):
            continue
    return 0


@functools.cache
def max_chunk() -> int:
    """The most images a chunk holds on this machine's CPU (see CHUNK_BYTES)."""
    return MAX_CHUNK_LARGE_L2 if l2_cache_bytes() >= LARGE_L2_BYTES else MAX_CHUNK_SMALL_L2


def images_per_chunk(bytes_per_image: int) -> int:
    """The most images (a power of two, at most `max_chunk()`) whose activation fits `CHUNK_BYTES`."""
    chunk, most = 1, max_chunk()
    while chunk * 2 <= most and chunk * 2 * bytes_per_image <= CHUNK_BYTES:
        chunk *= 2
    return chunk
