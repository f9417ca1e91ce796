"""The `mnist-flax` command (also `python -m mnist_flax`): train, evaluate, convert.

Argument parsing only; the work is in `train.py`, `evaluate.py` and `convert.py`, imported when a
command runs, so that `--help` and flag errors answer at once (`config.py`, which defines the
train flags, imports neither JAX nor TensorFlow). Every error a user can fix (a bad flag value, a
missing dataset or weights file, a workdir of another run, an unwritable workdir: any `ValueError`
the library raises for bad input) is printed as one line `error: ...` with exit status 2, without a
traceback. (Other exceptions, bugs, keep their traceback.) Ctrl-C exits with 130 after training
saved what was complete.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mnist_flax import config, runtime

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A command line argparse rejects (unknown flag, missing value, not a number)."""


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, except a None whose meaning the help text already says."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # No abbreviations: `seeds --seed 1` must not mean `--seeds 1`.
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        # argparse would print the usage block and exit; one line is what the user needs.
        raise UsageError(f"{message} (see {self.prog} --help)")


def _add_config_flags(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per `TrainConfig` field (dashes for underscores), grouped and explained by its metadata."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in config.fields().values():
        if field.name in skip:
            continue
        options = dict(field.metadata)
        group = options.pop("group")
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        if options.get("action") != "store_true":
            options.setdefault("type", type(field.default))
        groups[group].add_argument(
            "--" + field.name.replace("_", "-"), default=field.default, **options
        )


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of `mnist-flax`; `train`'s flags come from `config.TrainConfig`."""
    parser = _Parser(
        prog="mnist-flax",
        description="MNIST transfer learning with a frozen ImageNet MobileNetV2, in JAX/Flax NNX.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser(
        "train",
        help="train the Dense head on a frozen MobileNetV2 (resumes the workdir)",
        formatter_class=_DefaultsShown,
    )
    _add_config_flags(train)
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

    seeds = commands.add_parser(
        "seeds",
        help="train the same recipe once per seed; final test accuracy per seed, mean, sd, min, max",
        formatter_class=_DefaultsShown,
    )
    seeds.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    seeds.add_argument("--json", default=None, help="also write the summary to this JSON file")
    _add_config_flags(seeds, skip=("seed",))
    seeds.set_defaults(seed=config.TrainConfig.seed)

    evaluate = commands.add_parser(
        "evaluate", help="test accuracy, confusion.png and misclassified.png of a trained workdir"
    )
    evaluate.add_argument("--workdir", required=True)
    evaluate.add_argument(
        "--checkpoint", choices=config.EVALUATE_CHECKPOINTS, default=config.EVALUATE_CHECKPOINTS[0]
    )
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


def _config(args: argparse.Namespace) -> config.TrainConfig:
    """The run's configuration from its flags, validated before JAX loads (a bad flag answers at once)."""
    run_config = config.TrainConfig(**{name: getattr(args, name) for name in config.fields()})
    run_config.validate()
    return run_config


def _train(args: argparse.Namespace) -> None:
    run_config = _config(args)
    from mnist_flax import parallel, train

    cluster = (args.coordinator_address, args.num_processes, args.process_id)
    if args.distributed or any(value is not None for value in cluster):
        # Before anything else touches JAX: the runtime decides which devices exist.
        parallel.initialize_distributed(*cluster)
    train.train_and_evaluate(run_config)


def _seeds(args: argparse.Namespace) -> None:
    run_config = _config(args)
    from mnist_flax import seeds

    seeds.run_seeds(run_config, args.seeds, json_file=args.json)


def _evaluate(args: argparse.Namespace) -> None:
    from mnist_flax import evaluate

    evaluate.evaluate(args.workdir, checkpoint=args.checkpoint, test_split=args.test_split)


def _convert(args: argparse.Namespace) -> None:
    from mnist_flax import convert

    model = convert.mobilenet_v2_from_keras(args.weights, alpha=args.alpha, include_top=False)
    convert.save_converted(model, args.out, source=str(args.weights))
    print(f"wrote MobileNetV2 alpha {args.alpha} (no top) from {args.weights} to {args.out}")


COMMANDS = {"train": _train, "seeds": _seeds, "evaluate": _evaluate, "convert": _convert}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one `mnist-flax` command; returns the process exit status."""
    try:
        args = build_parser().parse_args(argv)
        # Before TensorFlow or JAX load (each command imports what it needs when it runs).
        runtime.quiet_libraries()
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
