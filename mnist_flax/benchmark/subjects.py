"""What the benchmark times: our training code, the tutorial's Keras model, whole runs with and without caching.

`protocol.py` owns how things are timed and reported; this module owns what is timed, built from
the project's public API only (`model`, `steps.StepRunner`, `input_pipeline`, `train`):

- `OurRun`: one variant's compiled train step, forward pass, input pipeline, and the pipeline
  feeding the step (`steps.prefetch_to_device`, as the epoch loop does), for either model
  (`--model`: the pipeline model on RGB images, or the notebook model on 28x28 digits in [0, 1]);
- `KerasRun`: the same model in Keras 3 on the backend named (`keras_classifier`: frozen
  MobileNetV2, GlobalAveragePooling2D, Dense(10, softmax), Adam, categorical cross-entropy; the
  notebook model has the notebook's UpSampling2D + Conv2D(3, relu) in front; bfloat16 as Keras'
  "mixed_bfloat16" policy) on the same batch, `train_on_batch` and `predict_on_batch`, and a check
  that it computes what ours computes (`KerasRun.output_difference`). A Keras backend is fixed when
  Keras is imported: `import_keras` imports it on the backend asked for, or says why it cannot;
- `cache_runs`: two complete `train.train_and_evaluate` runs, `--cache-features never` and `always`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

from mnist_flax import convert, input_pipeline, train
from mnist_flax.build import create_model
from mnist_flax.config import DIGIT_SIZE, MODELS, TrainConfig
from mnist_flax.freezing import ADAPTER, HEAD, freeze_labels, make_optimizer
from mnist_flax.model import resolve_resize
from mnist_flax.steps import StepRunner, make_metrics, prefetch_to_device

NUM_CLASSES = 10


class SubjectError(ValueError):
    """A benchmark option that cannot be honoured; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the report: a point of the swept options."""

    batch_size: int
    image_size: int
    dtype: str
    conv_impl: str
    resize: str
    model: str = MODELS[0]


def exact_size(split: input_pipeline.Split, num_examples: int) -> input_pipeline.Split:
    """`split` cut to, or repeated up to, exactly `num_examples` examples."""
    repeats = math.ceil(num_examples / split.num_examples)
    return input_pipeline.Split(
        examples=split.examples.repeat(repeats).take(num_examples),
        num_examples=num_examples,
        num_classes=split.num_classes,
        name=split.name,
        max_process_examples=num_examples,
    )


def describe_input(images) -> str:
    """What a model is fed, e.g. "float32 [28, 28, 1]" (one example's dtype and shape)."""
    return f"{images.dtype.name} {[int(side) for side in images.shape[1:]]}"


def resolve_weights(weights: str, alpha: float, image_size: int) -> str:
    """What `--weights` names, as both sides load it: "none", or a file or converted directory.

    "imagenet" becomes the official Keras file (from the Keras cache, else downloaded; offline, the
    error says where to put it), so that Keras and this project load the very same arrays.
    """
    if weights == "none":
        return weights
    if weights == "imagenet":
        rows = convert.imagenet_rows((image_size, image_size, 3))
        return str(convert.imagenet_weights_path(alpha, False, rows))
    if not pathlib.Path(weights).exists():
        raise SubjectError(f"--weights {weights}: no such file; pass imagenet, none or a path")
    return weights


class OurRun:
    """The train step, forward pass, pipeline and end-to-end loop of one variant.

    `variant.model` says which classifier (`model.create_model`) and so which batches: RGB images
    for the pipeline model, 28x28 digits in [0, 1] for the notebook model (its `--resize` is
    "none"). With `build_model` False (only the pipeline is measured) no model is built or
    compiled. `input` and `parameters` say what was timed, for the report to show.
    """

    def __init__(
        self,
        variant: Variant,
        split: input_pipeline.Split,
        *,
        weights: str,
        alpha: float,
        learning_rate: float,
        seed: int,
        build_model: bool,
    ):
        self.variant, self.split, self.seed = variant, split, seed
        self.compile_seconds = None
        self.input: str | None = None
        self.parameters: dict[str, int] | None = None
        if not build_model:
            return
        config = TrainConfig(
            model=variant.model,
            image_size=variant.image_size,
            batch_size=variant.batch_size,
            learning_rate=learning_rate,
            seed=seed,
            alpha=alpha,
            weights=weights,
            conv_impl=variant.conv_impl,
            dtype=variant.dtype,
            resize=variant.resize,
        )
        config.validate()
        model = create_model(config, NUM_CLASSES)
        self.parameters = count_parameters(model)
        self.runner = StepRunner(model, make_optimizer(model, learning_rate), make_metrics())
        first_batch = next(self.batches(exact_size(split, variant.batch_size), 0))
        self.input = describe_input(first_batch["image"])
        self.batch = jax.device_put(first_batch)
        began = time.perf_counter()
        self.runner.lower_train(self.batch).compile()
        self.compile_seconds = time.perf_counter() - began

    def batches(self, split: input_pipeline.Split, epoch: int):
        """One epoch of NumPy batches, shuffled by `epoch`, as the training loop receives them."""
        return input_pipeline.make_batches(
            split,
            batch_size=self.variant.batch_size,
            image_size=self.variant.image_size,
            shuffle_seed=input_pipeline.epoch_seed(self.seed, epoch),
            resize=resolve_resize(self.variant.resize, self.variant.model),
        ).as_numpy_iterator()

    # Step measurements: start one call, then wait for its result.

    def start_train_step(self) -> None:
        self.runner.train(self.batch)

    def wait_for_train_step(self, _=None) -> None:
        jax.block_until_ready(self.runner.metrics_state)

    def start_forward(self) -> jax.Array:
        return self.runner.predict(self.batch["image"])

    def trained_layers(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(kernel, bias) of the layers the frozen stage trains: the head's, the adapter's if any."""
        from flax import nnx

        model = nnx.merge(self.runner.model_def, self.runner.model_state)
        layers = {"head": model.head}
        if model.adapter is not None:
            layers["adapter"] = model.adapter.conv
        return {
            name: (np.asarray(layer.kernel[...]), np.asarray(layer.bias[...]))
            for name, layer in layers.items()
        }

    def probabilities(self, images) -> np.ndarray:
        """The forward pass (softmax probabilities) of a batch shaped like this run's."""
        return np.asarray(self.runner.predict(jax.device_put(np.asarray(images))))

    # Stream measurements: one epoch, timed after its first batch.

    def pipeline_epoch(self, num_batches: int) -> tuple[int, Any]:
        """(images a timed epoch delivers, `run(epoch) -> seconds`) for the pipeline alone."""
        split = exact_size(self.split, (num_batches + 1) * self.variant.batch_size)

        def run(epoch: int) -> float:
            batches = self.batches(split, epoch)
            next(batches)
            began = time.perf_counter()
            for _ in batches:
                pass
            return time.perf_counter() - began

        return num_batches * self.variant.batch_size, run

    def end_to_end_epoch(self, num_steps: int) -> tuple[int, Any]:
        """(images a timed epoch trains on, `run(epoch) -> seconds`) for the pipeline feeding the step."""
        split = exact_size(self.split, (num_steps + 1) * self.variant.batch_size)

        def run(epoch: int) -> float:
            batches = prefetch_to_device(self.batches(split, epoch))
            self.runner.train(next(batches))
            self.wait_for_train_step()
            began = time.perf_counter()
            for batch in batches:
                self.runner.train(batch)
            self.wait_for_train_step()
            return time.perf_counter() - began

        return num_steps * self.variant.batch_size, run


def count_parameters(model) -> dict[str, int]:
    """Our model's numbers of parameters as Keras counts them: trained in the frozen stage, all.

    "trainable": the adapter's and the head's (what the frozen stage's optimizer moves), Keras'
    `trainable_weights`; "total": every parameter and BatchNorm statistic, Keras' `count_params()`.
    """
    from flax import nnx

    labels = dict(nnx.to_flat_state(freeze_labels(model)))
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    trainable = sum(value.size for path, value in params if labels[path] in (ADAPTER, HEAD))
    total = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, (nnx.Param, nnx.BatchStat))))
    return {"trainable": int(trainable), "total": int(total)}


