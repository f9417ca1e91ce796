"""Keras references for this project's results: the same recipes in Keras, same data, per seed.

Every mode reads the data through this project's loader (`input_pipeline.load_split`, so
`--data-dir`/`--train-split`/`--test-split` mean what they mean for `mnist-flax train`) and runs
once per `--seeds` value (`keras.utils.set_random_seed`), printing the test accuracy after every
epoch. One mode a command:

- default: the Keras tutorial's head (Dense(10, softmax), Adam 1e-3, categorical cross-entropy,
  batch 32, `fit(shuffle=True)`) trained on the frozen MobileNetV2's pooled features, twice: on the
  features Keras' own MobileNetV2 computes and on those of this project's NNX MobileNetV2
  (converted from the same file), with how far the two feature sets are apart. The backbone is
  frozen, so training the head on precomputed features is the same computation as the tutorial's
  end-to-end `fit`, only cheaper. `--show-order` also shows which order `fit` feeds the examples
  in, epoch after epoch.
- `--model notebook`: the Keras notebook's own model trained end to end exactly as the notebook
  does (`benchmark.subjects.keras_classifier(model="notebook")`: InputLayer((28, 28, 1)),
  UpSampling2D(--image-size / 28), Conv2D(3, (3, 3), "same", relu), the frozen MobileNetV2,
  GlobalAveragePooling2D, Dense(10, softmax); `compile(optimizer="adam",
  loss="categorical_crossentropy")`, i.e. constant Adam 1e-3; `fit(batch_size=32, shuffle=True)`)
  on the digits as `x / 255`, 28x28x1. Prints every epoch's train and test accuracy and wall time,
  then the final test accuracy's mean, sd and min over the seeds. `--image-size` defaults to the
  notebook's 224 here (any multiple of 28).
- `--fine-tune-epochs N`: two-stage fine-tuning of the pipeline model (RGB images resized to
  `--image-size`, in [-1, 1], as `input_pipeline.make_batches(resize="host")` makes them), as in
  Keras' transfer-learning guide. Stage 1 is this project's default recipe: the head alone, Adam
  with cosine decay from `--learning-rate` (3e-3) to 0 over `--epochs` epochs, batch 32, trained
  on the frozen backbone's cached pooled features (exact: the frozen backbone runs in inference
  mode). Stage 2: the MobileNetV2's layers from `--fine-tune-from` (a Keras layer name, or a block
  number N meaning block_N_expand) up to Conv_1_bn become trainable, the backbone is still called
  with `training=False` (BatchNorm keeps its running statistics, trains its scale and offset), and
  the model is recompiled with a new Adam(CosineDecay(`--fine-tune-learning-rate`, N epochs of
  steps)) and fit end to end on the images for N epochs. Prints every epoch's stage and test
  accuracy, each stage's wall time, every seed's final accuracy and the summary.

`--json FILE` writes what was printed, per epoch and seed, with the summary. The two end-to-end
modes hold the split's images in memory (8,000 images at 224 px are 4.8 GB as float32 RGB; the
notebook mode's 28x28 digits are small). Examples, on the split of docs/results.md:

    W=../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5
    DATA=(--weights $W --data-dir ../shared/data/mnist \\
          --train-split "test[:8000]" --test-split "test[8000:]")
    # Head training on Keras' and on our features (docs/results.md's 96x96 comparison):
    python scripts/keras_reference.py "${DATA[@]}" --image-size 96 --seeds 0 1 2 3 4 --show-order
    # The Keras notebook's model, end to end, 10 epochs at 224 px:
    python scripts/keras_reference.py "${DATA[@]}" --model notebook --epochs 10 --seeds 0 1 2 \\
        --json keras-notebook.json
    # Frozen stage, then fine-tuning from block 13 for 5 epochs at 1e-4:
    python scripts/keras_reference.py "${DATA[@]}" --image-size 96 --epochs 10 \\
        --fine-tune-epochs 5 --fine-tune-from 13 --fine-tune-learning-rate 1e-4 --seeds 0 1 2 \\
        --json keras-fine-tune.json
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
import time
from typing import Any

import jax
import keras
import numpy as np
from flax import nnx

from mnist_flax import convert, input_pipeline
from mnist_flax.benchmark.subjects import NUM_CLASSES, keras_classifier
from mnist_flax.config import (
    DIGIT_SIZE,
    FINE_TUNE_STAGE,
    FROZEN_STAGE,
    ConfigError,
    TrainConfig,
    fine_tune_layer,
)

# The end-to-end modes' batch, the tutorial's and this project's default.
BATCH_SIZE = 32
# The tutorial's head recipe (the default mode): constant Adam at Keras' default rate.
TUTORIAL_LEARNING_RATE = 1e-3
# Image sides when --image-size is not given: the notebook's own, and docs/results.md's comparison's.
DEFAULT_IMAGE_SIZE = {"notebook": 224, "pipeline": 96}


def images_and_labels(
    args: argparse.Namespace, split: str, resize: str = "host"
) -> tuple[np.ndarray, np.ndarray]:
    """The split as this project's pipeline prepares it, padding dropped.

    resize="host": RGB, resized to --image-size, in [-1, 1] (the pipeline model's input);
    resize="none": 28x28x1 digits in [0, 1], the notebook's `x / 255`.
    """
    source = input_pipeline.load_split(args.dataset, split, data_dir=args.data_dir)
    batches = input_pipeline.make_batches(
        source, batch_size=250, image_size=args.image_size, shuffle_seed=None, resize=resize
    )
    images, labels = [], []
    for batch in batches.as_numpy_iterator():
        images.append(batch["image"][batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
    return np.concatenate(images), np.concatenate(labels)


def one_hot(labels: np.ndarray) -> np.ndarray:
    return keras.utils.to_categorical(labels, NUM_CLASSES)


def keras_backbone(args: argparse.Namespace, **options: Any) -> keras.Model:
    """Keras' MobileNetV2 (no top) with the --weights file, frozen."""
    size = args.image_size
    backbone = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), include_top=False, weights=args.weights, **options
    )
    backbone.trainable = False
    return backbone


