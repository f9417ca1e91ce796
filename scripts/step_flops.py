"""What each training setup compiles: the train step's FLOPs over the forward pass's (XLA's cost analysis).

    python scripts/step_flops.py               # 224 px, alpha 1, batch 32 (docs/benchmarks.md)
    python scripts/step_flops.py --image-size 96

Measured on the CPU path's arithmetic (`--conv-impl cpu`) as one straight graph (batch_chunk 0): the
cost analysis counts a loop body once, and counts the XLA path's depthwise-kernel gradient as a
dense convolution. Random weights (the FLOPs do not depend on them).
"""

import argparse

import jax
import numpy as np
from flax import nnx

from mnist_flax.build import create_model
from mnist_flax.config import FINE_TUNE_STAGE, FROZEN_STAGE, TrainConfig
from mnist_flax.freezing import make_optimizer
from mnist_flax.steps import StepRunner, make_metrics

# name -> (model, fine-tune-from, stage)
SETUPS = {
    "the head (pipeline model)": ("pipeline", None, FROZEN_STAGE),
    "fine-tuning from block 16": ("pipeline", "16", FINE_TUNE_STAGE),
    "fine-tuning from block 13": ("pipeline", "13", FINE_TUNE_STAGE),
    "fine-tuning from block 8": ("pipeline", "8", FINE_TUNE_STAGE),
    "the notebook model's adapter and head": ("notebook", None, FROZEN_STAGE),
    "the whole backbone (--fine-tune-from Conv1)": ("pipeline", "Conv1", FINE_TUNE_STAGE),
}


def flops(model_name: str, fine_tune_from: str | None, stage: str, image_size: int, batch: int):
    config = TrainConfig(
        model=model_name,
        weights="none",
        conv_impl="cpu",
        image_size=image_size,
        batch_size=batch,
        fine_tune_epochs=1 if fine_tune_from else 0,
        fine_tune_from=fine_tune_from or TrainConfig.fine_tune_from,
    )
    config.validate()
    model = create_model(config, 10)
    model.batch_chunk = 0
    optimizer = make_optimizer(model, 1e-3, stage=stage)
    steps = StepRunner(model, optimizer, make_metrics(), stage=stage)
    side, channels = (28, 1) if model.adapter is not None else (image_size, 3)
    inputs = {
        "image": np.zeros((batch, side, side, channels), np.float32),
        "label": np.zeros(batch, np.int32),
        "mask": np.ones(batch, bool),
    }
    train = steps.lower_train(inputs).compile().cost_analysis()["flops"]
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images))
    return train, forward.lower(state, inputs["image"]).compile().cost_analysis()["flops"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224, help="a multiple of 28")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    print(
        f"| what trains ({args.image_size} px, alpha 1, batch {args.batch_size}) | train / forward |"
    )
    for name, setup in SETUPS.items():
        train, forward = flops(*setup, args.image_size, args.batch_size)
        print(
            f"| {name} | {train / forward:.2f}x ({train / 1e9:.1f} / {forward / 1e9:.1f} GFLOPs) |"
        )


if __name__ == "__main__":
    main()
