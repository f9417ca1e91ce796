"""Throughput of this project's JAX code against the Keras/TensorFlow reference, measured in one run.

This script owns the benchmark protocol: a set of named measurements, each a zero-argument step function
that processes one batch and returns only when the result is computed (`block_until_ready` for JAX,
`.numpy()` for TensorFlow). `time_interleaved` warms every step up (compilation excluded), then runs the
steps in turn, repetition after repetition, so that a slow phase of a shared machine hits all of them alike;
figures are medians. Add a measurement by writing a `make_*` function returning a `Step` and listing it
in `MEASUREMENTS`.

    python scripts/benchmark.py                       # backbone forward, batch 32, 224x224
    python scripts/benchmark.py --json runs/bench.json --repeats 20

Measurements so far:
- flax_backbone_forward: `MobileNetV2(include_top=False)` under `jax.jit`, fast path (`depthwise="auto"`).
- keras_backbone_forward: `keras.applications.MobileNetV2(include_top=False)` called as
  `model(x, training=False)` inside `tf.function` (what `model.predict` runs; Keras disables XLA on CPU).
Both hold the same weights: the real ImageNet file when $MNIST_FLAX_SHARED has it, else Keras' random init.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

IMAGENET_NO_TOP = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


@dataclasses.dataclass(frozen=True)
class Step:
    """One measurement: `run()` processes `images` images and blocks until the result exists."""

    run: Callable[[], object]
    images: int


@dataclasses.dataclass(frozen=True)
class Options:
    batch_size: int
    image_size: int
    alpha: float
    seed: int
    depthwise: str
    batch_chunk: int | None


def time_interleaved(
    steps: dict[str, Step], *, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each step: `warmup` untimed calls each, then `repeats` rounds of one call each."""
    for step in steps.values():
        for _ in range(warmup):
            step.run()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step.run()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def _keras_backbone(options: Options):
    """A Keras MobileNetV2 without top; ImageNet weights when the shared folder has them."""
    import keras

    shared = os.environ.get("MNIST_FLAX_SHARED")
    weights_file = pathlib.Path(shared, "weights", IMAGENET_NO_TOP) if shared else None
    use_file = weights_file is not None and weights_file.is_file() and options.alpha == 1.0
    keras.utils.set_random_seed(options.seed)
    return keras.applications.MobileNetV2(
        input_shape=(options.image_size, options.image_size, 3),
        alpha=options.alpha,
        include_top=False,
        weights=str(weights_file) if use_file else None,
    )


def _images(options: Options) -> np.ndarray:
    rng = np.random.default_rng(options.seed)
    shape = (options.batch_size, options.image_size, options.image_size, 3)
    return rng.uniform(-1.0, 1.0, shape).astype(np.float32)


def make_keras_backbone_forward(options: Options, keras_model) -> Step:
    import tensorflow as tf

    forward = tf.function(lambda x: keras_model(x, training=False))
    x = tf.constant(_images(options))
    return Step(run=lambda: forward(x).numpy(), images=options.batch_size)


def make_flax_backbone_forward(options: Options, keras_model) -> Step:
    import jax
    from flax import nnx

    from mnist_flax.convert import mobilenet_v2_from_keras

    model = mobilenet_v2_from_keras(
        keras_model,
        alpha=options.alpha,
        include_top=False,
        depthwise=options.depthwise,
        batch_chunk=options.batch_chunk,
    )
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    x = jax.device_put(_images(options))
    return Step(run=lambda: forward(state, x).block_until_ready(), images=options.batch_size)


# name -> factory(options, keras_model). The Keras model is built once and shared (same weights).
MEASUREMENTS: dict[str, Callable[[Options, object], Step]] = {
    "flax_backbone_forward": make_flax_backbone_forward,
    "keras_backbone_forward": make_keras_backbone_forward,
}
# (ours, reference) pairs reported as a speed ratio.
RATIOS = {"backbone_forward": ("flax_backbone_forward", "keras_backbone_forward")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per step (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depthwise", default="auto", choices=["auto", "conv", "taps"])
    parser.add_argument(
        "--batch-chunk", type=int, help="MobileNetV2(batch_chunk=...); default: the model's choice"
    )
    parser.add_argument(
        "--only", nargs="+", choices=sorted(MEASUREMENTS), help="run only these measurements"
    )
    parser.add_argument("--json", type=pathlib.Path, help="also write the results to this file")
    args = parser.parse_args(argv)

    import jax

    options = Options(
        args.batch_size, args.image_size, args.alpha, args.seed, args.depthwise, args.batch_chunk
    )
    keras_model = _keras_backbone(options)
    names = args.only or list(MEASUREMENTS)
    steps = {name: MEASUREMENTS[name](options, keras_model) for name in names}
    seconds = time_interleaved(steps, repeats=args.repeats, warmup=args.warmup)

    results: dict = {
        "options": dataclasses.asdict(options) | {"repeats": args.repeats, "warmup": args.warmup},
        "environment": {
            "jax": jax.__version__,
            "jax_backend": jax.default_backend(),
            "cpu_count": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
        },
        "measurements": {},
        "ratios": {},
    }
    for name, times in seconds.items():
        median = statistics.median(times)
        results["measurements"][name] = {
            "median_seconds": median,
            "images_per_second": steps[name].images / median,
            "seconds": times,
        }
        print(
            f"{name:28s} {steps[name].images / median:9.1f} images/s  (median {median * 1e3:.1f} ms)"
        )
    for label, (ours, reference) in RATIOS.items():
        if ours in seconds and reference in seconds:
            ratio = statistics.median(seconds[reference]) / statistics.median(seconds[ours])
            results["ratios"][label] = ratio
            print(f"{label + ' ratio (ours / keras)':28s} {ratio:9.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
