"""The input pipeline: where the digits come from, and how they become batches (tf.data only).

Owns the two sources (a TensorFlow Datasets dataset by name, or a folder of classic MNIST IDX files
for machines without network), tfds split strings and per-process shards for both, the tutorial's
preprocessing (uint8 to float, grayscale to RGB, bilinear resize, MobileNetV2's [-1, 1] scaling),
and the seeded shuffle / batch / pad-and-mask step that every training and evaluation loop uses.

Nothing here imports JAX: batches leave as tf.data elements and the training code converts them.
The pipeline streams: only the raw 28x28 uint8 examples (47 MB for all of MNIST) are ever held
whole; resized images exist one batch at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import math
import os
import pathlib
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

from mnist_flax import runtime
from mnist_flax.config import RESIZE_PLACES

tf = runtime.import_tensorflow()
import tensorflow_datasets as tfds  # noqa: E402  (after TensorFlow, which it imports)

# TensorFlow is here for tf.data and tfds only. Where the full `tensorflow` package is installed
# (macOS, aarch64 Linux) it would claim the GPU that JAX uses; hide it, as the Flax examples do.
# (A RuntimeError means TensorFlow's devices were set up already, e.g. by Keras in this process.)
with contextlib.suppress(RuntimeError):
    tf.config.set_visible_devices([], "GPU")

IMAGE_SHAPE = (28, 28, 1)
IDX_NUM_CLASSES = 10
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
# The IDX source's split names and the file prefixes they read, as in the original MNIST release.
IDX_SPLIT_PREFIXES = {"train": "train", "test": "t10k"}


class DataError(ValueError):
    """A dataset, split or data file that cannot be used; the message says which and what to do."""


@dataclasses.dataclass(frozen=True)
class Split:
    """One process's share of a dataset split, before shuffling, batching and preprocessing.

    `examples` yields {"image": uint8 (28, 28, 1), "label": int32 ()} in the source's order, the same
    order on every pass. `max_process_examples` is the largest share over all processes (equal to
    `num_examples` with one process): `make_batches` pads every process to the batch count it needs,
    so that all processes step through the same number of global batches.
    """

    examples: tf.data.Dataset
    num_examples: int
    num_classes: int
    name: str
    max_process_examples: int
    # The whole split (every process's share) as (source split, start, stop) ranges.
    ranges: tuple[tuple[str, int, int], ...] = ()
    # The examples as in-memory arrays, for a split of cached values (`with_examples`), else None.
    arrays: dict[str, np.ndarray] | None = None


def shared_examples(a: Split, b: Split) -> int:
    """How many examples of one source two splits both select ("test[:8000]", "test[7000:]": 1000)."""
    return sum(
        max(0, min(stop_a, stop_b) - max(start_a, start_b))
        for name_a, start_a, stop_a in a.ranges
        for name_b, start_b, stop_b in b.ranges
        if name_a == name_b
    )


def load_split(
    dataset: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    tfds_data_dir: str | os.PathLike | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Split:
    """Loads `split` (tfds syntax: "train", "test[:8000]", "train[10%:]") of one 28x28 digit dataset.

    With `data_dir`, the examples come from the IDX files there ("train" reads train-*-ubyte[.gz],
    "test" reads t10k-*-ubyte[.gz]; Fashion-MNIST and KMNIST ship in the same format, so `dataset`
    is then only the name shown); otherwise from the tfds dataset named `dataset`, read from (or
    downloaded once into) `tfds_data_dir`, which defaults to tfds' own ($TFDS_DATA_DIR or
    ~/tensorflow_datasets). With `process_count` > 1 each process gets its own disjoint share, as
    `tfds.split_for_jax_process` divides it: each range of the split string is cut into
    `process_count` contiguous pieces whose sizes differ by at most one, the first processes
    taking the remainder.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(
            f"process_index {process_index} / process_count {process_count}: "
            "need 0 <= process_index < process_count"
        )
    if data_dir is not None:
        return _load_idx_split(
            dataset,
            pathlib.Path(data_dir),
            split,
            process_index=process_index,
            process_count=process_count,
        )
    return _load_tfds_split(
        dataset,
        split,
        tfds_data_dir=tfds_data_dir,
        process_index=process_index,
        process_count=process_count,
    )


