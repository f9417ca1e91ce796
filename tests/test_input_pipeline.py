"""The input pipeline: IDX and tfds sources, split strings, process shards, preprocessing, batches."""

import ast
import gzip
import math
import pathlib
import re
import socket

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from helpers import write_tfds_metadata

from mnist_flax import input_pipeline, runtime
from mnist_flax.input_pipeline import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    DataError,
    idx_bytes,
    write_idx_split,
)
from mnist_flax.model import preprocess_on_device


def digits(num: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random 28x28x1 uint8 digits whose first pixel is their index, so order is visible."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(num, 28, 28, 1), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(num) % 256
    labels = rng.integers(0, 10, size=num).astype(np.uint8)
    return images, labels


def as_arrays(dataset: tf.data.Dataset) -> dict[str, np.ndarray]:
    elements = list(dataset.as_numpy_iterator())
    return {name: np.stack([e[name] for e in elements]) for name in elements[0]}


def first_pixels(dataset: tf.data.Dataset) -> list[int]:
    return [int(e["image"][0, 0, 0]) for e in dataset.as_numpy_iterator()]


@pytest.fixture
def idx_dir(tmp_path) -> pathlib.Path:
    """20 training and 11 test digits, gzipped."""
    write_idx_split(tmp_path, "train", *digits(20, seed=1), gz=True)
    write_idx_split(tmp_path, "t10k", *digits(11, seed=2), gz=True)
    return tmp_path


# --- the IDX source --------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_idx_files_load_with_their_values_and_labels(tmp_path, gz):
    train_images, train_labels = digits(20, seed=1)
    write_idx_split(tmp_path, "train", train_images, train_labels, gz=gz)
    write_idx_split(tmp_path, "t10k", *digits(11, seed=2), gz=gz)

    split = input_pipeline.load_split("mnist", "train", data_dir=tmp_path)

    assert (split.num_examples, split.num_classes, split.max_process_examples) == (20, 10, 20)
    assert split.examples.element_spec == {
        "image": tf.TensorSpec((28, 28, 1), tf.uint8),
        "label": tf.TensorSpec((), tf.int32),
    }
    loaded = as_arrays(split.examples)
    np.testing.assert_array_equal(loaded["image"], train_images)
    np.testing.assert_array_equal(loaded["label"], train_labels)
    assert as_arrays(input_pipeline.load_split("mnist", "test", data_dir=tmp_path).examples)[
        "image"
    ].shape == (11, 28, 28, 1)


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        ("test[:8]", [("test", range(8))]),
        ("test[8:]", [("test", range(8, 11))]),
        ("test[-3:]", [("test", range(8, 11))]),
        ("train[10%:]", [("train", range(2, 20))]),
        ("train[:25%]", [("train", range(5))]),
        ("train[:2]+test[9:]", [("train", range(2)), ("test", range(9, 11))]),
    ],
)
def test_idx_split_strings_select_those_examples(idx_dir, split, expected):
    loaded = input_pipeline.load_split("mnist", split, data_dir=idx_dir)

    expected_pixels = [i for _, indices in expected for i in indices]
    assert loaded.num_examples == len(expected_pixels)
    assert first_pixels(loaded.examples) == expected_pixels
    labels = [int(e["label"]) for e in loaded.examples.as_numpy_iterator()]
    train_labels, test_labels = digits(20, seed=1)[1], digits(11, seed=2)[1]
    by_split = {"train": train_labels, "test": test_labels}
    assert labels == [int(by_split[name][i]) for name, indices in expected for i in indices]


def test_idx_test_files_alone_serve_test_splits_and_name_the_missing_train_files(tmp_path):
    write_idx_split(tmp_path, "t10k", *digits(11), gz=True)

    assert input_pipeline.load_split("mnist", "test[:4]", data_dir=tmp_path).num_examples == 4
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*train-labels-idx1-ubyte"):
        input_pipeline.load_split("mnist", "train", data_dir=tmp_path)


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ("validation", "only 'train'"),
        ("test[:12]", "incompatible with 11 examples"),
        ("test[:x]", "Unrecognized split format"),
        ("test[5:5]", "selects no examples"),
    ],
)
def test_idx_bad_split_strings_are_data_errors(idx_dir, split, message):
    with pytest.raises(DataError, match=re.escape(split)) as raised:
        input_pipeline.load_split("mnist", split, data_dir=idx_dir)
    assert message in str(raised.value)