def loaded_keras_backend() -> str | None:
    """The backend of the Keras imported in this process, None before Keras is imported."""
    keras = sys.modules.get("keras")
    return None if keras is None else keras.backend.backend()


def import_keras(backend: str):
    """Keras 3 on `backend` (`flags.KERAS_BACKENDS`); sets KERAS_BACKEND when Keras is not loaded yet.

    Keras reads its backend once, when it is imported, so a process holds one: asking for another
    than the one loaded is a `SubjectError` (`protocol.py` runs that backend in a process of its
    own). TensorFlow's own import pulls Keras in with TensorFlow's backend unless Keras is hidden
    (`runtime.import_tensorflow`, as this project imports it), so call this before any plain
    `import tensorflow`.
    """
    loaded = loaded_keras_backend()
    if loaded is None:
        os.environ["KERAS_BACKEND"] = backend
    import keras  # only with --keras-baseline: the project itself never needs Keras

    if keras.backend.backend() != backend:
        raise SubjectError(
            f"--keras-baseline {backend}: Keras runs on {keras.backend.backend()} in this "
            "process, and a Keras backend cannot change once Keras is imported"
        )
    return keras


def keras_environment(keras) -> dict[str, str]:
    """What Keras runs on: its backend, their versions, and the device its computations run on."""
    backend = keras.backend.backend()
    if backend == "jax":
        device = jax.devices()[0]
        platform, kind, version = jax.default_backend(), device.device_kind, jax.__version__
    else:
        import tensorflow as tf

        # This project keeps TensorFlow off the GPUs (`runtime.import_tensorflow`): they are JAX's.
        platform, kind, version = "cpu", "cpu", tf.__version__
        gpus = tf.config.get_visible_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            platform, kind = "gpu", details.get("device_name", "gpu")
    return {
        "backend": backend,
        "keras": keras.__version__,
        "backend_version": version,
        "platform": platform,
        "device": kind,
    }