def _process_share(
    split: str, split_infos: dict[str, tfds.core.SplitInfo], process_index: int, process_count: int
) -> tuple[list[tuple[str, int, int]], int]:
    """Resolves `split` with tfds' own parser into (split name, start, stop) ranges for this process.

    Also returns the largest share over all processes. A bad split string or an out-of-range slice
    becomes a DataError.
    """
    shares = []
    for index in range(process_count):
        share = tfds.split_for_jax_process(split, process_index=index, process_count=process_count)
        try:
            instructions = share.to_absolute(split_infos)
        except (ValueError, NotImplementedError) as error:
            raise DataError(
                f"split {split!r}: {error} (available: {', '.join(split_infos)})"
            ) from None
        shares.append(
            [
                (
                    i.splitname,
                    i.from_ or 0,
                    split_infos[i.splitname].num_examples if i.to is None else i.to,
                )
                for i in instructions
            ]
        )
    sizes = [sum(stop - start for _, start, stop in ranges) for ranges in shares]
    if sum(sizes) == 0:
        raise DataError(f"split {split!r} selects no examples")
    return shares[process_index], max(sizes)


def _share_name(name: str, process_index: int, process_count: int) -> str:
    if process_count == 1:
        return name
    return f"{name} (process {process_index} of {process_count})"


# --- the IDX source --------------------------------------------------------------------------------


def _idx_file(data_dir: pathlib.Path, stem: str) -> pathlib.Path | None:
    for name in (stem, stem + ".gz"):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def _read_idx_bytes(path: pathlib.Path, size: int | None = None) -> bytes:
    """The file's bytes (the first `size` only, when given), gunzipped when it ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as file:
                return file.read() if size is None else file.read(size)
        with open(path, "rb") as file:
            return file.read() if size is None else file.read(size)
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot be read as an IDX file ({error})") from None


def _idx_header(path: pathlib.Path, magic: int) -> tuple[int, ...]:
    """The dimensions from an IDX header whose magic number must be `magic`."""
    num_dims = magic & 0xFF
    header = _read_idx_bytes(path, 4 + 4 * num_dims)
    if len(header) < 4 + 4 * num_dims:
        raise DataError(f"{path}: truncated IDX header ({len(header)} bytes)")
    found = int.from_bytes(header[:4], "big")
    if found != magic:
        kind = "images" if magic == IDX_IMAGES_MAGIC else "labels"
        raise DataError(f"{path}: not an IDX {kind} file (magic number {found}, expected {magic})")
    return tuple(int(d) for d in np.frombuffer(header[4:], dtype=">u4"))


def _idx_split_files(data_dir: pathlib.Path, split_name: str) -> tuple[pathlib.Path, pathlib.Path]:
    prefix = IDX_SPLIT_PREFIXES[split_name]
    images = _idx_file(data_dir, f"{prefix}-images-idx3-ubyte")
    labels = _idx_file(data_dir, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        missing = [
            f"{prefix}-{kind}-ubyte[.gz]"
            for kind, path in (("images-idx3", images), ("labels-idx1", labels))
            if path is None
        ]
        raise DataError(
            f"split {split_name!r} needs {' and '.join(missing)} in {data_dir} "
            "(IDX files: train-{images-idx3,labels-idx1}-ubyte for 'train', "
            "t10k-{images-idx3,labels-idx1}-ubyte for 'test', optionally .gz)"
        )
    return images, labels


def _idx_split_length(images: pathlib.Path, labels: pathlib.Path) -> int:
    """The number of examples, from the headers, once they agree with each other and with 28x28."""
    num_images, rows, cols = _idx_header(images, IDX_IMAGES_MAGIC)
    (num_labels,) = _idx_header(labels, IDX_LABELS_MAGIC)
    if (rows, cols) != IMAGE_SHAPE[:2]:
        raise DataError(f"{images}: images are {rows}x{cols}, expected 28x28")
    if num_images != num_labels:
        raise DataError(
            f"{images} holds {num_images} images but {labels} holds {num_labels} labels"
        )
    return num_images


def _read_idx_arrays(images: pathlib.Path, labels: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """All images [N, 28, 28, 1] uint8 and labels [N] int32 of one split, each file validated."""
    num_examples = _idx_split_length(images, labels)
    arrays = []
    for path, header_size, shape in (
        (images, 16, (num_examples, *IMAGE_SHAPE)),
        (labels, 8, (num_examples,)),
    ):
        payload = _read_idx_bytes(path)[header_size:]
        expected = math.prod(shape)
        if len(payload) != expected:
            problem = "truncated" if len(payload) < expected else "longer than its header says"
            raise DataError(
                f"{path}: {problem}: the header promises {num_examples} entries "
                f"({expected} bytes of data) but the file holds {len(payload)}"
            )
        arrays.append(np.frombuffer(payload, dtype=np.uint8).reshape(shape))
    image_array, label_array = arrays
    bad = np.flatnonzero(label_array >= IDX_NUM_CLASSES)
    if bad.size:
        raise DataError(
            f"{labels}: label {label_array[bad[0]]} at index {bad[0]} is outside 0..9 "
            f"({bad.size} such labels)"
        )
    return image_array, label_array.astype(np.int32)


def write_idx_split(
    directory: str | os.PathLike,
    prefix: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    gz: bool = False,
) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes `prefix`-images-idx3-ubyte and -labels-idx1-ubyte (optionally .gz), as MNIST ships.

    `images` is uint8 [N, 28, 28] or [N, 28, 28, 1], `labels` [N] in 0..9; the inverse of what the
    IDX source reads (the benchmark's synthetic data and the tests use it).
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    images = np.asarray(images, np.uint8).reshape(len(images), *IMAGE_SHAPE[:2])
    labels = np.asarray(labels, np.uint8)
    paths = []
    for kind, magic, array in (
        ("images-idx3", IDX_IMAGES_MAGIC, images),
        ("labels-idx1", IDX_LABELS_MAGIC, labels),
    ):
        payload = idx_bytes(array, magic)
        path = directory / f"{prefix}-{kind}-ubyte{'.gz' if gz else ''}"
        path.write_bytes(gzip.compress(payload) if gz else payload)
        paths.append(path)
    return paths[0], paths[1]


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An IDX file's bytes: magic number, big-endian dimensions, then the raw uint8 data."""
    array = np.asarray(array)
    return magic.to_bytes(4, "big") + np.asarray(array.shape, ">u4").tobytes() + array.tobytes()


