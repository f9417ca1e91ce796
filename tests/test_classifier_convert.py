"""Whole trained Keras classifiers -> `TransferClassifier`: same outputs, gradients and training as Keras.

The Keras models are the notebook's Sequential (UpSampling2D -> Conv2D(3, relu) -> MobileNetV2 ->
GlobalAveragePooling2D -> Dense(10, softmax)) and the pipeline model (a Functional MobileNetV2 ->
pooling -> Dense), their backbones holding the real ImageNet weights from the shared folder and
fed real MNIST digits through this project's own input pipeline. The layers that train (the
adapter's Conv2D, the Dense head) are moved away from Keras' initial values with seeded noise, and
their biases made nonzero, so that a copy that dropped, re-initialised or transposed one fails.
The notebook's own 224 px (UpSampling2D(8)) is checked for its outputs; gradients and training run
at UpSampling2D(2) (56 px), which exercises the same code for a sixteenth of the CPU time.
"""

from __future__ import annotations

import json
import pathlib
import re

import jax
import keras
import numpy as np
import pytest
import tensorflow as tf
from flax import nnx

from mnist_flax import cli, convert, evaluate, input_pipeline
from mnist_flax.build import create_model
from mnist_flax.config import TrainConfig
from mnist_flax.convert import WeightsError
from mnist_flax.freezing import make_optimizer
from mnist_flax.keras_classifier import classifier_from_keras
from mnist_flax.steps import StepRunner, make_metrics, per_example_loss

NUM_CLASSES = 10
# Softmax probabilities, absolute: float32 through the whole ImageNet backbone, summed in other orders.
PROBABILITY_ATOL = 1e-5
# Gradients of the mean cross-entropy: |ours - Keras| <= RTOL x max |Keras| + ATOL, per array.
# The head's gradient is the pooled features times the softmax error, as accurate as the forward
# (measured 1.6e-5 relative): 1e-4. The adapter's travels back through the whole frozen backbone,
# and on MNIST's constant background a float32 rounding that moves a ReLU6 input across 0 or 6
# switches that unit's gradient over a whole region (the differences sit in single images).
# Against the float64 gradient (jax_enable_x64, these seeds and digits) Keras' own float32
# adapter-kernel gradient is 5.0e-4 relative off and ours 7.3e-4, their difference 5.8e-4 (on
# random inputs in [-1, 1] the gradients at the backbone's input agree to 2e-6): no
# float32 implementation meets 1e-4 here, so the adapter gets 2e-3, ~4x Keras' own error and still
# far below what a wrong copy, padding or upsampling does (O(1)). ATOL: float32's resolution of a
# loss of ~2.3 (2.3 x 1.2e-7, rounded up), which only matters for entries near 0.
HEAD_GRAD_RTOL = 1e-4
ADAPTER_GRAD_RTOL = 2e-3
GRAD_ATOL = 1e-6
# The mean cross-entropy of a batch after each of 5 Adam steps (1e-3) from the same weights. Adam's
# first step moves every parameter by ~lr whatever its gradient's size, so the adapter's gradient
# entries near 0 (see above) can step either way: the notebook model's losses differ by 6e-5 to
# 1.4e-4 depending on the CPU's summation order, the pipeline's (head only) by ~2e-5. Both stay
# below Keras' epsilon placement, which alone moved them by 4.6e-4 (docs/results.md#keras-parity).
LOSS_ATOL = {"notebook": 3e-4, "pipeline": 1e-4}
# `evaluate --weights`' mean cross-entropy over 12 digits vs Keras' on the same digits: -log of
# probabilities that agree to PROBABILITY_ATOL, a loss of ~2.5 (measured 4e-6 and 6e-6).
EVAL_LOSS_ATOL = 3e-5
# The pipeline model's input side (any >= 32 converts; smaller is cheaper on the CPU).
PIPELINE_SIZE = 96


def keras_backbone(weights: pathlib.Path, size: int) -> keras.Model:
    """The frozen ImageNet MobileNetV2 as the notebook builds it (`weights="imagenet"`), read offline."""
    base = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), include_top=False, weights=None
    )
    base.load_weights(weights)  # Keras' own H5 loading, by layer order: any input size
    base.trainable = False
    return base


