"""Throughput benchmark: where the time of a training step goes, and how it compares with Keras.

This module owns how things are timed (the protocol), the report (a table on stdout, optionally
`--json FILE`) and the run; what is timed is in `subjects.py`, the flags in `flags.py`. For every
combination of the swept options (`--batch-size`, `--image-size`, `--dtype`, `--conv-impl`,
`--resize`; each takes several values) it measures, on the model `--model` names (the pipeline
model on RGB images in [-1, 1], the default; or the Keras notebook's model, UpSampling2D +
Conv2D(3, relu) in front of the frozen backbone, on 28x28 digits in [0, 1]):

- pipeline: images/s coming out of the tf.data input pipeline alone (`input_pipeline.make_batches`,
  converted to NumPy as the training loop receives them);
- step: the compiled train step (`steps.StepRunner.train`, what the epoch loop runs) on a batch
  that already lives on the device: median and 90th-percentile step time and images/s (batch /
  median); and the host overhead per step, the time until the asynchronous call returns
  (dispatch), as a share of the step time;
- compile: the train step's one compilation (trace, lower and XLA compile), a single measurement;
- forward: the classifier's plain forward pass (softmax probabilities), the work of `model.predict`;
- end-to-end: the pipeline feeding the step, batches copied to the device ahead of the step;
- with `--keras-baseline [BACKEND ...]` (tensorflow, jax; the flag alone: tensorflow), the same
  model in Keras 3 on each backend (frozen MobileNetV2, GlobalAveragePooling2D, Dense(10, softmax),
  Adam, categorical cross-entropy; with `--model notebook` the notebook's exact Sequential model;
  one per `--dtype`, bfloat16 as Keras' "mixed_bfloat16") on the same batch:
  `model.train_on_batch` (the compiled step `model.fit` runs) and `model.predict_on_batch`, with the
  ratios ours / Keras. Both rows record what they were fed and their trainable and total parameter
  counts; Keras' row also its layers, its backend, versions and device, and, when both load the
  same weights file, how far its outputs are from ours with ours' head copied in. A process holds
  one Keras backend, so every backend but the one this process runs (`keras_backend_here`) is
  measured in a process of its own, ours' step and forward pass interleaved with that Keras there,
  and its rows are joined to this process' (`run_in_own_process`);
- with `--measure cache` (pipeline model only), two complete `train.train_and_evaluate` runs of
  `--epochs` epochs on the same small data, `--cache-features never` and `always`, and the ratio
  of their wall times.

The protocol: every measurement is warmed up first (compilation and tf.data start-up are never
timed), then all measurements of one batch size and image size, ours and Keras', run in turn,
repetition after repetition, so that a busy phase of a shared machine slows all of them alike.
Device work is waited for (`block_until_ready`) before a clock is read; every figure but the
compile time is a median over the repetitions.

Data: the IDX files in `--data-dir` (split `--split`), else synthetic 28x28 uint8 images with random
pixels and labels, written as IDX files to a temporary folder so that both go through the same
loader. The report says which. The command line is `mnist-flax benchmark` (its flags: `flags.py`):

    mnist-flax benchmark --batch-size 32 128 --resize host device --json bench.json
    mnist-flax benchmark --keras-baseline --weights ../shared/weights/FILE.h5
    mnist-flax benchmark --keras-baseline tensorflow jax --dtype float32 bfloat16 --weights imagenet
    mnist-flax benchmark --model notebook --keras-baseline --weights ../shared/FILE.h5
    mnist-flax benchmark --measure cache --data-dir ../shared/data/mnist --split test
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import itertools
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from mnist_flax import input_pipeline
from mnist_flax.benchmark.flags import DEFAULT_MEASUREMENTS, KERAS_MEASUREMENTS
from mnist_flax.benchmark.subjects import (
    NUM_CLASSES,
    KerasRun,
    OurRun,
    Variant,
    cache_runs,
    keras_weights,
    loaded_keras_backend,
    resolve_weights,
)
from mnist_flax.config import DIGIT_SIZE, MODELS, TrainConfig
from mnist_flax.convolutions import resolve_conv_impl
from mnist_flax.model import resolve_resize

# Synthetic data: enough examples for every measurement's epoch (smaller needs reuse a prefix).
MIN_SYNTHETIC_EXAMPLES = 1024


class BenchmarkError(ValueError):
    """A benchmark option that cannot be honoured; the message names the flag."""


# ----------------------------------------------------------------------------------------------
# Timing. A measurement is warmed up once, then asked for one repetition at a time.


@dataclasses.dataclass
class StepTimes:
    """Clock readings of a step called one at a time: when each call returned, when its work was done.

    For an asynchronous (JAX) step the time until the call returns is the host's share of the step:
    tracing-cache lookup, argument handling and enqueueing. Keras' calls return only when done, so
    only the total is meaningful there.
    """

    images_per_step: int
    asynchronous: bool
    seconds: list[float] = dataclasses.field(default_factory=list)
    dispatch_seconds: list[float] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        median = float(np.median(self.seconds))
        result = {
            "images_per_second": self.images_per_step / median,
            "median_seconds": median,
            "p90_seconds": float(np.percentile(self.seconds, 90)),
            "seconds": self.seconds,
        }
        if self.asynchronous:
            dispatch = float(np.median(self.dispatch_seconds))
            result |= {"dispatch_median_seconds": dispatch, "dispatch_share": dispatch / median}
        return result


class StepMeasurement:
    """`steps` calls per repetition, each timed alone: `start()` launches it, `wait(out)` blocks."""

    def __init__(
        self,
        start: Callable[[], Any],
        wait: Callable[[Any], Any],
        *,
        images_per_step: int,
        steps: int,
        warmup: int,
        asynchronous: bool,
    ):
        self.start, self.wait = start, wait
        self.steps, self.warmup = steps, warmup
        self.times = StepTimes(images_per_step, asynchronous)

    def warm_up(self) -> None:
        for _ in range(self.warmup):
            self.wait(self.start())

    def repeat(self) -> None:
        for _ in range(self.steps):
            began = time.perf_counter()
            out = self.start()
            returned = time.perf_counter()
            self.wait(out)
            done = time.perf_counter()
            self.times.seconds.append(done - began)
            self.times.dispatch_seconds.append(returned - began)

    def summary(self) -> dict[str, Any]:
        return self.times.summary()


class StreamMeasurement:
    """A stream of batches (the pipeline, or the pipeline feeding the step), one epoch a repetition.

    `run_epoch(epoch)` consumes a fresh epoch (shuffled by its number: 0 for the warm-up, then 1, 2,
    ...) and returns the seconds its timed batches took;
    it times everything after the epoch's first batch, so tf.data's start-up (and the shuffle that
    gathers the split) is excluded like a warm-up.
    """

    def __init__(self, run_epoch: Callable[[int], float], *, images_per_epoch: int, warmup: int):
        self.run_epoch = run_epoch
        self.images_per_epoch, self.warmup = images_per_epoch, warmup
        self.seconds: list[float] = []

    def warm_up(self) -> None:
        # One untimed epoch is enough: within an epoch, the first batch is never timed either.
        if self.warmup > 0:
            self.run_epoch(0)

    def repeat(self) -> None:
        self.seconds.append(self.run_epoch(len(self.seconds) + 1))

    def summary(self) -> dict[str, Any]:
        median = float(np.median(self.seconds))
        return {
            "images_per_second": self.images_per_epoch / median,
            "median_seconds": median,
            "seconds": self.seconds,
        }


def run_interleaved(measurements: Sequence[StepMeasurement | StreamMeasurement], repeats: int):
    """Warms every measurement up, then runs `repeats` rounds of one repetition of each, in turn."""
    for measurement in measurements:
        measurement.warm_up()
    for _ in range(repeats):
        for measurement in measurements:
            measurement.repeat()


# ----------------------------------------------------------------------------------------------
# Data.


@dataclasses.dataclass(frozen=True)
class DataSource:
    data_dir: pathlib.Path
    split: str
    description: str


@contextlib.contextmanager
def data_source(args: argparse.Namespace, num_examples: int) -> Iterator[DataSource]:
    """The `--data-dir` IDX files, or `num_examples` synthetic digits in a temporary IDX folder."""
    if args.data_dir is not None:
        yield DataSource(
            pathlib.Path(args.data_dir), args.split, f"IDX files in {args.data_dir}, {args.split}"
        )
        return
    rng = np.random.default_rng(args.seed)
    images = rng.integers(0, 256, (num_examples, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, num_examples).astype(np.uint8)
    with tempfile.TemporaryDirectory(prefix="mnist_flax_benchmark_") as directory:
        input_pipeline.write_idx_split(directory, "train", images, labels)
        yield DataSource(
            pathlib.Path(directory),
            "train",
            f"synthetic: {num_examples} random 28x28 uint8 images (no --data-dir)",
        )


# ----------------------------------------------------------------------------------------------
# One group: every variant of one batch size and image size, measured interleaved.


def measure_group(
    variants: list[Variant],
    args: argparse.Namespace,
    data: DataSource,
    keras_backend: str | None = None,
) -> tuple[list[dict], list[dict]]:
    """The rows of `variants` (same batch size and image size) and, on `keras_backend`, Keras' rows
    (one per dtype of `variants`), all measured interleaved."""
    batch_size, image_size = variants[0].batch_size, variants[0].image_size
    split = input_pipeline.load_split("mnist", data.split, data_dir=data.data_dir)
    build_model = bool({"step", "forward", "end-to-end"} & set(args.measure))
    # The pipeline alone needs no weights (and so no download).
    weights = resolve_weights(args.weights, args.alpha, image_size) if build_model else "none"
    common = dict(weights=weights, alpha=args.alpha, seed=args.seed)

    def steps(start: Callable[[], Any], wait: Callable[[Any], Any], asynchronous: bool):
        return StepMeasurement(
            start,
            wait,
            images_per_step=batch_size,
            steps=args.steps,
            warmup=args.warmup,
            asynchronous=asynchronous,
        )

    def stream(images_and_run: tuple[int, Callable[[int], float]]) -> StreamMeasurement:
        images, run_epoch = images_and_run
        return StreamMeasurement(run_epoch, images_per_epoch=images, warmup=args.warmup)

    def our_measurement(name: str, ours: OurRun) -> StepMeasurement | StreamMeasurement:
        if name == "pipeline":
            return stream(ours.pipeline_epoch(args.pipeline_batches))
        if name == "step":
            return steps(ours.start_train_step, ours.wait_for_train_step, True)
        if name == "forward":
            return steps(ours.start_forward, jax.block_until_ready, True)
        return stream(ours.end_to_end_epoch(args.steps))

    measured: list[tuple[dict, str, StepMeasurement | StreamMeasurement]] = []
    rows, runs = [], []
    for variant in variants:
        print(f"{'compiling' if build_model else 'preparing'} {describe(variant)}", flush=True)
        ours = OurRun(
            variant,
            split,
            learning_rate=args.learning_rate,
            build_model=build_model,
            **common,
        )
        row: dict[str, Any] = dataclasses.asdict(variant)
        if ours.compile_seconds is not None:
            row["compile_seconds"] = ours.compile_seconds
            row["input"], row["parameters"] = ours.input, ours.parameters
        if variant.conv_impl == "auto":
            row["conv_impl"] = f"auto={resolve_conv_impl('auto')}"
        if variant.model == "notebook":
            row["resize"] = resolve_resize(variant.resize, variant.model)
        elif variant.resize == "auto":
            row["resize"] = f"auto={resolve_resize('auto')}"
        for name in DEFAULT_MEASUREMENTS:
            if name in args.measure:
                measured.append((row, name, our_measurement(name, ours)))
        rows.append(row)
        runs.append(ours)
    keras_rows: dict[str, dict] = {}
    if keras_backend is not None and set(KERAS_MEASUREMENTS) & set(args.measure):
        for dtype in dict.fromkeys(variant.dtype for variant in variants):
            print(
                f"building the Keras {args.model} model on {keras_backend} "
                f"({batch_size} x {image_size}x{image_size}, {dtype})",
                flush=True,
            )
            keras = KerasRun(
                batch_size,
                image_size,
                split,
                backend=keras_backend,
                model=args.model,
                dtype=dtype,
                **common,
            )
            keras_row = {
                "batch_size": batch_size,
                "image_size": image_size,
                "model": args.model,
                "dtype": dtype,
                "resize": resolve_resize("host", args.model),
                **keras.environment,
                "input": keras.input,
                "parameters": keras.parameters,
                "layers": keras.layers,
            }
            # Same weights file, ours' head copied in: the outputs must agree (random weights differ).
            same_input = [
                (row, ours)
                for row, ours in zip(rows, runs, strict=True)
                if row["dtype"] == dtype and ours.input == keras.input
            ]
            if weights != "none" and same_input:
                row, ours = same_input[0]
                keras_row["output_difference"] = keras.output_difference(ours)
                keras_row["compared_with"] = f"conv {row['conv_impl']}, resize {row['resize']}"
            # Keras' calls return when their work is done: there is nothing to wait for after them.
            for name, start in (("step", keras.train_step), ("forward", keras.forward)):
                if name in args.measure:
                    measured.append((keras_row, name, steps(start, lambda _: None, False)))
            keras_rows[dtype] = keras_row

    print(f"timing {len(measured)} measurements x {args.repeats} repetitions", flush=True)
    run_interleaved([measurement for _, _, measurement in measured], args.repeats)
    for row, name, measurement in measured:
        row[name] = measurement.summary()
    for row in rows:
        keras_row = keras_rows.get(row["dtype"])
        if keras_row is not None:
            row["keras_backend"] = keras_backend
            row["ours_over_keras"] = {
                name: row[name]["images_per_second"] / keras_row[name]["images_per_second"]
                for name in KERAS_MEASUREMENTS
                if name in keras_row
            }
    return rows, list(keras_rows.values())


def measure_cache(args: argparse.Namespace, data: DataSource) -> dict:
    """Two whole training runs of `--epochs` epochs, without and with cached features."""
    train_examples, test_examples = args.cache_examples
    base = data.split.split("[")[0]
    config = TrainConfig(
        dataset="mnist",
        data_dir=str(data.data_dir),
        train_split=f"{base}[:{train_examples}]",
        test_split=f"{base}[{train_examples}:{train_examples + test_examples}]",
        image_size=args.image_size[0],
        batch_size=args.batch_size[0],
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        seed=args.seed,
        alpha=args.alpha,
        weights=resolve_weights(args.weights, args.alpha, args.image_size[0]),
        conv_impl=args.conv_impl[0],
        dtype=args.dtype[0],
        resize=args.resize[0],
        quiet=True,
    )
    return cache_runs(config, args.cache_repeats)


def describe(variant: Variant) -> str:
    return (
        f"{variant.model} model, batch {variant.batch_size}, "
        f"{variant.image_size}x{variant.image_size}, {variant.dtype}, "
        f"conv {variant.conv_impl}, resize {variant.resize}"
    )


def resize_comparisons(rows: list[dict]) -> list[dict]:
    """For variants that differ only in --resize: device / host images/s of pipeline and end to end."""
    comparisons = []
    key_fields = ("model", "batch_size", "image_size", "dtype", "conv_impl")
    by_key = {(tuple(row[f] for f in key_fields), row["resize"]): row for row in rows}
    for (key, resize), device in by_key.items():
        host = by_key.get((key, "host"))
        if resize != "device" or host is None:
            continue
        comparison = dict(zip(key_fields, key, strict=True))
        for name in ("pipeline", "end-to-end"):
            if name in device and name in host:
                comparison[f"{name}_device_over_host"] = (
                    device[name]["images_per_second"] / host[name]["images_per_second"]
                )
        comparisons.append(comparison)
    return comparisons


# ----------------------------------------------------------------------------------------------
# The report.


def environment() -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _percent(share: float | None) -> float | None:
    return None if share is None else share * 100


# (heading, unit, what it shows): one column of the table each.
COLUMNS: tuple[tuple[str, str, Callable[[dict], float | None]], ...] = (
    ("pipeline", "img/s", lambda row: row.get("pipeline", {}).get("images_per_second")),
    ("step", "img/s", lambda row: row.get("step", {}).get("images_per_second")),
    ("step", "ms med", lambda row: _ms(row.get("step", {}).get("median_seconds"))),
    ("step", "ms p90", lambda row: _ms(row.get("step", {}).get("p90_seconds"))),
    ("forward", "img/s", lambda row: row.get("forward", {}).get("images_per_second")),
    ("end2end", "img/s", lambda row: row.get("end-to-end", {}).get("images_per_second")),
    ("compile", "s", lambda row: row.get("compile_seconds")),
    ("dispatch", "% step", lambda row: _percent(row.get("step", {}).get("dispatch_share"))),
)


# The table's name for Keras on each backend.
KERAS_LABELS = {"tensorflow": "keras-tf", "jax": "keras-jax"}


def _table(rows: list[dict], keras_rows: list[dict]) -> list[str]:
    """Our rows, each process' after the rows of the Keras baseline they were measured with."""

    def settings(who, model, batch, size, dtype, conv_impl, resize) -> str:
        return f"{who:9} {model:8} {batch:>5} {size:>4} {dtype:8} {conv_impl:10} {resize:9}"

    def cells(row: dict, who: str) -> str:
        values = (column(row) for _, _, column in COLUMNS)
        return settings(
            who,
            row.get("model", MODELS[0]),
            row["batch_size"],
            row["image_size"],
            row.get("dtype", "float32"),
            row.get("conv_impl", "-"),
            row.get("resize", "host"),
        ) + "".join("        -" if v is None else f"{v:9.1f}" for v in values)

    header = settings("", "model", "batch", "size", "dtype", "conv", "resize")
    lines = [
        header + "".join(f"{heading:>9}" for heading, _, _ in COLUMNS),
        " " * len(header) + "".join(f"{unit:>9}" for _, unit, _ in COLUMNS),
    ]
    for backend in dict.fromkeys(row.get("keras_backend") for row in rows):
        lines += [cells(row, "ours") for row in rows if row.get("keras_backend") == backend]
        lines += [
            cells(row, KERAS_LABELS[row["backend"]])
            for row in keras_rows
            if row["backend"] == backend
        ]
    return lines