def _load_idx_split(
    dataset: str, data_dir: pathlib.Path, split: str, *, process_index: int, process_count: int
) -> Split:
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is not a directory")
    # Only the splits that the split string names are opened, and only their headers are needed to
    # resolve it, so "test[:8000]" works with the t10k files alone.
    named = _split_names(split)
    if "all" in named:
        named = {
            name
            for name in IDX_SPLIT_PREFIXES
            if _idx_file(data_dir, f"{IDX_SPLIT_PREFIXES[name]}-images-idx3-ubyte")
        }
    split_files = {}
    split_infos = {}
    for split_name in sorted(named):
        if split_name not in IDX_SPLIT_PREFIXES:
            raise DataError(
                f"split {split!r}: IDX data has only 'train' (train-*-ubyte files) "
                "and 'test' (t10k-*-ubyte files)"
            )
        split_files[split_name] = _idx_split_files(data_dir, split_name)
        split_infos[split_name] = tfds.core.SplitInfo(
            name=split_name,
            shard_lengths=[_idx_split_length(*split_files[split_name])],
            num_bytes=0,
        )
    ranges, max_process_examples = _process_share(split, split_infos, process_index, process_count)
    whole_split = tuple(_process_share(split, split_infos, 0, 1)[0])
    arrays = {}
    parts = []
    for split_name, start, stop in ranges:
        if split_name not in arrays:
            arrays[split_name] = _read_idx_arrays(*split_files[split_name])
        images, labels = arrays[split_name]
        parts.append(
            tf.data.Dataset.from_tensor_slices(
                {"image": images[start:stop], "label": labels[start:stop]}
            )
        )
    examples = parts[0]
    for part in parts[1:]:
        examples = examples.concatenate(part)
    return Split(
        examples=examples,
        num_examples=sum(stop - start for _, start, stop in ranges),
        num_classes=IDX_NUM_CLASSES,
        name=_share_name(f"{dataset} {split} ({data_dir})", process_index, process_count),
        max_process_examples=max_process_examples,
        ranges=whole_split,
    )


