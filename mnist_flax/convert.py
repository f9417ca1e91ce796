"""Keras MobileNetV2 weights -> the NNX `MobileNetV2`, and the converted model's own on-disk format.

This module owns reading weights (Keras H5 files, a live `keras.Model`, the official "imagenet" files in the
Keras cache or from Keras' download URL), copying them into the model through an explicit Keras-name ->
NNX-path map with every shape checked, and saving/loading the converted model as an Orbax checkpoint plus
a small JSON config (`save_converted` / a directory as `source`), which needs no TensorFlow to load.

Weight sources understood:
- Legacy Keras H5 weights, the layout `keras.applications` downloads: a root attribute `layer_names`, one
  group per layer with a `weight_names` attribute. Keras 2 names arrays `Conv1/kernel:0` and depthwise
  kernels `depthwise_kernel`; Keras 3 writes `Conv1/kernel` and `kernel`. Both are read.
- A legacy full-model H5 (`model.save("m.h5")`): the same layout under a `model_weights` group.
- A Keras 3 `.weights.h5` (`model.save_weights`): groups `layers/<auto name>/vars` holding the arrays
  by position and the layer's real name as an attribute.
H5 files are read with h5py only: TensorFlow is never imported on that path.

The same map, read the other way (`keras_arrays`, `assign_keras_weights`), fills a Keras
MobileNetV2 from the model: `mnist-flax export --format keras` (`keras_classifier.py`).

The same directory format holds a whole classifier (`save_classifier` / `restore_classifier`, backbone,
adapter and head), which `--weights DIR` continues or evaluates; converting a whole trained Keras
classifier into one is `keras_classifier.py`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mnist_flax.mobilenet_v2 import Conv2D, DepthwiseConv2D, InferenceBatchNorm, MobileNetV2

KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
IMAGENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
IMAGENET_ROWS = (96, 128, 160, 192, 224)
CONFIG_FILE = "config.json"
STATE_DIR = "state"

# Keras variable name -> NNX variable name. Keras 2 calls the depthwise kernel `depthwise_kernel`.
KERAS_TO_NNX_VARIABLE = {
    "kernel": "kernel",
    "depthwise_kernel": "kernel",
    "bias": "bias",
    "gamma": "scale",
    "beta": "bias",
    "moving_mean": "mean",
    "moving_variance": "var",
}
# The Keras variables of each layer kind, in Keras' own order (the order `.weights.h5` stores them in).
KERAS_VARIABLES = {
    Conv2D: ("kernel",),
    DepthwiseConv2D: ("kernel",),
    InferenceBatchNorm: ("gamma", "beta", "moving_mean", "moving_variance"),
    nnx.Linear: ("kernel", "bias"),
}

# {Keras layer name: {Keras variable name: array}}, for layers that have weights.
KerasArrays = dict[str, dict[str, np.ndarray]]


class WeightsError(ValueError):
    """Weights that cannot be used: unreadable, not Keras, or not matching the requested model."""


@dataclasses.dataclass(frozen=True)
class ConvertedConfig:
    """What `save_converted` records next to the Orbax state: enough to rebuild the module."""

    alpha: float
    include_top: bool
    classes: int
    source: str


# ----------------------------------------------------------------------------------------------------
# The public entry point.


def mobilenet_v2_from_keras(
    source: str | os.PathLike | Any,
    *,
    alpha: float | None = None,
    include_top: bool | None = None,
    classes: int | None = None,
    classifier_activation: str | None = "softmax",
    pooling: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
    conv_impl: str = "auto",
    dtype: jnp.dtype | None = None,
) -> MobileNetV2:
    """A `MobileNetV2` holding the weights of `source`; it computes what Keras computes with `training=False`.

    source: "imagenet" (the official Keras file for alpha, include_top and the input rows), a Keras H5
        weights file, a directory written by `save_converted`, or a live `keras.Model` (a MobileNetV2, or a
        model with one nested inside).
    alpha, include_top, classes: the architecture; must match the weights (a mismatch names the layer).
        None means: what a `save_converted` directory recorded, else Keras' defaults for a backbone
        (1.0, False, 1000).
    input_shape: (rows, cols, 3); only picks which "imagenet" file to use, as Keras does (rows in 96..224
        and square, else the 224 file). The model itself accepts any size >= 32.
    classifier_activation, pooling, conv_impl, dtype: see `MobileNetV2`.
    """
    options = dict(
        classifier_activation=classifier_activation,
        pooling=pooling,
        conv_impl=conv_impl,
        dtype=dtype,
    )
    if isinstance(source, (str, os.PathLike)) and pathlib.Path(source).is_dir():
        return load_converted(
            source, alpha=alpha, include_top=include_top, classes=classes, **options
        )
    alpha = 1.0 if alpha is None else alpha
    include_top = bool(include_top)
    classes = 1000 if classes is None else classes
    if isinstance(source, (str, os.PathLike)):
        if str(source) == "imagenet":
            rows = imagenet_rows(input_shape)
            path = imagenet_weights_path(alpha, include_top, rows)
            arrays, description = read_keras_h5(path), str(path)
        else:
            arrays, description = read_keras_h5(source), str(source)
    elif hasattr(source, "layers") and hasattr(source, "get_layer"):
        arrays, description = read_keras_model(source), f"keras.Model {source.name!r}"
    else:
        raise WeightsError(
            f"weights source {source!r} is neither 'imagenet', a path nor a keras.Model; pass one of those"
        )
    model = nnx.eval_shape(
        lambda: MobileNetV2(
            alpha=alpha, include_top=include_top, classes=classes, rngs=nnx.Rngs(0), **options
        )
    )
    copy_keras_weights(arrays, model, description)
    return model


# ----------------------------------------------------------------------------------------------------
# Copying: the explicit name map, with every shape checked and every array used exactly once.


def copy_keras_weights(arrays: KerasArrays, model: MobileNetV2, description: str) -> None:
    """Put each Keras array into the NNX variable `model.keras_layers()` maps its layer to.

    Like `vit_copy_weights` in the Flax ViT example: every target must be found with the right shape,
    and the set of source arrays not copied must end up empty. Works on an abstract (`nnx.eval_shape`)
    model too: each variable is replaced by a concrete array.
    """
    unvisited = {(layer, variable) for layer, variables in arrays.items() for variable in variables}
    for layer, module in model.keras_layers().items():
        if layer not in arrays:
            raise WeightsError(
                f"{description}: no weights for layer {layer!r}; it is not a MobileNetV2 file for "
                f"alpha={model.alpha}, include_top={model.include_top} (pass the options it was saved with)"
            )
        for keras_name in KERAS_VARIABLES[type(module)]:
            if keras_name not in arrays[layer]:
                raise WeightsError(
                    f"{description}: layer {layer!r} has no {keras_name!r} array "
                    f"(it has {sorted(arrays[layer])})"
                )
            array = arrays[layer][keras_name]
            target = getattr(module, KERAS_TO_NNX_VARIABLE[keras_name])
            if array.shape != target.shape:
                raise WeightsError(
                    f"{description}: layer {layer!r} {keras_name} has shape {array.shape} but the "
                    f"alpha={model.alpha}, classes={model.classes} model needs {target.shape}; "
                    "the file is for another alpha or class count"
                )
            target.set_value(jnp.asarray(array, dtype=target.dtype))
            unvisited.remove((layer, keras_name))
    if unvisited:
        layer, variable = sorted(unvisited)[0]
        hint = " (pass include_top=True)" if layer == "predictions" else ""
        raise WeightsError(
            f"{description}: {len(unvisited)} arrays were not used, first layer {layer!r} {variable}{hint}; "
            f"the file is not a MobileNetV2 with alpha={model.alpha}, include_top={model.include_top}"
        )


# ----------------------------------------------------------------------------------------------------
# The way back: the same map read the other way, from the model into a live Keras MobileNetV2.


def keras_arrays(model: MobileNetV2) -> KerasArrays:
    """`model`'s arrays by Keras layer and variable name: what `copy_keras_weights` copied in,
    read back out through the same map (`keras_layers`, `KERAS_VARIABLES`, `KERAS_TO_NNX_VARIABLE`)."""
    return {
        layer: {
            keras_name: np.asarray(getattr(module, KERAS_TO_NNX_VARIABLE[keras_name]).get_value())
            for keras_name in KERAS_VARIABLES[type(module)]
        }
        for layer, module in model.keras_layers().items()
    }


def assign_keras_weights(arrays: KerasArrays, keras_model: Any, description: str) -> None:
    """Assigns `arrays` (`keras_arrays`) to the MobileNetV2 in a live Keras model, by name.

    The inverse of `read_keras_model`: every Keras variable must get an array of its shape and
    every array must be used, so a map that missed a layer fails here rather than leaving Keras'
    initial values in the exported model.
    """
    mobilenet = find_mobilenet(keras_model)
    if mobilenet is None:
        raise WeightsError(f"{description}: the Keras model has no layer named 'Conv1'")
    unvisited = {(layer, variable) for layer, variables in arrays.items() for variable in variables}
    for layer in mobilenet.layers:
        weights = {variable_name(w.path): w for w in layer.weights}
        for name, weight in _canonical(weights, layer.name, description).items():
            if (layer.name, name) not in unvisited:
                raise WeightsError(
                    f"{description}: Keras layer {layer.name!r} has a {name!r} variable that no "
                    "array of the model maps to (another alpha or include_top?)"
                )
            array = arrays[layer.name][name]
            if tuple(weight.shape) != array.shape:
                raise WeightsError(
                    f"{description}: Keras layer {layer.name!r} {name} has shape "
                    f"{tuple(weight.shape)}, the model's array {array.shape}"
                )
            weight.assign(array)
            unvisited.remove((layer.name, name))
    if unvisited:
        layer, variable = sorted(unvisited)[0]
        raise WeightsError(
            f"{description}: {len(unvisited)} arrays found no Keras variable, first layer "
            f"{layer!r} {variable}"
        )


# ----------------------------------------------------------------------------------------------------
# Reading weights.


def variable_name(weight_name: str) -> str:
    """'block_1_expand/kernel:0' -> 'kernel'; 'expanded_conv_depthwise/depthwise_kernel:0' -> 'depthwise_kernel'."""
    name = weight_name.rsplit("/", 1)[-1]
    return name.removesuffix(":0")


def _canonical(variables: Mapping[str, Any], layer: str, description: str) -> dict:
    """Keras 2's `depthwise_kernel` is Keras 3's `kernel`: store it (an array or a Keras variable)
    under the latter, once."""
    out: dict[str, np.ndarray] = {}
    for name, array in variables.items():
        canonical = "kernel" if name == "depthwise_kernel" else name
        if canonical in out:
            raise WeightsError(f"{description}: layer {layer!r} has two {canonical!r} arrays")
        out[canonical] = array
    return out


def read_keras_h5(path: str | os.PathLike) -> KerasArrays:
    """All weight arrays of a Keras H5 file (any of the layouts in the module docstring), by layer name."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        file = h5py.File(path, "r")
    except OSError as err:
        raise WeightsError(f"{path} is not an HDF5 file, so not Keras weights ({err})") from err
    with file:
        root = file.get("model_weights", file)  # a full-model H5 nests the weights
        if "layer_names" in root.attrs:
            return _read_legacy_h5(root, str(path))
        if "layers" in file and isinstance(file["layers"], h5py.Group):
            return _read_keras3_weights_h5(file["layers"], str(path))
    raise WeightsError(
        f"{path} is an HDF5 file but not Keras weights (no 'layer_names' attribute and no 'layers' group); "
        "pass a file written by Keras (model.save_weights / keras.applications)"
    )