def _label(row: dict) -> str:
    size = row["image_size"]
    return (
        f"{row.get('model', MODELS[0])} model, batch {row['batch_size']} {size}x{size} "
        f"{row['dtype']} conv {row['conv_impl']}"
    )


def _parameters(row: dict) -> str:
    counts = row["parameters"]
    return f"{counts['trainable']:,} of {counts['total']:,} parameters trainable"


def keras_runtime(keras_row: dict) -> str:
    """What a Keras row ran on, e.g. "Keras 3.15.1 on jax 0.10.2, gpu NVIDIA H200"."""
    device = keras_row["platform"]
    if keras_row["device"].lower() != device:
        device += f" {keras_row['device']}"
    return f"Keras {keras_row['keras']} on {keras_row['backend']} {keras_row['backend_version']}, {device}"


def _models_compared(keras_row: dict, rows: list[dict]) -> str:
    """What Keras' row timed (runtime, layers, input, parameters, outputs), beside ours."""
    size = keras_row["image_size"]
    line = (
        f"{KERAS_LABELS[keras_row['backend']]} {keras_row['model']} model, batch "
        f"{keras_row['batch_size']} {size}x{size} {keras_row['dtype']}: "
        f"{keras_runtime(keras_row)}; {' > '.join(keras_row['layers'])} on "
        f"{keras_row['input']}, {_parameters(keras_row)}"
    )
    key = ("batch_size", "image_size", "dtype")
    ours = [
        row
        for row in rows
        if "parameters" in row
        and row.get("keras_backend") == keras_row["backend"]
        and all(row[name] == keras_row[name] for name in key)
    ]
    if ours:
        line += f"; ours on {ours[0]['input']}, {_parameters(ours[0])}"
    if "output_difference" in keras_row:
        line += (
            f"; outputs max |ours - keras| {keras_row['output_difference']:.1e} "
            f"(ours {keras_row['compared_with']}, its head copied into Keras)"
        )
    return line


