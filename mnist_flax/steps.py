"""The steps and how they run: loss, train/eval step, the compiled step runner, device prefetch.

A batch is {"image": [B, S, S, 3] float32 or [B, 28, 28, 1] uint8, "label": int32 [B], "mask":
bool [B]}; the mask is False on the padding that fills the last batch of an epoch (the notebook
model's "image" is [B, 28, 28, 1] float32 in [0, 1]). With cached features a batch holds
"features" [B, num_features] (the frozen backbone's output, computed once) instead of "image", and
the same steps compile to the head alone; in the fine-tuning stage it may hold "activations" (the
frozen layers' output, entering the fine-tuned ones), and the steps compile to the layers that
train.

On cached values the epoch loop runs many steps per call: `train_block` and `eval_block` take the
split's arrays, already on the device, and a block of `input_pipeline.batch_indices`, and
`lax.scan` the same step over the batches they gather (the same batches, in the same order, with
the same padding), so the host dispatches one call instead of one per batch.

The steps are written as plain NNX code that updates the model, optimizer and metrics in place
(as in Flax's MNIST example). `StepRunner` is the one way they are run, in training, evaluation,
feature caching and the benchmark. It follows the "functional training loop" of Flax's performance
guide (docs_nnx/guides/performance.md): each object is `nnx.split` once into a static graphdef and
a state pytree, and each step is a plain `jax.jit` function of those states that `nnx.merge`s the
objects, runs the NNX code and returns the new states. A call is then an ordinary jitted call with
no Python walk over the object graph (`nnx.jit` walks MobileNetV2's 262 variables on every call;
`nnx.cached_partial` caches that walk; `scripts/runner_overhead.py` measures all three, and
docs/benchmarks.md has the figures).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from mnist_flax import cpu_chunks, input_pipeline, parallel
from mnist_flax.config import FROZEN_STAGE, TrainConfig
from mnist_flax.freezing import trained_filter
from mnist_flax.model import POINTS, TransferClassifier, resolve_resize

Batch = dict[str, Any]


def make_metrics() -> nnx.MultiMetric:
    """Running sums of the loss and of correct predictions, kept on the device."""
    return nnx.MultiMetric(loss=nnx.metrics.Average("loss"), accuracy=nnx.metrics.Accuracy())


def per_example_loss(model: TransferClassifier, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Softmax cross-entropy of every row of the batch (padding included), and the logits.

    The batch holds an "image", or the values a stage cached at "activations" or "features":
    the classifier runs the rest of its chain from there (`TransferClassifier.__call__`).
    """
    (start,) = [point for point in POINTS[:-1] if point in batch]
    logits = model(batch[start], start=start)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return losses, logits


def train_step(
    model: TransferClassifier,
    optimizer: nnx.Optimizer,
    metrics: nnx.MultiMetric,
    batch: Batch,
    stage: str,
) -> None:
    """One optimizer step of `stage` (`config.STAGES`, the one `optimizer` was made for) on one
    batch; updates model, optimizer and metrics in place."""
    # Only what the stage trains is differentiated; the frozen parameters get zero gradients,
    # which `set_to_zero` ignores. (Asking for every gradient gives the same update, XLA deleting
    # the unused ones; this way the step never asks for them.)
    graphdef, trained, rest = nnx.split(model, trained_filter(model, stage), ...)

    def summed_loss(trained, batch):
        losses, logits = per_example_loss(nnx.merge(graphdef, trained, rest), batch)
        # Padding rows weigh 0.
        return jnp.sum(losses * batch["mask"].astype(losses.dtype)), (losses, logits)

    # On the CPU path the notebook model's gradient is summed over chunks of a few examples
    # (`cpu_chunks.py`); everywhere else this is one `jax.value_and_grad` on the whole batch.
    (_, (losses, logits)), trained_grads = cpu_chunks.value_and_grad_in_chunks(
        jax.value_and_grad(summed_loss, has_aux=True),
        trained,
        batch,
        cpu_chunks.gradient_chunk(model),
    )
    # The loss is the mean over the real examples only.
    count = jnp.maximum(jnp.sum(batch["mask"].astype(jnp.float32)), 1.0)
    trained_grads = jax.tree.map(lambda g: g / count, trained_grads)
    zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    grads = nnx.merge_state(zeros, trained_grads)
    # In place: Adam moves the parameters that train in this stage; the frozen ones get
    # set_to_zero's zero update.
    optimizer.update(model, grads)
    # In place: adds this batch's losses and hits to the running sums (padding excluded).
    metrics.update(loss=losses, logits=logits, labels=batch["label"], mask=batch["mask"])


