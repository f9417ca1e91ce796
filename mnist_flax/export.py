"""Exporting a trained classifier to what deployment targets read: Keras, LiteRT, ONNX, StableHLO.

`mnist-flax export` takes the classifier `mnist-flax evaluate` would measure (a run's checkpoint
through `evaluate.restore_run`, or a converted classifier through `evaluate.load_classifier`) and
writes it in one format. Every format computes the float32 function the JAX model computes, takes
what the Keras model of the same kind takes (the pipeline model: float32 RGB images [N, S, S, 3] in
[-1, 1]; the notebook model: float32 digits [N, 28, 28, 1] in [0, 1]), any batch size, and gives
the softmax probabilities [N, classes]:

- keras: `keras_classifier.keras_from_classifier`, saved as a .keras file.
- litert: that Keras model through TensorFlow's LiteRT converter (Keras' `Model.export(format=
  "litert")`) with LiteRT's built-in operators only: no TensorFlow ops, no opaque XLA call, the
  depthwise convolutions are DEPTHWISE_CONV_2D. `--quantize int8` makes weights and activations
  int8, calibrated on digits of the training split, with float32 in and out.
- onnx: that Keras model through tf2onnx (Keras' own route on the TensorFlow backend), standard ONNX
  operators only (why not jax2onnx from the JAX model: docs/deploy.md).
- stablehlo: `jax.export` of the jitted predict function with the weights inside, the batch size
  symbolic, lowered for `STABLEHLO_PLATFORMS`: on the CPU it computes the CPU path's forms, elsewhere
  XLA's convolutions (`lax.platform_dependent`), the choice `--conv-impl auto` makes.

Nothing reaches `--out` unchecked: the file is written in a temporary folder beside it, read back by
its own runtime (Keras, LiteRT's interpreter, ONNX Runtime, `jax.export.deserialize`) and run on
test digits against the JAX model (largest difference of the probabilities, at most
`FLOAT32_ATOL` for the float32 formats; accuracy and predicted classes of both), at the run's batch
size and at batch 1. Only then are it and its sidecar `<out>.json` (what the model takes and gives,
the classes, how it was checked) moved into place. A format whose libraries are missing is one line
naming the extra that installs them.
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import pathlib
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from mnist_flax import evaluate, input_pipeline, keras_classifier, runtime
from mnist_flax.config import DIGIT_SIZE, EXPORT_FORMATS, EXPORT_QUANTIZATIONS, TrainConfig
from mnist_flax.mobilenet_v2 import Conv2D, DepthwiseConv2D, MobileNetV2
from mnist_flax.model import NotebookAdapter, TransferClassifier

# The largest difference of probabilities a float32 format may show against the JAX model.
FLOAT32_ATOL = 1e-4
# Training digits LiteRT's int8 calibration runs through the model (its guide asks for a few hundred).
REPRESENTATIVE_EXAMPLES = 256
# int8 moves the probabilities by design, and what it costs in accuracy is reported, not judged.
# A quantization that broke the model (wrong input scaling, a saturated layer) changes most
# predicted classes: the check asks at least this share to agree with the JAX model.
INT8_MIN_AGREEMENT = 0.5
SUFFIXES = {"keras": ".keras", "litert": ".tflite", "onnx": ".onnx", "stablehlo": ".stablehlo"}
STABLEHLO_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# The modules each format needs beyond the core install: the `export` extra.
RUNTIMES = {
    "keras": ("keras",),
    "litert": ("keras", "ai_edge_litert"),
    "onnx": ("keras", "tf2onnx", "onnx", "onnxruntime"),
    "stablehlo": (),
}
INSTALL = 'pip install "mnist-flax[export]"'
SIDECAR_SUFFIX = ".json"


class ExportError(ValueError):
    """An export that cannot be made or did not pass its check (nothing was written)."""


def export_run(
    workdir: str | os.PathLike,
    *,
    fmt: str,
    out: str | os.PathLike,
    checkpoint: str = "auto",
    quantize: str | None = None,
    test_split: str | None = None,
    train_split: str | None = None,
    check_examples: int = 256,
) -> dict:
    """Exports the workdir's run, the checkpoint `mnist-flax evaluate` would restore, to `out`.

    test_split, train_split: the digits of the check and of the int8 calibration; default the
    run's own. Returns the sidecar's contents (`_export`).
    """
    out = _check_request(fmt, out, quantize, check_examples)
    loaded = evaluate.restore_run(workdir, checkpoint=checkpoint, test_split=test_split)
    loaded.description = f"the {loaded.config.model} classifier of {workdir}, {loaded.description}"
    return _export(
        loaded,
        fmt=fmt,
        out=out,
        quantize=quantize,
        train_split=train_split or loaded.config.train_split,
        check_examples=check_examples,
    )


def export_classifier(
    weights: str | os.PathLike,
    *,
    fmt: str,
    out: str | os.PathLike,
    quantize: str | None = None,
    dataset: str = TrainConfig.dataset,
    data_dir: str | os.PathLike | None = None,
    test_split: str = TrainConfig.test_split,
    train_split: str = TrainConfig.train_split,
    check_examples: int = 256,
) -> dict:
    """Exports the classifier `mnist-flax convert --keras-model` wrote to `weights`, to `out`."""
    out = _check_request(fmt, out, quantize, check_examples)
    loaded = evaluate.load_classifier(
        weights, dataset=dataset, data_dir=data_dir, test_split=test_split
    )
    return _export(
        loaded,
        fmt=fmt,
        out=out,
        quantize=quantize,
        train_split=train_split,
        check_examples=check_examples,
    )


def _check_request(
    fmt: str, out: str | os.PathLike, quantize: str | None, check_examples: int
) -> pathlib.Path:
    """Refuses, before the slow model build, what cannot succeed: the options, --out, the runtimes."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    if quantize is not None and (quantize not in EXPORT_QUANTIZATIONS or fmt != "litert"):
        raise ExportError(
            f"--quantize {quantize}: only --format litert quantizes, to "
            f"{' or '.join(EXPORT_QUANTIZATIONS)}"
        )
    if check_examples < 0:
        raise ExportError(f"--check-examples {check_examples}: give 0 (all) or more")
    out = pathlib.Path(out)
    if out.is_dir():
        raise ExportError(
            f"--out {out} is a directory; name the file to write, e.g. {out / 'model'}{SUFFIXES[fmt]}"
        )
    if out.suffix != SUFFIXES[fmt]:
        raise ExportError(f"--out {out}: a {fmt} file ends in {SUFFIXES[fmt]}; name it so")
    if not out.parent.is_dir():
        raise ExportError(f"--out {out}: the folder {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise ExportError(f"--out {out}: the folder {out.parent} is not writable")
    for module in RUNTIMES[fmt]:
        try:
            importlib.import_module(module)
        except ImportError:
            raise ExportError(
                f"--format {fmt} needs the Python package {module!r}, which is not installed: "
                f"{INSTALL}"
            ) from None
    if fmt in ("litert", "onnx"):
        import keras

        if keras.backend.backend() != "tensorflow":
            raise ExportError(
                f"--format {fmt} converts the Keras model with TensorFlow, but Keras runs on "
                f"{keras.backend.backend()}; set KERAS_BACKEND=tensorflow"
            )
    return out


def _export(
    loaded: evaluate.Loaded,
    *,
    fmt: str,
    out: pathlib.Path,
    quantize: str | None,
    train_split: str,
    check_examples: int,
) -> dict:
    """Writes, checks and moves into place; prints what was written and how it compared."""
    config = loaded.config
    runtime.enable_compilation_cache(config.compilation_cache)
    metadata = _metadata(loaded, fmt, quantize)
    representative = None
    if quantize is not None:
        representative = _images(
            input_pipeline.load_split(config.dataset, train_split, data_dir=config.data_dir),
            config,
            REPRESENTATIVE_EXAMPLES,
            shuffle_seed=config.seed,  # a sample of the whole split, not its first digits
        )
        metadata["quantization"]["calibration"] = (
            f"{len(representative)} digits of {config.dataset} {train_split}"
        )
    sidecar = out.with_name(out.name + SIDECAR_SUFFIX)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as temporary:
        path = pathlib.Path(temporary, out.name)
        written = WRITERS[fmt](loaded.model, path, metadata, representative)
        check = _check(RUNNERS[fmt](path), loaded, quantize, check_examples)
        summary = {**metadata, **written, "bytes": path.stat().st_size, "check": check}
        pathlib.Path(temporary, sidecar.name).write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(pathlib.Path(temporary, sidecar.name), sidecar)
        os.replace(path, out)
    _report(out, sidecar, summary)
    return summary


def _metadata(loaded: evaluate.Loaded, fmt: str, quantize: str | None) -> dict:
    """What a user of the file needs to feed it and read it (the sidecar, and ONNX's metadata)."""
    config, model = loaded.config, loaded.model
    size = model.image_size
    if model.adapter is not None:
        shape = [None, DIGIT_SIZE, DIGIT_SIZE, 1]
        values = (
            f"gray {DIGIT_SIZE}x{DIGIT_SIZE} digits as x / 255 (uint8 to [0, 1]), white on black "
            f"as in MNIST; the model upsamples them to {size}x{size} itself"
        )
    else:
        shape = [None, size, size, 3]
        values = (
            f"RGB in [-1, 1]: a {DIGIT_SIZE}x{DIGIT_SIZE} gray digit (uint8, white on black as in "
            f"MNIST) copied to 3 channels, resized to {size}x{size} bilinearly (half-pixel "
            "centres, no antialiasing: tf.image.resize's default), then x / 127.5 - 1 "
            "(MobileNetV2's preprocess_input)"
        )
    num_classes = model.head.out_features
    return {
        "format": fmt,
        "model": config.model,
        "source": loaded.description,
        "input": {"shape": shape, "dtype": "float32", "layout": "NHWC", "values": values},
        "output": {
            "shape": [None, num_classes],
            "dtype": "float32",
            "values": "softmax probabilities; column i is class i",
        },
        # The label index is the class; MNIST's label i is the digit i.
        "classes": [str(i) for i in range(num_classes)],
        "quantization": (
            None
            if quantize is None
            else {"scheme": f"{quantize} weights and activations, float32 input and output"}
        ),
    }


# ----------------------------------------------------------------------------------------------------
# The four writers: (model, path, metadata, representative digits or None) -> what the sidecar adds.


def _write_keras(model: TransferClassifier, path: pathlib.Path, metadata: dict, _) -> dict:
    keras_classifier.keras_from_classifier(model).save(path)
    return {}


def _write_litert(
    model: TransferClassifier,
    path: pathlib.Path,
    metadata: dict,
    representative: np.ndarray | None,
) -> dict:
    import tensorflow as tf

    options: dict[str, Any] = {"target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]}}
    if representative is not None:
        options = {
            "target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
            "optimizations": [tf.lite.Optimize.DEFAULT],
            "representative_dataset": lambda: ([image[None]] for image in representative),
        }
    keras_model = keras_classifier.keras_from_classifier(model)
    with _quiet_converters():
        keras_model.export(str(path), format="litert", verbose=False, **options)
    return {"ops": litert_ops(path)}


def litert_ops(path: str | os.PathLike) -> dict[str, int]:
    """How often each operator occurs in a LiteRT model, read from the file's own schema."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(pathlib.Path(path).read_bytes(), 0)
    names = {code: name for name, code in vars(schema.BuiltinOperator).items() if name.isupper()}
    counts: collections.Counter[str] = collections.Counter()
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        for o in range(subgraph.OperatorsLength()):
            code = model.OperatorCodes(subgraph.Operators(o).OpcodeIndex())
            # Files keep codes below 127 in the old byte field, newer ones in both: take the larger.
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            counts[names.get(builtin, f"code {builtin}")] += 1
    return dict(counts.most_common())


def _write_onnx(model: TransferClassifier, path: pathlib.Path, metadata: dict, _) -> dict:
    import onnx
    import tensorflow as tf

    keras_model = keras_classifier.keras_from_classifier(model)
    (inputs,) = keras_model.inputs
    # Named and with a free batch: Keras infers a signature only from a model it has called.
    signature = [tf.TensorSpec((None, *inputs.shape[1:]), tf.float32, name=inputs.name)]
    with _quiet_converters():
        keras_model.export(str(path), format="onnx", verbose=False, input_signature=signature)
    proto = onnx.load(path)
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"  # tf2onnx names it unk__N
    onnx.helper.set_model_props(proto, {"mnist_flax": json.dumps(metadata)})
    onnx.checker.check_model(proto)
    onnx.save(proto, path)
    ops = onnx_ops(path)
    foreign = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise ExportError(f"the ONNX model uses operators outside the standard set ({foreign})")
    opset = max(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))
    return {"ops": ops, "opset": opset}


def onnx_ops(path: str | os.PathLike) -> dict[str, int]:
    """How often each operator occurs in an ONNX model's graph."""
    import onnx

    graph = onnx.load(path).graph
    return dict(collections.Counter(node.op_type for node in graph.node).most_common())


def _write_stablehlo(model: TransferClassifier, path: pathlib.Path, metadata: dict, _) -> dict:
    # One set of arrays, two ways to compute: the CPU path's forms on the CPU, XLA's convolutions
    # on accelerators. The whole batch at once: a symbolic batch cannot be cut into chunks.
    cpu_graph, state = nnx.split(with_computation(model, conv_impl="cpu", batch_chunk=0))
    xla_graph, _ = nnx.split(with_computation(model, conv_impl="xla", batch_chunk=0))

    def predict(images: jax.Array) -> jax.Array:
        def computed(graphdef):
            return lambda images: jax.nn.softmax(nnx.merge(graphdef, state)(images))

        return jax.lax.platform_dependent(
            images, cpu=computed(cpu_graph), default=computed(xla_graph)
        )

    (batch,) = jax.export.symbolic_shape("batch")
    shape = (batch, *metadata["input"]["shape"][1:])
    exported = jax.export.export(jax.jit(predict), platforms=STABLEHLO_PLATFORMS)(
        jax.ShapeDtypeStruct(shape, np.float32)
    )
    path.write_bytes(exported.serialize())
    return {
        "platforms": list(exported.platforms),
        "calling_convention_version": exported.calling_convention_version,
    }


WRITERS = {
    "keras": _write_keras,
    "litert": _write_litert,
    "onnx": _write_onnx,
    "stablehlo": _write_stablehlo,
}


class _quiet_converters:
    """tf2onnx logs every step at INFO and Keras' tf2onnx shim warns about NumPy 2; neither helps."""

    def __enter__(self):
        import logging

        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore", FutureWarning)
        self._logger = logging.getLogger("tf2onnx")
        self._level = self._logger.level
        self._logger.setLevel(logging.WARNING)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)
        return self._warnings.__exit__(*exc)


# ----------------------------------------------------------------------------------------------------
# Reading the file back with its own runtime: path -> (float32 images -> probabilities).

Runner = Callable[[np.ndarray], np.ndarray]


def _run_keras(path: pathlib.Path) -> Runner:
    import keras

    keras_model = keras.models.load_model(path, compile=False)
    return lambda images: np.asarray(keras_model(images, training=False))


def _run_litert(path: pathlib.Path) -> Runner:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    (given,) = interpreter.get_input_details()
    (result,) = interpreter.get_output_details()

    def run(images: np.ndarray) -> np.ndarray:
        # The converted batch dimension is dynamic (shape_signature -1): size it to this batch.
        interpreter.resize_tensor_input(given["index"], images.shape, strict=True)
        interpreter.allocate_tensors()
        interpreter.set_tensor(given["index"], images)
        interpreter.invoke()
        return interpreter.get_tensor(result["index"]).copy()

    return run


def _run_onnx(path: pathlib.Path) -> Runner:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})[0]