def move_away_from_init(layer: keras.layers.Layer, seed: int) -> None:
    """Seeded noise on the kernel, and a nonzero bias (Keras starts it at 0)."""
    rng = np.random.default_rng(seed)
    kernel, bias = layer.kernel, layer.bias
    kernel.assign(kernel.numpy() + rng.normal(0.0, 0.05, kernel.shape).astype(np.float32))
    bias.assign(rng.normal(0.1, 0.1, bias.shape).astype(np.float32))


def notebook_keras(weights: pathlib.Path, factor: int, seed: int = 0) -> keras.Sequential:
    """The notebook's model, with UpSampling2D(factor) (8 is the notebook's 224 px)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.layers.InputLayer((28, 28, 1)),
            keras.layers.UpSampling2D(size=(factor, factor)),
            keras.layers.Conv2D(3, (3, 3), padding="same", activation="relu", name="adapter"),
            keras_backbone(weights, 28 * factor),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(NUM_CLASSES, activation="softmax", name="head"),
        ]
    )
    move_away_from_init(model.get_layer("adapter"), seed)
    move_away_from_init(model.get_layer("head"), seed + 1)
    return model


def pipeline_keras(weights: pathlib.Path, size: int, seed: int = 0) -> keras.Model:
    """The pipeline model as a Functional model: RGB [-1, 1] images -> backbone -> pooling -> Dense."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    features = keras.layers.GlobalAveragePooling2D()(
        keras_backbone(weights, size)(inputs, training=False)
    )
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", name="head")(features)
    model = keras.Model(inputs, outputs)
    move_away_from_init(model.get_layer("head"), seed + 1)
    return model


def digit_batches(
    mnist_dir: pathlib.Path, split: str, batch_size: int, *, image_size: int, resize: str
) -> list[dict[str, np.ndarray]]:
    """Real MNIST test digits as the training loop sees them (resize "none": the notebook's)."""
    loaded = input_pipeline.load_split("mnist", split, data_dir=mnist_dir)
    batches = input_pipeline.make_batches(
        loaded, batch_size=batch_size, image_size=image_size, shuffle_seed=None, resize=resize
    )
    return list(batches.as_numpy_iterator())


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(NUM_CLASSES, dtype=np.float32)[labels]


@nnx.jit
def softmax(model, images):
    return jax.nn.softmax(model(images))


def assert_probabilities_match(model, keras_model, images: np.ndarray) -> float:
    ours = np.asarray(softmax(model, images))
    theirs = np.asarray(keras_model(images, training=False))
    assert ours.shape == theirs.shape == (len(images), NUM_CLASSES)
    error = float(np.abs(ours - theirs).max())
    assert error <= PROBABILITY_ATOL, f"max |p - p_keras| = {error:.3g}"
    return error


# ----------------------------------------------------------------------------------------------------
# Parity with Keras on real digits and the real ImageNet backbone.


def test_notebook_model_at_224_gives_keras_probabilities(imagenet_h5_keras2, mnist_idx_dir):
    keras_model = notebook_keras(imagenet_h5_keras2, factor=8)
    model = classifier_from_keras(keras_model)
    assert convert.classifier_kind(model) == "notebook"
    assert (model.image_size, model.adapter.factor, model.backbone.alpha) == (224, 8, 1.0)
    (batch,) = digit_batches(mnist_idx_dir, "test[:4]", 4, image_size=224, resize="none")
    error = assert_probabilities_match(model, keras_model, batch["image"])
    print(f"notebook 224 px: max |p - p_keras| = {error:.2g}")


def test_pipeline_model_gives_keras_probabilities(imagenet_h5_keras2, mnist_idx_dir):
    keras_model = pipeline_keras(imagenet_h5_keras2, size=PIPELINE_SIZE)
    model = classifier_from_keras(keras_model)
    assert convert.classifier_kind(model) == "pipeline"
    assert (model.image_size, model.adapter) == (PIPELINE_SIZE, None)
    (batch,) = digit_batches(mnist_idx_dir, "test[:4]", 4, image_size=PIPELINE_SIZE, resize="host")
    error = assert_probabilities_match(model, keras_model, batch["image"])
    print(f"pipeline {PIPELINE_SIZE} px: max |p - p_keras| = {error:.2g}")


