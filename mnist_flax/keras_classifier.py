"""Whole Keras classifiers <-> `TransferClassifier`: `mnist-flax convert --keras-model` and the way back.

Converts the Keras notebook's model and the pipeline model (a live model, or a `.keras` / full-model
`.h5` file through `load_keras_model`), trained head and adapter included. The backbone's arrays go
through `convert.py`'s name map; the adapter's Conv2D and the head's Dense are copied here.
`convert.save_classifier` then writes it as a directory that `--weights DIR` continues or evaluates.
`keras_from_classifier` builds the Keras model of either kind back from a `TransferClassifier`
through the same maps (`mnist-flax export --format keras`, and what LiteRT and ONNX are converted
from), so converting a Keras classifier and exporting it gives its arrays back bit for bit. Only
the paths that take or make a live Keras model import Keras.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mnist_flax import convert
from mnist_flax.config import DIGIT_SIZE, MIN_IMAGE_SIZE
from mnist_flax.mobilenet_v2 import MobileNetV2
from mnist_flax.model import NotebookAdapter, TransferClassifier

# The classifier's own layers (the adapter's Conv2D, the head's Dense): Keras variable -> NNX variable.
_KERAS_TO_NNX_DENSE_OR_CONV = {"kernel": "kernel", "bias": "bias"}
# The head's activations we convert: the model returns logits and the loss applies the softmax.
HEAD_ACTIVATIONS = ("softmax", "linear")
KERAS_MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
# What `classifier_from_keras` converts, for the error messages.
_CLASSIFIER_SHAPES = (
    "the notebook's [UpSampling2D, Conv2D(3, relu)] or nothing, then a nested "
    "MobileNetV2(include_top=False), GlobalAveragePooling2D, Dense"
)


def load_keras_model(path: str | os.PathLike) -> Any:
    """A whole Keras model from a Keras 3 `.keras` file or a legacy full-model `.h5` (`model.save`).

    Imports Keras (and so TensorFlow): only this path needs it. Any file Keras cannot load is a
    one-line `WeightsError`.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise convert.WeightsError(f"Keras model file {path} does not exist")
    if path.name.endswith(".weights.h5"):
        raise convert.WeightsError(
            f"{path} holds weights only (model.save_weights), not a model; pass a file written by "
            "model.save('model.keras') or model.save('model.h5')"
        )
    if path.suffix not in KERAS_MODEL_SUFFIXES:
        raise convert.WeightsError(
            f"{path} is not a Keras model file ({', '.join(KERAS_MODEL_SUFFIXES)}); pass a file "
            "written by model.save('model.keras') or model.save('model.h5')"
        )
    import keras  # heavy (TensorFlow): only converting a Keras model file needs it

    try:
        return keras.models.load_model(path, compile=False)
    except Exception as err:  # Keras raises ValueError, OSError, zipfile and h5py errors alike
        reason = " ".join(str(err).split())[:300]
        raise convert.WeightsError(
            f"{path} cannot be loaded as a Keras model ({type(err).__name__}: {reason}); pass a "
            "file written by model.save('model.keras') or model.save('model.h5')"
        ) from err


def classifier_from_keras(keras_model: Any) -> TransferClassifier:
    """The `TransferClassifier` computing what a live Keras classifier computes, its trained weights copied.

    Converts the Keras notebook's model, `Sequential([InputLayer((28, 28, 1)), UpSampling2D(f),
    Conv2D(3, (3, 3), padding="same", activation="relu"), MobileNetV2(include_top=False),
    GlobalAveragePooling2D(), Dense(n, activation="softmax")])`, into the "notebook" model
    (`NotebookAdapter(f)`, image size 28 f), and the same without UpSampling2D and Conv2D, input
    (S, S, 3), into the "pipeline" model; Sequential or Functional, the backbone nested as one
    layer, pooled by its own `pooling="avg"` or by the GlobalAveragePooling2D after it. The
    structure is read from the layer types, alpha from the backbone's array shapes. The head
    returns logits: Keras' softmax is the one our loss and `predict` apply. Anything else is a
    one-line `WeightsError` naming the layer.
    """
    description = f"keras.Model {getattr(keras_model, 'name', keras_model)!r}"
    parts = _classifier_parts(keras_model, description)
    arrays = convert.read_keras_model(parts["backbone"])
    alpha = _backbone_alpha(parts["backbone"], arrays, description)
    upsampling = parts["upsampling"]

    def build() -> TransferClassifier:
        backbone = MobileNetV2(alpha=alpha, include_top=False, pooling="avg", rngs=nnx.Rngs(0))
        adapter = None if upsampling is None else NotebookAdapter(parts["factor"], rngs=nnx.Rngs(0))
        return TransferClassifier(
            backbone,
            parts["classes"],
            image_size=parts["image_size"],
            adapter=adapter,
            rngs=nnx.Rngs(0),
        )

    model = nnx.eval_shape(build)
    convert.copy_keras_weights(arrays, model.backbone, description)
    if model.adapter is not None:
        _copy_dense_or_conv(parts["conv"], model.adapter.conv, description)
    _copy_dense_or_conv(parts["dense"], model.head, description)
    abstract = [
        "/".join(map(str, path))
        for path, value in nnx.to_flat_state(nnx.state(model))
        if isinstance(value.get_value(), jax.ShapeDtypeStruct)
    ]
    if abstract:  # a variable the name map does not cover: a bug here, not in the user's model
        raise AssertionError(f"{description}: no Keras array was copied into {', '.join(abstract)}")
    return model


