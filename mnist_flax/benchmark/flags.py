"""`mnist-flax benchmark`'s command line: its flags, and what it can measure.

Like `config.py` for `train`, this imports neither JAX nor TensorFlow, so that `--help` and flag
errors answer at once; `protocol.py` does the work.
"""

from __future__ import annotations

import argparse
import pathlib

from mnist_flax import config

# What `mnist-flax benchmark` can measure (`protocol.py`), and what it measures unless told.
MEASUREMENTS = ("pipeline", "step", "forward", "end-to-end", "cache")
DEFAULT_MEASUREMENTS = ("pipeline", "step", "forward", "end-to-end")
# The measurements Keras has a counterpart of (`train_on_batch`, `predict_on_batch`), and the Keras 3
# backends `--keras-baseline` runs them on, the first being what a bare `--keras-baseline` means.
KERAS_MEASUREMENTS = ("step", "forward")
KERAS_BACKENDS = ("tensorflow", "jax")


class _KerasBackends(argparse.Action):
    """`--keras-baseline [BACKEND ...]`: the backends named, each once; the flag alone, the first."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, list(dict.fromkeys(values or KERAS_BACKENDS[:1])))


def add_flags(parser: argparse.ArgumentParser) -> None:
    """`mnist-flax benchmark`'s flags (the work: `protocol.py`)."""
    sweep = parser.add_argument_group("swept options (every combination is one row)")
    # Every default is the training run's (`TrainConfig`).
    defaults = config.TrainConfig()
    for flag, value, options in (
        ("--batch-size", defaults.batch_size, {"type": int}),
        ("--image-size", defaults.image_size, {"type": int}),
        ("--dtype", defaults.dtype, {"choices": config.DTYPES}),
        ("--conv-impl", defaults.conv_impl, {"choices": config.CONV_IMPLS}),
        ("--resize", defaults.resize, {"choices": config.RESIZE_MODES}),
    ):
        sweep.add_argument(flag, nargs="+", default=[value], help="as for train", **options)
    model = parser.add_argument_group("model and data")
    model.add_argument(
        "--model",
        choices=config.MODELS,
        default=defaults.model,
        help="pipeline: RGB images in [-1, 1] into the frozen MobileNetV2; notebook: the Keras "
        "notebook's model, 28x28 digits in [0, 1] through UpSampling2D(--image-size / 28) + "
        "Conv2D(3, relu) first (--image-size a multiple of 28; no --resize, no --measure cache)",
    )
    model.add_argument(
        "--alpha", type=float, default=defaults.alpha, help="MobileNetV2 width multiplier"
    )
    model.add_argument(
        "--weights",
        default=defaults.weights,
        help="imagenet (Keras cache or download), none (random), PATH.h5, or a DIR from "
        "`mnist-flax convert` (not with --keras-baseline)",
    )
    model.add_argument("--data-dir", help="MNIST IDX files; default: synthetic digits")
    model.add_argument("--split", default="train", help="split of --data-dir to read, e.g. test")
    model.add_argument(
        "--learning-rate", type=float, default=defaults.learning_rate, help="as for train"
    )
    model.add_argument("--seed", type=int, default=defaults.seed, help="as for train")
    protocol = parser.add_argument_group("protocol")
    protocol.add_argument(
        "--measure",
        nargs="+",
        choices=MEASUREMENTS,
        default=list(DEFAULT_MEASUREMENTS),
        help="what to measure",
    )
    protocol.add_argument(
        "--keras-baseline",
        nargs="*",
        choices=KERAS_BACKENDS,
        default=[],
        action=_KerasBackends,
        metavar="BACKEND",
        help="also time the same model in Keras 3 on each BACKEND "
        f"({', '.join(KERAS_BACKENDS)}; the flag alone: {KERAS_BACKENDS[0]}), "
        "interleaved with ours; a backend other than the one Keras runs on in this process "
        "runs in a process of its own",
    )
    protocol.add_argument("--steps", type=int, default=10, help="timed steps a repetition")
    protocol.add_argument("--repeats", type=int, default=5, help="timed repetitions")
    protocol.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    protocol.add_argument(
        "--pipeline-batches", type=int, default=50, help="timed batches a pipeline epoch"
    )
    cache = parser.add_argument_group(
        "--measure cache",
        "two train_and_evaluate runs, without and with cached features, on the first value of "
        "each swept option",
    )
    cache.add_argument("--epochs", type=int, default=10, help="epochs of each run")
    cache.add_argument(
        "--cache-examples",
        type=int,
        nargs=2,
        default=[512, 128],
        metavar=("TRAIN", "TEST"),
        help="train and test examples, taken from the start of --split",
    )
    cache.add_argument("--cache-repeats", type=int, default=1, help="runs each way")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results to this file")