def summarize(finals: list[float]) -> dict[str, float]:
    """Mean, sample sd (0 for one seed), min and max, as `mnist-flax seeds` reports them."""
    return {
        "mean": statistics.fmean(finals),
        "sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
        "min": min(finals),
        "max": max(finals),
    }


def summary_line(what: str, finals: list[float]) -> str:
    summary = summarize(finals)
    return (
        f"{what} over {len(finals)} seeds: mean {summary['mean']:.2%}, sd {summary['sd']:.2%}, "
        f"min {summary['min']:.2%}, max {summary['max']:.2%}"
    )


def steps_per_epoch(num_examples: int) -> int:
    """Batches `fit` runs an epoch (the last one partial), what the cosine schedules count."""
    return math.ceil(num_examples / BATCH_SIZE)


class EpochLog(keras.callbacks.Callback):
    """Prints and records every epoch of one `fit`: its learning rate, accuracies and wall time.

    An epoch's `seconds` include its test pass (`fit`'s validation), as `mnist-flax train`'s do;
    `test_seconds` is that pass alone. Keras' train accuracy is the running one over the epoch.
    """

    def __init__(self, seed: int, stage: str, first_epoch: int, total_epochs: int):
        super().__init__()
        self.seed, self.stage = seed, stage
        self.first_epoch, self.total_epochs = first_epoch, total_epochs
        self.records: list[dict[str, Any]] = []
        self.began = self.test_began = 0.0
        self.test_seconds: float | None = None
        self.learning_rate = float("nan")

    def on_epoch_begin(self, epoch, logs=None):
        self.began = time.perf_counter()
        self.test_seconds = None
        # The rate of the epoch's first step (a schedule's value at the optimizer's step count).
        self.learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_test_begin(self, logs=None):
        self.test_began = time.perf_counter()

    def on_test_end(self, logs=None):
        self.test_seconds = time.perf_counter() - self.test_began

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        record = {
            "epoch": self.first_epoch + epoch,
            "stage": self.stage,
            "learning_rate": self.learning_rate,
            "train_accuracy": float(logs["accuracy"]),
            "test_accuracy": float(logs["val_accuracy"]),
            "seconds": time.perf_counter() - self.began,
            "test_seconds": self.test_seconds,
        }
        self.records.append(record)
        width = len(str(self.total_epochs))
        test = "" if self.test_seconds is None else f", test {self.test_seconds:.1f} s"
        print(
            f"seed {self.seed}  epoch {record['epoch']:>{width}}/{self.total_epochs} "
            f"{self.stage:9}  lr {record['learning_rate']:.2e}  "
            f"train acc {record['train_accuracy']:.2%}  test acc {record['test_accuracy']:.2%}  "
            f"({record['seconds']:.1f} s{test})",
            flush=True,
        )


