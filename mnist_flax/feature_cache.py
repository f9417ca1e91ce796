"""Where a frozen stage's cached values are kept, and what they depend on, so a later run finds them.

`train.py` decides when caching is exact (`_EpochLoop.inputs_for`) and computes the values; this
module owns finding them again. A split's cached values (the backbone's pooled features; while
fine-tuning, the activation entering the fine-tuned layers) are a function of the frozen layers'
parameters, of the code and libraries that run them, of the settings that shape the computation
(image size, dtype, convolutions, resize, batch) and of the examples, and `FeatureCache.key`
hashes exactly those: the parameters' and the examples' bytes, never a file name, so new weights
or new data under an old name are a different key.

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
import os
import pathlib
import tempfile
import warnings
import zipfile

import jax
import numpy as np
from flax import nnx

from mnist_flax import input_pipeline, runtime

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
        """Deletes the least recently used files until the directory fits `DISK_BUDGET_MB`."""
        files = {}
        for path in self.directory.glob("*.npz"):
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