def _run_stablehlo(path: pathlib.Path) -> Runner:
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    return lambda images: np.asarray(exported.call(images))


RUNNERS = {
    "keras": _run_keras,
    "litert": _run_litert,
    "onnx": _run_onnx,
    "stablehlo": _run_stablehlo,
}


# ----------------------------------------------------------------------------------------------------
# The check.


def with_computation(
    model: TransferClassifier, *, conv_impl: str, batch_chunk: int
) -> TransferClassifier:
    """A copy of `model` sharing its arrays that computes in float32, its convolutions by
    `conv_impl` (`convolutions.py`), `batch_chunk` images at a time (0: the whole batch).

    What the exports trace: the same parameters whatever `--dtype`, `--conv-impl`
    and chunking the run used, so that every format computes the same float32 function.
    """
    copy = nnx.clone(model)
    for _, module in nnx.iter_modules(copy):
        if isinstance(module, (MobileNetV2, Conv2D, DepthwiseConv2D, NotebookAdapter)):
            module.conv_impl = conv_impl
        if isinstance(module, (MobileNetV2, Conv2D, DepthwiseConv2D)):
            module.dtype = None  # the input's: float32
    copy.batch_chunk = batch_chunk
    return copy


def _batches(split: input_pipeline.Split, config: TrainConfig, shuffle_seed: int | None):
    """The split as the exported model takes it: float32 images (pipeline) or [0, 1] digits."""
    batches = input_pipeline.make_batches(
        split,
        batch_size=config.batch_size,
        image_size=config.image_size,
        shuffle_seed=shuffle_seed,
        resize="none" if config.model == "notebook" else "host",
    )
    return batches.as_numpy_iterator()


