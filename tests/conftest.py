"""Shared fixtures: the real ImageNet weights and MNIST files (when the environment has them), tiny IDX
digits, a He-initialised random backbone, and one persistent compilation cache for the session.

`MNIST_FLAX_SHARED` names a folder laid out like `../shared` (see README, "Running the tests"); tests that
need it skip cleanly when it is unset or incomplete.
"""

import os
import pathlib

import jax
import pytest
from helpers import block_digits, use_he_backbone

from mnist_flax import input_pipeline

IMAGENET_NO_TOP = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


def _shared_file(*parts: str) -> pathlib.Path:
    root = os.environ.get("MNIST_FLAX_SHARED")
    if not root:
        pytest.skip("MNIST_FLAX_SHARED is not set (point it at the shared weights and data folder)")
    path = pathlib.Path(root, *parts)
    if not path.exists():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(params=["keras2-layout", "keras3-layout"])
def imagenet_h5(request) -> pathlib.Path:
    """The real ImageNet MobileNetV2 (alpha 1.0, no top) weights file, in both Keras name layouts."""
    if request.param == "keras2-layout":
        return _shared_file("weights", IMAGENET_NO_TOP)
    return _shared_file("weights", "keras3-layout", IMAGENET_NO_TOP)


@pytest.fixture
def imagenet_h5_keras2() -> pathlib.Path:
    """The Keras-2 layout alone: the file `keras.applications` itself downloads and loads."""
    return _shared_file("weights", IMAGENET_NO_TOP)


@pytest.fixture
def mnist_idx_dir() -> pathlib.Path:
    """The folder holding the real MNIST test set as gzipped IDX files (t10k-* only)."""
    path = _shared_file("data", "mnist")
    _shared_file("data", "mnist", "t10k-images-idx3-ubyte.gz")
    return path


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory) -> pathlib.Path:
    """40 training and 20 test block digits (`helpers.block_digits`) as IDX files."""
    directory = tmp_path_factory.mktemp("idx")
    input_pipeline.write_idx_split(directory, "train", *block_digits(40, seed=0))
    input_pipeline.write_idx_split(directory, "t10k", *block_digits(20, seed=1))
    return directory


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent compilation cache for the session: runs after the first skip XLA compiles."""
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    previous = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for name, value in previous.items():
        jax.config.update(name, value)


@pytest.fixture(scope="session", autouse=True)
def session_cache_home(tmp_path_factory):
    """The per-user cache ($XDG_CACHE_HOME) of module- and session-wide fixtures' runs."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        yield


@pytest.fixture(autouse=True)
def per_user_cache(tmp_path_factory, monkeypatch):
    """A fresh per-user cache ($XDG_CACHE_HOME) for every test, its subprocesses included: runs
    keep their cached features there (`--feature-cache auto`), never in the home directory, and
    no test finds another's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))


@pytest.fixture
def he_backbone(monkeypatch):
    """Every model built from a config in this test (training, evaluation) has a He-initialised backbone."""
    use_he_backbone(monkeypatch)