def corrupt(kind: str, folder: pathlib.Path) -> str:
    """Writes a t10k pair with one defect; returns the name of the file the error must name."""
    images, labels = digits(11)
    image_bytes = idx_bytes(images[..., 0], IDX_IMAGES_MAGIC)
    label_bytes = idx_bytes(labels, IDX_LABELS_MAGIC)
    target = "t10k-images-idx3-ubyte"
    if kind == "images magic":
        image_bytes = idx_bytes(images[..., 0], IDX_LABELS_MAGIC)
    elif kind == "labels magic":
        label_bytes = idx_bytes(labels, IDX_IMAGES_MAGIC)
        target = "t10k-labels-idx1-ubyte"
    elif kind == "truncated images":
        image_bytes = image_bytes[:-10]
    elif kind == "images longer than header":
        image_bytes += b"\0" * 784
    elif kind == "truncated labels":
        label_bytes = label_bytes[:-1]
        target = "t10k-labels-idx1-ubyte"
    elif kind == "count mismatch":
        label_bytes = idx_bytes(labels[:10], IDX_LABELS_MAGIC)
    elif kind == "label out of range":
        labels[7] = 10
        label_bytes = idx_bytes(labels, IDX_LABELS_MAGIC)
        target = "t10k-labels-idx1-ubyte"
    elif kind == "not 28x28":
        image_bytes = idx_bytes(np.zeros((11, 32, 32), np.uint8), IDX_IMAGES_MAGIC)
    elif kind == "truncated header":
        image_bytes = image_bytes[:9]
    for name, payload in (
        ("t10k-images-idx3-ubyte", image_bytes),
        ("t10k-labels-idx1-ubyte", label_bytes),
    ):
        (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
    if kind == "not gzip":
        (folder / "t10k-images-idx3-ubyte.gz").write_bytes(image_bytes)
    if kind == "missing labels":
        (folder / "t10k-labels-idx1-ubyte.gz").unlink()
        target = "t10k-labels-idx1-ubyte"
    return target


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("images magic", f"magic number {IDX_LABELS_MAGIC}, expected {IDX_IMAGES_MAGIC}"),
        ("labels magic", f"magic number {IDX_IMAGES_MAGIC}, expected {IDX_LABELS_MAGIC}"),
        ("truncated images", "truncated"),
        ("images longer than header", "longer than its header"),
        ("truncated labels", "truncated"),
        ("count mismatch", "11 images but"),
        ("label out of range", "label 10 at index 7 is outside 0..9"),
        ("not 28x28", "32x32, expected 28x28"),
        ("truncated header", "truncated IDX header"),
        ("not gzip", "cannot be read"),
        ("missing labels", "needs t10k-labels-idx1-ubyte"),
    ],
)
def test_each_bad_idx_file_is_a_one_line_error_naming_it(tmp_path, kind, message):
    target = corrupt(kind, tmp_path)

    with pytest.raises(DataError) as raised:
        input_pipeline.load_split("mnist", "test", data_dir=tmp_path)

    text = str(raised.value)
    assert target in text and message in text and "\n" not in text


def test_real_mnist_test_files_split_8000_2000(mnist_idx_dir):
    head = input_pipeline.load_split("mnist", "test[:8000]", data_dir=mnist_idx_dir)
    tail = input_pipeline.load_split("mnist", "test[8000:]", data_dir=mnist_idx_dir)

    assert (head.num_examples, tail.num_examples) == (8000, 2000)
    labels = np.concatenate(
        [
            np.concatenate([b["label"] for b in split.examples.batch(4096).as_numpy_iterator()])
            for split in (head, tail)
        ]
    )
    counts = np.bincount(labels, minlength=10)
    # MNIST's test set: 892 fives at least, 1135 ones at most, per class.
    assert counts.sum() == 10_000 and counts.min() >= 850 and counts.max() <= 1200
    first = next(head.examples.as_numpy_iterator())
    assert first["label"] == 7 and first["image"].max() == 255  # the famous first test digit


# --- process shards --------------------------------------------------------------------------------


