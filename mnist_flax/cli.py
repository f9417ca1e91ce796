"""The `mnist-flax` command (also `python -m mnist_flax`): train, seeds, evaluate, predict, convert,
export, plot, benchmark.

Argument parsing only; the work is in the module each command names (`train.py`, `seeds.py`,
`evaluate.py`, `predict.py`, `convert.py`, `export.py`, `plotting.py`, `benchmark/`), imported
when a command runs, so that `--help` and flag errors answer at once (`config.py`, which defines
the train flags, imports neither JAX nor TensorFlow). Every error a user can fix (a bad flag value,
a missing dataset, weights or image file, a workdir of another run or in use by one, an unwritable
workdir, checkpoints none of which reads: any `ValueError` the library raises for bad input) is
printed as one line `error: ...` with exit status 2, without a traceback. (Other exceptions, bugs,
keep their traceback.) Ctrl-C exits with 130 after training
saved what was complete.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from mnist_flax import config, runtime
from mnist_flax.benchmark import flags as benchmark_flags

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
    cluster.add_argument(
        "--distributed-timeout",
        type=float,
        default=config.DISTRIBUTED_TIMEOUT_S,
        metavar="SECONDS",
        help="how long a process waits for the others to join, and to meet before training, "
        "before it stops with a line naming those that did not arrive",
    )

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
        "evaluate",
        help="test accuracy, confusion.png and misclassified.png of a trained workdir, or of a "
        "classifier converted from Keras (--weights DIR)",
    )
    evaluate.add_argument(
        "--workdir",
        required=True,
        help="the run to evaluate; with --weights, where the figures are written",
    )
    evaluate.add_argument(
        "--checkpoint",
        choices=config.EVALUATE_CHECKPOINTS,
        default=None,
        help=f"which of the run's checkpoints (default: {config.EVALUATE_CHECKPOINTS[0]})",
    )
    evaluate.add_argument(
        "--test-split",
        default=None,
        help="split to evaluate (default: the run's test split; with --weights: test)",
    )
    converted = evaluate.add_argument_group(
        "a converted classifier (the run's config says these for a workdir)"
    )
    converted.add_argument(
        "--weights",
        default=None,
        metavar="DIR",
        help="evaluate the whole classifier `mnist-flax convert --keras-model` wrote to DIR",
    )
    converted.add_argument("--dataset", default=None, help="with --weights (default: mnist)")
    converted.add_argument(
        "--data-dir", default=None, metavar="DIR", help="with --weights: read IDX files from DIR"
    )
    converted.add_argument(
        "--batch-size", type=int, default=None, help="with --weights (default: 32)"
    )

    predict = commands.add_parser(
        "predict",
        help="classify image files of handwritten digits (PNG, JPEG, any size, dark on light or "
        "light on dark), each made MNIST-like first: the top classes of each",
    )
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files, one digit each")
    model_source = predict.add_mutually_exclusive_group(required=True)
    model_source.add_argument(
        "--workdir",
        metavar="RUN",
        help="a trained run: its checkpoint as `mnist-flax evaluate` chooses it",
    )
    model_source.add_argument(
        "--weights",
        metavar="DIR",
        help="the whole classifier `mnist-flax convert --keras-model` wrote to DIR",
    )
    predict.add_argument(
        "--checkpoint",
        choices=config.EVALUATE_CHECKPOINTS,
        default=None,
        help=f"with --workdir: which of the run's checkpoints (default: "
        f"{config.EVALUATE_CHECKPOINTS[0]}, as for evaluate)",
    )
    predict.add_argument(
        "--json",
        action="store_true",
        help="print one JSON list (each image's top classes and all its probabilities) instead "
        "of a line per image",
    )

    convert = commands.add_parser(
        "convert",
        help="convert Keras MobileNetV2 weights (--weights) or a whole trained Keras classifier "
        "(--keras-model) into a directory for --weights DIR",
    )
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--weights", help="imagenet | PATH.h5: MobileNetV2 weights, a backbone for `train`"
    )
    source.add_argument(
        "--keras-model",
        metavar="PATH",
        help="a trained Keras classifier (.keras, or a full-model .h5 from model.save): the "
        "notebook's Sequential or the pipeline model, head and adapter included",
    )
    convert.add_argument("--alpha", type=float, default=None, help="with --weights (default: 1.0)")
    convert.add_argument("--out", required=True, help="output directory")

    export = commands.add_parser(
        "export",
        help="write a trained classifier as a .keras file, a LiteRT .tflite, an ONNX model or "
        "StableHLO (jax.export), checked against the JAX model before it is written",
    )
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--workdir", help="a run of mnist-flax train: the checkpoint evaluate would restore"
    )
    source.add_argument(
        "--weights",
        metavar="DIR",
        help="a whole classifier `mnist-flax convert --keras-model` wrote to DIR",
    )
    export.add_argument(
        "--format",
        required=True,
        choices=config.EXPORT_FORMATS,
        help="what to write (who reads each, and how: docs/deploy.md)",
    )
    export.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="the file: .keras, .tflite, .onnx or .stablehlo as --format; PATH.json beside it "
        "says what the model takes and gives",
    )
    export.add_argument(
        "--checkpoint",
        choices=config.EVALUATE_CHECKPOINTS,
        default=None,
        help=f"with --workdir, as for evaluate (default: {config.EVALUATE_CHECKPOINTS[0]})",
    )
    export.add_argument(
        "--quantize",
        choices=config.EXPORT_QUANTIZATIONS,
        default=None,
        help="--format litert only: int8 weights and activations, calibrated on digits of "
        "--train-split; float32 in and out",
    )
    export.add_argument(
        "--check-examples",
        type=int,
        default=256,
        metavar="N",
        help="test digits the export is checked on against the JAX model (0: the whole split)",
    )
    data = export.add_argument_group("data for the check and the calibration")
    data.add_argument(
        "--test-split", default=None, help="default: the run's test split; with --weights: test"
    )
    data.add_argument(
        "--train-split",
        default=None,
        help="with --quantize: the int8 calibration's digits (default: the run's train split; "
        "with --weights: train)",
    )
    data.add_argument("--dataset", default=None, help="with --weights (default: mnist)")
    data.add_argument(
        "--data-dir", default=None, metavar="DIR", help="with --weights: read IDX files from DIR"
    )

    plot = commands.add_parser(
        "plot",
        help="draw a run's training curves (accuracy, loss, learning rate) from its history.json",
    )
    plot.add_argument("history", help="a workdir of `mnist-flax train`, or its history.json")
    plot.add_argument(
        "-o", "--output", help="PNG to write (default: curves.png beside the history)"
    )

    benchmark = commands.add_parser(
        "benchmark",
        help="throughput of the input pipeline, the compiled train step, the forward pass and "
        "both together, optionally against Keras; swept options take several values",
        formatter_class=_DefaultsShown,
    )
    benchmark_flags.add_flags(benchmark)
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
        parallel.initialize_distributed(*cluster, timeout_s=args.distributed_timeout)
    train.train_and_evaluate(run_config)


def _seeds(args: argparse.Namespace) -> None:
    run_config = _config(args)
    from mnist_flax import seeds

    seeds.run_seeds(run_config, args.seeds, json_file=args.json)


def _evaluate(args: argparse.Namespace) -> None:
    converted_only = {
        "--dataset": args.dataset,
        "--data-dir": args.data_dir,
        "--batch-size": args.batch_size,
    }
    if args.weights is None:
        given = [flag for flag, value in converted_only.items() if value is not None]
        if given:
            raise UsageError(
                f"{given[0]} applies to --weights DIR; a run's workdir records its own "
                "(see mnist-flax evaluate --help)"
            )
        from mnist_flax import evaluate

        evaluate.evaluate(
            args.workdir,
            checkpoint=args.checkpoint or config.EVALUATE_CHECKPOINTS[0],
            test_split=args.test_split,
        )
        return
    if args.checkpoint is not None:
        raise UsageError(
            "--checkpoint chooses among a run's checkpoints; --weights DIR holds one classifier "
            "(see mnist-flax evaluate --help)"
        )
    from mnist_flax import evaluate

    given = {
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "test_split": args.test_split,
        "batch_size": args.batch_size,
    }
    # Unset flags keep `evaluate_classifier`'s defaults (TrainConfig's); it validates the rest.
    evaluate.evaluate_classifier(
        args.weights,
        args.workdir,
        **{name: value for name, value in given.items() if value is not None},
    )


def _predict(args: argparse.Namespace) -> None:
    if args.weights is not None and args.checkpoint is not None:
        raise UsageError(
            "--checkpoint chooses among a run's checkpoints; --weights DIR holds one classifier "
            "(see mnist-flax predict --help)"
        )
    import json

    import numpy as np

    from mnist_flax import predict

    # Every image is read (and found to hold a digit) before the slow model build.
    digits = np.stack([predict.load_digit(path) for path in args.images])
    classifier = predict.load_classifier(
        workdir=args.workdir,
        weights=args.weights,
        checkpoint=args.checkpoint or config.EVALUATE_CHECKPOINTS[0],
    )
    print(f"predicting with {classifier.description}", file=sys.stderr)
    results = predict.predict_files(args.images, classifier, digits=digits)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            print(predict.format_line(result))


def _convert(args: argparse.Namespace) -> None:
    if args.keras_model is not None:
        if args.alpha is not None:
            raise UsageError(
                "--alpha applies to --weights; --keras-model reads it from the model's arrays "
                "(see mnist-flax convert --help)"
            )
        _convert_classifier(args.keras_model, args.out)
        return
    from mnist_flax import convert

    alpha = 1.0 if args.alpha is None else args.alpha
    model = convert.mobilenet_v2_from_keras(args.weights, alpha=alpha, include_top=False)
    convert.save_converted(model, args.out, source=str(args.weights))
    print(f"wrote MobileNetV2 alpha {alpha} (no top) from {args.weights} to {args.out}")


def _convert_classifier(path: str, out: str) -> None:
    from mnist_flax import convert, keras_classifier

    model = keras_classifier.classifier_from_keras(keras_classifier.load_keras_model(path))
    kind = convert.classifier_kind(model)
    convert.save_classifier(model, out, model_name=kind, source=str(path))
    print(
        f"wrote the {kind} classifier ({model.head.out_features} classes, MobileNetV2 alpha "
        f"{model.backbone.alpha}, {model.image_size} px) from {path} to {out}; use it with "
        f"--model {kind} --image-size {model.image_size} --weights {out}"
    )


def _export(args: argparse.Namespace) -> None:
    if args.train_split is not None and args.quantize is None:
        raise UsageError(
            "--train-split chooses the int8 calibration's digits: it applies to --quantize int8"
        )
    common = {
        "fmt": args.format,
        "out": args.out,
        "quantize": args.quantize,
        "check_examples": args.check_examples,
    }
    if args.weights is None:
        for flag, value in {"--dataset": args.dataset, "--data-dir": args.data_dir}.items():
            if value is not None:
                raise UsageError(
                    f"{flag} applies to --weights DIR; a run's workdir records its own "
                    "(see mnist-flax export --help)"
                )
        from mnist_flax import export

        export.export_run(
            args.workdir,
            checkpoint=args.checkpoint or config.EVALUATE_CHECKPOINTS[0],
            test_split=args.test_split,
            train_split=args.train_split,
            **common,
        )
        return
    if args.checkpoint is not None:
        raise UsageError(
            "--checkpoint chooses among a run's checkpoints; --weights DIR holds one classifier "
            "(see mnist-flax export --help)"
        )
    from mnist_flax import export

    given = {
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "test_split": args.test_split,
        "train_split": args.train_split,
    }
    # Unset flags keep `export_classifier`'s defaults (TrainConfig's).
    export.export_classifier(
        args.weights,
        **common,
        **{name: value for name, value in given.items() if value is not None},
    )


def _plot(args: argparse.Namespace) -> None:
    from mnist_flax import plotting

    source = pathlib.Path(args.history)
    default = (source if source.is_dir() else source.parent) / "curves.png"
    written = plotting.plot_history(
        plotting.load_history(source), pathlib.Path(args.output) if args.output else default
    )
    print(f"wrote {written}")


def _benchmark(args: argparse.Namespace) -> None:
    from mnist_flax.benchmark import protocol

    protocol.report(args)


COMMANDS = {
    "train": _train,
    "seeds": _seeds,
    "evaluate": _evaluate,
    "predict": _predict,
    "convert": _convert,
    "export": _export,
    "plot": _plot,
    "benchmark": _benchmark,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one `mnist-flax` command; returns the process exit status.

    With `argv` None (the command line: `mnist-flax`, `python -m mnist_flax`) the process exits
    next, and the interpreter's last garbage collection is spared the libraries' objects
    (`runtime.freeze_for_exit`); called with a list (tests, notebooks) it leaves the collector alone.
    """
    status = _run(argv)
    if argv is None:
        runtime.freeze_for_exit()
    return status


def _run(argv: Sequence[str] | None) -> int:
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