def _split_names(split: str) -> set[str]:
    """The split names that a split string reads ({"train", "test"} for "train[:10%]+test")."""
    return {part.split("[")[0].strip() for part in split.split("+")}


# --- the tfds source -------------------------------------------------------------------------------


def _offline_advice(dataset: str) -> str:
    return (
        f"without network, pass --data-dir DIR holding the MNIST IDX files "
        f"(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        f"t10k-labels-idx1-ubyte, optionally .gz), or copy a tfds data dir where {dataset!r} was "
        f"already prepared and point TFDS_DATA_DIR at it"
    )


def _check_can_download(builder: tfds.core.DatasetBuilder) -> None:
    """Fails at once, with the offline options, when the dataset's download host cannot be reached.

    tfds retries an unreachable host with exponential backoff for minutes before giving up; one
    unretried request to the first URL it would fetch tells the same thing in seconds.
    """
    urls = sorted(builder.url_infos or {})
    if not urls:
        return
    try:
        urllib.request.urlopen(urllib.request.Request(urls[0], method="HEAD"), timeout=10).close()
    except urllib.error.HTTPError:
        return  # the host answered, with whatever status: it is reachable
    except OSError as error:  # URLError and timeouts are OSErrors
        host = urllib.parse.urlsplit(urls[0]).netloc
        raise DataError(
            f"cannot download tfds dataset {builder.name!r}: {host} is unreachable "
            f"({type(error).__name__}); {_offline_advice(builder.name)}"
        ) from None