# Our parameter -> the Keras variable it was converted from (`notebook_keras`' layer names).
KERAS_VARIABLE = {
    "adapter/conv/kernel": ("adapter", "kernel"),
    "adapter/conv/bias": ("adapter", "bias"),
    "head/kernel": ("head", "kernel"),
    "head/bias": ("head", "bias"),
}


def keras_model_and_batches(
    model_name: str, weights: pathlib.Path, mnist_dir: pathlib.Path, split: str
) -> tuple[keras.Model, list[dict[str, np.ndarray]]]:
    """The Keras classifier `model_name` names and real digits for it in batches of 8: the
    notebook's at UpSampling2D(2) (56 px) on [0, 1] digits, the pipeline model at 96 px on RGB."""
    if model_name == "notebook":
        keras_model, size, resize = notebook_keras(weights, factor=2), 56, "none"
    else:
        keras_model, size, resize = pipeline_keras(weights, PIPELINE_SIZE), PIPELINE_SIZE, "host"
    return keras_model, digit_batches(mnist_dir, split, 8, image_size=size, resize=resize)


@pytest.mark.parametrize("model_name", ["notebook", "pipeline"])
def test_gradients_match_keras(model_name, imagenet_h5_keras2, mnist_idx_dir):
    """d(mean cross-entropy) / d(adapter and head parameters), ours vs Keras' GradientTape."""
    keras_model, (batch,) = keras_model_and_batches(
        model_name, imagenet_h5_keras2, mnist_idx_dir, "test[:8]"
    )
    model = classifier_from_keras(keras_model)
    trains = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("adapter"), nnx.PathContains("head")))
    graphdef, params, rest = nnx.split(model, trains, ...)

    @jax.jit
    def grad(params):
        # The training step's own loss function (`steps.per_example_loss`), averaged.
        return jax.grad(lambda p: per_example_loss(nnx.merge(graphdef, p, rest), batch)[0].mean())(
            params
        )

    ours = {"/".join(map(str, path)): v.get_value() for path, v in nnx.to_flat_state(grad(params))}

    variables = {
        name: getattr(keras_model.get_layer(layer), attribute)
        for name, (layer, attribute) in KERAS_VARIABLE.items()
        if layer != "adapter" or model_name == "notebook"
    }
    with tf.GradientTape() as tape:
        predicted = keras_model(batch["image"], training=False)
        loss = keras.ops.mean(
            keras.losses.categorical_crossentropy(one_hot(batch["label"]), predicted)
        )
    theirs = dict(zip(variables, tape.gradient(loss, list(variables.values())), strict=True))

    assert sorted(ours) == sorted(theirs)
    report = {}
    for name, expected in theirs.items():
        expected, got = np.asarray(expected), np.asarray(ours[name])
        assert got.shape == expected.shape, name
        scale = float(np.abs(expected).max())
        assert scale > 1e-4, f"{name}: Keras' gradient is ~0, the check would be empty"
        report[name] = (float(np.abs(got - expected).max()), scale)
    print(
        {
            name: f"{error:.2g} = {error / scale:.2g} x max |g|"
            for name, (error, scale) in report.items()
        }
    )
    for name, (error, scale) in report.items():
        rtol = ADAPTER_GRAD_RTOL if name.startswith("adapter") else HEAD_GRAD_RTOL
        assert error <= rtol * scale + GRAD_ATOL, f"{name}: {error:.3g} (max |grad| {scale:.3g})"


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["notebook", "pipeline"])
def test_five_training_steps_match_keras_train_on_batch(
    model_name, imagenet_h5_keras2, mnist_idx_dir
):
    """The tutorial's recipe: Adam 1e-3 on categorical cross-entropy, adapter and head training."""
    keras_model, batches = keras_model_and_batches(
        model_name, imagenet_h5_keras2, mnist_idx_dir, "test[:40]"
    )
    model = classifier_from_keras(keras_model)  # the weights before any step
    keras_model.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", jit_compile=False
    )
    runner = StepRunner(model, make_optimizer(model, 1e-3), make_metrics())
    assert len(batches) == 5 and all(batch["mask"].all() for batch in batches)

    # The control: the last batch's loss before any step, which training must have moved.
    last = batches[-1]
    untrained = float(
        keras.ops.mean(
            keras.losses.categorical_crossentropy(
                one_hot(last["label"]), keras_model(last["image"], training=False)
            )
        )
    )
    ours, theirs = [], []
    for batch in batches:
        runner.reset_metrics()
        runner.train(batch)  # records the batch's loss before the step, as train_on_batch returns
        ours.append(runner.read_metrics()["loss"])
        # Keras before 3.15 returns the mean loss of every call so far, not the batch's (its bug
        # keras-team/keras#22596, fixed in 3.15.0 by #22617); the steps themselves are the same.
        keras_model.reset_metrics()
        theirs.append(float(keras_model.train_on_batch(batch["image"], one_hot(batch["label"]))))
    errors = np.abs(np.subtract(ours, theirs))
    print(
        f"losses {np.round(theirs, 4)} (untrained last batch {untrained:.4f}); "
        f"max |loss - loss_keras| = {errors.max():.2g}"
    )
    assert errors.max() <= LOSS_ATOL[model_name], f"losses ours {ours} vs Keras {theirs}"
    # Four steps moved the last batch's loss by far more than the tolerance: a step that did
    # nothing, or trained other parameters, could not pass.
    assert abs(theirs[-1] - untrained) > 100 * LOSS_ATOL[model_name]