def _decode(name: bytes | str) -> str:
    return name.decode("utf8") if isinstance(name, bytes) else str(name)


def _read_legacy_h5(root: h5py.Group, description: str) -> KerasArrays:
    arrays: KerasArrays = {}
    for layer in map(_decode, root.attrs["layer_names"]):
        group = root[layer]
        weight_names = [_decode(n) for n in group.attrs.get("weight_names", [])]
        if weight_names:
            variables = {variable_name(n): np.asarray(group[n]) for n in weight_names}
            arrays[layer] = _canonical(variables, layer, description)
    return arrays


def _read_keras3_weights_h5(layers: h5py.Group, description: str) -> KerasArrays:
    """Keras 3 `.weights.h5`: arrays are stored by position, so name them from the layer kind."""
    positional: dict[str, list[np.ndarray]] = {}
    for group in layers.values():
        if "vars" not in group or len(group["vars"]) == 0:
            continue
        layer = _decode(group["vars"].attrs.get("name", group.name.rsplit("/", 1)[-1]))
        positional[layer] = [np.asarray(group["vars"][str(i)]) for i in range(len(group["vars"]))]
    arrays: KerasArrays = {}
    for layer, values in positional.items():
        if layer.startswith(("bn_", "Conv_1_bn")) or layer.endswith("_BN"):
            names: Iterable[str] = KERAS_VARIABLES[InferenceBatchNorm]
        elif layer == "predictions":
            names = KERAS_VARIABLES[nnx.Linear]
        else:
            names = ("kernel",)
        if len(values) != len(tuple(names)):
            raise WeightsError(
                f"{description}: layer {layer!r} has {len(values)} arrays, a MobileNetV2 layer of that "
                f"name has {len(tuple(names))}"
            )
        arrays[layer] = dict(zip(names, values, strict=True))
    return arrays