def _classifier_parts(keras_model: Any, description: str) -> dict[str, Any]:
    """The classifier's layers by role, checked one by one, with its input geometry."""
    import keras  # the model is a live Keras model: Keras is loaded already

    if not isinstance(keras_model, keras.Model):
        raise convert.WeightsError(
            f"{description} is not a keras.Model; pass a Keras model or its file"
        )
    if isinstance(keras_model, keras.Sequential):
        operations = list(keras_model.layers)
    elif hasattr(keras_model, "operations"):
        # A Functional model: `operations` also holds plain ops (x / 127.5 - 1, ...), which are not
        # layers but would change what it computes.
        operations = list(keras_model.operations)
    else:
        raise convert.WeightsError(
            f"{description} is a subclassed keras.Model, whose layers' order is not known; build "
            f"it as a Sequential or Functional model ({_CLASSIFIER_SHAPES})"
        )
    layers = [op for op in operations if not isinstance(op, keras.layers.InputLayer)]

    def unexpected(layer: Any, expected: str) -> convert.WeightsError:
        return convert.WeightsError(
            f"{description}: layer {layer.name!r} ({type(layer).__name__}) where {expected} "
            f"should be; the converter takes {_CLASSIFIER_SHAPES}"
        )

    parts: dict[str, Any] = {"upsampling": None, "conv": None}
    queue = list(layers)
    if queue and isinstance(queue[0], keras.layers.UpSampling2D):
        parts["upsampling"] = queue.pop(0)
        if not queue or not isinstance(queue[0], keras.layers.Conv2D):
            raise convert.WeightsError(
                f"{description}: UpSampling2D {parts['upsampling'].name!r} is not followed by the "
                "notebook's Conv2D(3, (3, 3), padding='same', activation='relu')"
            )
        parts["conv"] = queue.pop(0)
    if not queue:
        raise convert.WeightsError(
            f"{description} has no MobileNetV2 backbone; it must be {_CLASSIFIER_SHAPES}"
        )
    backbone = queue.pop(0)
    if not hasattr(backbone, "layers") or convert.find_mobilenet(backbone) is not backbone:
        raise unexpected(backbone, "the nested MobileNetV2 backbone")
    parts["backbone"] = backbone
    backbone_names = [layer.name for layer in backbone.layers]
    if "predictions" in backbone_names:
        raise convert.WeightsError(
            f"{description}: backbone {backbone.name!r} has its ImageNet top (include_top=True); "
            "the converter takes MobileNetV2(include_top=False) followed by the classifier's Dense"
        )
    last = backbone.layers[-1]
    pooled = isinstance(last, keras.layers.GlobalAveragePooling2D)
    if not pooled and last.name != "out_relu":
        raise convert.WeightsError(
            f"{description}: backbone {backbone.name!r} ends in {last.name!r} "
            f"({type(last).__name__}); only average pooling converts (pooling=None or 'avg')"
        )
    if not pooled:
        if not queue or not isinstance(queue[0], keras.layers.GlobalAveragePooling2D):
            raise (
                unexpected(queue[0], "GlobalAveragePooling2D")
                if queue
                else convert.WeightsError(
                    f"{description} ends at the backbone: no pooling and no Dense head"
                )
            )
        _check_config(
            queue.pop(0), {"data_format": "channels_last", "keepdims": False}, description
        )
    if not queue:
        raise convert.WeightsError(f"{description} has no Dense head after the backbone's pooling")
    dense = queue.pop(0)
    if not isinstance(dense, keras.layers.Dense):
        raise unexpected(dense, "the Dense head")
    activation = dense.get_config()["activation"]
    if activation not in HEAD_ACTIVATIONS:
        raise convert.WeightsError(
            f"{description}: Dense head {dense.name!r} has activation {activation!r}; only "
            f"{' or '.join(HEAD_ACTIVATIONS)} (logits) convert"
        )
    _check_config(dense, {"use_bias": True}, description)
    if queue:
        raise unexpected(queue[0], "nothing (the Dense head is the last layer)")
    parts["dense"] = dense
    parts["classes"] = int(dense.get_config()["units"])
    parts.update(_input_geometry(keras_model, parts, description))
    return parts