def describe_keras_layer(layer) -> str:
    """A Keras layer as the report shows it, e.g. "UpSampling2D(4, 4)", "Conv2D(3, 3x3, relu)"."""
    kind = type(layer).__name__
    if kind == "UpSampling2D":
        return f"{kind}({', '.join(map(str, layer.size))})"
    if kind == "Conv2D":
        kernel = "x".join(map(str, layer.kernel_size))
        return f"{kind}({layer.filters}, {kernel}, {layer.activation.__name__})"
    if kind == "Dense":
        return f"{kind}({layer.units}, {layer.activation.__name__})"
    if kind == "Functional":
        return layer.name  # the backbone, e.g. mobilenetv2_1.00_224
    return kind


def keras_parameters(model) -> dict[str, int]:
    """`count_parameters` of a Keras model."""
    trainable = sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)
    return {"trainable": trainable, "total": int(model.count_params())}


def keras_weights(weights: str) -> str | None:
    """`resolve_weights`' answer as Keras' `weights=`: None for random, else the H5 file."""
    if weights == "none":
        return None
    if pathlib.Path(weights).is_dir():
        raise SubjectError(
            f"--keras-baseline: Keras cannot load the converted directory {weights}; "
            "pass --weights imagenet, none or an H5 file"
        )
    return weights


def keras_classifier(
    alpha: float,
    image_size: int,
    weights: str,
    seed: int,
    *,
    model: str = MODELS[0],
    dtype: str = "float32",
):
    """The Keras model `model` names (`config.MODELS`), compiled as the tutorial compiles it.

    "pipeline": Input(image_size, image_size, 3), MobileNetV2(include_top=False) frozen,
    GlobalAveragePooling2D, Dense(10, softmax). "notebook": the notebook's own
    `Sequential([InputLayer((28, 28, 1)), UpSampling2D(image_size // 28), Conv2D(3, (3, 3),
    padding="same", activation="relu"), base, GlobalAveragePooling2D(), Dense(10, softmax)])`.
    Both: `compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])`.
    dtype "bfloat16" computes as ours does (`model.py`): the backbone and the pooling under Keras'
    "mixed_bfloat16" policy (float32 variables), the adapter and the head in float32.
    Keras is the one imported (`import_keras` picks its backend).
    """
    import keras

    keras.utils.set_random_seed(seed)
    backbone_policy = "mixed_bfloat16" if dtype == "bfloat16" else "float32"
    # keras.applications builds under the global policy; set for the backbone alone.
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(backbone_policy)
    try:
        backbone = keras.applications.MobileNetV2(
            input_shape=(image_size, image_size, 3),
            alpha=alpha,
            include_top=False,
            weights=keras_weights(weights),
        )
    finally:
        keras.config.set_dtype_policy(previous)
    backbone.trainable = False
    if model == "notebook":
        factor = image_size // DIGIT_SIZE
        inputs = [
            keras.layers.InputLayer(shape=(DIGIT_SIZE, DIGIT_SIZE, 1)),
            keras.layers.UpSampling2D(size=(factor, factor), dtype="float32"),
            keras.layers.Conv2D(3, (3, 3), padding="same", activation="relu", dtype="float32"),
        ]
    else:
        inputs = [keras.layers.InputLayer(shape=(image_size, image_size, 3))]
    classifier = keras.Sequential(
        [
            *inputs,
            backbone,
            keras.layers.GlobalAveragePooling2D(dtype=backbone_policy),
            keras.layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32"),
        ]
    )
    classifier.compile(
        optimizer=keras.optimizers.Adam(), loss="categorical_crossentropy", metrics=["accuracy"]
    )
    return classifier