def find_mobilenet(model: Any) -> Any:
    """The model itself if it has MobileNetV2's `Conv1` layer, else the first nested model that does."""
    names = {layer.name for layer in model.layers}
    if "Conv1" in names:
        return model
    for layer in model.layers:
        if hasattr(layer, "layers"):
            found = find_mobilenet(layer)
            if found is not None:
                return found
    return None


def read_keras_model(model: Any) -> KerasArrays:
    """The weight arrays of a live Keras 3 MobileNetV2 (or of the one nested in `model`), by layer name."""
    mobilenet = find_mobilenet(model)
    if mobilenet is None:
        raise WeightsError(
            f"keras.Model {model.name!r} has no layer named 'Conv1', so it holds no MobileNetV2"
        )
    arrays: KerasArrays = {}
    for layer in mobilenet.layers:
        if layer.weights:
            variables = {variable_name(w.path): np.asarray(w.numpy()) for w in layer.weights}
            arrays[layer.name] = _canonical(variables, layer.name, f"keras.Model {model.name!r}")
    return arrays


# ----------------------------------------------------------------------------------------------------
# The official ImageNet files.


def imagenet_rows(input_shape: tuple[int, int, int] | None) -> int:
    """Which ImageNet file Keras loads for `input_shape`: its rows if square and in 96..224, else 224."""
    if input_shape is None:
        return 224
    rows, cols = input_shape[0], input_shape[1]
    return rows if rows == cols and rows in IMAGENET_ROWS else 224