def gather_batch(examples: dict[str, jax.Array], indices: jax.Array) -> Batch:
    """The batch `indices` (-1: padding) selects from `examples`, zeros and mask False on padding,
    as `input_pipeline.shuffle_and_batch` gathers it on the host."""
    mask = indices >= 0
    rows = jnp.maximum(indices, 0)
    batch = {
        name: jnp.where(mask.reshape(-1, *[1] * (values.ndim - 1)), values[rows], 0)
        for name, values in examples.items()
    }
    return {**batch, "mask": mask}


def eval_step(model: TransferClassifier, metrics: nnx.MultiMetric, batch: Batch) -> jax.Array:
    """Adds one batch to the metrics (in place); returns the predicted classes."""
    losses, logits = per_example_loss(model, batch)
    # In place: adds this batch's losses and hits to the running sums (padding excluded).
    metrics.update(loss=losses, logits=logits, labels=batch["label"], mask=batch["mask"])
    return jnp.argmax(logits, axis=-1)


class StepRunner:
    """The model, optimizer and metrics as device-resident states, and the jitted steps on them.

    What is compiled: one `jax.jit` function per step (train and eval on a batch, on a block of
    cached batches, the forward pass to a cached point, predict, and the metrics' reset and
    read-out), each traced once per batch shape. What is donated: the states a
    step replaces (model, optimizer and metrics for `train`, metrics for `eval` and
    `reset_metrics`), so XLA writes the new ones into the old buffers instead of holding two copies.

    Sharding: everything runs on `mesh` (default: a one-device mesh of the default device). The
    states are replicated over it, and every step returns them with that same replicated sharding
    (`out_shardings`), so the donated buffers are reused and the next call sees the layout it was
    compiled for. Batches must come split along the mesh's batch axis (`parallel.shard_batch`; with
    one device a NumPy batch will do), and per-example outputs leave split the same way.

    The runner owns the state: the NNX objects' arrays are stale (donated) while it runs. `sync()`
    writes the current state back into them, e.g. before a checkpoint is saved.

    `stage` (`config.STAGES`): the stage `optimizer` belongs to (`freezing.make_optimizer`), which
    says what `train` differentiates.
    """

    def __init__(
        self,
        model: TransferClassifier,
        optimizer: nnx.Optimizer | None,
        metrics: nnx.MultiMetric,
        *,
        stage: str = FROZEN_STAGE,
        mesh: Mesh | None = None,
    ):
        self.mesh = mesh if mesh is not None else parallel.data_mesh(jax.devices()[:1])
        self.model, self.optimizer, self.metrics, self.stage = model, optimizer, metrics, stage
        self.model_def, model_state = nnx.split(model)
        # Evaluation needs no optimizer (None): then `train` is not available.
        self.optimizer_def, optimizer_state = nnx.split(optimizer)
        self.metrics_def, metrics_state = nnx.split(metrics)
        self.model_state, self.optimizer_state, self.metrics_state = parallel.replicate(
            (model_state, optimizer_state, metrics_state), self.mesh
        )
        state = parallel.replicated(self.mesh)
        rows = parallel.batch_sharding(self.mesh)
        self._rows = rows
        self._train = jax.jit(self._train_fn, donate_argnums=(0, 1, 2), out_shardings=state)
        self._eval = jax.jit(self._eval_fn, donate_argnums=1, out_shardings=(state, rows))
        self._train_block = jax.jit(
            self._train_block_fn, donate_argnums=(0, 1, 2), out_shardings=state
        )
        self._eval_block = jax.jit(self._eval_block_fn, donate_argnums=1, out_shardings=state)
        self._forward = jax.jit(self._forward_fn, static_argnames="stop", out_shardings=rows)
        self._predict = jax.jit(self._predict_fn, out_shardings=rows)
        self._reset = jax.jit(self._reset_fn, donate_argnums=0, out_shardings=state)
        self._compute = jax.jit(self._compute_fn, out_shardings=state)

    # The pure functions that are compiled: merge, run the NNX code, return the new states.

    def _train_fn(self, model_state, optimizer_state, metrics_state, batch):
        model = nnx.merge(self.model_def, model_state)
        optimizer = nnx.merge(self.optimizer_def, optimizer_state)
        metrics = nnx.merge(self.metrics_def, metrics_state)
        train_step(model, optimizer, metrics, batch, self.stage)
        return nnx.state(model), nnx.state(optimizer), nnx.state(metrics)

    def _eval_fn(self, model_state, metrics_state, batch):
        model = nnx.merge(self.model_def, model_state)
        metrics = nnx.merge(self.metrics_def, metrics_state)
        predictions = eval_step(model, metrics, batch)
        return nnx.state(metrics), predictions

    def _batch(self, examples, indices) -> Batch:
        # Gathered from replicated arrays, then split over the mesh like a batch from the host.
        return jax.lax.with_sharding_constraint(gather_batch(examples, indices), self._rows)

    def _train_block_fn(self, model_state, optimizer_state, metrics_state, examples, indices):
        def step(states, batch_indices):
            return self._train_fn(*states, self._batch(examples, batch_indices)), None

        states, _ = jax.lax.scan(step, (model_state, optimizer_state, metrics_state), indices)
        return states

    def _eval_block_fn(self, model_state, metrics_state, examples, indices):
        def step(metrics_state, batch_indices):
            batch = self._batch(examples, batch_indices)
            return self._eval_fn(model_state, metrics_state, batch)[0], None

        metrics_state, _ = jax.lax.scan(step, metrics_state, indices)
        return metrics_state

    def _forward_fn(self, model_state, images, stop):
        return nnx.merge(self.model_def, model_state)(images, stop=stop)

    def _predict_fn(self, model_state, images):
        return jax.nn.softmax(nnx.merge(self.model_def, model_state)(images))

    def _reset_fn(self, metrics_state):
        metrics = nnx.merge(self.metrics_def, metrics_state)
        metrics.reset()
        return nnx.state(metrics)

    def _compute_fn(self, metrics_state):
        return nnx.merge(self.metrics_def, metrics_state).compute()

    # What the loops call.

    def train(self, batch: Batch) -> None:
        """One optimizer step; adds the batch to the running metrics."""
        self.model_state, self.optimizer_state, self.metrics_state = self._train(
            self.model_state, self.optimizer_state, self.metrics_state, batch
        )

    def eval(self, batch: Batch) -> jax.Array:
        """Adds the batch to the running metrics; returns its predicted classes."""
        self.metrics_state, predictions = self._eval(self.model_state, self.metrics_state, batch)
        return predictions

    def train_block(self, examples: dict[str, jax.Array], indices: jax.Array) -> None:
        """One optimizer step per row of `indices` [steps, batch] on the batches it gathers from
        `examples` (a split's arrays, replicated on the mesh: `place_examples`)."""
        self.model_state, self.optimizer_state, self.metrics_state = self._train_block(
            self.model_state, self.optimizer_state, self.metrics_state, examples, indices
        )

    def eval_block(self, examples: dict[str, jax.Array], indices: jax.Array) -> None:
        """Adds every batch `indices` gathers from `examples` to the running metrics."""
        self.metrics_state = self._eval_block(
            self.model_state, self.metrics_state, examples, indices
        )

    def place_examples(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A split's arrays (cached values and labels), replicated on every device of the mesh."""
        return parallel.replicate(arrays, self.mesh)

    def forward(self, images: jax.Array, stop: str) -> jax.Array:
        """The classifier from a batch of images to point `stop` (`model.POINTS`: the pooled
        "features" the frozen stage caches, the "activations" fine-tuning caches), split like
        the batch."""
        return self._forward(self.model_state, images, stop=stop)

    def predict(self, images: jax.Array) -> jax.Array:
        """Class probabilities (the tutorial's softmax output), the work of Keras' `predict`."""
        return self._predict(self.model_state, images)

    def reset_metrics(self) -> None:
        self.metrics_state = self._reset(self.metrics_state)

    def read_metrics(self) -> dict[str, float]:
        """The running loss and accuracy (waits for the queued steps)."""
        return {name: float(value) for name, value in self._compute(self.metrics_state).items()}

    def lower_train(self, batch: Batch) -> jax.stages.Lowered:
        """The train step lowered for `batch` (`.compile().cost_analysis()` says what XLA kept)."""
        return self._train.lower(self.model_state, self.optimizer_state, self.metrics_state, batch)

    def sync(self) -> None:
        """Writes the current state into the model, optimizer and metrics objects."""
        nnx.update(self.model, self.model_state)
        if self.optimizer is not None:
            nnx.update(self.optimizer, self.optimizer_state)
        nnx.update(self.metrics, self.metrics_state)


def epoch_batches(split: input_pipeline.Split, config: TrainConfig, shuffle_seed: int | None):
    """`split`'s batches as this process feeds them to the steps (tf.data; the caller converts):
    its rows of every global batch of `config.batch_size`, resized where `--resize` says,
    shuffled by `shuffle_seed` (None: in the split's order)."""
    return input_pipeline.make_batches(
        split,
        batch_size=parallel.local_batch_size(config.batch_size),
        image_size=config.image_size,
        shuffle_seed=shuffle_seed,
        resize=resolve_resize(config.resize, config.model),
    )


def prefetch_to_device(
    batches: Iterable[dict[str, np.ndarray]],
    place: Callable[[dict[str, np.ndarray]], Any] = jax.device_put,
    size: int = 2,
) -> Iterator[Any]:
    """Starts copying the next `size` batches to the device while the current step runs.

    `place` decides the batch's device layout: the training loop passes `parallel.shard_batch`,
    which splits the batch axis over the mesh.
    """
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(place(batch))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