# ----------------------------------------------------------------------------------------------------
# The command line: `convert --keras-model` on both file formats, then `evaluate --weights`.


def keras_mean_loss_and_confusion(keras_model, batches) -> tuple[float, np.ndarray]:
    losses, confusion = [], np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    for batch in batches:
        predicted = np.asarray(keras_model(batch["image"], training=False))
        losses.append(keras.losses.categorical_crossentropy(one_hot(batch["label"]), predicted))
        np.add.at(confusion, (batch["label"], predicted.argmax(-1)), 1)
    return float(np.concatenate(losses).mean()), confusion


@pytest.mark.slow
def test_keras_and_h5_files_convert_and_evaluate_through_the_cli(
    imagenet_h5_keras2, mnist_idx_dir, tmp_path, capsys, monkeypatch
):
    notebook = notebook_keras(imagenet_h5_keras2, factor=2, seed=3)
    notebook.save(tmp_path / "notebook.keras")  # Keras 3's format
    pipeline = pipeline_keras(imagenet_h5_keras2, size=PIPELINE_SIZE, seed=4)
    pipeline.save(tmp_path / "pipeline.h5")  # the legacy full-model H5
    results = []
    evaluate_classifier = evaluate.evaluate_classifier
    monkeypatch.setattr(
        evaluate,
        "evaluate_classifier",
        lambda *args, **kwargs: results.append(evaluate_classifier(*args, **kwargs)),
    )
    cases = [
        (tmp_path / "notebook.keras", notebook, "notebook", 56, "none"),
        (tmp_path / "pipeline.h5", pipeline, "pipeline", PIPELINE_SIZE, "host"),
    ]
    for path, keras_model, kind, size, resize in cases:
        out = tmp_path / f"{kind}-converted"
        assert cli.main(["convert", "--keras-model", str(path), "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert printed == (
            f"wrote the {kind} classifier (10 classes, MobileNetV2 alpha 1.0, {size} px) from "
            f"{path} to {out}; use it with --model {kind} --image-size {size} --weights {out}\n"
        )
        saved = json.loads((out / "config.json").read_text())
        assert {k: saved[k] for k in ("model", "num_classes", "image_size", "alpha")} == {
            "model": kind,
            "num_classes": NUM_CLASSES,
            "image_size": size,
            "alpha": 1.0,
        }
        flags = ["--data-dir", str(mnist_idx_dir), "--test-split", "test[:12]"]
        command = ["evaluate", "--weights", str(out), "--workdir", str(tmp_path / kind), *flags]
        assert cli.main([*command, "--batch-size", "8"]) == 0, capsys.readouterr().err
        result = results.pop()
        assert f"on mnist test[:12], the {kind} classifier in {out}" in capsys.readouterr().out
        assert (tmp_path / kind / "misclassified.png").is_file()
        # Keras on the same 12 digits in one batch (evaluate padded its second batch of 8: the
        # padding must not count).
        batches = digit_batches(mnist_idx_dir, "test[:12]", 12, image_size=size, resize=resize)
        loss, confusion = keras_mean_loss_and_confusion(keras_model, batches)
        assert result["num_examples"] == 12
        assert abs(result["test_loss"] - loss) <= EVAL_LOSS_ATOL, (result["test_loss"], loss)
        assert result["confusion"] == confusion.tolist()

    # `train --weights DIR` rebuilds the notebook model at the converted size only: the
    # upsampling factor is in no array.
    notebook_dir = tmp_path / "notebook-converted"
    with pytest.raises(WeightsError, match="image_size 56, not 224; pass --image-size 56"):
        create_model(TrainConfig(model="notebook", weights=str(notebook_dir)), NUM_CLASSES)


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    return captured.err


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    notes = tmp_path / "notes.keras"
    notes.write_text("not a model")
    weights_only = tmp_path / "model.weights.h5"
    weights_only.write_bytes(b"")
    torch_file = tmp_path / "model.pt"
    torch_file.write_bytes(b"")
    convert_out = ["--out", str(tmp_path / "out")]
    cases = [
        (
            ["convert", "--keras-model", str(tmp_path / "absent.keras"), *convert_out],
            "does not exist",
        ),
        (
            ["convert", "--keras-model", str(notes), *convert_out],
            "cannot be loaded as a Keras model",
        ),
        (["convert", "--keras-model", str(weights_only), *convert_out], "holds weights only"),
        (["convert", "--keras-model", str(torch_file), *convert_out], "is not a Keras model file"),
        (
            ["convert", "--keras-model", str(notes), "--weights", "imagenet", *convert_out],
            "not allowed with",
        ),
        (
            ["convert", "--keras-model", str(notes), "--alpha", "0.5", *convert_out],
            "--alpha applies to --weights",
        ),
        (["convert", *convert_out], "one of the arguments --weights --keras-model is required"),
        (
            ["evaluate", "--weights", str(tmp_path), "--workdir", str(tmp_path)],
            "holds no converted classifier",
        ),
        (
            [
                "evaluate",
                "--weights",
                str(tmp_path),
                "--workdir",
                str(tmp_path),
                "--checkpoint",
                "best",
            ],
            "--checkpoint chooses",
        ),
        (
            ["evaluate", "--workdir", str(tmp_path), "--data-dir", str(tmp_path)],
            "--data-dir applies to --weights",
        ),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        assert message in one_error_line(capsys), argv
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# What converts and what is refused, on a small random backbone (no shared files needed).


@pytest.fixture(scope="module")
def small_backbone() -> keras.Model:
    """A random alpha-0.35 MobileNetV2 for any input size, shared by the structures below."""
    keras.utils.set_random_seed(0)
    return keras.applications.MobileNetV2(
        input_shape=(None, None, 3), alpha=0.35, include_top=False, weights=None
    )


def sequential(*layers, input_shape=(28, 28, 1)) -> keras.Sequential:
    return keras.Sequential([keras.layers.InputLayer(input_shape), *layers])


def upsample(size=(2, 2), interpolation="nearest"):
    return keras.layers.UpSampling2D(size, interpolation=interpolation)


def adapter(**overrides):
    return keras.layers.Conv2D(3, (3, 3), **{"padding": "same", "activation": "relu", **overrides})


def test_a_pooled_linear_classifier_of_another_alpha_converts():
    """Backbone pooled by its own pooling="avg", a logits head, alpha read from the array shapes.

    The backbone is renamed, so only its shapes say alpha 0.5 (0.35, tried first, has other ones).
    The copy is checked array by array: the forward of such a model is the tests' above.
    """
    pooled = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3),
        alpha=0.5,
        include_top=False,
        weights=None,
        pooling="avg",
        name="renamed",
    )
    inputs = keras.Input((32, 32, 3))
    keras_model = keras.Model(inputs, keras.layers.Dense(4, name="head")(pooled(inputs)))
    move_away_from_init(keras_model.get_layer("head"), seed=0)
    model = classifier_from_keras(keras_model)
    assert (model.backbone.alpha, model.image_size, model.head.out_features) == (0.5, 32, 4)
    assert convert.classifier_kind(model) == "pipeline"
    head = keras_model.get_layer("head")
    np.testing.assert_array_equal(model.head.kernel.get_value(), head.kernel.numpy())
    np.testing.assert_array_equal(model.head.bias.get_value(), head.bias.numpy())
    block = pooled.get_layer("block_16_project_BN")
    np.testing.assert_array_equal(
        model.backbone.blocks[16].project_BN.var.get_value(), block.moving_variance.numpy()
    )