def imagenet_weights_filename(alpha: float, include_top: bool, rows: int) -> str:
    """Keras' file name, e.g. 'mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5'."""
    suffix = "" if include_top else "_no_top"
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}{suffix}.h5"


def keras_cache_dir() -> pathlib.Path:
    """Where Keras caches downloaded application weights: $KERAS_HOME/models, default ~/.keras/models."""
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return pathlib.Path(keras_home, "models")


def imagenet_weights_path(alpha: float, include_top: bool, rows: int) -> pathlib.Path:
    """The official ImageNet weights file: from the Keras cache, else downloaded into it from Keras' URL."""
    if alpha not in IMAGENET_ALPHAS:
        raise WeightsError(
            f"alpha={alpha} has no ImageNet weights; Keras ships {', '.join(map(str, IMAGENET_ALPHAS))}"
        )
    if rows not in IMAGENET_ROWS:
        raise WeightsError(
            f"rows={rows} has no ImageNet weights; Keras ships {', '.join(map(str, IMAGENET_ROWS))}"
        )
    filename = imagenet_weights_filename(alpha, include_top, rows)
    path = keras_cache_dir() / filename
    if path.is_file():
        return path
    url = KERAS_WEIGHTS_URL + filename
    partial = path.with_name(path.name + ".part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        urllib.request.urlretrieve(url, partial)
    except (urllib.error.URLError, OSError) as err:
        partial.unlink(missing_ok=True)
        raise WeightsError(
            f"could not download {url} ({err}); without network, download that file elsewhere and "
            f"place it at {path} (or set KERAS_HOME)"
        ) from err
    partial.replace(path)  # only a complete download gets the cache name
    return path


# ----------------------------------------------------------------------------------------------------
# The converted model on disk: Orbax state + config JSON; loading needs neither Keras nor TensorFlow.


def save_converted(model: MobileNetV2, out_dir: str | os.PathLike, *, source: str = "") -> None:
    """Write `model`'s variables as an Orbax checkpoint in `out_dir/state` and its config in `out_dir/config.json`.

    `source` is recorded in the config for provenance (e.g. the H5 file converted).
    """
    config = ConvertedConfig(
        alpha=model.alpha, include_top=model.include_top, classes=model.classes, source=source
    )
    _write_directory(out_dir, model, dataclasses.asdict(config))


def _write_directory(out_dir: str | os.PathLike, model: nnx.Module, config: dict) -> None:
    """`out_dir/state` (the model's variables, Orbax) and `out_dir/config.json` (what rebuilds it)."""
    import orbax.checkpoint as ocp  # heavy imports, only needed to write and read these

    from mnist_flax import checkpoints

    out_dir = pathlib.Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out_dir / STATE_DIR, checkpoints.to_saved(nnx.state(model)), force=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def _read_state(directory: pathlib.Path, target: nnx.State) -> nnx.State:
    """`target` (concrete or abstract) holding the variables saved in `directory/state`."""
    import orbax.checkpoint as ocp

    from mnist_flax import checkpoints

    # Restore onto this process's first device: the sharding saved with the arrays names the
    # device that wrote them, which another process of a multi-process run does not have.
    on_local_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(
            directory / STATE_DIR, checkpoints.saved_target(target, on_local_device)
        )
    return checkpoints.into_state(target, restored)


def load_converted(
    directory: str | os.PathLike,
    *,
    alpha: float | None = None,
    include_top: bool | None = None,
    classes: int | None = None,
    **options: Any,
) -> MobileNetV2:
    """The `MobileNetV2` that `save_converted` wrote to `directory`.

    alpha/include_top/classes, when given, must equal the saved ones; `options` (pooling,
    classifier_activation, conv_impl, dtype) are free, they do not change the
    variables.
    """

    directory = pathlib.Path(directory).absolute()
    config_path = directory / CONFIG_FILE
    if not config_path.is_file() or not (directory / STATE_DIR).is_dir():
        raise WeightsError(
            f"{directory} is not a converted MobileNetV2 (no {CONFIG_FILE} and {STATE_DIR}/); "
            "write one with `mnist-flax convert`"
        )
    config = ConvertedConfig(**json.loads(config_path.read_text()))
    requested = {"alpha": alpha, "include_top": include_top, "classes": classes}
    for name, value in requested.items():
        saved = getattr(config, name)
        # classes only matters with a top; a no-top model has no layer that depends on it.
        if value is not None and value != saved and (name != "classes" or config.include_top):
            raise WeightsError(
                f"{directory} holds a MobileNetV2 with {name}={saved}, not {value}; pass {name}={saved}"
            )
    abstract = nnx.eval_shape(
        lambda: MobileNetV2(
            alpha=config.alpha,
            include_top=config.include_top,
            classes=config.classes,
            rngs=nnx.Rngs(0),
            **options,
        )
    )
    graphdef, abstract_state = nnx.split(abstract)
    return nnx.merge(graphdef, _read_state(directory, abstract_state))


# ----------------------------------------------------------------------------------------------------
# A whole converted classifier on disk (backbone, adapter and head): what `--weights DIR` continues.

CLASSIFIER_KIND = "classifier"


def is_converted_classifier(source: Any) -> bool:
    """Whether `source` is a directory holding a whole classifier (`save_classifier`)."""
    if not isinstance(source, (str, os.PathLike)) or not pathlib.Path(source).is_dir():
        return False
    config_path = pathlib.Path(source) / CONFIG_FILE
    return (
        config_path.is_file() and json.loads(config_path.read_text()).get("kind") == CLASSIFIER_KIND
    )


def save_classifier(
    model: Any, out_dir: str | os.PathLike, *, model_name: str, source: str = ""
) -> None:
    """Writes a `TransferClassifier`'s variables (Orbax) and what rebuilds it (config.json).

    `model_name` is its `--model` ("pipeline" or "notebook").
    """
    config = {
        "kind": CLASSIFIER_KIND,
        "model": model_name,
        "alpha": model.backbone.alpha,
        "num_classes": model.head.out_features,
        "image_size": model.image_size,
        "source": source,
    }
    _write_directory(out_dir, model, config)


def classifier_config(directory: str | os.PathLike) -> dict:
    """The config.json `save_classifier` wrote into `directory`."""
    return json.loads((pathlib.Path(directory) / CONFIG_FILE).read_text())


def restore_classifier(directory: str | os.PathLike, model: Any) -> None:
    """Fills `model` (a `TransferClassifier` of the same kind and shape) with a saved classifier."""

    directory = pathlib.Path(directory).absolute()
    saved = classifier_config(directory)
    asked = {
        "model": classifier_kind(model),
        "alpha": model.backbone.alpha,
        "num_classes": model.head.out_features,
    }
    if model.adapter is not None:
        # The notebook model's upsampling factor is image_size / 28: no array records it.
        asked["image_size"] = model.image_size
    for name, value in asked.items():
        if saved[name] != value:
            flag = "--" + name.replace("_", "-")
            raise WeightsError(
                f"{directory} holds a classifier with {name} {saved[name]!r}, not {value!r}; "
                f"pass {flag} {saved[name]} (or other --weights)"
            )
    # In place: every parameter and BatchNorm statistic of the saved classifier.
    nnx.update(model, _read_state(directory, nnx.state(model)))


def classifier_kind(model: Any) -> str:
    """The `--model` a `model.TransferClassifier` is: "notebook" (it has the adapter) or "pipeline"."""
    return "pipeline" if model.adapter is None else "notebook"