def _check_config(layer: Any, expected: Mapping[str, Any], description: str) -> None:
    """Every `expected` setting of the layer's `get_config()` (tuples compared as lists)."""
    config = layer.get_config()
    for key, value in expected.items():
        got = config.get(key)
        if (list(got) if isinstance(got, (tuple, list)) else got) != (
            list(value) if isinstance(value, tuple) else value
        ):
            raise convert.WeightsError(
                f"{description}: layer {layer.name!r} ({type(layer).__name__}) has {key}={got!r}; "
                f"the converter needs {key}={value!r}"
            )


def _input_geometry(keras_model: Any, parts: dict[str, Any], description: str) -> dict[str, int]:
    """image_size (and the notebook's upsampling factor) from the model's input and UpSampling2D."""
    try:
        shape = tuple(keras_model.inputs[0].shape)[1:]
    except (AttributeError, IndexError, TypeError, ValueError):
        shape = None
    if shape is None or None in shape:
        raise convert.WeightsError(
            f"{description} has no fixed input shape ({shape}); build it with an input such as "
            "keras.Input((28, 28, 1)) before saving"
        )
    if parts["upsampling"] is None:
        if len(shape) != 3 or shape[0] != shape[1] or shape[2] != 3 or shape[0] < MIN_IMAGE_SIZE:
            raise convert.WeightsError(
                f"{description}: the pipeline model takes square RGB images of at least "
                f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} (S, S, 3); this one takes {shape}"
            )
        return {"image_size": int(shape[0])}
    upsampling, conv = parts["upsampling"], parts["conv"]
    config = upsampling.get_config()
    size = tuple(config["size"])
    if len(set(size)) != 1:
        raise convert.WeightsError(
            f"{description}: UpSampling2D {upsampling.name!r} has size {size}; only a square factor "
            "(f, f) converts"
        )
    _check_config(
        upsampling, {"interpolation": "nearest", "data_format": "channels_last"}, description
    )
    _check_config(
        conv,
        {
            "filters": 3,
            "kernel_size": (3, 3),
            "strides": (1, 1),
            "padding": "same",
            "dilation_rate": (1, 1),
            "groups": 1,
            "activation": "relu",
            "use_bias": True,
            "data_format": "channels_last",
        },
        description,
    )
    if shape != (DIGIT_SIZE, DIGIT_SIZE, 1):
        raise convert.WeightsError(
            f"{description}: the notebook model takes {DIGIT_SIZE}x{DIGIT_SIZE}x1 digits "
            f"(InputLayer(({DIGIT_SIZE}, {DIGIT_SIZE}, 1))); this one takes {shape}"
        )
    factor = int(size[0])
    if DIGIT_SIZE * factor < MIN_IMAGE_SIZE:
        raise convert.WeightsError(
            f"{description}: UpSampling2D {upsampling.name!r} by {factor} gives "
            f"{DIGIT_SIZE * factor} px, below MobileNetV2's {MIN_IMAGE_SIZE}"
        )
    return {"image_size": DIGIT_SIZE * factor, "factor": factor}


def _backbone_alpha(backbone: Any, arrays: convert.KerasArrays, description: str) -> float:
    """The width multiplier whose MobileNetV2 has exactly these arrays' shapes.

    Keras names the model `mobilenetv2_<alpha>_<rows>`; that alpha is tried first, then every alpha
    Keras ships (a renamed model still converts). Shapes decide, so a wrong name cannot mislead.
    """
    candidates = list(convert.IMAGENET_ALPHAS)
    named = re.fullmatch(r"mobilenetv2_(\d+\.\d+)_\w+", str(backbone.name))
    if named:
        candidates.insert(0, float(named.group(1)))
    shapes = {
        (layer, name): tuple(array.shape)
        for layer, variables in arrays.items()
        for name, array in variables.items()
    }
    for alpha in candidates:
        abstract = nnx.eval_shape(
            lambda alpha=alpha: MobileNetV2(alpha=alpha, include_top=False, rngs=nnx.Rngs(0))
        )
        expected = {
            (layer, keras_name): tuple(
                getattr(module, convert.KERAS_TO_NNX_VARIABLE[keras_name]).shape
            )
            for layer, module in abstract.keras_layers().items()
            for keras_name in convert.KERAS_VARIABLES[type(module)]
        }
        if expected == shapes:
            return alpha
    raise convert.WeightsError(
        f"{description}: backbone {backbone.name!r} is not a MobileNetV2 (include_top=False) of any "
        f"alpha Keras ships ({', '.join(map(str, convert.IMAGENET_ALPHAS))}): its arrays' names or shapes differ"
    )


