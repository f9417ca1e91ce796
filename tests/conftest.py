"""Shared fixtures: where the real ImageNet weights and MNIST files are, when the environment has them.

`MNIST_FLAX_SHARED` names a folder laid out like `../shared` (see README, "Running the tests"); tests that
need it skip cleanly when it is unset or incomplete.
"""

import os
import pathlib

import pytest

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
def mnist_idx_dir() -> pathlib.Path:
    """The folder holding the real MNIST test set as gzipped IDX files (t10k-* only)."""
    path = _shared_file("data", "mnist")
    _shared_file("data", "mnist", "t10k-images-idx3-ubyte.gz")
    return path