@pytest.mark.parametrize(("split", "count"), [("test", 3), ("train[3:]+test[:4]", 4), ("test", 1)])
def test_process_shards_are_disjoint_cover_the_split_and_agree_on_max(idx_dir, split, count):
    def images(dataset: tf.data.Dataset) -> list[bytes]:
        return [e["image"].tobytes() for e in dataset.as_numpy_iterator()]

    whole = images(input_pipeline.load_split("mnist", split, data_dir=idx_dir).examples)
    shards = [
        input_pipeline.load_split(
            "mnist", split, data_dir=idx_dir, process_index=index, process_count=count
        )
        for index in range(count)
    ]

    shard_images = [images(s.examples) for s in shards]
    assert sorted(image for shard in shard_images for image in shard) == sorted(whole)
    assert len(set(whole)) == len(whole)  # so equal sorted lists mean disjoint and covering
    if "+" not in split:  # one range: contiguous shares, in order
        assert [image for shard in shard_images for image in shard] == whole
    sizes = [s.num_examples for s in shards]
    assert sizes == [len(shard) for shard in shard_images]
    assert max(sizes) - min(sizes) <= (2 if "+" in split else 1)
    assert {s.max_process_examples for s in shards} == {max(sizes)}


def test_every_process_gets_the_same_number_of_batches(idx_dir):
    # 11 examples over 3 processes: 4, 4, 3; with batches of 3 the last process needs one batch
    # less, and gets a fully masked one instead.
    batch_counts = set()
    seen = 0
    for index in range(3):
        split = input_pipeline.load_split(
            "mnist", "test", data_dir=idx_dir, process_index=index, process_count=3
        )
        batches = list(
            input_pipeline.make_batches(
                split, batch_size=3, image_size=28, shuffle_seed=None, resize="device"
            ).as_numpy_iterator()
        )
        batch_counts.add(len(batches))
        seen += sum(int(b["mask"].sum()) for b in batches)
    assert batch_counts == {2} and seen == 11


def test_bad_process_index_is_a_data_error(idx_dir):
    with pytest.raises(DataError, match="process_index 2"):
        input_pipeline.load_split(
            "mnist", "test", data_dir=idx_dir, process_index=2, process_count=2
        )


# --- the tfds source -------------------------------------------------------------------------------