def fit(model, x, y, test, *, epochs: int, log: EpochLog) -> float:
    """The tutorial's `fit` (batch 32, shuffled, the test split as validation); its seconds."""
    began = time.perf_counter()
    model.fit(
        x,
        one_hot(y),
        batch_size=BATCH_SIZE,
        epochs=epochs,
        shuffle=True,
        validation_data=(test[0], one_hot(test[1])),
        callbacks=[log],
        verbose=0,
    )
    return time.perf_counter() - began


# ----------------------------------------------------------------------------------------------
# Default mode: the tutorial's head on Keras' and on our features.


def our_features(args: argparse.Namespace, images: np.ndarray) -> np.ndarray:
    model = convert.mobilenet_v2_from_keras(args.weights, pooling="avg")
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return np.concatenate(
        [np.asarray(forward(state, images[i : i + 50])) for i in range(0, len(images), 50)]
    )


def keras_head_accuracies(features, labels, test_features, test_labels, seed, epochs):
    keras.utils.set_random_seed(seed)
    head = keras.Sequential(
        [keras.Input(features.shape[1:]), keras.layers.Dense(NUM_CLASSES, activation="softmax")]
    )
    head.compile(
        optimizer=keras.optimizers.Adam(TUTORIAL_LEARNING_RATE),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = head.fit(
        features,
        one_hot(labels),
        batch_size=BATCH_SIZE,
        epochs=epochs,
        shuffle=True,
        validation_data=(test_features, one_hot(test_labels)),
        verbose=0,
    )
    return history.history["val_accuracy"]


def first_batch_of_each_epoch(seed: int, epochs: int = 3) -> list[list[int]]:
    """The examples `fit(shuffle=True)` puts first in each epoch, recorded by an eager layer."""
    keras.utils.set_random_seed(seed)
    seen: list[list[int]] = []

    class Record(keras.layers.Layer):
        def call(self, x, training=None):
            if training:
                seen.append(np.asarray(x)[:, 0].astype(int).tolist())
            return x

    model = keras.Sequential([keras.Input((1,)), Record(), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", run_eagerly=True)
    x = np.arange(64, dtype=np.float32)[:, None]
    model.fit(x, x, batch_size=8, epochs=epochs, shuffle=True, verbose=0)
    return [seen[epoch * 8] for epoch in range(epochs)]


def compare_head_features(args: argparse.Namespace) -> dict:
    train_images, train_labels = images_and_labels(args, args.train_split)
    test_images, test_labels = images_and_labels(args, args.test_split)
    size = args.image_size
    backbone = keras_backbone(args, pooling="avg")
    keras_features = [
        backbone.predict(x, batch_size=64, verbose=0) for x in (train_images, test_images)
    ]
    ours = [our_features(args, x) for x in (train_images, test_images)]
    gap = max(np.abs(a - b).max() for a, b in zip(ours, keras_features, strict=True))
    print(
        f"pooled features at {size}x{size}: max |ours - keras| = {gap:.2e}, "
        f"max |keras| = {np.abs(keras_features[1]).max():.2f}"
    )
    runs = []
    for name, (features, test_features) in (("keras", keras_features), ("ours", ours)):
        for seed in args.seeds:
            accuracies = keras_head_accuracies(
                features, train_labels, test_features, test_labels, seed, args.epochs
            )
            runs.append({"features": name, "seed": seed, "test_accuracy": accuracies})
            print(
                f"Keras head on {name:5} features, seed {seed}: test accuracy per epoch "
                + " ".join(f"{a:.4f}" for a in accuracies)
            )
    return {"feature_max_abs_difference": float(gap), "runs": runs}


# ----------------------------------------------------------------------------------------------
# --model notebook: the notebook's model, end to end.


def notebook_runs(args: argparse.Namespace) -> dict:
    train = images_and_labels(args, args.train_split, resize="none")
    test = images_and_labels(args, args.test_split, resize="none")
    factor = args.image_size // DIGIT_SIZE
    print(
        f"Keras notebook model: {len(train[1])} train / {len(test[1])} test digits, "
        f"UpSampling2D({factor}) to {args.image_size}x{args.image_size}, {args.epochs} epochs, "
        "batch 32, Adam 1e-3",
        flush=True,
    )
    runs = []
    for seed in args.seeds:
        model = keras_classifier(1.0, args.image_size, args.weights, seed, model="notebook")
        log = EpochLog(seed, FROZEN_STAGE, 1, args.epochs)
        seconds = fit(model, *train, test, epochs=args.epochs, log=log)
        final = log.records[-1]["test_accuracy"]
        runs.append(
            {
                "seed": seed,
                "epochs": log.records,
                "fit_seconds": seconds,
                "final_test_accuracy": final,
            }
        )
        print(f"seed {seed}: final test accuracy {final:.2%} (fit {seconds:.1f} s)", flush=True)
    finals = [run["final_test_accuracy"] for run in runs]
    print(summary_line("final test accuracy", finals))
    return {"runs": runs, "summary": summarize(finals)}


# ----------------------------------------------------------------------------------------------
# --fine-tune-epochs: frozen stage on cached features, then fine-tuning end to end.


class InferenceMode(keras.layers.Layer):
    """Calls `backbone` with training=False whatever the call around it says.

    Keras' guide writes `x = base_model(inputs, training=False)` so that BatchNorm keeps its
    running statistics while fine-tuning. In Keras 3 (3.15 here) a Functional model passes the
    `training` it is called with (True in `fit`) to every layer in its graph, overriding the
    training=False recorded with the call (keras-team/keras#20285), so the unfrozen BatchNorm
    layers would normalise with batch statistics and update their running ones. Called from this
    layer's `call`, with no `training` argument of its own, the explicit False holds.
    """

    def __init__(self, backbone: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone

    def call(self, images):
        return self.backbone(images, training=False)

    def compute_output_shape(self, input_shape):
        return self.backbone.compute_output_shape(input_shape)


def fine_tuned_classifier(args: argparse.Namespace, seed: int):
    """(model, head, backbone): Keras' guide's model, the backbone called with training=False."""
    keras.utils.set_random_seed(seed)
    size = args.image_size
    backbone = keras_backbone(args)
    inputs = keras.Input((size, size, 3))
    features = InferenceMode(backbone, name="backbone_in_inference_mode")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    head = keras.layers.Dense(NUM_CLASSES, activation="softmax")
    model = keras.Model(inputs, head(pooled))
    return model, head, backbone


def unfreeze_from(backbone: keras.Model, layer_name: str) -> list[str]:
    """Makes the backbone's layers from `layer_name` on trainable (the rest frozen); their names."""
    names = [layer.name for layer in backbone.layers]
    start = names.index(layer_name)
    backbone.trainable = True
    for index, layer in enumerate(backbone.layers):
        layer.trainable = index >= start
    return [layer.name for layer in backbone.layers[start:] if layer.weights]


def compile_with_cosine(model: keras.Model, peak: float, decay_steps: int) -> None:
    """Adam (Keras' epsilon 1e-7) with cosine decay from `peak` to 0 over `decay_steps`."""
    schedule = keras.optimizers.schedules.CosineDecay(peak, decay_steps=decay_steps)
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )


def trainable_count(model: keras.Model) -> int:
    return sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)


def fine_tune_runs(args: argparse.Namespace) -> dict:
    train = images_and_labels(args, args.train_split)
    test = images_and_labels(args, args.test_split)
    layer = fine_tune_layer(args.fine_tune_from)
    steps = steps_per_epoch(len(train[1]))
    total = args.epochs + args.fine_tune_epochs
    # Stage 1's input: the frozen backbone (inference mode) is the same for every seed.
    began = time.perf_counter()
    frozen = keras_backbone(args, pooling="avg")
    features = [frozen.predict(x, batch_size=64, verbose=0) for x in (train[0], test[0])]
    feature_seconds = time.perf_counter() - began
    print(
        f"pooled features of {len(train[1])} train / {len(test[1])} test images at "
        f"{args.image_size}x{args.image_size}: {feature_seconds:.1f} s",
        flush=True,
    )
    runs = []
    for seed in args.seeds:
        model, head, backbone = fine_tuned_classifier(args, seed)
        # Stage 1: the head alone on the cached features (the same Dense layer as the model's).
        head_model = keras.Sequential([keras.Input(features[0].shape[1:]), head])
        compile_with_cosine(head_model, args.learning_rate, args.epochs * steps)
        frozen_log = EpochLog(seed, FROZEN_STAGE, 1, total)
        frozen_seconds = fit(
            head_model,
            features[0],
            train[1],
            (features[1], test[1]),
            epochs=args.epochs,
            log=frozen_log,
        )
        # Stage 2: the top of the backbone too, end to end on the images, with a new Adam.
        fine_tuned = unfreeze_from(backbone, layer)
        compile_with_cosine(model, args.fine_tune_learning_rate, args.fine_tune_epochs * steps)
        trainable = trainable_count(model)
        print(
            f"seed {seed}: fine-tuning {len(fine_tuned)} layers from {layer} to {fine_tuned[-1]} "
            f"and the head ({trainable:,} trainable parameters)",
            flush=True,
        )
        fine_tune_log = EpochLog(seed, FINE_TUNE_STAGE, args.epochs + 1, total)
        fine_tune_seconds = fit(
            model, *train, test, epochs=args.fine_tune_epochs, log=fine_tune_log
        )
        records = frozen_log.records + fine_tune_log.records
        run = {
            "seed": seed,
            "epochs": records,
            "stage_seconds": {FROZEN_STAGE: frozen_seconds, FINE_TUNE_STAGE: fine_tune_seconds},
            "fine_tuned_layers": fine_tuned,
            "trainable_parameters": trainable,
            "frozen_test_accuracy": frozen_log.records[-1]["test_accuracy"],
            "final_test_accuracy": records[-1]["test_accuracy"],
        }
        runs.append(run)
        print(
            f"seed {seed}: final test accuracy {run['final_test_accuracy']:.2%} (after the frozen "
            f"stage {run['frozen_test_accuracy']:.2%}); frozen stage {frozen_seconds:.1f} s on "
            f"cached features, fine-tuning {fine_tune_seconds:.1f} s",
            flush=True,
        )
    frozen_finals = [run["frozen_test_accuracy"] for run in runs]
    finals = [run["final_test_accuracy"] for run in runs]
    print(summary_line("test accuracy after the frozen stage", frozen_finals))
    print(summary_line("final test accuracy", finals))
    return {
        "feature_seconds": feature_seconds,
        "fine_tune_layer": layer,
        "runs": runs,
        "frozen_summary": summarize(frozen_finals),
        "summary": summarize(finals),
    }


# ----------------------------------------------------------------------------------------------
# The command line.


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Modes: default (head on Keras' and our features), --model notebook, "
        "--fine-tune-epochs N; see the module docstring.",
    )
    parser.add_argument("--weights", required=True, help="Keras MobileNetV2 H5 weights (no top)")
    parser.add_argument("--data-dir", default=None, help="IDX files (default: tfds)")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--train-split", default="test[:8000]")
    parser.add_argument("--test-split", default="test[8000:]")
    parser.add_argument(
        "--model",
        choices=("pipeline", "notebook"),
        default="pipeline",
        help="notebook: train the Keras notebook's model end to end (default: pipeline)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input side; a multiple of 28 with --model notebook "
        f"(default: {DEFAULT_IMAGE_SIZE['notebook']} for the notebook model, "
        f"{DEFAULT_IMAGE_SIZE['pipeline']} otherwise)",
    )
    parser.add_argument(
        "--epochs", type=int, default=10, help="epochs (the frozen stage's with fine-tuning) (10)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="the frozen stage's peak rate with --fine-tune-epochs (default: "
        f"{defaults.learning_rate:g}); the other modes use the tutorial's 1e-3",
    )
    fine_tune = parser.add_argument_group("fine-tuning (the pipeline model)")
    fine_tune.add_argument(
        "--fine-tune-epochs",
        type=int,
        default=0,
        help="epochs of a second stage that also trains the backbone from --fine-tune-from on "
        "(default: 0, no fine-tuning)",
    )
    fine_tune.add_argument(
        "--fine-tune-from",
        default=None,
        metavar="LAYER",
        help="Keras layer name, or block number N for block_N_expand "
        f"(default: {defaults.fine_tune_from})",
    )
    fine_tune.add_argument(
        "--fine-tune-learning-rate",
        type=float,
        default=None,
        help=f"the second stage's peak rate (default: {defaults.fine_tune_learning_rate:g})",
    )
    parser.add_argument("--show-order", action="store_true")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results to this file")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fills in the mode's defaults; a flag another mode owns, or a bad value, is a usage error."""
    defaults = TrainConfig()
    fine_tuning = args.fine_tune_epochs > 0
    if args.epochs < 1 or args.fine_tune_epochs < 0:
        parser.error("--epochs must be at least 1 and --fine-tune-epochs at least 0")
    if args.model == "notebook" and fine_tuning:
        parser.error("--fine-tune-epochs applies to --model pipeline")
    if not fine_tuning:
        for flag in ("learning_rate", "fine_tune_from", "fine_tune_learning_rate"):
            if getattr(args, flag) is not None:
                parser.error(
                    f"--{flag.replace('_', '-')} applies to fine-tuning (--fine-tune-epochs N); "
                    "this mode trains with the tutorial's constant Adam 1e-3"
                )
    for flag in ("learning_rate", "fine_tune_from", "fine_tune_learning_rate"):
        if getattr(args, flag) is None:
            setattr(args, flag, getattr(defaults, flag))
    if args.image_size is None:
        args.image_size = DEFAULT_IMAGE_SIZE[args.model]
    if args.model == "notebook" and args.image_size % DIGIT_SIZE:
        parser.error(
            f"--image-size {args.image_size}: the notebook model upsamples the 28x28 digits by a "
            "whole factor, so it must be a multiple of 28 (224 is the notebook's 8x)"
        )
    try:
        fine_tune_layer(args.fine_tune_from)
    except ConfigError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    began = time.perf_counter()
    if args.model == "notebook":
        mode, results = "notebook", notebook_runs(args)
    elif args.fine_tune_epochs:
        mode, results = "fine-tune", fine_tune_runs(args)
    else:
        mode, results = "head", compare_head_features(args)
    if args.show_order:
        for seed in args.seeds[:1]:
            order = first_batch_of_each_epoch(seed)
            results["fit_order"] = order
            print(f"fit(shuffle=True) first batch of epochs 1-3 (seed {seed}):", order)
    results = {
        "mode": mode,
        "options": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
        "keras": keras.__version__,
        "command": sys.argv,
        **results,
        "seconds": time.perf_counter() - began,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