def _images(
    split: input_pipeline.Split, config: TrainConfig, count: int, shuffle_seed: int | None
) -> np.ndarray:
    """The first `count` real (unpadded) images of the split's batches."""
    images = []
    for batch in _batches(split, config, shuffle_seed):
        images.append(batch["image"][batch["mask"]])
        if sum(map(len, images)) >= count:
            break
    return np.concatenate(images)[:count]


def _check(run: Runner, loaded: evaluate.Loaded, quantize: str | None, examples: int) -> dict:
    """The exported model against the JAX model on the test split's first `examples` digits (0:
    all), batch by batch at the run's batch size (the last one smaller) and once at batch 1."""
    config, split = loaded.config, loaded.split
    # The JAX model as evaluate computes it, in float32 whatever the run's --dtype.
    graphdef, state = nnx.split(
        with_computation(
            loaded.model,
            conv_impl=config.conv_impl,
            batch_chunk=loaded.model.batch_chunk,
        )
    )
    probabilities = jax.jit(
        lambda state, images: jax.nn.softmax(nnx.merge(graphdef, state)(images))
    )
    wanted = examples or split.num_examples
    count, difference, agree, correct, correct_jax = 0, 0.0, 0, 0, 0
    first, sizes = None, {1}
    for batch in _batches(split, config, shuffle_seed=None):
        # The JAX model on the padded batch (one compiled shape), the export on its real rows.
        keep = np.flatnonzero(batch["mask"])[: wanted - count]
        theirs = np.asarray(probabilities(state, batch["image"]))[keep]
        images, labels = batch["image"][keep], batch["label"][keep]
        ours = run(images)
        sizes.add(len(images))
        if ours.shape != theirs.shape:
            raise ExportError(
                f"the exported model gives shape {ours.shape} for {len(images)} images, the JAX "
                f"model {theirs.shape}"
            )
        if first is None:
            first = (images[:1], theirs[:1])
        difference = max(difference, float(np.abs(ours - theirs).max()))
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        correct += int((ours.argmax(-1) == labels).sum())
        correct_jax += int((theirs.argmax(-1) == labels).sum())
        count += len(images)
        if count >= wanted:
            break
    # Batch 1: the batch dimension is dynamic in every format.
    difference = max(difference, float(np.abs(run(first[0]) - first[1]).max()))
    check = {
        "examples": count,
        "split": f"{config.dataset} {config.test_split}",
        "batch_sizes": sorted(sizes),
        "max_abs_difference": difference,
        "accuracy": correct / count,
        "jax_accuracy": correct_jax / count,
        "same_class": agree,
    }
    if quantize is None and difference > FLOAT32_ATOL:
        raise ExportError(
            f"the exported model's probabilities differ from the JAX model's by up to "
            f"{difference:.2g} on {count} digits of {check['split']}, more than {FLOAT32_ATOL:g}; "
            "nothing was written"
        )
    if quantize is not None and agree < INT8_MIN_AGREEMENT * count:
        raise ExportError(
            f"the {quantize} model predicts the JAX model's class for only {agree} of {count} "
            f"digits of {check['split']} (at least {INT8_MIN_AGREEMENT:.0%} needed); nothing was "
            "written"
        )
    return check


def _report(out: pathlib.Path, sidecar: pathlib.Path, summary: dict) -> None:
    check = summary["check"]
    quantized = summary["quantization"] is not None
    bound = "" if quantized else f" (float32: at most {FLOAT32_ATOL:g})"
    drop = 100 * (check["jax_accuracy"] - check["accuracy"])
    lines = [
        f"wrote {out} ({summary['bytes'] / 1e6:.1f} MB, {summary['format']}"
        f"{' int8' if quantized else ''}): {summary['source']}",
        f"checked on {check['examples']} digits of {check['split']}, batch sizes "
        f"{', '.join(map(str, check['batch_sizes']))}: max |p - p_jax| "
        f"{check['max_abs_difference']:.2g}{bound}; accuracy {check['accuracy']:.2%}, the JAX "
        f"model's {check['jax_accuracy']:.2%}"
        + (f" ({drop:.2f} points lost to int8)" if quantized else "")
        + f"; the JAX model's class for {check['same_class']}/{check['examples']}",
    ]
    if "ops" in summary:
        lines.append("operators: " + ", ".join(f"{op} {n}" for op, n in summary["ops"].items()))
    lines.append(f"what it takes and gives, and this check: {sidecar}")
    print("\n".join(lines))