def _load_tfds_split(
    dataset: str,
    split: str,
    *,
    tfds_data_dir: str | os.PathLike | None,
    process_index: int,
    process_count: int,
) -> Split:
    try:
        builder = tfds.builder(dataset, data_dir=tfds_data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(
            f"--dataset {dataset!r} is not a tfds dataset (e.g. mnist, fashion_mnist, kmnist); "
            "see tfds.list_builders()"
        ) from None
    except ValueError as error:  # e.g. an unknown builder config ("mnist/foo")
        raise DataError(f"--dataset {dataset!r}: {str(error).splitlines()[0]}") from None
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    features = dict(builder.info.features.items())
    image = features.get(image_key)
    label = features.get(label_key)
    if (
        not isinstance(image, tfds.features.Image)
        or tuple(image.shape) != IMAGE_SHAPE
        or tf.as_dtype(image.dtype) != tf.uint8
    ):
        found = "none" if image is None else f"{image.shape} {tf.as_dtype(image.dtype).name}"
        raise DataError(
            f"--dataset {dataset!r}: needs 28x28x1 uint8 images in {image_key!r}, found {found}"
        )
    if not isinstance(label, tfds.features.ClassLabel):
        raise DataError(f"--dataset {dataset!r}: needs class labels in {label_key!r}")

    if not builder.is_prepared():
        _check_can_download(builder)
        try:
            builder.download_and_prepare()
        except OSError as error:  # tfds' download errors are OSErrors
            raise DataError(
                f"cannot download tfds dataset {dataset!r} ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:200]}); {_offline_advice(dataset)}"
            ) from None

    split_infos = dict(builder.info.splits.items())
    ranges, max_process_examples = _process_share(split, split_infos, process_index, process_count)
    whole_split = tuple(_process_share(split, split_infos, 0, 1)[0])
    examples = builder.as_dataset(
        split=tfds.split_for_jax_process(
            split, process_index=process_index, process_count=process_count
        ),
        shuffle_files=False,
    )
    examples = examples.map(
        lambda example: {
            "image": example[image_key],
            "label": tf.cast(example[label_key], tf.int32),
        },
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return Split(
        examples=examples,
        num_examples=sum(stop - start for _, start, stop in ranges),
        num_classes=label.num_classes,
        name=_share_name(f"{dataset} {split}", process_index, process_count),
        max_process_examples=max_process_examples,
        ranges=whole_split,
    )


def with_examples(split: Split, arrays: dict[str, np.ndarray]) -> Split:
    """`split` with its examples replaced by in-memory arrays in the same order (cached features).

    The arrays must hold one row per example of `split`; the process share, class count and name
    stay, so batching gives the same shuffled order and batch count as the original examples.
    """
    lengths = {name: len(values) for name, values in arrays.items()}
    if set(lengths.values()) != {split.num_examples}:
        raise DataError(f"{split.name}: {split.num_examples} examples but arrays of {lengths} rows")
    examples = tf.data.Dataset.from_tensor_slices(arrays)
    return dataclasses.replace(split, examples=examples, arrays=arrays)


def in_memory_split(
    images: np.ndarray, labels: np.ndarray, *, num_classes: int, name: str
) -> Split:
    """A split of examples held in memory, uint8 images [N, 28, 28, 1] and int32 labels [N], for
    one process: the digits `mnist-flax predict` made of a user's image files."""
    return Split(
        examples=tf.data.Dataset.from_tensor_slices({"image": images, "label": labels}),
        num_examples=len(images),
        num_classes=num_classes,
        name=name,
        max_process_examples=len(images),
    )


# --- batches ---------------------------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """The data-order seed of `epoch` under run seed `seed`: a pure function, so a resumed run
    shuffles exactly as an uninterrupted one, and neighbouring epochs get unrelated orders."""
    if seed < 0 or epoch < 0:
        raise DataError(f"seed {seed} and epoch {epoch} must be >= 0")
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def batch_indices(
    num_examples: int, batch_size: int, shuffle_seed: int | None, num_batches: int | None = None
) -> np.ndarray:
    """Which example each row of each batch of an epoch holds: [num_batches, batch_size], -1 for
    the padding that fills the last batch (and any further all-padding batches).

    With a `shuffle_seed`, the order is `np.random.default_rng(shuffle_seed).permutation(
    num_examples)` of the examples' own order; `None` keeps that order. `num_batches` defaults to
    ceil(num_examples / batch_size). The one definition of an epoch's batches: tf.data gathers
    them on the host (`shuffle_and_batch`), the epochs on cached values on the device.
    """
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size} must be >= 1")
    needed = -(-num_examples // batch_size)
    num_batches = needed if num_batches is None else num_batches
    if num_batches < needed:
        raise DataError(
            f"num_batches {num_batches} < the {needed} that {num_examples} examples need"
        )
    order = (
        np.arange(num_examples)
        if shuffle_seed is None
        else np.random.default_rng(shuffle_seed).permutation(num_examples)
    )
    indices = np.full(num_batches * batch_size, -1, np.int32)  # -1: padding
    indices[:num_examples] = order
    return indices.reshape(num_batches, batch_size)


def shuffle_and_batch(
    examples: tf.data.Dataset,
    *,
    num_examples: int,
    batch_size: int,
    shuffle_seed: int | None,
    num_batches: int | None = None,
) -> tf.data.Dataset:
    """Batches a dataset of dict elements, shuffled, padded to a static batch size and masked.

    The batches are `batch_indices`'s: the order depends on nothing but the seed and the length, so
    datasets of equal length (images and their cached features) are shuffled alike, and not on
    TensorFlow's global seed. The split is held in memory as one element (raw 28x28 digits, 47 MB
    for all of MNIST, or pooled feature vectors) and the batches are gathered from it.

    Every element gets a bool "mask" [batch_size]. The padding is big_vision's (and clu's): the
    examples are followed by endless padding marked False, cut into `num_batches` whole batches,
    so each example is seen exactly once, the last batch is filled with padding (zeros), and shapes
    never change (no recompilation). It is done on the example indices (-1 marks padding), so that
    tf.data works a batch at a time rather than an example at a time. `num_batches` may ask for
    more batches than the examples need, all padding, which keeps every process of a multi-process
    run stepping through the same count. `num_examples` must be the dataset's length; a mismatch
    fails when it is read.
    """
    if not isinstance(examples.element_spec, dict) or "mask" in examples.element_spec:
        raise DataError("shuffle_and_batch needs dict elements without a 'mask' entry")
    indices = batch_indices(num_examples, batch_size, shuffle_seed, num_batches)
    specs = examples.element_spec
    examples = examples.apply(tf.data.experimental.assert_cardinality(num_examples))
    index_batches = tf.data.Dataset.from_tensor_slices(indices)
    if num_examples == 0:  # a process with no share still steps through its padding batches
        examples = tf.data.Dataset.from_tensors(
            {name: tf.zeros(spec.shape, spec.dtype) for name, spec in specs.items()}
        )

    def gather(everything: dict[str, tf.Tensor], indices: tf.Tensor) -> dict:
        mask = indices >= 0
        batch = {}
        for name, values in everything.items():
            rows = tf.gather(values, tf.maximum(indices, 0))
            row_mask = tf.reshape(mask, [-1] + [1] * (values.shape.rank - 1))
            batch[name] = tf.where(row_mask, rows, tf.zeros_like(rows))
        batch["mask"] = mask
        return batch

    # One element holding the whole split, then the batches of indices gathered from it.
    batches = examples.batch(max(num_examples, 1)).flat_map(
        lambda everything: index_batches.map(lambda indices: gather(everything, indices))
    )
    return batches.prefetch(tf.data.AUTOTUNE)


def preprocess_images(images_uint8: tf.Tensor, image_size: int) -> tf.Tensor:
    """[B, H, W, 1] uint8 digits -> [B, S, S, 3] float32 in [-1, 1], as the tutorial feeds them.

    Bilinear `tf.image.resize` (half-pixel centres, no antialiasing), then MobileNetV2's
    `preprocess_input` scaling x / 127.5 - 1. Resizing the single gray channel before repeating it
    gives the same values as the tutorial's RGB-then-resize at a third of the work.
    """
    if image_size < 1:
        raise DataError(f"--image-size {image_size} must be >= 1")
    images = tf.cast(images_uint8, tf.float32)
    images = tf.image.resize(images, (image_size, image_size), method="bilinear")
    images = images / 127.5 - 1.0
    return tf.image.grayscale_to_rgb(images)


def make_batches(
    split: Split,
    *,
    batch_size: int,
    image_size: int,
    shuffle_seed: int | None,
    resize: str = "host",
) -> tf.data.Dataset:
    """One epoch of model-ready batches {"image", "label" int32 [B], "mask" bool [B]}, prefetched.

    resize="host": "image" is float32 [B, S, S, 3] in [-1, 1], resized here. resize="device":
    "image" stays uint8 [B, 28, 28, 1] (784 bytes an image instead of 602 KB at 224) and the
    training step applies the same preprocessing on the accelerator. resize="none": "image" is
    float32 [B, 28, 28, 1] in [0, 1], the Keras notebook's `x / 255.0`, which its model upsamples
    inside the step. `batch_size` is this
    process's share of the global batch; every process yields the same number of batches.
    Splits whose examples carry no "image" (cached features) are batched as they are, in the same
    shuffled order as their images would be.
    """
    if resize not in (*RESIZE_PLACES, "none"):
        raise DataError(f"--resize {resize!r}: choose one of {', '.join(RESIZE_PLACES)}")
    if image_size < 1:
        raise DataError(f"--image-size {image_size} must be >= 1")
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size} must be >= 1")
    batches = shuffle_and_batch(
        split.examples,
        num_examples=split.num_examples,
        batch_size=batch_size,
        shuffle_seed=shuffle_seed,
        num_batches=-(-split.max_process_examples // batch_size),
    )
    # A split of cached features (`with_examples`) has no images to preprocess.
    if resize == "host" and "image" in split.examples.element_spec:
        batches = batches.map(
            lambda batch: {**batch, "image": preprocess_images(batch["image"], image_size)},
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    if resize == "none" and "image" in split.examples.element_spec:
        batches = batches.map(
            lambda batch: {**batch, "image": tf.cast(batch["image"], tf.float32) / 255.0},
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    # No autotuning thread: deleting an iterator waits for that thread to wake up, with the GIL
    # held, which stalled whole runs between an epoch and its evaluation (docs/benchmarks.md).
    # Without it, AUTOTUNE keeps its starting values: a map on min(16, cores) threads and a
    # prefetch buffer of its first size.
    options = tf.data.Options()
    options.autotune.enabled = False
    return batches.prefetch(tf.data.AUTOTUNE).with_options(options)
