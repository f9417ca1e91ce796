"""What trains, and how: freeze labels by parameter path, each stage's optimizer, Keras' Adam, the
learning-rate schedules.

`freeze_labels` names every parameter's group from its path ("frozen" backbone, "fine-tuned"
backbone layers from `--fine-tune-from` on, "adapter", "head"), and `make_optimizer` turns those
labels into one `optax.multi_transform` per stage (`config.STAGES`): the one place that says what
trains (`set_to_zero` for the groups a stage leaves alone, Keras' Adam for the others).

Why freezing costs no backward pass through the backbone: the train step differentiates only what
the stage trains (`trained_filter`), and `set_to_zero` never reads the zero gradients the frozen
parameters get. In the pipeline model nothing trainable sits before the backbone, so the head's
gradient needs only the pooled features. The notebook model's adapter does sit before it: its
gradient travels back through the frozen backbone's activations (not its weights). Fine-tuning from
layer L adds the backward pass of the layers after L only. `tests/test_steps.py` checks this from
the compiled steps' cost analysis (the FLOPs: docs/benchmarks.md).

BatchNorm in the backbone always normalises with its running statistics (Keras `training=False`,
also while fine-tuning, as Keras' guide does), and those statistics are `nnx.BatchStat`s, which
the optimizer (`wrt=nnx.Param`) never sees; a fine-tuned BatchNorm trains its scale and offset.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mnist_flax.config import FINE_TUNE_STAGE, FROZEN_STAGE
from mnist_flax.keras_names import keras_layer_path
from mnist_flax.model import TransferClassifier

# The parameter groups of `freeze_labels`, each with its own transformation in `make_optimizer`.
FROZEN = "frozen"
FINE_TUNED = "fine-tuned"
ADAPTER = "adapter"
HEAD = "head"
GROUPS = (FROZEN, FINE_TUNED, ADAPTER, HEAD)
# The groups each stage's optimizer trains (Adam); the others get `set_to_zero`'s zero update.
TRAINED_GROUPS = {FROZEN_STAGE: (ADAPTER, HEAD), FINE_TUNE_STAGE: (FINE_TUNED, ADAPTER, HEAD)}
# Keras' Adam: epsilon 1e-7 (optax's default is 1e-8), the usual betas.
ADAM_EPSILON = 1e-7
ADAM_BETAS = (0.9, 0.999)


def freeze_labels(model: TransferClassifier) -> nnx.State:
    """A tree like `nnx.state(model, nnx.Param)` holding each parameter's group.

    The group comes from the parameter's path: the adapter's and the head's are their own groups;
    a backbone parameter is "fine-tuned" when its Keras layer is `model.fine_tune_from` or comes
    after it, else "frozen". A parameter outside the known submodules is an error rather than
    silently trained or frozen, and so is a fine-tuned layer that matched no parameter.
    """
    names = list(model.backbone.keras_layers())
    fine_tuned_layers = (
        set() if model.fine_tune_from is None else set(names[names.index(model.fine_tune_from) :])
    )
    fine_tuned_paths = {keras_layer_path(name) for name in fine_tuned_layers}

    def label(path, _):
        if path[0] == "backbone":
            return FINE_TUNED if tuple(path[1:-1]) in fine_tuned_paths else FROZEN
        return {"adapter": ADAPTER, "head": HEAD}.get(path[0])

    labels = nnx.map_state(label, nnx.state(model, nnx.Param))
    flat = nnx.to_flat_state(labels)
    unlabelled = ["/".join(map(str, path)) for path, group in flat if group is None]
    if unlabelled:
        raise AssertionError(f"parameters without a freeze label: {', '.join(unlabelled)}")
    unvisited = fine_tuned_paths - {
        tuple(path[1:-1]) for path, group in flat if group == FINE_TUNED
    }
    if unvisited:
        raise AssertionError(f"fine-tuned layers without parameters: {sorted(unvisited)}")
    return labels


def learning_rate_schedule(
    name: str, peak: float, *, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0
) -> optax.Schedule:
    """The head's learning rate at each optimizer step (`config.LR_SCHEDULES`).

    "constant" is the tutorial's; "cosine" decays from `peak` to 0 over the whole run;
    "warmup-cosine" first rises linearly from 0 to `peak` over `warmup_epochs`. The schedule's
    position is Adam's step count, which the optimizer state (and so every checkpoint) holds:
    a resumed run continues where it stopped.
    """
    total = epochs * steps_per_epoch
    if name == "constant":
        return optax.constant_schedule(peak)
    if name == "cosine":
        return optax.cosine_decay_schedule(peak, decay_steps=total)
    if name == "warmup-cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup_steps=warmup_epochs * steps_per_epoch, decay_steps=total
        )
    raise ValueError(f"unknown learning-rate schedule {name!r}")


def keras_adam(learning_rate: float | optax.Schedule) -> optax.GradientTransformation:
    """Adam exactly as Keras computes it; the same state as `optax.adam` (`ScaleByAdamState`).

    Keras adds epsilon to the square root of the uncorrected second moment,
    `lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)`, where optax adds it after the bias
    correction. The two differ by an effective epsilon of eps / sqrt(1 - b2^t) (3.2e-6 at the first
    step), enough to move parameters with tiny gradients differently: after 5 steps the loss would
    differ from Keras' `train_on_batch` by 4.6e-4 (tests/test_classifier_convert.py).
    """
    b1, b2 = ADAM_BETAS

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        correction = jnp.sqrt(1 - b2**count) / (1 - b1**count)
        updates = jax.tree.map(lambda m, v: correction * m / (jnp.sqrt(v) + ADAM_EPSILON), mu, nu)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    moments = optax.GradientTransformation(optax.scale_by_adam(b1, b2).init, update)
    return optax.chain(moments, optax.scale_by_learning_rate(learning_rate))


def make_optimizer(
    model: TransferClassifier, learning_rate: float | optax.Schedule, *, stage: str = FROZEN_STAGE
) -> nnx.Optimizer:
    """The optimizer of one stage (`config.STAGES`), one `optax.multi_transform` over `freeze_labels`.

    Frozen stage: Adam (`keras_adam`) on the adapter and the head, a zero update for the whole
    backbone. Fine-tune stage: Adam also on the fine-tuned layers; like Keras' guide (which
    recompiles the model with a new Adam) it is a new optimizer, its moments and step count
    starting from zero, and the head trains at the same (small) rate.
    """
    adam = keras_adam(learning_rate)
    transforms = {
        group: adam if group in TRAINED_GROUPS[stage] else optax.set_to_zero() for group in GROUPS
    }
    return nnx.Optimizer(
        model, optax.multi_transform(transforms, freeze_labels(model)), wrt=nnx.Param
    )


def trained_filter(model: TransferClassifier, stage: str) -> Callable[[tuple, Any], bool]:
    """An NNX filter selecting the parameters `stage` trains (those the step differentiates)."""
    trained = {
        path
        for path, group in nnx.to_flat_state(freeze_labels(model))
        if group in TRAINED_GROUPS[stage]
    }
    return lambda path, _: tuple(path) in trained


def trainable_filter(model: TransferClassifier) -> Callable[[tuple, Any], bool]:
    """An NNX filter selecting every parameter that some stage trains (what checkpoints keep)."""
    trainable_paths = {
        path for path, group in nnx.to_flat_state(freeze_labels(model)) if group != FROZEN
    }
    return lambda path, _: tuple(path) in trainable_paths
