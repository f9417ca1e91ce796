"""Where the CPU path's forward pass goes: its rate against a large matrix product, per unit.

    python scripts/forward_profile.py --weights ../shared/weights/FILE.h5           # whole pass
    python scripts/forward_profile.py --weights ../shared/weights/FILE.h5 --per-unit

The whole pass (the pipeline model's pooled features, batch 32, 224 px) under each `--chunks`
setting ("auto" is the default per-unit choice, `cpu_chunks.unit_chunks`; a number is that many
images for every unit), interleaved with a float32 2048 x 2048 matrix product in the same
process: images/s, GFLOP/s (XLA's cost analysis of the pass as one straight graph) and the share of
the product's rate. `--per-unit` times each of the 19 units alone on its real input, for chunks
of 1, 2, 4, 8 and the whole batch, with each unit's FLOPs and its rate at the default chunk
against the product's. Medians over `--repeats` rounds.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mnist_flax import cpu_chunks
from mnist_flax.build import create_model
from mnist_flax.config import TrainConfig
from mnist_flax.keras_names import NUM_UNITS

MATMUL_SIDE = 2048


def timed(fn, *args) -> float:
    began = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--weights", default="none", help="as for train (the FLOPs do not care)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--chunks", nargs="+", default=["auto", "2"], help="auto or N images")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--per-unit", action="store_true")
    args = parser.parse_args()
    config = TrainConfig(weights=args.weights, image_size=args.image_size, conv_impl="cpu")
    model = create_model(config, 10)
    size = args.image_size
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (args.batch_size, size, size, 3)), jnp.float32)

    def forward(chunk):
        model.batch_chunk = None if chunk == "auto" else int(chunk)
        graphdef, state = nnx.split(model)
        return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, stop="features")), state

    straight, state = forward("0")
    flops = straight.lower(state, images).compile().cost_analysis()["flops"]
    a = jnp.ones((MATMUL_SIDE, MATMUL_SIDE), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    if args.per_unit:
        timed(matmul, a)
        rate = 2 * MATMUL_SIDE**3 / np.median([timed(matmul, a) for _ in range(5)]) / 1e9
        per_unit(model, images, args.repeats, rate)
        return
    passes = {chunk: forward(chunk) for chunk in args.chunks}
    for fn, state in passes.values():
        timed(fn, state, images)
    timed(matmul, a)
    seconds = {chunk: [] for chunk in passes}
    matmul_seconds = []
    for round_ in range(args.repeats):
        order = list(passes) if round_ % 2 == 0 else list(passes)[::-1]
        for chunk in order:
            seconds[chunk].append(timed(passes[chunk][0], passes[chunk][1], images))
        matmul_seconds.append(np.median([timed(matmul, a) for _ in range(5)]))
    rate = 2 * MATMUL_SIDE**3 / np.median(matmul_seconds) / 1e9
    print(f"forward pass: {flops / 1e9:.2f} GFLOPs a batch of {args.batch_size} at {size} px")
    print(f"float32 {MATMUL_SIDE}x{MATMUL_SIDE} matrix product: {rate:.1f} GFLOP/s")
    for chunk, values in seconds.items():
        median = np.median(values)
        print(
            f"chunks {chunk:>4}: {median * 1e3:6.1f} ms a batch, {args.batch_size / median:6.1f} "
            f"img/s, {flops / median / 1e9:6.1f} GFLOP/s = {flops / median / 1e9 / rate:.0%} of "
            "the product's rate"
        )


def per_unit(model, images, repeats: int, rate: float) -> None:
    model.batch_chunk = None  # the per-unit choice, shown beside the timings
    graphdef, state = nnx.split(model.backbone)
    inputs, x = [], images
    for unit in range(NUM_UNITS):
        inputs.append(x)
        x = jax.jit(lambda s, x, u=unit: nnx.merge(graphdef, s).units[u](x))(state, x)
    chunks = (1, 2, 4, 8, images.shape[0])
    fns = {}
    for unit in range(NUM_UNITS):
        for chunk in chunks:
            fns[unit, chunk] = jax.jit(
                lambda s, x, u=unit, c=chunk: cpu_chunks.map_in_chunks(
                    lambda y: nnx.merge(graphdef, s).units[u](y), x, c
                )
            )
            timed(fns[unit, chunk], state, inputs[unit])
    seconds = {key: [] for key in fns}
    for _ in range(repeats):
        for (unit, chunk), fn in fns.items():
            seconds[unit, chunk].append(timed(fn, state, inputs[unit]))
    chosen = cpu_chunks.unit_chunks(model, images.shape[1], images.shape[2])
    batch = images.shape[0]
    # Each unit's FLOPs from XLA's cost analysis of its whole-batch graph.
    flops = [
        fns[unit, batch].lower(state, inputs[unit]).compile().cost_analysis()["flops"]
        for unit in range(NUM_UNITS)
    ]
    print(f"float32 {MATMUL_SIDE}x{MATMUL_SIDE} matrix product: {rate:.1f} GFLOP/s")
    print(
        "unit  input          "
        + "".join(f"{c:>8}" for c in chunks)
        + "  auto  GFLOPs  GFLOP/s at auto (share of the product's)"
    )
    totals = dict.fromkeys(chunks, 0.0)
    auto_total = 0.0
    for unit in range(NUM_UNITS):
        ms = {chunk: np.median(seconds[unit, chunk]) * 1e3 for chunk in chunks}
        for chunk in chunks:
            totals[chunk] += ms[chunk]
        auto_ms = ms[chosen[unit] or batch]
        auto_total += auto_ms
        achieved = flops[unit] / auto_ms / 1e6
        shape = "x".join(map(str, inputs[unit].shape[1:]))
        print(
            f"{unit:>4}  {shape:14}"
            + "".join(f"{ms[c]:8.1f}" for c in chunks)
            + f"{chosen[unit]:>6}{flops[unit] / 1e9:8.3f}{achieved:9.1f} ({achieved / rate:.0%})"
        )
    achieved = sum(flops) / auto_total / 1e6
    print(
        "sum   "
        + " " * 14
        + "".join(f"{totals[c]:8.1f}" for c in chunks)
        + f"{auto_total:6.1f}{sum(flops) / 1e9:8.3f}{achieved:9.1f} ({achieved / rate:.0%})   (ms)"
    )


if __name__ == "__main__":
    main()
