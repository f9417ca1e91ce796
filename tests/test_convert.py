"""Weight conversion: every Keras source reads into the NNX MobileNetV2, and bad files fail naming the layer.

Small Keras files are written into tmp_path from random Keras models (Keras' own legacy H5 writer, a
full-model H5, a Keras 3 `.weights.h5`), then modified with h5py for the error cases.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import textwrap
import urllib.error

import h5py
import keras
import numpy as np
import pytest
from flax import nnx
from keras.src.legacy.saving import legacy_h5_format
from keras_helpers import assert_close_to_keras, random_images, random_keras_mobilenet

from mnist_flax import convert
from mnist_flax.convert import WeightsError, mobilenet_v2_from_keras, save_converted

ALPHA = 0.35
SIZE = 32


def forward(model, images):
    return nnx.jit(lambda m, x: m(x))(model, images)


@pytest.fixture(scope="module")
def keras_model() -> keras.Model:
    return random_keras_mobilenet(alpha=ALPHA, input_shape=(SIZE, SIZE, 3), pooling="avg")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return random_images((2, SIZE, SIZE, 3))


@pytest.fixture(scope="module")
def legacy_h5(keras_model, tmp_path_factory) -> pathlib.Path:
    """The keras.applications layout (Keras 3 names), written by Keras' own legacy H5 writer."""
    path = tmp_path_factory.mktemp("h5") / "weights.h5"
    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, keras_model)
    return path


def modified_copy(source: pathlib.Path, target: pathlib.Path, edit) -> pathlib.Path:
    target.write_bytes(source.read_bytes())
    with h5py.File(target, "r+") as file:
        edit(file)
    return target


def test_legacy_h5_matches_keras(keras_model, legacy_h5, images):
    model = mobilenet_v2_from_keras(legacy_h5, alpha=ALPHA, pooling="avg")
    assert_close_to_keras(forward(model, images), keras_model(images, training=False))


def test_full_model_h5_and_keras3_weights_h5(keras_model, images, tmp_path):
    expected = keras_model(images, training=False)
    keras_model.save(tmp_path / "full.h5")  # legacy full model: weights under `model_weights`
    keras_model.save_weights(tmp_path / "model.weights.h5")  # Keras 3 native weights file
    for path in (tmp_path / "full.h5", tmp_path / "model.weights.h5"):
        model = mobilenet_v2_from_keras(path, alpha=ALPHA, pooling="avg")
        assert_close_to_keras(forward(model, images), expected, path.name)


def test_nested_keras_model(keras_model, images):
    """The tutorial's shape: a MobileNetV2 inside a bigger model; the converter finds the backbone."""
    inputs = keras.Input((SIZE, SIZE, 3))
    outputs = keras.layers.Dense(10, name="head")(keras_model(inputs, training=False))
    classifier = keras.Model(inputs, outputs)
    model = mobilenet_v2_from_keras(classifier, alpha=ALPHA, pooling="avg")
    assert_close_to_keras(forward(model, images), keras_model(images, training=False))


def test_missing_array_names_the_layer(legacy_h5, tmp_path):
    def drop_moving_mean(file):
        del file["block_3_expand_BN"]["block_3_expand_BN"]["moving_mean"]
        names = file["block_3_expand_BN"].attrs["weight_names"]
        file["block_3_expand_BN"].attrs["weight_names"] = [
            str(n) for n in names if "moving_mean" not in str(n)
        ]

    path = modified_copy(legacy_h5, tmp_path / "missing.h5", drop_moving_mean)
    with pytest.raises(WeightsError, match=r"'block_3_expand_BN' has no 'moving_mean'"):
        mobilenet_v2_from_keras(path, alpha=ALPHA)


def test_wrong_shape_names_the_layer(legacy_h5, tmp_path):
    def reshape_kernel(file):
        group = file["block_5_project"]["block_5_project"]
        kernel = group["kernel"][...]
        del group["kernel"]
        group["kernel"] = kernel[..., :-1]

    path = modified_copy(legacy_h5, tmp_path / "wrong.h5", reshape_kernel)
    with pytest.raises(WeightsError, match=r"layer 'block_5_project' kernel has shape"):
        mobilenet_v2_from_keras(path, alpha=ALPHA)