def _copy_dense_or_conv(layer: Any, module: Any, description: str) -> None:
    """A Keras Dense/Conv2D's kernel and bias into an nnx.Linear/nnx.Conv (same layouts), shapes checked."""
    arrays = {
        convert.variable_name(weight.path): np.asarray(weight.numpy()) for weight in layer.weights
    }
    unvisited = set(arrays)
    for keras_name, nnx_name in _KERAS_TO_NNX_DENSE_OR_CONV.items():
        if keras_name not in arrays:
            raise convert.WeightsError(
                f"{description}: layer {layer.name!r} has no {keras_name!r} array "
                f"(it has {sorted(arrays)})"
            )
        target = getattr(module, nnx_name)
        if arrays[keras_name].shape != target.shape:
            raise convert.WeightsError(
                f"{description}: layer {layer.name!r} {keras_name} has shape "
                f"{arrays[keras_name].shape}, the converted model needs {target.shape}"
            )
        target.set_value(jnp.asarray(arrays[keras_name], dtype=target.dtype))
        unvisited.remove(keras_name)
    if unvisited:
        raise convert.WeightsError(
            f"{description}: layer {layer.name!r} has arrays the converter does not know: "
            f"{', '.join(sorted(unvisited))}"
        )


# ----------------------------------------------------------------------------------------------------
# The way back: a `TransferClassifier` as the Keras model of its kind.

# The Keras model's input and its own layers, by name (the backbone keeps Keras' MobileNetV2 names).
KERAS_INPUT_NAMES = {"pipeline": "images", "notebook": "digits"}


def keras_from_classifier(model: TransferClassifier) -> Any:
    """The Keras classifier computing what `model` computes, its arrays copied bit for bit.

    The pipeline model: `keras.Input((S, S, 3), name="images")` (RGB in [-1, 1]) ->
    `MobileNetV2(alpha, include_top=False)` -> `GlobalAveragePooling2D` -> `Dense(n, "softmax")`;
    the notebook model: `keras.Input((28, 28, 1), name="digits")` (in [0, 1]) -> `UpSampling2D(f)`
    -> `Conv2D(3, (3, 3), "same", "relu")` -> the same backbone and head. Functional models,
    taking any batch size, the backbone frozen as in the tutorial; `classifier_from_keras` of the
    result gives `model`'s arrays back. The output is the softmax probabilities (ours computes
    logits and applies the softmax in the loss and in `predict`).
    """
    import keras  # heavy (TensorFlow): only the Keras-based exports need it

    kind = convert.classifier_kind(model)
    description = f"the {kind} classifier"
    size = model.image_size
    shape = (DIGIT_SIZE, DIGIT_SIZE, 1) if model.adapter is not None else (size, size, 3)
    inputs = keras.Input(shape, name=KERAS_INPUT_NAMES[kind])
    x = inputs
    if model.adapter is not None:
        factor = model.adapter.factor
        x = keras.layers.UpSampling2D((factor, factor), name="upsampling")(x)
        adapter = keras.layers.Conv2D(3, (3, 3), padding="same", activation="relu", name="adapter")
        x = adapter(x)
    backbone = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=model.backbone.alpha, include_top=False, weights=None
    )
    backbone.trainable = False
    x = keras.layers.GlobalAveragePooling2D(name="pooling")(backbone(x, training=False))
    head = keras.layers.Dense(model.head.out_features, activation="softmax", name="head")
    keras_model = keras.Model(inputs, head(x), name=f"mnist_{kind}")
    convert.assign_keras_weights(convert.keras_arrays(model.backbone), backbone, description)
    if model.adapter is not None:
        _assign_dense_or_conv(model.adapter.conv, adapter, description)
    _assign_dense_or_conv(model.head, head, description)
    return keras_model


def _assign_dense_or_conv(module: Any, layer: Any, description: str) -> None:
    """An nnx.Linear/nnx.Conv's kernel and bias into a Keras Dense/Conv2D: `_copy_dense_or_conv` backwards."""
    weights = {convert.variable_name(weight.path): weight for weight in layer.weights}
    if sorted(weights) != sorted(_KERAS_TO_NNX_DENSE_OR_CONV):
        raise AssertionError(f"{description}: Keras layer {layer.name!r} has {sorted(weights)}")
    for keras_name, nnx_name in _KERAS_TO_NNX_DENSE_OR_CONV.items():
        array = np.asarray(getattr(module, nnx_name).get_value())
        if tuple(weights[keras_name].shape) != array.shape:
            raise AssertionError(
                f"{description}: Keras layer {layer.name!r} {keras_name} has shape "
                f"{tuple(weights[keras_name].shape)}, ours {array.shape}"
            )
        weights[keras_name].assign(array)
