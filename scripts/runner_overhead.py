"""How the train step is called: `nnx.jit`, `nnx.cached_partial` over it, and `steps.StepRunner`.

The three run the same `steps.train_step` on the same batch. For each, per call: the host time until
the asynchronous call returns (dispatch) and the time until the step's work is done, medians over
`--steps` calls after a warm-up, the three interleaved round after round. Flax's performance guide
(docs_nnx/guides/performance.md) describes the three; `StepRunner` is its "functional training
loop" and the one this project uses.

    python scripts/runner_overhead.py                   # tiny: 32x32, alpha 0.35, batch 8
    python scripts/runner_overhead.py --image-size 224 --alpha 1.0 --batch-size 32
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np
from flax import nnx

from mnist_flax.build import create_model
from mnist_flax.config import FROZEN_STAGE, TrainConfig
from mnist_flax.freezing import make_optimizer
from mnist_flax.steps import StepRunner, make_metrics, train_step


def runners(config: TrainConfig) -> dict:
    """name -> (call(batch), wait()): each with its own model, optimizer and metrics."""

    def objects():
        model = create_model(config, 10)
        return model, make_optimizer(model, config.learning_rate), make_metrics()

    model, optimizer, metrics = objects()
    frozen_step = functools.partial(train_step, stage=FROZEN_STAGE)
    nnx_step = nnx.jit(frozen_step)
    plain = (
        lambda batch: nnx_step(model, optimizer, metrics, batch),
        lambda: jax.block_until_ready(nnx.state(metrics)),
    )
    cached_objects = objects()
    cached_step = nnx.cached_partial(nnx.jit(frozen_step), *cached_objects)
    cached = (cached_step, lambda: jax.block_until_ready(nnx.state(cached_objects[2])))
    runner = StepRunner(*objects())
    split_merge = (runner.train, lambda: jax.block_until_ready(runner.metrics_state))
    return {"nnx.jit": plain, "nnx.cached_partial": cached, "StepRunner": split_merge}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=0.35)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed calls a round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds")
    args = parser.parse_args()
    config = TrainConfig(
        image_size=args.image_size, alpha=args.alpha, batch_size=args.batch_size, weights="none"
    )
    rng = np.random.default_rng(0)
    batch = jax.device_put(
        {
            "image": rng.uniform(
                -1, 1, (args.batch_size, args.image_size, args.image_size, 3)
            ).astype(np.float32),
            "label": rng.integers(0, 10, args.batch_size).astype(np.int32),
            "mask": np.ones(args.batch_size, bool),
        }
    )
    calls = runners(config)
    for call, wait in calls.values():  # compile and warm up
        for _ in range(3):
            call(batch)
            wait()
    dispatch = {name: [] for name in calls}
    total = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, (call, wait) in calls.items():
            for _ in range(args.steps):
                began = time.perf_counter()
                call(batch)
                returned = time.perf_counter()
                wait()
                dispatch[name].append(returned - began)
                total[name].append(time.perf_counter() - began)
    print(
        f"batch {args.batch_size}, {args.image_size}x{args.image_size}, alpha {args.alpha}, "
        f"jax {jax.__version__} on {jax.default_backend()}; medians of "
        f"{args.steps * args.repeats} calls"
    )
    print(f"{'':20} {'dispatch ms':>12} {'step ms':>10} {'dispatch share':>15}")
    for name in calls:
        d, t = np.median(dispatch[name]) * 1e3, np.median(total[name]) * 1e3
        print(f"{name:20} {d:12.2f} {t:10.2f} {d / t:15.1%}")


if __name__ == "__main__":
    main()