def test_file_for_another_alpha_or_top_is_refused(legacy_h5):
    with pytest.raises(WeightsError, match=r"layer 'Conv1' kernel .* another alpha"):
        mobilenet_v2_from_keras(legacy_h5, alpha=1.0)
    with pytest.raises(WeightsError, match=r"no weights for layer 'predictions'"):
        mobilenet_v2_from_keras(legacy_h5, alpha=ALPHA, include_top=True)


def test_unused_array_names_the_layer(legacy_h5, tmp_path):
    def add_array(file):
        group = file["Conv_1_bn"]
        group["Conv_1_bn"]["extra"] = np.zeros(3, np.float32)
        group.attrs["weight_names"] = [*map(str, group.attrs["weight_names"]), "Conv_1_bn/extra"]

    path = modified_copy(legacy_h5, tmp_path / "extra.h5", add_array)
    with pytest.raises(WeightsError, match=r"not used, first layer 'Conv_1_bn' extra"):
        mobilenet_v2_from_keras(path, alpha=ALPHA)


def test_non_keras_files_get_a_clear_error(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not weights")
    with pytest.raises(WeightsError, match="is not an HDF5 file"):
        mobilenet_v2_from_keras(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as file:
        file["data"] = np.zeros(3)
    with pytest.raises(WeightsError, match="not Keras weights"):
        mobilenet_v2_from_keras(other)
    with pytest.raises(WeightsError, match="does not exist"):
        mobilenet_v2_from_keras(tmp_path / "absent.h5")


def test_saved_directory_loads_without_tensorflow(legacy_h5, keras_model, images, tmp_path):
    """Convert an H5 and reload the saved directory in a fresh interpreter: neither imports TensorFlow."""
    np.save(tmp_path / "images.npy", images)
    script = textwrap.dedent(f"""
        import sys, numpy as np
        from flax import nnx
        from mnist_flax.convert import mobilenet_v2_from_keras, save_converted
        model = mobilenet_v2_from_keras({str(legacy_h5)!r}, alpha={ALPHA})
        save_converted(model, {str(tmp_path / "converted")!r}, source="test")
        loaded = mobilenet_v2_from_keras({str(tmp_path / "converted")!r}, pooling="avg")
        out = nnx.jit(lambda m, x: m(x))(loaded, np.load({str(tmp_path / "images.npy")!r}))
        np.save({str(tmp_path / "out.npy")!r}, np.asarray(out))
        assert "tensorflow" not in sys.modules and "keras" not in sys.modules, "TensorFlow was imported"
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    config = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert config == {"alpha": ALPHA, "include_top": False, "classes": 1000, "source": "test"}
    assert_close_to_keras(np.load(tmp_path / "out.npy"), keras_model(images, training=False))


def test_saved_directory_refuses_other_architecture(legacy_h5, tmp_path):
    save_converted(mobilenet_v2_from_keras(legacy_h5, alpha=ALPHA), tmp_path / "converted")
    with pytest.raises(WeightsError, match=re.escape("alpha=0.35, not 1.0; pass alpha=0.35")):
        mobilenet_v2_from_keras(tmp_path / "converted", alpha=1.0)
    with pytest.raises(WeightsError, match="not a converted MobileNetV2"):
        mobilenet_v2_from_keras(tmp_path)


def test_imagenet_reads_the_keras_cache(legacy_h5, keras_model, images, tmp_path, monkeypatch):
    cache = tmp_path / "keras_home" / "models"
    cache.mkdir(parents=True)
    name = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5"
    (cache / name).write_bytes(legacy_h5.read_bytes())
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setattr(convert.urllib.request, "urlretrieve", pytest.fail)  # no download
    model = mobilenet_v2_from_keras("imagenet", alpha=ALPHA, pooling="avg", input_shape=(96, 96, 3))
    assert_close_to_keras(forward(model, images), keras_model(images, training=False))


def test_imagenet_offline_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(url, filename):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(convert.urllib.request, "urlretrieve", offline)
    name = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"
    url = f"https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/{name}"
    expected = re.escape(url) + ".*" + re.escape(f"place it at {tmp_path / 'models' / name}")
    with pytest.raises(WeightsError, match=expected):
        mobilenet_v2_from_keras("imagenet", include_top=True, input_shape=(200, 200, 3))
    assert not list((tmp_path / "models").iterdir())  # no partial file left behind
    with pytest.raises(WeightsError, match=re.escape("alpha=0.6 has no ImageNet weights")):
        mobilenet_v2_from_keras("imagenet", alpha=0.6)
