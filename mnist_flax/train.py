"""The training job: a frozen ImageNet MobileNetV2 with a new Dense head, trained on MNIST-like data.

This module owns
- `TransferClassifier`: the frozen backbone (global average pooling built in) and the Dense head;
- what trains: `freeze_labels` names every parameter "frozen" or "trainable" from its path and
  `make_optimizer` turns those labels into `optax.multi_transform`, the one place that says what is
  frozen (`set_to_zero` for the backbone, Adam for the head);
- the steps `train_step` / `eval_step` and `preprocess_on_device` (for `resize="device"`);
- the epoch loop `train_and_evaluate`, `evaluate`, and what they write into the workdir
  (history.json, Orbax checkpoints through `checkpoints.py`, curves.png and friends through `plotting.py`);
- `--cache-features`: the frozen backbone's pooled features computed once per split, then the same
  epoch loop and steps on batches of features instead of images;
- data parallelism over every device of every process (`parallel.py`: batch sharded over a 1-D
  mesh, state replicated), the same code on one device and on a pod slice.

Why freezing costs no backward pass through the backbone: `set_to_zero` never reads the gradient it
is given, so every backbone gradient is dead code, and XLA removes it while compiling. The head sits
after the backbone, so its own gradient needs only the pooled features. `tests/test_train.py`
checks this from the compiled step's cost analysis (train step FLOPs within a few percent of the
forward pass).

BatchNorm in the backbone always normalises with its running statistics (Keras `training=False`),
and those statistics are `nnx.BatchStat`s, which the optimizer (`wrt=nnx.Param`) never sees.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from mnist_flax import checkpoints, input_pipeline, parallel, plotting
from mnist_flax.mobilenet_v2 import MIN_INPUT_SIZE, MobileNetV2, resolve_depthwise

FROZEN = "frozen"
TRAINABLE = "trainable"
# Every parameter lives under one of these submodules of TransferClassifier; the label says what
# the optimizer does with it.
LABEL_OF_SUBMODULE = {"backbone": FROZEN, "head": TRAINABLE}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# How often the progress bar reads the running loss and accuracy back from the device. Each read
# waits for the queued steps, so it is kept rare.
PROGRESS_REFRESH_SECONDS = 1.0


class ConfigError(ValueError):
    """An invalid training option (named by its command-line flag)."""


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on; the CLI flags map one to one onto these fields."""

    dataset: str = "mnist"
    data_dir: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    image_size: int = 224
    batch_size: int = 32
    epochs: int = 10
    learning_rate: float = 1e-3
    seed: int = 0
    alpha: float = 1.0
    weights: str = "imagenet"  # "imagenet" | "none" (random init) | PATH.h5 | converted DIR
    depthwise: str = "auto"
    dtype: str = "float32"  # compute dtype of the backbone; parameters stay float32
    resize: str = "host"  # "host": tf.data resizes; "device": the jitted step does
    cache_features: bool = False
    quiet: bool = False
    workdir: str | None = None  # None -> runs/<dataset>

    def validate(self) -> None:
        """Raises ConfigError naming the first invalid flag."""
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (
                self.image_size >= MIN_INPUT_SIZE,
                f"--image-size must be at least {MIN_INPUT_SIZE} (MobileNetV2's smallest input), "
                f"got {self.image_size}",
            ),
            (
                self.learning_rate > 0,
                f"--learning-rate must be positive, got {self.learning_rate}",
            ),
            (self.alpha > 0, f"--alpha must be positive, got {self.alpha}"),
            (
                self.dtype in DTYPES,
                f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}",
            ),
            (
                self.resize in input_pipeline.RESIZE_MODES,
                f"--resize must be one of {', '.join(input_pipeline.RESIZE_MODES)}, "
                f"got {self.resize!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        try:
            resolve_depthwise(self.depthwise)
        except ValueError as error:
            raise ConfigError(f"--depthwise: {error}") from None

    def resolved_workdir(self) -> pathlib.Path:
        return pathlib.Path(self.workdir or os.path.join("runs", self.dataset))


# ----------------------------------------------------------------------------------------------
# The model and what trains.


def preprocess_on_device(images_uint8: jax.Array, image_size: int) -> jax.Array:
    """[B, 28, 28, 1] uint8 -> [B, S, S, 3] float32 in [-1, 1], inside the jitted step.

    The same arithmetic as the tf.data path (`input_pipeline.preprocess_images`): bilinear resize
    with half-pixel centres and no antialiasing (what `tf.image.resize` does), then MobileNetV2's
    scaling `x / 127.5 - 1`. Resizing the single gray channel before copying it to RGB gives the
    same numbers for a third of the work.
    """
    images = images_uint8.astype(jnp.float32)
    batch, _, _, channels = images.shape
    images = jax.image.resize(
        images, (batch, image_size, image_size, channels), method="bilinear", antialias=False
    )
    images = jnp.broadcast_to(images, (batch, image_size, image_size, 3))
    return images / 127.5 - 1.0


class TransferClassifier(nnx.Module):
    """MobileNetV2 (no top, average pooled) -> Dense(num_classes); returns logits.

    The Keras tutorial ends in Dense(10, activation="softmax") trained with categorical
    cross-entropy; here the head returns logits and the loss applies the softmax, which is the same
    function computed stably.
    """

    def __init__(self, backbone: MobileNetV2, num_classes: int, *, image_size: int, rngs: nnx.Rngs):
        self.backbone = backbone
        # Keras' Dense initialises its kernel with Glorot-uniform and its bias with zeros.
        self.head = nnx.Linear(
            backbone.num_features,
            num_classes,
            kernel_init=nnx.initializers.glorot_uniform(),
            rngs=rngs,
        )
        self.image_size = image_size

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.classify_features(self.features(images))

    def features(self, images: jax.Array) -> jax.Array:
        """The frozen backbone alone: images -> pooled features [B, num_features] (what gets cached)."""
        # uint8 batches come from `resize="device"`: 28x28 gray digits, resized here on the device.
        if images.dtype == jnp.uint8:
            images = preprocess_on_device(images, self.image_size)
        return self.backbone(images)

    def classify_features(self, features: jax.Array) -> jax.Array:
        """The head alone, on pooled backbone features [B, num_features] (also cached ones)."""
        # A bfloat16 backbone hands over bfloat16 features; the head and the softmax stay float32.
        return self.head(features.astype(jnp.float32))


def build_backbone(config: TrainConfig, rngs: nnx.Rngs) -> MobileNetV2:
    """The backbone `config.weights` names: random ("none"), Keras ImageNet, an H5 file or a converted dir."""
    options = dict(
        alpha=config.alpha,
        include_top=False,
        pooling="avg",
        depthwise=config.depthwise,
        dtype=DTYPES[config.dtype],
    )
    if config.weights == "none":
        return MobileNetV2(**options, rngs=rngs)
    # Imported here: the converter pulls in h5py and, for "imagenet", the Keras download cache.
    from mnist_flax import convert

    return convert.mobilenet_v2_from_keras(
        config.weights, input_shape=(config.image_size, config.image_size, 3), **options
    )


def create_model(config: TrainConfig, num_classes: int) -> TransferClassifier:
    """The classifier, initialised from `config.seed` (backbone and head draw from separate keys)."""
    backbone_key, head_key = jax.random.split(jax.random.key(config.seed))
    backbone = build_backbone(config, nnx.Rngs(params=backbone_key))
    return TransferClassifier(
        backbone, num_classes, image_size=config.image_size, rngs=nnx.Rngs(params=head_key)
    )


def freeze_labels(model: TransferClassifier) -> nnx.State:
    """A tree like `nnx.state(model, nnx.Param)` holding "frozen" or "trainable" for each parameter.

    The label comes from the parameter's path (its first component is the submodule); a parameter
    outside the known submodules is an error rather than silently trained or frozen.
    """
    params = nnx.state(model, nnx.Param)
    labels = nnx.map_state(lambda path, _: LABEL_OF_SUBMODULE.get(path[0]), params)
    unlabelled = ["/".join(map(str, path)) for path, label in labels.flat_state() if label is None]
    if unlabelled:
        raise AssertionError(f"parameters without a freeze label: {', '.join(unlabelled)}")
    return labels


def make_optimizer(model: TransferClassifier, learning_rate: float) -> nnx.Optimizer:
    """Adam on the trainable parameters, a zero update for the frozen ones, split by `freeze_labels`."""
    tx = optax.multi_transform(
        {
            FROZEN: optax.set_to_zero(),
            # Keras' Adam uses epsilon 1e-7 (optax defaults to 1e-8).
            TRAINABLE: optax.adam(learning_rate, eps=1e-7),
        },
        freeze_labels(model),
    )
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def trainable_filter(model: TransferClassifier) -> Callable[[tuple, Any], bool]:
    """An NNX filter selecting the parameters `freeze_labels` calls trainable (what checkpoints keep)."""
    trainable_paths = {
        path for path, label in freeze_labels(model).flat_state() if label == TRAINABLE
    }
    return lambda path, _: tuple(path) in trainable_paths


def make_metrics() -> nnx.MultiMetric:
    """Running sums of the loss and of correct predictions, kept on the device."""
    return nnx.MultiMetric(loss=nnx.metrics.Average("loss"), accuracy=nnx.metrics.Accuracy())


# ----------------------------------------------------------------------------------------------
# The steps. A batch is {"image": [B, S, S, 3] float32 or [B, 28, 28, 1] uint8, "label": int32 [B],
# "mask": bool [B]}; the mask is False on the zero padding that fills the last batch of an epoch.
# With --cache-features a batch holds "features" [B, num_features] (the backbone's output, computed
# once) instead of "image", and the same steps compile to the head alone.


def _per_example_loss(model: TransferClassifier, batch: dict) -> tuple[jax.Array, jax.Array]:
    if "features" in batch:
        logits = model.classify_features(batch["features"])
    else:
        logits = model(batch["image"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return losses, logits


@nnx.jit
def train_step(
    model: TransferClassifier, optimizer: nnx.Optimizer, metrics: nnx.MultiMetric, batch: dict
) -> None:
    """One optimizer step on one batch; updates model, optimizer and metrics in place."""

    def loss_fn(model):
        losses, logits = _per_example_loss(model, batch)
        # Padding rows weigh 0: the loss is the mean over the real examples only.
        mask = batch["mask"].astype(losses.dtype)
        return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0), (losses, logits)

    (_, (losses, logits)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    # In place: Adam moves the head's parameters; the backbone's get set_to_zero's zero update.
    optimizer.update(model, grads)
    # In place: adds this batch's losses and hits to the running sums (padding excluded).
    metrics.update(loss=losses, logits=logits, labels=batch["label"], mask=batch["mask"])


@nnx.jit
def eval_step(model: TransferClassifier, metrics: nnx.MultiMetric, batch: dict) -> jax.Array:
    """Adds one test batch to the metrics (in place); returns the predicted classes."""
    losses, logits = _per_example_loss(model, batch)
    # In place: adds this batch's losses and hits to the running sums (padding excluded).
    metrics.update(loss=losses, logits=logits, labels=batch["label"], mask=batch["mask"])
    return jnp.argmax(logits, axis=-1)


class CompiledState:
    """Runs NNX functions of (model, optimizer, metrics) as `jax.jit` functions of their state.

    `nnx.jit` walks the whole object graph on every call to find what changed: 22-27 ms per call
    for MobileNetV2's 262 variables on a 2-core CPU, longer than a whole step on a TPU. Here the
    graph is split once into a static graphdef and a state pytree; each call is then a plain
    `jax.jit` call (a whole 32x32 alpha-0.35 step, compute included, takes 1.3-3 ms), and the
    state is donated so XLA updates it in place.

    While this holds the state, the objects' arrays are stale (donated): call `sync()` before
    touching the model, optimizer or metrics directly, e.g. to save a checkpoint.

    With a `mesh`, the state is replicated on every device of the mesh and kept so: each step's
    new state is pinned to the same replicated layout as its input, so the donated buffers are
    reused and the next step sees the layout it was compiled for.
    """

    def __init__(self, *nodes: nnx.Module | nnx.Pytree, mesh: Mesh | None = None):
        self.nodes = nodes
        self.graphdef, self.state = nnx.split(nodes)
        self.state_sharding = None if mesh is None else parallel.replicated(mesh)
        if mesh is not None:
            self.state = parallel.replicate(self.state, mesh)

    def jit(self, fn: Callable[..., Any], *, donate: bool = True) -> Callable[..., Any]:
        """`fn(*nodes, *args)` as a function of `*args`, updating the held state."""

        def pure(state, *args):
            nodes = nnx.merge(self.graphdef, state)
            out = fn(*nodes, *args)
            new_state = nnx.state(nodes)
            if self.state_sharding is not None:
                new_state = jax.lax.with_sharding_constraint(new_state, self.state_sharding)
            return new_state, out

        jitted = jax.jit(pure, donate_argnums=0 if donate else ())

        def call(*args):
            self.state, out = jitted(self.state, *args)
            return out

        call.lower = lambda *args: jitted.lower(self.state, *args)
        return call

    def sync(self) -> None:
        """Points the NNX objects at the current state."""
        nnx.update(self.nodes, self.state)


class TrainingSteps:
    """The jitted train/eval/metrics functions of one run, sharing one device-resident state.

    With a `mesh` (data parallel), the state is replicated over its devices and batches must come
    sharded along its batch axis (`parallel.shard_batch`); without one, everything lives on the
    default device.
    """

    def __init__(
        self,
        model: TransferClassifier,
        optimizer: nnx.Optimizer,
        metrics: nnx.MultiMetric,
        *,
        mesh: Mesh | None = None,
    ):
        self.compiled = CompiledState(model, optimizer, metrics, mesh=mesh)
        self.train = self.compiled.jit(train_step)
        self.eval = self.compiled.jit(
            lambda model, _, metrics, batch: eval_step(model, metrics, batch)
        )

        def backbone_features(model, _, __, batch):
            features = model.features(batch["image"])
            if mesh is None:
                return features
            # Each row stays on the device (and so in the process) whose image it came from, so
            # every process reads back exactly the rows of its own data shard.
            return jax.lax.with_sharding_constraint(features, parallel.batch_sharding(mesh))

        self.features = self.compiled.jit(backbone_features, donate=False)
        self.reset_metrics = self.compiled.jit(lambda _, __, metrics: metrics.reset())
        self.read_metrics = self.compiled.jit(
            lambda _, __, metrics: metrics.compute(), donate=False
        )

    def metrics(self) -> dict[str, float]:
        """Reads the running loss and accuracy (waits for queued steps)."""
        return {name: float(value) for name, value in self.read_metrics().items()}

    def sync(self) -> None:
        self.compiled.sync()


# ----------------------------------------------------------------------------------------------
# The epoch loop.


def _prefetch_to_device(
    batches: Iterable[dict[str, np.ndarray]],
    place: Callable[[dict[str, np.ndarray]], Any] = jax.device_put,
    size: int = 2,
) -> Iterator[Any]:
    """Starts copying the next batches to the device while the current step runs.

    `place` is where the batch's device layout is decided: the training loop passes
    `parallel.shard_batch`, which splits the batch axis over the mesh.
    """
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(place(batch))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def _run_epoch(
    step: Callable[[dict], Any],
    steps: TrainingSteps,
    dataset,
    *,
    mesh: Mesh,
    num_steps: int,
    description: str,
    show_progress: bool,
) -> tuple[dict[str, float], float]:
    """Feeds every batch of `dataset` to `step`; returns the epoch's metrics and images/s."""
    steps.reset_metrics()
    start = time.perf_counter()
    examples = 0
    last_refresh = start
    with tqdm(
        total=num_steps, desc=description, unit="step", leave=False, disable=not show_progress
    ) as bar:

        def count_examples(batch):
            nonlocal examples
            # Processes step in lockstep on shards that differ by at most one example, so this
            # process's count times the process count is the global throughput.
            examples += int(np.sum(batch["mask"])) * jax.process_count()
            return parallel.shard_batch(batch, mesh)

        for batch in _prefetch_to_device(dataset.as_numpy_iterator(), place=count_examples):
            step(batch)
            bar.update(1)
            now = time.perf_counter()
            if show_progress and now - last_refresh >= PROGRESS_REFRESH_SECONDS:
                running = steps.metrics()
                bar.set_postfix(
                    img_s=f"{examples / (now - start):.0f}",
                    loss=f"{running['loss']:.4f}",
                    acc=f"{running['accuracy']:.4f}",
                )
                last_refresh = now
        metrics = steps.metrics()
    return metrics, examples / (time.perf_counter() - start)


def _cache_features(
    split: input_pipeline.Split,
    steps: TrainingSteps,
    config: TrainConfig,
    *,
    mesh: Mesh,
    batch_size: int,
    show_progress: bool,
) -> input_pipeline.Split:
    """`split` with every image replaced by the frozen backbone's pooled features, computed once.

    The backbone is frozen and deterministic (BatchNorm uses running statistics), so its features
    are the same every epoch; computing them once leaves the epochs only the head's work. The
    features are computed by the same jitted backbone as the end-to-end step, in the split's own
    order, so the epochs can shuffle them exactly as they would shuffle the images.
    """
    batches = input_pipeline.make_batches(
        split,
        batch_size=batch_size,
        image_size=config.image_size,
        shuffle_seed=None,
        resize=config.resize,
    )
    features, labels = [], []
    num_steps = math.ceil(split.max_process_examples / batch_size)
    with tqdm(
        total=num_steps,
        desc=f"caching {split.name} features",
        unit="step",
        leave=False,
        disable=not show_progress,
    ) as bar:
        for host, device in _prefetch_to_device(
            batches.as_numpy_iterator(), place=lambda b: (b, parallel.shard_batch(b, mesh))
        ):
            real = host["mask"]
            batch_features = parallel.local_rows(steps.features(device), mesh)[real]
            # bfloat16 -> float32 is exact, and the head casts its input to float32 anyway.
            features.append(batch_features.astype(np.float32))
            labels.append(host["label"][real])
            bar.update(1)
    return input_pipeline.with_examples(
        split, {"features": np.concatenate(features), "label": np.concatenate(labels)}
    )


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Holds back Ctrl-C while a checkpoint and history.json are written, then delivers it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def write_json_atomically(path: pathlib.Path, content: Any) -> None:
    """Writes JSON so that readers see the old file or the new one, never half of one."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(temporary, path)


def _is_writer() -> bool:
    """Whether this process writes the run's files and talks: process 0 of a multi-process run.

    Every process runs the same loop and holds the same replicated state and metrics, so the
    others would only repeat (and race to rewrite) what process 0 writes.
    """
    return jax.process_index() == 0


def _say(message: str) -> None:
    if _is_writer():
        tqdm.write(message)


def _summary_line(record: dict, epochs: int, images_per_second: float) -> str:
    return (
        f"epoch {record['epoch']:>{len(str(epochs))}}/{epochs}  "
        f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.2%}  "
        f"test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.2%}  "
        f"({record['seconds']:.1f} s, {images_per_second:.0f} img/s)"
    )


def train_and_evaluate(config: TrainConfig) -> dict:
    """Trains `config.epochs` epochs (resuming the workdir's latest checkpoint); returns the history.

    The workdir receives history.json (rewritten after every epoch), Orbax checkpoints of every
    epoch (the last few and the best kept) and curves.png at the end. A workdir that holds another
    run is refused before anything is written. Ctrl-C stops after the last complete epoch's
    checkpoint; running again resumes from it.

    Data parallel over every device of every process: `config.batch_size` is the global batch,
    split over the devices (it must be a multiple of their count). In a multi-process run (after
    `parallel.initialize_distributed`) each process reads its own shard of each split, every
    process saves its part of the checkpoints (all must see the same workdir), and process 0
    alone writes history.json and the plots.
    """
    config.validate()
    mesh = parallel.data_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    workdir = config.resolved_workdir()
    config = dataclasses.replace(config, workdir=str(workdir))

    shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train_split = input_pipeline.load_split(
        config.dataset, config.train_split, data_dir=config.data_dir, **shard
    )
    test_split = input_pipeline.load_split(
        config.dataset, config.test_split, data_dir=config.data_dir, **shard
    )
    run_config = {**dataclasses.asdict(config), "num_classes": train_split.num_classes}
    # Refuses a mismatched or unwritable workdir before the (slow) model build and any write.
    checkpoints.check_workdir(workdir, run_config)

    model = create_model(config, train_split.num_classes)
    optimizer = make_optimizer(model, config.learning_rate)
    metrics = make_metrics()
    # Replicated before restoring: Orbax restores each array with the sharding of its target.
    for node in (model, optimizer, metrics):
        nnx.update(node, parallel.replicate(nnx.state(node), mesh))
    store = checkpoints.RunCheckpoints(workdir)
    try:
        history: list[dict] = []
        data_seed = config.seed
        if store.latest_epoch() is not None:
            restored = store.restore(
                store.latest_epoch(),
                trainable=nnx.state(model, trainable_filter(model)),
                optimizer=nnx.state(optimizer),
            )
            nnx.update(model, restored.trainable)
            nnx.update(optimizer, restored.optimizer)
            history, data_seed = restored.history, restored.data_seed
            _say(
                f"resuming from the epoch-{restored.epoch} checkpoint in {workdir} "
                f"({restored.epoch} of {config.epochs} epochs done)"
            )
        _train_epochs(
            config,
            run_config,
            mesh,
            model,
            optimizer,
            metrics,
            store,
            history,
            data_seed,
            train_split,
            test_split,
        )
    finally:
        store.close()
    history_file = {"config": run_config, "epochs": history}
    if _is_writer():
        plotting.plot_history(history_file, workdir / "curves.png")
    return history_file


def _train_epochs(
    config: TrainConfig,
    run_config: dict,
    mesh: Mesh,
    model: TransferClassifier,
    optimizer: nnx.Optimizer,
    metrics: nnx.MultiMetric,
    store: checkpoints.RunCheckpoints,
    history: list[dict],
    data_seed: int,
    train_split: input_pipeline.Split,
    test_split: input_pipeline.Split,
) -> None:
    """The epochs after those in `history`, each ending in a checkpoint and a history.json rewrite."""
    workdir = pathlib.Path(config.workdir)
    steps = TrainingSteps(model, optimizer, metrics, mesh=mesh)
    show_progress = not config.quiet and _is_writer()
    batch_size = parallel.local_batch_size(config.batch_size)
    if config.cache_features and len(history) < config.epochs:
        start = time.perf_counter()
        train_split, test_split = (
            _cache_features(
                split,
                steps,
                config,
                mesh=mesh,
                batch_size=batch_size,
                show_progress=show_progress,
            )
            for split in (train_split, test_split)
        )
        _say(
            f"cached the backbone features of {train_split.name} and {test_split.name} "
            f"({time.perf_counter() - start:.1f} s)"
        )
    test_batches = input_pipeline.make_batches(
        test_split,
        batch_size=batch_size,
        image_size=config.image_size,
        shuffle_seed=None,
        resize=config.resize,
    )
    # Every process steps through as many batches as the largest shard needs (the others pad).
    train_steps = math.ceil(train_split.max_process_examples / batch_size)
    test_steps = math.ceil(test_split.max_process_examples / batch_size)
    epoch = len(history)
    try:
        for epoch in range(len(history) + 1, config.epochs + 1):
            start = time.perf_counter()
            train_batches = input_pipeline.make_batches(
                train_split,
                batch_size=batch_size,
                image_size=config.image_size,
                shuffle_seed=input_pipeline.epoch_seed(data_seed, epoch),
                resize=config.resize,
            )
            train_metrics, images_per_second = _run_epoch(
                steps.train,
                steps,
                train_batches,
                mesh=mesh,
                num_steps=train_steps,
                description=f"epoch {epoch}/{config.epochs}",
                show_progress=show_progress,
            )
            test_metrics, _ = _run_epoch(
                steps.eval,
                steps,
                test_batches,
                mesh=mesh,
                num_steps=test_steps,
                description="test",
                show_progress=show_progress,
            )
            record = {
                "epoch": epoch,
                "train_loss": train_metrics["loss"],
                "train_accuracy": train_metrics["accuracy"],
                "test_loss": test_metrics["loss"],
                "test_accuracy": test_metrics["accuracy"],
                "seconds": time.perf_counter() - start,
            }
            steps.sync()
            with _interrupts_deferred():
                history.append(record)
                # Every process saves: Orbax writes each array once and synchronises the processes.
                store.save(
                    epoch,
                    trainable=nnx.state(model, trainable_filter(model)),
                    optimizer=nnx.state(optimizer),
                    data_seed=data_seed,
                    run_config=run_config,
                    history=history,
                )
                if _is_writer():
                    write_json_atomically(
                        workdir / checkpoints.HISTORY_FILE,
                        {"config": run_config, "epochs": history},
                    )
            _say(_summary_line(record, config.epochs, images_per_second))
    except KeyboardInterrupt:
        steps.sync()
        _say(
            f"interrupted during epoch {epoch}; epochs 1-{len(history)} are saved in {workdir}, "
            "run the same command again to resume"
            if history
            else f"interrupted during epoch {epoch}; nothing was saved yet"
        )
        raise


# ----------------------------------------------------------------------------------------------
# Evaluation of a saved run.


def evaluate(
    workdir: str | os.PathLike, *, checkpoint: str = "best", test_split: str | None = None
) -> dict:
    """Restores the workdir's best (or latest) checkpoint and evaluates it on the test split.

    Prints the test accuracy and writes confusion.png and misclassified.png into the workdir.
    Returns {"epoch", "checkpoint", "test_split", "test_loss", "test_accuracy", "num_examples",
    "confusion"}.
    """
    workdir = pathlib.Path(workdir)
    if checkpoint not in ("best", "latest"):
        raise ConfigError(f"--checkpoint must be best or latest, got {checkpoint!r}")
    store = checkpoints.RunCheckpoints(workdir, read_only=True)
    try:
        epoch = store.best_epoch() if checkpoint == "best" else store.latest_epoch()
        if epoch is None:
            raise checkpoints.WorkdirError(
                f"{workdir} holds no checkpoint; train into it first (mnist-flax train --workdir ...)"
            )
        run_config = store.run_config(epoch)
        known = {field.name for field in dataclasses.fields(TrainConfig)}
        config = TrainConfig(**{k: v for k, v in run_config.items() if k in known})
        config = dataclasses.replace(config, test_split=test_split or config.test_split)
        split = input_pipeline.load_split(
            config.dataset, config.test_split, data_dir=config.data_dir
        )
        if split.num_classes != run_config["num_classes"]:
            raise checkpoints.CheckpointMismatchError(
                f"--test-split {config.test_split} of {config.dataset} has {split.num_classes} "
                f"classes but the checkpoint in {workdir} was trained on {run_config['num_classes']}"
            )
        model = create_model(config, run_config["num_classes"])
        restored = store.restore(epoch, trainable=nnx.state(model, trainable_filter(model)))
        nnx.update(model, restored.trainable)
    finally:
        store.close()

    metrics = make_metrics()
    batches = input_pipeline.make_batches(
        split,
        batch_size=config.batch_size,
        image_size=config.image_size,
        shuffle_seed=None,
        resize=config.resize,
    )
    num_classes = run_config["num_classes"]
    confusion = np.zeros((num_classes, num_classes), np.int64)
    wrong_images, wrong_predicted, wrong_true = [], [], []
    for batch in batches.as_numpy_iterator():
        predicted = np.asarray(eval_step(model, metrics, batch))
        real = batch["mask"]
        true, predicted, images = batch["label"][real], predicted[real], batch["image"][real]
        np.add.at(confusion, (true, predicted), 1)
        for index in np.flatnonzero(true != predicted):
            if len(wrong_images) < plotting.MISCLASSIFIED_SHOWN:
                wrong_images.append(images[index])
                wrong_predicted.append(int(predicted[index]))
                wrong_true.append(int(true[index]))
    computed = metrics.compute()
    result = {
        "epoch": epoch,
        "checkpoint": checkpoint,
        "test_split": config.test_split,
        "test_loss": float(computed["loss"]),
        "test_accuracy": float(computed["accuracy"]),
        "num_examples": int(confusion.sum()),
        "confusion": confusion.tolist(),
    }
    plotting.plot_confusion(confusion, workdir / "confusion.png")
    plotting.plot_misclassified(
        wrong_images, wrong_predicted, wrong_true, workdir / "misclassified.png"
    )
    print(
        f"test accuracy {result['test_accuracy']:.2%} "
        f"({int(np.trace(confusion))}/{result['num_examples']}) on {config.dataset} "
        f"{config.test_split}, {checkpoint} checkpoint (epoch {epoch}); wrote "
        f"{workdir / 'confusion.png'} and {workdir / 'misclassified.png'}"
    )
    return result
