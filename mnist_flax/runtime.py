"""The process around a run: quiet libraries and JAX's persistent compilation cache.

`quiet_libraries` is what the `mnist-flax` command calls before TensorFlow or JAX load: TensorFlow
2.21 writes its oneDNN notice and absl's "All log messages before absl::InitializeLog()" line to
stderr even with `TF_CPP_MIN_LOG_LEVEL` set, unless its oneDNN custom operations are off
(`TF_ENABLE_ONEDNN_OPTS=0`); this project uses TensorFlow for tf.data only (no TensorFlow matmul or
convolution), so they do nothing for it. Its errors are held back too (`TF_CPP_MIN_LOG_LEVEL=3`):
the full build that `tensorflow` installs logs "failed call to cuInit" on a machine without a GPU
driver the first time it lists its devices, and TensorFlow's errors that matter to tf.data reach
Python as exceptions. Orbax's absl warnings (a read-only checkpoint directory when evaluating) are
held back too. Environment variables a user set are left as they are.

`import_tensorflow` imports TensorFlow without the Keras import its `__init__` makes and keeps it
off the GPUs, which are JAX's (below). The full build of `tensorflow` 2.21 (not tensorflow-cpu's)
also logs "Could not find cuda drivers on your machine" from its CUDA stub as it loads, whatever
`TF_CPP_MIN_LOG_LEVEL` says (tensorflow/tensorflow#100442); so where that level hides TensorFlow's
INFO lines, the import writes nothing to stderr (file descriptor 2) at all.

`enable_compilation_cache` turns on JAX's persistent compilation cache, so that a second run of the
same command (or a resumed run) loads its compiled steps instead of compiling them again. It lives
in the per-user `cache_home()`, beside the cached features `feature_cache.py` keeps there.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import pathlib
import sys

# Anything the user set wins (setdefault).
QUIET_ENVIRONMENT = {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}


def quiet_libraries() -> None:
    """Silences TensorFlow's and absl's start-up chatter; call before TensorFlow is imported."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    # Orbax logs through absl's Python logger; its warnings are about its own options.
    logging.getLogger("absl").setLevel(logging.ERROR)


def freeze_for_exit() -> None:
    """Spares the interpreter's last garbage collection every object alive now (`gc.freeze`).

    For a process about to exit: TensorFlow's and JAX's modules hold millions of objects, and the
    collection Python runs at exit walks every one (what that costs: docs/benchmarks.md,
    "Start-up"). Not for a process that goes on: a frozen object is never collected.
    """
    gc.freeze()


def import_tensorflow():
    """`import tensorflow`, minus the Keras 3 import TensorFlow's `__init__` makes; returns the module.

    TensorFlow imports `keras.src.optimizers` at start-up, whole Keras with it, only so that Keras'
    optimizers register with SavedModel (b/196254385), and passes on an ImportError. This project
    uses TensorFlow for tf.data and tfds, which need no Keras, so it skips that import
    (docs/benchmarks.md, "Start-up"). `keras` is hidden while TensorFlow loads and nothing else: a later
    `import keras` (or `tf.keras`) loads it as usual. Where Keras or TensorFlow is loaded already,
    this is a plain import.

    TensorFlow is then kept off the GPUs (`tf.config.set_visible_devices([], "GPU")`, as Flax's
    examples do): it would otherwise take most of their memory, which JAX needs. Its pip builds
    cannot load a TPU's libtpu at all. Where TensorFlow has set its devices up already (a notebook
    that used it first), they are left as they are.
    """
    if "tensorflow" in sys.modules or "keras" in sys.modules:
        tf = importlib.import_module("tensorflow")
    else:
        sys.modules["keras"] = None  # `import keras` raises ImportError while this is here
        try:
            with _stderr_muted(_tensorflow_log_level() >= 1):
                tf = importlib.import_module("tensorflow")
        finally:
            if sys.modules.get("keras", 0) is None:
                del sys.modules["keras"]
    # RuntimeError: "Visible devices cannot be modified after being initialized".
    with contextlib.suppress(RuntimeError):
        tf.config.set_visible_devices([], "GPU")
    return tf


def _tensorflow_log_level() -> int:
    """`TF_CPP_MIN_LOG_LEVEL` as TensorFlow reads it: 0 (everything) unless a number says more."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


@contextlib.contextmanager
def _stderr_muted(mute: bool):
    """File descriptor 2 points at the null device inside (when `mute`): C++ libraries write there
    directly, past Python's `sys.stderr`. An exception raised inside still reaches the caller."""
    saved = _duplicate_stderr() if mute else None
    if saved is None:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _duplicate_stderr() -> int | None:
    """A copy of file descriptor 2 once Python's buffer is out, or None where there is none."""
    sys.stderr.flush()
    try:
        return os.dup(2)
    except OSError:
        return None


def cache_home() -> pathlib.Path:
    """This project's per-user cache: $XDG_CACHE_HOME/mnist_flax, by default ~/.cache/mnist_flax.
    It holds JAX's compiled steps (jax/) and cached backbone features (features/, `feature_cache`)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(root, "mnist_flax")


def enable_compilation_cache(setting: str) -> pathlib.Path | None:
    """Points JAX's persistent compilation cache at `setting`'s directory; returns it.

    "none": JAX's own configuration is left alone (off unless the user turned it on). "auto": a
    cache directory already configured for JAX (JAX_COMPILATION_CACHE_DIR, or `jax.config` in a
    notebook) is kept, else the per-user one. Anything else is the directory to use. Every
    compilation is cached, however quick: the steps of a small run compile in well under JAX's
    default threshold of one second, and each still costs start-up time.
    """
    import jax

    if setting == "none":
        return None
    directory = jax.config.jax_compilation_cache_dir
    if setting != "auto" or not directory:
        directory = str(cache_home() / "jax" if setting == "auto" else setting)
        jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return pathlib.Path(directory)
