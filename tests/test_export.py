"""`mnist-flax export`: every format read back by its own runtime against the JAX model, the Keras
round trip bit for bit, and the refusals (one line, nothing written).

The runs are tiny (alpha 0.35, 32 px pipeline and 56 px notebook models, a few dozen block digits,
`idx_dir`) on a He-initialised backbone, whose features depend on the pixels: with Keras' Glorot
draw they are ~1e-11 whatever the input, every digit would get the same probabilities and a
comparison of outputs would prove nothing. Each format's test skips without its runtime (the
`export` extra). The files are loaded here as docs/deploy.md shows, not through `export.py`'s own
readers, so the check does not vouch for itself.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import pathlib
import re
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config, use_he_backbone

from mnist_flax import cli, evaluate, export, input_pipeline, train

FLOAT32_ATOL = 1e-4  # what the issue asks of every float32 format


@pytest.fixture(scope="module")
def pipeline_run(idx_dir, tmp_path_factory) -> pathlib.Path:
    """A two-epoch pipeline run with a validation split, so that "best" exists.

    The He backbone stays patched in while the module's tests run: a run's frozen backbone is
    rebuilt from its weights source (here "none", then He-initialised) when it is restored.
    """
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_he_backbone(monkeypatch)
        workdir = tmp_path_factory.mktemp("pipeline")
        config = tiny_config(
            idx_dir, workdir, epochs=2, train_split="train[:30]", validation_split="train[30:]"
        )
        train.train_and_evaluate(config)
        yield workdir


@pytest.fixture(scope="module")
def notebook_keras(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """The Keras notebook's Sequential (UpSampling2D(2), 56 px, alpha 0.35) saved as .keras, and
    the directory `mnist-flax convert --keras-model` made of it: (file, directory).

    Random BatchNorm statistics and biases (`random_keras_mobilenet`), He-scaled kernels so that
    the digits reach the head, a nonzero head bias: a copy that dropped any of them would show.
    """
    keras = pytest.importorskip("keras")
    from keras_helpers import random_keras_mobilenet

    backbone = random_keras_mobilenet(alpha=0.35, input_shape=(56, 56, 3), seed=3)
    rng = np.random.default_rng(3)
    for layer in backbone.layers:
        if hasattr(layer, "kernel"):
            kh, kw, cin, _ = layer.kernel.shape
            fan_in = kh * kw * (1 if "depthwise" in layer.name else cin)
            kernel = rng.normal(0, np.sqrt(2 / fan_in), layer.kernel.shape)
            layer.kernel.assign(kernel.astype(np.float32))
    original = keras.Sequential(
        [
            keras.layers.InputLayer((28, 28, 1)),
            keras.layers.UpSampling2D(2),
            keras.layers.Conv2D(3, (3, 3), padding="same", activation="relu"),
            backbone,
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    original.layers[-1].bias.assign(rng.normal(0, 0.3, 10).astype(np.float32))
    folder = tmp_path_factory.mktemp("notebook")
    original.save(folder / "original.keras")
    converted = folder / "converted"
    argv = ["convert", "--keras-model", str(folder / "original.keras"), "--out", str(converted)]
    assert cli.main(argv) == 0
    return folder / "original.keras", converted


def digits_and_probabilities(loaded: evaluate.Loaded) -> tuple[np.ndarray, np.ndarray]:
    """The run's whole test split as the exported model takes it, and the JAX model's probabilities."""
    config = loaded.config
    batches = input_pipeline.make_batches(
        loaded.split,
        batch_size=config.batch_size,
        image_size=config.image_size,
        shuffle_seed=None,
        resize="none" if config.model == "notebook" else "host",
    )
    images = np.concatenate([b["image"][b["mask"]] for b in batches.as_numpy_iterator()])
    probabilities = np.asarray(nnx.jit(lambda m, x: jax.nn.softmax(m(x)))(loaded.model, images))
    return images, probabilities


# The loaders of docs/deploy.md, five lines each: file -> (float32 images -> probabilities).


def load_litert(path):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    run = interpreter.get_signature_runner()
    (name,) = interpreter.get_signature_list()["serving_default"]["inputs"]  # images or digits
    return lambda images: run(**{name: images})["output_0"]


def load_onnx(path):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {session.get_inputs()[0].name: images})[0]


def load_keras(path):
    import keras

    model = keras.models.load_model(path)
    return lambda images: np.asarray(model.predict(images, verbose=0))


def load_stablehlo(path):
    exported = jax.export.deserialize(bytearray(pathlib.Path(path).read_bytes()))
    return lambda images: np.asarray(exported.call(images))


LOADERS = {
    "litert": load_litert,
    "onnx": load_onnx,
    "keras": load_keras,
    "stablehlo": load_stablehlo,
}


def check_litert(path, sidecar) -> None:
    ops = export.litert_ops(path)
    assert ops == sidecar["ops"]
    # Built-in depthwise convolutions, not one opaque XLA call or a TensorFlow (Flex) op.
    assert ops["DEPTHWISE_CONV_2D"] == 17 and ops["CONV_2D"] >= 35, ops
    assert not {"CUSTOM", "DELEGATE", "STABLEHLO_COMPOSITE"} & set(ops), ops


def check_onnx(path, sidecar) -> None:
    import onnx

    proto = onnx.load(path)
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}
    depthwise = [
        node
        for node in proto.graph.node
        if node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute)
    ]
    assert len(depthwise) == 17
    assert export.onnx_ops(path) == sidecar["ops"]
    (given,) = proto.graph.input
    assert given.type.tensor_type.shape.dim[0].dim_param == "batch"
    embedded = json.loads({p.key: p.value for p in proto.metadata_props}["mnist_flax"])
    assert embedded["input"] == sidecar["input"]


def check_keras(path, sidecar) -> None:
    import keras

    model = keras.models.load_model(path)
    backbone = next(layer for layer in model.layers if layer.name.startswith("mobilenetv2"))
    assert not backbone.trainable  # frozen, as in the tutorial
    assert model.layers[-1].get_config()["activation"] == "softmax"


def check_stablehlo(path, sidecar) -> None:
    exported = jax.export.deserialize(bytearray(pathlib.Path(path).read_bytes()))
    assert exported.platforms == export.STABLEHLO_PLATFORMS == tuple(sidecar["platforms"])
    (given,) = exported.in_avals
    assert str(given.shape[0]) == "batch"  # symbolic: any batch size


CHECKS = {
    "litert": check_litert,
    "onnx": check_onnx,
    "keras": check_keras,
    "stablehlo": check_stablehlo,
}


@functools.cache
def restored(
    source: str, checkpoint: str, data_dir: str | None = None
) -> tuple[evaluate.Loaded, np.ndarray, np.ndarray]:
    """The classifier an export took (a run's checkpoint, or with `checkpoint` "weights" a
    converted directory and its test digits from `data_dir`), the test digits and the JAX model's
    probabilities on them, computed once per classifier."""
    if checkpoint == "weights":
        loaded = evaluate.load_classifier(source, data_dir=data_dir)
    else:
        loaded = evaluate.restore_run(source, checkpoint=checkpoint)
    return loaded, *digits_and_probabilities(loaded)


# (model, format, extra flags, the classifier the export must say it took): every format with
# each model, each --checkpoint value and --quantize once; the pipeline model from a run's
# workdir, the notebook model from a converted Keras classifier (--weights DIR).
# LiteRT's two cases take more than ~20 s (TensorFlow's converter, int8 calibration): slow.
SLOW = pytest.mark.slow
CASES = [
    ("pipeline", "onnx", [], "the best checkpoint by validation accuracy", ()),
    ("pipeline", "litert", ["--quantize", "int8", "--checkpoint", "latest"], "the latest", SLOW),
    ("pipeline", "stablehlo", ["--checkpoint", "best"], "the best checkpoint", ()),
    ("pipeline", "keras", [], "the best checkpoint", ()),
    ("notebook", "litert", [], "the notebook classifier in", SLOW),
    ("notebook", "onnx", [], "the notebook classifier in", ()),
    ("notebook", "stablehlo", ["--check-examples", "12"], "the notebook classifier in", ()),
]


@pytest.mark.parametrize(
    ("model", "fmt", "flags", "chosen"),
    [
        pytest.param(
            model,
            fmt,
            flags,
            chosen,
            marks=marks,
            id=f"{model}-{fmt}{'-int8' if '--quantize' in flags else ''}",
        )
        for model, fmt, flags, chosen, marks in CASES
    ],
)
def test_export_gives_the_jax_models_probabilities(
    pipeline_run, notebook_keras, idx_dir, model, fmt, flags, chosen, tmp_path, capsys
):
    for module in export.RUNTIMES[fmt]:
        pytest.importorskip(module)
    out = tmp_path / f"model{export.SUFFIXES[fmt]}"
    if model == "pipeline":
        source = ["--workdir", str(pipeline_run)]
        checkpoint = flags[flags.index("--checkpoint") + 1] if "--checkpoint" in flags else "auto"
        loaded, images, expected = restored(str(pipeline_run), checkpoint)
    else:
        converted = notebook_keras[1]
        source = ["--weights", str(converted), "--data-dir", str(idx_dir)]
        loaded, images, expected = restored(str(converted), "weights", str(idx_dir))
    argv = ["export", *source, "--format", fmt, "--out", str(out), *flags]
    assert cli.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"wrote {out} (" in printed and chosen in printed, printed
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, out.name + ".json"]

    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    quantized = "--quantize" in flags
    examples = 12 if "--check-examples" in flags else 20  # 20: the whole tiny test split
    assert sidecar["check"]["examples"] == examples
    batch = loaded.config.batch_size  # the run's 8; a converted classifier's default 32
    sizes = {1, min(batch, examples), examples % batch or batch}
    assert sidecar["check"]["batch_sizes"] == sorted(sizes)
    assert sidecar["bytes"] == out.stat().st_size
    assert sidecar["model"] == model and sidecar["format"] == fmt
    shape = [None, 28, 28, 1] if model == "notebook" else [None, 32, 32, 3]
    assert sidecar["input"]["shape"] == shape and sidecar["input"]["dtype"] == "float32"
    assert sidecar["output"]["shape"] == [None, 10] and len(sidecar["classes"]) == 10
    assert (sidecar["quantization"] is not None) == quantized
    CHECKS[fmt](out, sidecar)

    # The file on its own, against the JAX model of the classifier the export took.
    assert expected.std(0).max() > 1e-3  # the digits give different probabilities
    run = LOADERS[fmt](out)
    for batch in (images, images[:1], images[:3]):  # any batch size
        got = run(batch)
        assert got.shape == (len(batch), 10)
        # Probabilities: int8 rounds each of the 10 to a step of 1/256, by up to half a step.
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=10 / 512 if quantized else 1e-5)
        if not quantized:
            error = float(np.abs(got - expected[: len(batch)]).max())
            assert error <= FLOAT32_ATOL, error
    agreement = (run(images).argmax(-1) == expected.argmax(-1)).mean()
    assert agreement >= (export.INT8_MIN_AGREEMENT if quantized else 1.0)
    if quantized:
        assert sidecar["quantization"]["calibration"].endswith("digits of mnist train[:30]")
        assert "points lost to int8" in printed
        parameters = sum(v.size for v in jax.tree.leaves(nnx.state(loaded.model, nnx.Param)))
        assert out.stat().st_size < 2 * parameters  # int8: a byte a weight, not float32's four
    else:
        assert sidecar["check"]["max_abs_difference"] <= FLOAT32_ATOL


def test_a_converted_keras_classifier_exported_back_is_the_same_bit_for_bit(
    notebook_keras, idx_dir, tmp_path, capsys
):
    """convert --keras-model, then export --weights DIR --format keras: the original arrays."""
    import keras

    original_file, converted = notebook_keras
    out = tmp_path / "exported.keras"
    argv = ["export", "--weights", str(converted), "--data-dir", str(idx_dir)]
    assert cli.main([*argv, "--format", "keras", "--out", str(out)]) == 0, capsys.readouterr().err
    assert f"the notebook classifier in {converted}" in capsys.readouterr().out

    original, exported = keras.models.load_model(original_file), keras.models.load_model(out)
    theirs, ours = original.weights, exported.weights
    assert len(theirs) == len(ours) == 264
    for a, b in zip(theirs, ours, strict=True):
        assert a.path.rsplit("/", 1)[-1] == b.path.rsplit("/", 1)[-1]
        np.testing.assert_array_equal(np.asarray(b.numpy()), np.asarray(a.numpy()), a.path)
    _, images, _ = restored(str(converted), "weights", str(idx_dir))
    expected = np.asarray(original(images))
    assert expected.std(0).max() > 1e-3  # the digits give different probabilities
    np.testing.assert_array_equal(np.asarray(exported(images)), expected)


def test_keras_from_classifier_inverts_classifier_from_keras(pipeline_run, notebook_keras, idx_dir):
    """The two directions of the maps (convert.py, keras_classifier.py) compose to the identity."""
    pytest.importorskip("keras")
    from mnist_flax.keras_classifier import classifier_from_keras, keras_from_classifier

    for model in (
        restored(str(pipeline_run), "auto")[0].model,
        restored(str(notebook_keras[1]), "weights", str(idx_dir))[0].model,
    ):
        back = classifier_from_keras(keras_from_classifier(model))
        ours = dict(nnx.to_flat_state(nnx.state(model)))
        again = dict(nnx.to_flat_state(nnx.state(back)))
        assert sorted(ours) == sorted(again)
        for path, variable in ours.items():
            np.testing.assert_array_equal(again[path].get_value(), variable.get_value(), str(path))


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    return captured.err


def test_bad_requests_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    folder = tmp_path / "out"
    folder.mkdir()
    run = ["export", "--workdir", str(empty)]
    onnx_out = ["--format", "onnx", "--out", str(folder / "m.onnx")]
    cases = [
        (
            [*run, "--format", "stablehlo", "--out", str(folder / "m.stablehlo")],
            "holds no checkpoint",
        ),
        (
            [*run, "--format", "tflite", "--out", str(folder / "m.tflite")],
            "invalid choice: 'tflite'",
        ),
        ([*run, "--format", "stablehlo", "--out", str(folder)], "is a directory"),
        ([*run, "--format", "litert", "--out", str(folder / "m.onnx")], "ends in .tflite"),
        (
            [*run, "--format", "keras", "--out", str(tmp_path / "absent" / "m.keras")],
            "does not exist",
        ),
        ([*run, *onnx_out, "--quantize", "int8"], "only --format litert quantizes"),
        ([*run, *onnx_out, "--check-examples", "-1"], "--check-examples -1"),
        ([*run, *onnx_out, "--train-split", "train"], "applies to --quantize int8"),
        ([*run, *onnx_out, "--data-dir", str(tmp_path)], "--data-dir applies to --weights"),
        (
            ["export", "--weights", str(empty), *onnx_out, "--checkpoint", "best"],
            "--checkpoint chooses",
        ),
        (
            [
                "export",
                "--weights",
                str(empty),
                "--format",
                "keras",
                "--out",
                str(folder / "m.keras"),
            ],
            "holds no converted classifier",
        ),
        (["export", *onnx_out], "one of the arguments --workdir --weights is required"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        assert message in one_error_line(capsys), argv

    # A missing runtime: one line naming the extra, before any model is built.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    assert cli.main([*run, *onnx_out]) == 2
    # onnxruntime, or the first of the format's packages that is really missing here.
    missing = re.search(
        r"needs the Python package '(\w+)', which is not installed: (.*)$", one_error_line(capsys)
    )
    assert missing and missing[1] in export.RUNTIMES["onnx"], missing
    assert missing[2] == 'pip install "mnist-flax[export]"'

    assert list(folder.iterdir()) == []


def test_an_export_that_fails_its_check_leaves_nothing(pipeline_run, tmp_path, capsys, monkeypatch):
    """The check runs on the written file before it is moved: a failure leaves --out as it was."""
    out = tmp_path / "model.stablehlo"
    out.write_bytes(b"an earlier export")
    monkeypatch.setattr(export, "FLOAT32_ATOL", 0.0)  # no float32 model can pass that
    argv = ["export", "--workdir", str(pipeline_run), "--format", "stablehlo"]
    assert cli.main([*argv, "--out", str(out)]) == 2
    assert re.search(
        r"differ from the JAX model's by up to \S+ on 20 digits", one_error_line(capsys)
    )
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.stablehlo"]  # no temporary left


@pytest.mark.slow
def test_the_real_backbone_round_trips_and_exports_on_real_digits(
    imagenet_h5_keras2, mnist_idx_dir, tmp_path, capsys
):
    """The pipeline model on the ImageNet MobileNetV2 at 96 px, a Keras classifier converted:
    exported back to .keras bit for bit, and as LiteRT and ONNX within 1e-4 on 64 real digits."""
    pytest.importorskip("keras")
    from test_classifier_convert import pipeline_keras

    original = pipeline_keras(imagenet_h5_keras2, size=96, seed=5)
    original.save(tmp_path / "original.keras")
    converted = tmp_path / "converted"
    argv = ["convert", "--keras-model", str(tmp_path / "original.keras"), "--out", str(converted)]
    assert cli.main(argv) == 0
    source = ["--weights", str(converted), "--data-dir", str(mnist_idx_dir)]
    for fmt in ("keras", "litert", "onnx"):
        if not all(importlib.util.find_spec(module) for module in export.RUNTIMES[fmt]):
            continue  # that runtime is not installed: the others still run
        out = tmp_path / f"exported{export.SUFFIXES[fmt]}"
        argv = ["export", *source, "--test-split", "test[:64]", "--format", fmt, "--out", str(out)]
        assert cli.main(argv) == 0, capsys.readouterr().err
        check = json.loads(out.with_name(out.name + ".json").read_text())["check"]
        print(fmt, capsys.readouterr().out)
        assert check["examples"] == 64 and check["same_class"] == 64
        assert check["max_abs_difference"] <= FLOAT32_ATOL
    import keras

    exported = keras.models.load_model(tmp_path / "exported.keras")
    assert len(original.weights) == len(exported.weights) == 262
    for a, b in zip(original.weights, exported.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(b.numpy()), np.asarray(a.numpy()), a.path)