def functional_with_an_op(base: keras.Model) -> keras.Model:
    """The preprocessing as a plain op (not a layer): Keras lists it in `operations` only."""
    inputs = keras.Input((32, 32, 3))
    features = keras.layers.GlobalAveragePooling2D()(base(inputs * 2.0 - 1.0))
    return keras.Model(inputs, keras.layers.Dense(10)(features))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda base: sequential(
                upsample(),
                adapter(),
                base,
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(10, activation="relu"),
            ),
            "activation 'relu'; only softmax or linear",
        ),
        (
            lambda base: sequential(
                upsample(),
                adapter(),
                base,
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dropout(0.2),
                keras.layers.Dense(10),
            ),
            "(Dropout) where the Dense head should be",
        ),
        (
            lambda base: sequential(
                upsample(), adapter(), base, keras.layers.GlobalAveragePooling2D()
            ),
            "has no Dense head",
        ),
        (
            lambda base: sequential(
                upsample(),
                adapter(),
                base,
                keras.layers.GlobalMaxPooling2D(),
                keras.layers.Dense(10),
            ),
            "(GlobalMaxPooling2D) where GlobalAveragePooling2D should be",
        ),
        (
            lambda base: sequential(
                upsample(interpolation="bilinear"),
                adapter(),
                base,
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(10),
            ),
            "has interpolation='bilinear'; the converter needs interpolation='nearest'",
        ),
        (
            lambda base: sequential(
                upsample((2, 3)),
                adapter(),
                base,
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(10),
            ),
            "has size (2, 3); only a square factor",
        ),
        (
            lambda base: sequential(
                upsample(),
                adapter(activation="sigmoid"),
                base,
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(10),
            ),
            "has activation='sigmoid'; the converter needs activation='relu'",
        ),
        (
            lambda base: sequential(
                upsample(),
                base,
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(10),
                input_shape=(28, 28, 3),
            ),
            "is not followed by the notebook's Conv2D",
        ),
        (
            lambda base: sequential(
                upsample(),
                adapter(),
                base,
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(10),
                input_shape=(32, 32, 1),
            ),
            "takes 28x28x1 digits",
        ),
        (
            lambda base: sequential(
                base,
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(10),
                input_shape=(40, 32, 3),
            ),
            "square RGB images of at least 32x32",
        ),
        (
            functional_with_an_op,
            "where the nested MobileNetV2 backbone should be",
        ),
    ],
    ids=[
        "relu-head",
        "dropout",
        "no-dense",
        "max-pooling",
        "bilinear",
        "non-square",
        "adapter-activation",
        "no-adapter",
        "notebook-input",
        "pipeline-input",
        "functional-op",
    ],
)
def test_unconvertible_models_get_one_line_naming_the_layer(small_backbone, build, message):
    with pytest.raises(WeightsError, match="^[^\n]*" + re.escape(message)):
        classifier_from_keras(build(small_backbone))
