"""Feature caching: when a stage's epochs can run on what its frozen layers compute, computing that
once, and keeping it so that a later run finds it.

`stage_inputs` decides, per stage, whether caching is exact and within budget, and gives the
epoch loop its splits on cached values (the backbone's pooled features; while fine-tuning, the
activation entering the fine-tuned layers) or on images. Those values are a function of the frozen
layers' parameters, of the code and libraries that run them, of the settings that shape the
computation (image size, dtype, convolutions, resize, batch) and of the examples, and
`FeatureCache.key` hashes exactly those: the parameters' and the examples' bytes, never a file
name, so new weights or new data under an old name are a different key.

They are kept in this process's memory (the next seed of `mnist-flax seeds` finds them there) and,
unless `--feature-cache none`, as one .npz file per split in a directory (`--feature-cache auto`:
$XDG_CACHE_HOME/mnist_flax/features, by default ~/.cache/mnist_flax/features). A rerun of the same
command, a resumed run, or another recipe for the head on the same data then loads them instead of
running the backbone over every image again: the features computed once by an earlier run, the
same bits. The directory keeps the most recently used files up to `DISK_BUDGET_MB` and deleting
it is always safe; a file that cannot be read or does not match is computed again.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import math
import os
import pathlib
import tempfile
import time
import warnings
import zipfile

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from mnist_flax import cpu_chunks, housekeeping, input_pipeline, parallel, runtime
from mnist_flax.config import FROZEN_STAGE, TrainConfig
from mnist_flax.keras_names import NUM_UNITS, unit_of_layer
from mnist_flax.model import resolve_resize
from mnist_flax.steps import StepRunner, epoch_batches, prefetch_to_device

# The directory's files beyond this (least recently used first) are deleted after each write:
# 1280 float32 features per digit make 51 MB for MNIST's 10,000 test digits, 307 MB for its
# 60,000 training digits.
DISK_BUDGET_MB = 4096
# Libraries whose versions can change the cached values (XLA's code generation, tf.data's resize).
_LIBRARIES = ("jax", "jaxlib", "flax", "numpy", "tensorflow")


@functools.cache
def code_digest() -> str:
    """This package's source and the computing libraries' versions: a change to either can change
    the values, so a cache from other code is never read."""
    digest = hashlib.sha256()
    for path in sorted(pathlib.Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for library in _LIBRARIES:
        try:
            version = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            version = "-"
        digest.update(f"{library}={version}\0".encode())
    return digest.hexdigest()


class FeatureCache:
    """Cached values by key: in this process's memory, and in `directory` when there is one."""

    def __init__(self, directory: pathlib.Path | None):
        self.directory = directory
        self.memory: dict[str, dict[str, np.ndarray]] = {}
        # Split examples already hashed: id -> (the dataset, kept alive so the id stays its own,
        # the examples' digest, the labels in order).
        self._examples: dict[int, tuple[object, str, np.ndarray]] = {}

    @staticmethod
    def parameters_digest(modules: list[nnx.Module]) -> str:
        """The bytes of every variable of `modules` (parameters and BatchNorm statistics), in order."""
        digest = hashlib.sha256()
        for module in modules:
            for path, leaf in nnx.to_flat_state(nnx.state(module)):
                # A replicated array: this process's copy (every copy holds the same values).
                value = np.asarray(leaf[...].addressable_data(0))
                digest.update(f"{path}{value.dtype}{value.shape}".encode())
                digest.update(np.ascontiguousarray(value).tobytes())
        return digest.hexdigest()

    @classmethod
    def for_flag(cls, setting: str) -> FeatureCache:
        """--feature-cache: "none" (memory only), "auto" (the per-user directory) or a directory."""
        if setting == "none":
            return cls(None)
        return cls(
            runtime.cache_home() / "features" if setting == "auto" else pathlib.Path(setting)
        )

    def key(self, split: input_pipeline.Split, parameters: str, settings: dict) -> str:
        """The key of `split`'s values computed by frozen layers with `parameters_digest`
        `parameters` under `settings` (JSON-serialisable: what else shapes the computation)."""
        examples, _ = self._hash_examples(split)
        content = {
            "code": code_digest(),
            "backend": [jax.default_backend(), jax.devices()[0].device_kind],
            "parameters": parameters,
            "examples": examples,
            "settings": settings,
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def load(self, key: str, split: input_pipeline.Split) -> tuple[dict, str] | None:
        """`split`'s cached arrays under `key` and where they were found ("memory" or the
        directory), or None. A file that cannot be read, or whose labels are not the split's, is
        ignored (and replaced when the values are stored again)."""
        if key in self.memory:
            return self.memory[key], "memory"
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path) as file:
                arrays = {name: file[name] for name in file.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            return None
        _, labels = self._hash_examples(split)
        if not np.array_equal(arrays.get("label"), labels):
            return None
        os.utime(path)  # most recently used: the last file the budget deletes
        self.memory[key] = arrays
        return arrays, str(self.directory)

    def store(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        """Keeps `arrays` under `key` in memory and, written atomically, in the directory."""
        self.memory[key] = arrays
        path = self._path(key)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as file:
                np.savez(file, **arrays)
            os.replace(file.name, path)
        except OSError as error:
            # The run goes on from memory; only a later run loses the values.
            warnings.warn(
                f"--feature-cache {self.directory}: cannot keep the cached values there ({error}); "
                "pass another directory or none",
                stacklevel=2,
            )
            return
        self._keep_within_budget(path)

    def _path(self, key: str) -> pathlib.Path | None:
        return None if self.directory is None else self.directory / f"{key}.npz"

    def _hash_examples(self, split: input_pipeline.Split) -> tuple[str, np.ndarray]:
        """The digest of `split`'s images and labels (in order), and its labels; read once."""
        known = self._examples.get(id(split.examples))
        if known is None:
            digest, labels = hashlib.sha256(), []
            for batch in split.examples.batch(8192).as_numpy_iterator():
                digest.update(np.ascontiguousarray(batch["image"]).tobytes())
                digest.update(np.ascontiguousarray(batch["label"], np.int32).tobytes())
                labels.append(batch["label"])
            known = (split.examples, digest.hexdigest(), np.concatenate(labels).astype(np.int32))
            self._examples[id(split.examples)] = known
        return known[1], known[2]

    def _keep_within_budget(self, written: pathlib.Path) -> None:
        """Deletes the least recently used files until the directory fits `DISK_BUDGET_MB`.

        What a run killed while writing left half written (a `.tmp` file) counts too, and goes
        first as the oldest; one being written now is the newest, so it goes last.
        """
        files = {}
        for path in [*self.directory.glob("*.npz"), *self.directory.glob("*.tmp")]:
            try:
                status = path.stat()
            except FileNotFoundError:  # deleted meanwhile by another run
                continue
            files[path] = (status.st_mtime, status.st_size)
        total = sum(size for _, size in files.values())
        for path in sorted(files, key=lambda path: files[path][0]):
            if total <= DISK_BUDGET_MB * 2**20:
                break
            if path != written:
                path.unlink(missing_ok=True)
                total -= files[path][1]


def stage_inputs(
    stage: str,
    runner: StepRunner,
    splits: dict[str, input_pipeline.Split],
    *,
    config: TrainConfig,
    cache: FeatureCache,
    stop: housekeeping.StopRequest,
) -> tuple[str, dict[str, input_pipeline.Split]]:
    """What the stage's epochs run on ("images", or cached values), and the splits holding it.

    Caching is exact where every layer before the cached point is frozen and deterministic
    (BatchNorm uses running statistics) and no augmentation changes an image from one epoch to
    the next, so every epoch would compute the same values. The frozen stage caches the
    backbone's pooled features (the epochs train the head alone); the fine-tuning stage caches
    the activation entering the fine-tuned layers (the epochs run only those layers and the
    head). The notebook model's adapter trains in front of the backbone, so nothing after it can
    be cached. `--cache-features auto` caches when the values fit `--cache-budget-mb`; "always"
    whenever it is exact. Computing them checks `stop` between batches.
    """
    model, mode = runner.model, config.cache_features
    point = "features" if stage == FROZEN_STAGE else "activations"
    what = "backbone features" if stage == FROZEN_STAGE else "fine-tuned layers' input"
    if mode == "never":
        return "images", splits
    if model.adapter is not None:
        housekeeping.say(
            f"not caching the {what}: the notebook model's adapter trains in front of the "
            "backbone, so they change with every step; the epochs run on images"
        )
        return "images", splits
    if stage != FROZEN_STAGE and model.cut == 0:
        housekeeping.say(
            f"not caching the {what}: fine-tuning from {model.fine_tune_from} trains the "
            "whole backbone, so no frozen layer comes before it; the epochs run on images"
        )
        return "images", splits
    shape = _shape(point, runner, splits["train"], config)
    examples = sum(split.max_process_examples for split in splits.values())
    megabytes = examples * math.prod(shape) * 4 / 2**20  # float32
    size = f"{examples} x {' x '.join(map(str, shape))} float32, {megabytes:,.0f} MB"
    if mode == "auto" and megabytes > config.cache_budget_mb:
        housekeeping.say(
            f"not caching the {what}: {size} is over --cache-budget-mb "
            f"{config.cache_budget_mb}; the epochs run on images"
        )
        return "images", splits
    start = time.perf_counter()
    keys = _keys(point, runner, splits, config, cache)
    found = {}
    for role, split in splits.items():
        arrays = cache.load(keys[role], split)
        if arrays is None:
            computed = _compute(point, runner, split, config, stop)
            cache.store(keys[role], computed)
            arrays = (computed, None)
        found[role] = (input_pipeline.with_examples(split, arrays[0]), arrays[1])
    splits = {role: split for role, (split, _) in found.items()}
    names = ", ".join(split.name for split in splits.values())
    computed = [splits[role].name for role, (_, where) in found.items() if where is None]
    if computed:
        seconds = f"{time.perf_counter() - start:.1f} s"
        if len(computed) < len(splits):
            seconds += f" for {', '.join(computed)}, the rest cached by an earlier run"
        kept = f", kept in {cache.directory}" if cache.directory is not None else ""
        housekeeping.say(f"cached the {what} of {names}: {size} ({seconds}){kept}")
    else:
        wheres = {where for _, where in found.values()}
        origin = "" if wheres == {"memory"} else f" ({cache.directory})"
        housekeeping.say(f"reusing the {what} of {names} cached by an earlier run{origin}: {size}")
    return f"cached {point}", splits


def _shape(
    point: str, runner: StepRunner, split: input_pipeline.Split, config: TrainConfig
) -> tuple[int, ...]:
    """The shape of one example's cached values (from the jitted function's shape)."""
    spec = epoch_batches(split, config, None).element_spec["image"]
    # A whole global batch: the jitted function splits its rows over the mesh.
    shape = (config.batch_size, *spec.shape[1:])
    image = jax.ShapeDtypeStruct(shape, spec.dtype.as_numpy_dtype)
    return tuple(jax.eval_shape(lambda x: runner.forward(x, point), image).shape[1:])


def _keys(
    point: str,
    runner: StepRunner,
    splits: dict[str, input_pipeline.Split],
    config: TrainConfig,
    cache: FeatureCache,
) -> dict[str, str]:
    """Each split's `FeatureCache.key`: the frozen layers (every backbone layer before the
    cached point), how they run, and the split's examples."""
    model = runner.model
    backbone = model.backbone
    stop = NUM_UNITS if point == "features" else model.cut
    frozen = [
        module
        for name, module in backbone.keras_layers().items()
        if name != "predictions" and unit_of_layer(name) < stop
    ]
    parameters = FeatureCache.parameters_digest(frozen)
    settings = {
        "values": point,
        # With a fine-tuning stage, the features are computed in two parts (`TransferClassifier`).
        "cut": model.cut if model.fine_tune_from is not None else None,
        "image_size": config.image_size,
        "dtype": config.dtype,
        "conv_impl": config.conv_impl,
        # Images per chunk depend on the CPU's caches (`cpu_chunks.max_chunk`).
        "unit_chunks": cpu_chunks.unit_chunks(model, config.image_size, config.image_size),
        "resize": resolve_resize(config.resize, config.model),
        "batch_size": parallel.local_batch_size(config.batch_size),
        "devices": jax.device_count(),
        "process": [jax.process_index(), jax.process_count()],
    }
    return {role: cache.key(split, parameters, settings) for role, split in splits.items()}


def _compute(
    point: str,
    runner: StepRunner,
    split: input_pipeline.Split,
    config: TrainConfig,
    stop: housekeeping.StopRequest,
) -> dict[str, np.ndarray]:
    """What the frozen layers make of every image of `split`, and its labels, in its order.

    Computed by the same jitted layers as the end-to-end step, in the split's own order, so
    the epochs shuffle the cached values exactly as they would shuffle the images.
    """
    values, labels = [], []
    batches = epoch_batches(split, config, None).as_numpy_iterator()
    local_batch = parallel.local_batch_size(config.batch_size)
    num_steps = math.ceil(split.max_process_examples / local_batch)
    with tqdm(
        total=num_steps,
        desc=f"caching {split.name} {point}",
        unit="step",
        leave=False,
        disable=config.quiet or not housekeeping.is_writer(),
    ) as bar:
        place = lambda batch: (batch, parallel.shard_batch(batch, runner.mesh))  # noqa: E731
        for host, device in prefetch_to_device(batches, place=place):
            real = host["mask"]
            # Each row comes back from the device (so the process) that holds its image.
            rows = parallel.local_rows(runner.forward(device["image"], point), runner.mesh)
            # bfloat16 -> float32 is exact, and the next layer casts back to its dtype.
            values.append(rows[real].astype(np.float32))
            labels.append(host["label"][real])
            bar.update(1)
            stop.check()
    return {point: np.concatenate(values), "label": np.concatenate(labels)}