class KerasRun:
    """Keras' train step and forward pass of `model`'s classifier on one batch, on `backend`.

    The batch is what that model reads: the tf.data host-resized RGB images in [-1, 1] (pipeline),
    or the 28x28 digits as the notebook's `x / 255` (notebook), held as the backend's tensors (on
    JAX, on the device, as ours are). `input`, `layers`, `parameters` and `environment` say what
    was timed, on what.
    """

    def __init__(
        self,
        batch_size: int,
        image_size: int,
        split: input_pipeline.Split,
        *,
        backend: str,
        weights: str,
        alpha: float,
        seed: int,
        model: str = MODELS[0],
        dtype: str = "float32",
    ):
        keras = import_keras(backend)
        self.environment = keras_environment(keras)
        self.model = keras_classifier(alpha, image_size, weights, seed, model=model, dtype=dtype)
        import tensorflow as tf  # here, after Keras: `runtime.import_tensorflow` says why

        raw = next(iter(exact_size(split, batch_size).examples.batch(batch_size)))
        if model == "notebook":
            images = tf.cast(raw["image"], tf.float32) / 255.0
        else:
            images = input_pipeline.preprocess_images(raw["image"], image_size)
        self.images_array = images.numpy()
        self.images = keras.ops.convert_to_tensor(self.images_array)
        self.labels = keras.ops.convert_to_tensor(tf.one_hot(raw["label"], NUM_CLASSES).numpy())
        self.input = describe_input(self.images_array)
        self.layers = [describe_keras_layer(layer) for layer in self.model.layers]
        self.parameters = keras_parameters(self.model)

    def train_step(self) -> None:
        self.model.train_on_batch(self.images, self.labels)

    def forward(self) -> None:
        self.model.predict_on_batch(self.images)

    def output_difference(self, ours: OurRun) -> float:
        """max |ours - Keras| of the softmax outputs on this batch, ours' trained layers copied in.

        Both load the same backbone weights, so with the head (and adapter) set to ours the two
        models compute the same function; a difference beyond rounding is a different model.
        """
        trained = ours.trained_layers()
        self.model.layers[-1].set_weights(list(trained["head"]))
        if "adapter" in trained:
            (conv,) = [layer for layer in self.model.layers if type(layer).__name__ == "Conv2D"]
            conv.set_weights(list(trained["adapter"]))
        theirs = np.asarray(self.model.predict_on_batch(self.images), np.float32)
        return float(np.abs(ours.probabilities(self.images_array) - theirs).max())


def cache_runs(config: TrainConfig, repeats: int) -> dict:
    """Wall time of `train_and_evaluate(config)` without and with cached features, `repeats` each."""
    seconds: dict[bool, list[float]] = {False: [], True: []}
    epoch_seconds: dict[bool, list[float]] = {False: [], True: []}
    histories: dict[bool, list[dict]] = {}
    for _ in range(repeats):
        for cache in (False, True):
            mode = "always" if cache else "never"
            print(f"training {config.epochs} epochs, --cache-features {mode}", flush=True)
            with tempfile.TemporaryDirectory(prefix="mnist_flax_benchmark_run_") as workdir:
                # Features computed in every run: an earlier repeat's on disk would time a load.
                run = dataclasses.replace(
                    config, cache_features=mode, feature_cache="none", workdir=workdir
                )
                began = time.perf_counter()
                histories[cache] = train.train_and_evaluate(run)["epochs"]
                seconds[cache].append(time.perf_counter() - began)
                epoch_seconds[cache].append(sum(record["seconds"] for record in histories[cache]))
    without, with_cache = (float(np.median(seconds[cache])) for cache in (False, True))
    differences = [
        abs(a[key] - b[key])
        for a, b in zip(histories[False], histories[True], strict=True)
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy")
    ]
    return {
        "epochs": config.epochs,
        "train_split": config.train_split,
        "test_split": config.test_split,
        "batch_size": config.batch_size,
        "image_size": config.image_size,
        # seconds: whole runs (model build, compilation, caching, checkpoints, plots included);
        # epoch_seconds: the epochs alone, as the history records them.
        "without_cache": {
            "median_seconds": without,
            "seconds": seconds[False],
            "epoch_seconds": epoch_seconds[False],
        },
        "with_cache": {
            "median_seconds": with_cache,
            "seconds": seconds[True],
            "epoch_seconds": epoch_seconds[True],
        },
        "speedup": without / with_cache,
        "history_max_abs_difference": max(differences),
    }