class InputPipelineTestDigits(tfds.core.GeneratorBasedBuilder):
    """A real (tiny) tfds dataset, prepared offline: 25 train and 13 test digits."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(25), "test": self._generate_examples(13)}

    def _generate_examples(self, num):
        images, labels = digits(num)
        for index in range(num):
            yield index, {"image": images[index], "label": int(labels[index])}


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("tfds")
    InputPipelineTestDigits(data_dir=path).download_and_prepare()
    return path


def test_tfds_dataset_by_name_reads_slices_and_shards(tiny_tfds_dir):
    name = "input_pipeline_test_digits"
    whole = input_pipeline.load_split(name, "test", tfds_data_dir=tiny_tfds_dir)
    order = first_pixels(whole.examples)
    assert sorted(order) == list(range(13)) and whole.num_classes == 10
    assert first_pixels(whole.examples) == order  # the same order on every pass

    for split, selected in [
        ("test[:8]", order[:8]),
        ("test[8:]", order[8:]),
        ("test[-25%:]", order[-3:]),
    ]:
        loaded = input_pipeline.load_split(name, split, tfds_data_dir=tiny_tfds_dir)
        assert (loaded.num_examples, first_pixels(loaded.examples)) == (len(selected), selected)

    shards = [
        input_pipeline.load_split(
            name, "test", tfds_data_dir=tiny_tfds_dir, process_index=i, process_count=2
        )
        for i in range(2)
    ]
    assert [s.num_examples for s in shards] == [7, 6]
    assert first_pixels(shards[0].examples) + first_pixels(shards[1].examples) == order
    with pytest.raises(DataError, match="incompatible with 13 examples"):
        input_pipeline.load_split(name, "test[:14]", tfds_data_dir=tiny_tfds_dir)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "kmnist"])
def test_tfds_digit_datasets_yield_28x28x1_uint8_and_labels(tmp_path, name):
    write_tfds_metadata(tmp_path, name, num_examples=12)
    with tfds.testing.mock_data(num_examples=12, data_dir=tmp_path):
        split = input_pipeline.load_split(name, "train", tfds_data_dir=tmp_path)
        examples = as_arrays(split.examples)

    assert (split.num_examples, split.num_classes, split.name) == (12, 10, f"{name} train")
    assert examples["image"].shape == (12, 28, 28, 1) and examples["image"].dtype == np.uint8
    assert examples["label"].dtype == np.int32
    assert examples["label"].min() >= 0 and examples["label"].max() <= 9


@pytest.mark.parametrize(
    ("name", "message"),
    [("cifar10", r"needs 28x28x1 uint8 images.*\(32, 32, 3\)"), ("mnst", "not a tfds dataset")],
)
def test_unusable_tfds_datasets_are_data_errors(tmp_path, name, message):
    with pytest.raises(DataError, match=message):
        input_pipeline.load_split(name, "train", tfds_data_dir=tmp_path)


def test_tfds_without_network_says_how_to_go_offline_at_once(tmp_path, monkeypatch):
    # Name resolution fails as on a machine with no network (this one has none anyway); the test
    # must not depend on whether the machine running it has network.
    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)

    with pytest.raises(DataError) as raised:
        input_pipeline.load_split("mnist", "train", tfds_data_dir=tmp_path)

    text = str(raised.value)
    assert "\n" not in text and "cannot download tfds dataset 'mnist'" in text
    assert "--data-dir" in text and "TFDS_DATA_DIR" in text


def _imported(module, nodes=ast.walk) -> list[str]:
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    found = [
        alias.name for node in nodes(tree) if isinstance(node, ast.Import) for alias in node.names
    ]
    return found + [node.module for node in nodes(tree) if isinstance(node, ast.ImportFrom)]


def test_the_module_never_imports_jax():
    # A static check: TensorFlow itself may load JAX when it is installed, so sys.modules can't tell.
    # TensorFlow comes through `runtime.import_tensorflow`, whose module imports JAX only inside
    # the function that configures JAX's cache.
    imported = _imported(input_pipeline) + _imported(runtime, nodes=lambda tree: tree.body)
    assert "tensorflow_datasets" in imported
    assert not [
        name for name in imported if name and name.split(".")[0] in ("jax", "flax", "optax")
    ]


# --- preprocessing ---------------------------------------------------------------------------------


def test_preprocess_images_matches_the_tutorials_rgb_resize_and_scaling():
    images = tf.constant(digits(2)[0])

    out = input_pipeline.preprocess_images(images, 48)

    # The tutorial: float, gray to RGB, resize, then MobileNetV2's preprocess_input.
    reference = tf.image.resize(tf.image.grayscale_to_rgb(tf.cast(images, tf.float32)), (48, 48))
    reference = reference / 127.5 - 1.0
    assert out.shape == (2, 48, 48, 3) and out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy(), reference.numpy(), atol=1e-6)
    assert out.numpy().min() >= -1.0 and out.numpy().max() <= 1.0
    np.testing.assert_array_equal(out[..., 0].numpy(), out[..., 2].numpy())


def test_preprocess_images_keeps_values_at_the_same_size():
    images = tf.constant([[[[0], [255]], [[128], [51]]]], tf.uint8)
    out = input_pipeline.preprocess_images(images, 2).numpy()
    np.testing.assert_allclose(
        out[0, :, :, 1], [[-1.0, 1.0], [128 / 127.5 - 1, 51 / 127.5 - 1]], rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("image_size", [32, 97])
def test_device_preprocessing_agrees_with_tf_data(image_size):
    """`--resize device` computes the pixels tf.data computes, on random digits.

    Random pixels make every interpolation weight count: nearest-neighbour resizing of the same
    digits (checked too) is far off, so a wrong interpolation could not pass.
    """
    images = digits(3)[0]
    on_host = input_pipeline.preprocess_images(tf.constant(images), image_size).numpy()
    on_device = np.asarray(preprocess_on_device(images, image_size))
    assert on_device.shape == on_host.shape
    np.testing.assert_allclose(on_device, on_host, atol=1e-5)
    nearest = tf.image.resize(tf.cast(images, tf.float32), (image_size,) * 2, method="nearest")
    assert np.abs(nearest.numpy() / 127.5 - 1.0 - on_device[..., :1]).max() > 0.1


# --- shuffling, batching, padding ------------------------------------------------------------------


def numbered(num: int, offset: int = 0) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(
        {"value": np.arange(offset, offset + num, dtype=np.int64), "pair": np.ones((num, 2))}
    )


def batched_values(**kwargs) -> list[int]:
    batches = input_pipeline.shuffle_and_batch(**kwargs).as_numpy_iterator()
    return [int(v) for b in batches for v, m in zip(b["value"], b["mask"], strict=True) if m]


def test_shuffle_order_depends_only_on_seed_and_length():
    first = batched_values(examples=numbered(50), num_examples=50, batch_size=8, shuffle_seed=3)
    again = batched_values(examples=numbered(50), num_examples=50, batch_size=8, shuffle_seed=3)
    other_seed = batched_values(
        examples=numbered(50), num_examples=50, batch_size=8, shuffle_seed=4
    )
    # Different contents (cached features instead of images) of the same length: same permutation.
    other_content = batched_values(
        examples=numbered(50, offset=1000), num_examples=50, batch_size=8, shuffle_seed=3
    )
    tf.random.set_seed(1234)  # TensorFlow's global seed plays no part
    after_global_seed = batched_values(
        examples=numbered(50), num_examples=50, batch_size=8, shuffle_seed=3
    )

    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert again == first == after_global_seed
    assert other_seed != first and sorted(other_seed) == list(range(50))
    assert [v - 1000 for v in other_content] == first
    assert first == list(np.random.default_rng(3).permutation(50))


def test_no_seed_keeps_source_order():
    values = batched_values(examples=numbered(10), num_examples=10, batch_size=4, shuffle_seed=None)
    assert values == list(range(10))


@pytest.mark.parametrize("shuffle_seed", [None, 0])
def test_last_batch_is_padded_and_masked_so_each_example_counts_once(shuffle_seed):
    batches = list(
        input_pipeline.shuffle_and_batch(
            numbered(10), num_examples=10, batch_size=4, shuffle_seed=shuffle_seed, num_batches=4
        ).as_numpy_iterator()
    )

    assert len(batches) == 4
    assert all(b["value"].shape == (4,) and b["pair"].shape == (4, 2) for b in batches)
    assert [b["mask"].tolist() for b in batches[2:]] == [[True, True, False, False], [False] * 4]
    assert not batches[2]["pair"][2:].any() and not batches[3]["value"].any()
    values = [v for b in batches for v, m in zip(b["value"], b["mask"], strict=True) if m]
    assert sorted(values) == list(range(10))
    spec = input_pipeline.shuffle_and_batch(
        numbered(10), num_examples=10, batch_size=4, shuffle_seed=shuffle_seed
    ).element_spec
    assert spec["value"].shape == (4,) and spec["mask"] == tf.TensorSpec((4,), tf.bool)


@pytest.mark.parametrize("shuffle_seed", [None, 0])
def test_a_wrong_num_examples_fails_when_read(shuffle_seed):
    batches = input_pipeline.shuffle_and_batch(
        numbered(10), num_examples=9, batch_size=4, shuffle_seed=shuffle_seed
    )
    with pytest.raises(tf.errors.FailedPreconditionError):
        list(batches)


def test_epoch_seed_is_a_pure_function_that_varies_by_epoch():
    seeds = [input_pipeline.epoch_seed(0, epoch) for epoch in range(10)]
    assert seeds == [input_pipeline.epoch_seed(0, epoch) for epoch in range(10)]
    assert len(set(seeds)) == 10 and input_pipeline.epoch_seed(1, 0) != seeds[0]


@pytest.mark.parametrize("resize", ["host", "device"])
def test_make_batches_shapes_dtypes_and_values(idx_dir, resize):
    split = input_pipeline.load_split("mnist", "test", data_dir=idx_dir)

    dataset = input_pipeline.make_batches(
        split, batch_size=4, image_size=32, shuffle_seed=5, resize=resize
    )
    batches = list(dataset.as_numpy_iterator())

    # No autotuning thread, whose wake-up deleting an iterator would wait for (`make_batches`).
    assert dataset.options().autotune.enabled is False
    assert len(batches) == math.ceil(11 / 4)
    images = np.concatenate([b["image"][b["mask"]] for b in batches])
    if resize == "host":
        assert batches[0]["image"].shape == (4, 32, 32, 3) and images.dtype == np.float32
        expected = input_pipeline.preprocess_images(tf.constant(digits(11, seed=2)[0]), 32)
        order = np.random.default_rng(5).permutation(11)
        np.testing.assert_allclose(images, expected.numpy()[order], atol=1e-6)
    else:
        assert batches[0]["image"].shape == (4, 28, 28, 1) and images.dtype == np.uint8
        order = np.random.default_rng(5).permutation(11)
        np.testing.assert_array_equal(images, digits(11, seed=2)[0][order])
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, digits(11, seed=2)[1][order])


def test_make_batches_rejects_an_unknown_resize_mode(idx_dir):
    split = input_pipeline.load_split("mnist", "test", data_dir=idx_dir)
    with pytest.raises(DataError, match="--resize 'gpu'"):
        input_pipeline.make_batches(
            split, batch_size=4, image_size=32, shuffle_seed=0, resize="gpu"
        )