def format_report(results: dict) -> str:
    """The human-readable report of `results` (what `main` returns)."""
    env, load = results["environment"], results["load_average"]
    lines = [
        f"data: {results['data']}",
        f"jax {env['jax']} on {env['backend']} ({env['device']} x{env['device_count']}), "
        f"{env['cpu_count']} CPUs, load average {load['start']} at start, {load['end']} at end",
    ]
    if results["rows"]:
        lines += ["", *_table(results["rows"], results["keras"]), ""]
    for keras_row in results["keras"]:
        lines.append(_models_compared(keras_row, results["rows"]))
    for row in results["rows"]:
        if "ours_over_keras" in row:
            ratios = ", ".join(f"{k} {v:.2f}x" for k, v in row["ours_over_keras"].items())
            lines.append(
                f"ours / {KERAS_LABELS[row['keras_backend']]}, {_label(row)}, "
                f"resize {row['resize']}: {ratios}"
            )
    for comparison in results["resize_comparisons"]:
        ratios = ", ".join(
            f"{name.removesuffix('_device_over_host')} {value:.2f}x"
            for name, value in comparison.items()
            if name.endswith("_device_over_host")
        )
        lines.append(f"--resize device / host, {_label(comparison)}: {ratios}")
    if "cache" in results:
        cache = results["cache"]
        size = cache["image_size"]
        lines.append(
            f"feature caching, {cache['epochs']} epochs on {cache['train_split']} / "
            f"{cache['test_split']}, batch {cache['batch_size']}, {size}x{size}: "
            f"{cache['without_cache']['median_seconds']:.1f} s without, "
            f"{cache['with_cache']['median_seconds']:.1f} s with, speed-up {cache['speedup']:.2f}x "
            f"(epochs alone: {cache['without_cache']['epoch_seconds'][-1]:.1f} s and "
            f"{cache['with_cache']['epoch_seconds'][-1]:.1f} s; histories differ by at most "
            f"{cache['history_max_abs_difference']:.2g})"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The run.


def _check(args: argparse.Namespace) -> None:
    for flag in ("steps", "repeats", "pipeline_batches", "epochs", "cache_repeats"):
        if getattr(args, flag) < 1:
            raise BenchmarkError(f"--{flag.replace('_', '-')} must be at least 1")
    if min(args.cache_examples) < 1:
        raise BenchmarkError("--cache-examples needs at least one train and one test example")
    if args.model == "notebook":
        if "cache" in args.measure:
            raise BenchmarkError(
                "--measure cache cannot be used with --model notebook: its adapter trains in "
                "front of the backbone, so no cache of the backbone's features is exact"
            )
        if args.resize != ["auto"]:
            raise BenchmarkError(
                f"--resize {' '.join(args.resize)} applies to --model pipeline: the notebook "
                f"model takes {DIGIT_SIZE}x{DIGIT_SIZE} digits in [0, 1] and upsamples them "
                "inside its step (leave --resize out)"
            )
        odd = [size for size in args.image_size if size % DIGIT_SIZE]
        if odd:
            raise BenchmarkError(
                f"--image-size {' '.join(map(str, odd))}: --model notebook upsamples the "
                f"{DIGIT_SIZE}x{DIGIT_SIZE} digits by a whole factor (UpSampling2D), so every "
                f"size must be a multiple of {DIGIT_SIZE} (224 is the notebook's 8x)"
            )


def keras_backend_here(backends: Sequence[str]) -> str | None:
    """Which of `backends` this process runs: the one Keras is loaded on, else (Keras not imported
    yet) the first; None when Keras runs on another backend here."""
    loaded = loaded_keras_backend()
    if loaded is None:
        return backends[0] if backends else None
    return loaded if loaded in backends else None


# What a process of its own runs: `run_in_own_process` passes the options and results files.
_CHILD = (
    "import sys; from mnist_flax import runtime; runtime.quiet_libraries(); "
    "from mnist_flax.benchmark import protocol; protocol.run_child(*sys.argv[1:])"
)


def run_in_own_process(args: argparse.Namespace, backend: str) -> dict:
    """`run` in a new Python process with Keras on `backend`: our step and forward pass interleaved
    with that Keras (the ratios come from that one process); returns its results.

    Its output is relayed line by line, so that a notebook shows it too.
    """
    options = vars(args) | {
        "keras_baseline": [backend],
        "measure": [name for name in args.measure if name in KERAS_MEASUREMENTS],
        "json": None,
    }
    label = KERAS_LABELS[backend]
    print(f"{label}: in a process of its own (KERAS_BACKEND={backend})", flush=True)
    with tempfile.TemporaryDirectory(prefix="mnist_flax_benchmark_") as directory:
        options_file = pathlib.Path(directory, "options.json")
        results_file = pathlib.Path(directory, "results.json")
        options_file.write_text(json.dumps(options, default=str))
        process = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(options_file), str(results_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=os.environ | {"KERAS_BACKEND": backend},
        )
        last = ""
        for line in process.stdout:
            print(f"{label}: {line}", end="", flush=True)
            last = line.strip() or last
        status = process.wait()
        if status != 0:
            raise BenchmarkError(
                f"--keras-baseline {backend}: its process (KERAS_BACKEND={backend}) exited with "
                f"status {status}; its last line: {last}"
            )
        return json.loads(results_file.read_text())


def run_child(options_file: str, results_file: str) -> None:
    """The body of `run_in_own_process`'s process: `run` of the options in `options_file`."""
    args = argparse.Namespace(**json.loads(pathlib.Path(options_file).read_text()))
    pathlib.Path(results_file).write_text(json.dumps(run(args), default=str))


def run(args: argparse.Namespace) -> dict:
    """Measures what `args` asks for; returns the results (the JSON file's content).

    With `--keras-baseline`, this process measures ours beside the backend `keras_backend_here`
    names; every other backend runs first, in a process of its own (`run_in_own_process`), before
    this one opens the device (a TPU admits one process at a time); their rows are appended.
    """
    _check(args)
    load_start = [round(load, 2) for load in os.getloadavg()]
    backends = args.keras_baseline if set(KERAS_MEASUREMENTS) & set(args.measure) else []
    if backends:
        if importlib.util.find_spec("keras") is None:
            raise BenchmarkError(
                "--keras-baseline needs Keras 3: pip install 'mnist-flax[keras]' (or keras)"
            )
        # A missing file or a directory Keras cannot read answers now, not in another process.
        for size in args.image_size:
            keras_weights(resolve_weights(args.weights, args.alpha, size))
    here = keras_backend_here(backends)
    others = [run_in_own_process(args, backend) for backend in backends if backend != here]
    variants = [
        Variant(*values, model=args.model)
        for values in itertools.product(
            args.batch_size, args.image_size, args.dtype, args.conv_impl, args.resize
        )
    ]
    largest_epoch = (max(args.pipeline_batches, args.steps) + 1) * max(args.batch_size)
    synthetic_examples = max(MIN_SYNTHETIC_EXAMPLES, largest_epoch, sum(args.cache_examples))
    results: dict[str, Any] = {"environment": environment(), "options": vars(args) | {"json": None}}
    results["rows"], results["keras"] = [], []
    with data_source(args, synthetic_examples) as data:
        results["data"] = data.description
        if set(args.measure) - {"cache"}:
            groups = itertools.groupby(variants, key=lambda v: (v.batch_size, v.image_size))
            for _, group in groups:
                rows, keras_rows = measure_group(list(group), args, data, here)
                results["rows"] += rows
                results["keras"] += keras_rows
        if "cache" in args.measure:
            results["cache"] = measure_cache(args, data)
    # This process' rows: the others measured only what Keras has a counterpart of.
    results["resize_comparisons"] = resize_comparisons(results["rows"])
    for other in others:
        results["rows"] += other["rows"]
        results["keras"] += other["keras"]
    results["load_average"] = {
        "start": load_start,
        "end": [round(load, 2) for load in os.getloadavg()],
    }
    return results


def report(args: argparse.Namespace) -> dict:
    """`mnist-flax benchmark`: measures, prints the report (and writes `--json`); returns the results."""
    results = run(args)
    print(format_report(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results
