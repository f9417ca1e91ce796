"""The `mnist-flax` command (also `python -m mnist_flax`): train, evaluate, convert.

Argument parsing only; the work is in `train.py` and `convert.py`, imported when a command runs so
that `--help` and flag errors answer at once. Every error a user can fix (a bad flag value, a
missing dataset or weights file, a workdir of another run, an unwritable workdir: any `ValueError`
the library raises for bad input) is printed as one line `error: ...` with exit status 2, without a
traceback. (Other exceptions, bugs, keep their traceback.) Ctrl-C exits with 130 after training
saved what was complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A command line argparse rejects (unknown flag, missing value, not a number)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # argparse would print the usage block and exit; one line is what the user needs.
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of `mnist-flax`.

    The train defaults repeat `TrainConfig`'s (this module does not import `train`, so that `--help`
    answers without loading JAX); change both together.
    """
    parser = _Parser(
        prog="mnist-flax",
        description="MNIST transfer learning with a frozen ImageNet MobileNetV2, in JAX/Flax NNX.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser(
        "train", help="train the Dense head on a frozen MobileNetV2 (resumes the workdir)"
    )
    data = train.add_argument_group("data")
    data.add_argument("--dataset", default="mnist", help="tfds dataset name (default: mnist)")
    data.add_argument(
        "--data-dir",
        default=None,
        help="read IDX files (train-*-ubyte, t10k-*-ubyte, gzipped or not) from DIR instead of tfds",
    )
    data.add_argument(
        "--train-split", default="train", help='tfds split syntax, e.g. "train[:80%%]"'
    )
    data.add_argument("--test-split", default="test", help='tfds split syntax, e.g. "test[8000:]"')
    data.add_argument("--image-size", type=int, default=224, help="input side in pixels, >= 32")
    data.add_argument(
        "--resize",
        choices=("host", "device"),
        default="host",
        help="resize in tf.data (host) or inside the jitted step (device)",
    )
    model = train.add_argument_group("model")
    model.add_argument("--alpha", type=float, default=1.0, help="MobileNetV2 width multiplier")
    model.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet | none (random) | PATH.h5 (Keras weights) | DIR (from `mnist-flax convert`)",
    )
    model.add_argument(
        "--depthwise",
        choices=("auto", "conv", "taps"),
        default="auto",
        help="convolution implementation (auto: taps on CPU, conv elsewhere)",
    )
    model.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="backbone compute dtype (parameters stay float32)",
    )
    fit = train.add_argument_group("training")
    fit.add_argument("--batch-size", type=int, default=32)
    fit.add_argument("--epochs", type=int, default=10)
    fit.add_argument("--learning-rate", type=float, default=1e-3)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument(
        "--cache-features",
        action="store_true",
        help="compute the frozen backbone's features once and train the head on them",
    )
    out = train.add_argument_group("output")
    out.add_argument("--workdir", default=None, help="run directory (default: runs/<dataset>)")
    out.add_argument("--quiet", action="store_true", help="no progress bars, one line per epoch")
    cluster = train.add_argument_group(
        "multi-process (one process per host; --batch-size is the global batch)"
    )
    cluster.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run, detecting the cluster (TPU pod slice, SLURM, MPI, "
        "or JAX_COORDINATOR_ADDRESS)",
    )
    cluster.add_argument(
        "--coordinator-address", default=None, help="HOST:PORT where process 0 listens"
    )
    cluster.add_argument("--num-processes", type=int, default=None)
    cluster.add_argument("--process-id", type=int, default=None, help="0 .. --num-processes - 1")

    evaluate = commands.add_parser(
        "evaluate", help="test accuracy, confusion.png and misclassified.png of a trained workdir"
    )
    evaluate.add_argument("--workdir", required=True)
    evaluate.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    evaluate.add_argument(
        "--test-split", default=None, help="split to evaluate (default: the run's test split)"
    )

    convert = commands.add_parser(
        "convert", help="convert Keras MobileNetV2 weights into a directory for --weights DIR"
    )
    convert.add_argument("--weights", required=True, help="imagenet | PATH.h5")
    convert.add_argument("--alpha", type=float, default=1.0)
    convert.add_argument("--out", required=True, help="output directory")
    return parser


def _train(args: argparse.Namespace) -> None:
    from mnist_flax import parallel, train

    cluster = (args.coordinator_address, args.num_processes, args.process_id)
    if args.distributed or any(value is not None for value in cluster):
        # Before anything else touches JAX: the runtime decides which devices exist.
        parallel.initialize_distributed(*cluster)

    # Every TrainConfig field has the flag of the same name (dashes for underscores).
    fields = {
        field.name: getattr(args, field.name) for field in dataclasses.fields(train.TrainConfig)
    }
    train.train_and_evaluate(train.TrainConfig(**fields))


def _evaluate(args: argparse.Namespace) -> None:
    from mnist_flax import train

    train.evaluate(args.workdir, checkpoint=args.checkpoint, test_split=args.test_split)


def _convert(args: argparse.Namespace) -> None:
    from mnist_flax import convert

    model = convert.mobilenet_v2_from_keras(args.weights, alpha=args.alpha, include_top=False)
    convert.save_converted(model, args.out, source=str(args.weights))
    print(f"wrote MobileNetV2 alpha {args.alpha} (no top) from {args.weights} to {args.out}")


COMMANDS = {"train": _train, "evaluate": _evaluate, "convert": _convert}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one `mnist-flax` command; returns the process exit status."""
    try:
        args = build_parser().parse_args(argv)
        COMMANDS[args.command](args)
    except (UsageError, ValueError) as error:
        # The library's own ValueError subclasses (DataError, WeightsError, ConfigError, ...) are
        # input problems with a one-line message; a ValueError from elsewhere is a bug and keeps
        # its traceback.
        if isinstance(error, ValueError) and not type(error).__module__.startswith("mnist_flax"):
            raise
        message = " ".join(str(error).split())
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
