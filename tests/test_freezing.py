"""What trains: freeze labels by path, each stage's optimizer, Keras' Adam and the schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import tiny_model

from mnist_flax import freezing
from mnist_flax.config import FINE_TUNE_STAGE, LR_SCHEDULES, STAGES
from mnist_flax.keras_names import backbone_layer_names, keras_layer_path


def groups_by_layer(model) -> dict[str, set[str]]:
    """{group: the Keras layer names (or submodules) of the parameters `freeze_labels` put in it}."""
    keras_name = {keras_layer_path(name): name for name in backbone_layer_names()}
    groups: dict[str, set[str]] = {}
    for path, group in nnx.to_flat_state(freezing.freeze_labels(model)):
        layer = keras_name[tuple(path[1:-1])] if path[0] == "backbone" else path[0]
        groups.setdefault(group, set()).add(layer)
    return groups


@pytest.mark.parametrize(
    "model, fine_tune_from, first_fine_tuned",
    [
        ("pipeline", None, None),
        ("notebook", "16", "block_16_expand"),
        ("pipeline", "block_13_depthwise", "block_13_depthwise"),
    ],
)
def test_freeze_labels_name_each_parameters_group_by_its_path(
    model, fine_tune_from, first_fine_tuned
):
    classifier = tiny_model(model=model, fine_tune_from=fine_tune_from)
    groups = groups_by_layer(classifier)
    layers = backbone_layer_names()
    cut = len(layers) if first_fine_tuned is None else layers.index(first_fine_tuned)
    assert groups[freezing.FROZEN] == set(layers[:cut])
    assert groups.get(freezing.FINE_TUNED, set()) == set(layers[cut:])
    assert groups[freezing.HEAD] == {"head"}
    assert groups.get(freezing.ADAPTER) == ({"adapter"} if model == "notebook" else None)
    labelled = nnx.to_flat_state(freezing.freeze_labels(classifier))
    assert len(labelled) == len(nnx.to_flat_state(nnx.state(classifier, nnx.Param)))


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_trains_its_groups_and_leaves_the_rest_unchanged(stage):
    model = tiny_model(model="notebook", fine_tune_from="16")
    optimizer = freezing.make_optimizer(model, 1e-2, stage=stage)
    before = nnx.to_flat_state(nnx.state(model, nnx.Param))
    before = {path: np.asarray(variable[...]).copy() for path, variable in before}
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    labels = dict(nnx.to_flat_state(freezing.freeze_labels(model)))
    trained = {freezing.ADAPTER, freezing.HEAD}
    if stage == FINE_TUNE_STAGE:
        trained.add(freezing.FINE_TUNED)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        moved = not np.array_equal(before[path], np.asarray(variable[...]))
        assert moved == (labels[path] in trained), (stage, path, labels[path])


def test_a_parameter_outside_backbone_and_head_is_refused():
    model = tiny_model()
    model.temperature = nnx.Param(jnp.ones(()))
    with pytest.raises(AssertionError, match="temperature"):
        freezing.make_optimizer(model, 1e-3)


OPTAX_SCHEDULES = {
    # 4 epochs of 3 steps, 1 warm-up epoch, peak 3e-3: what `learning_rate_schedule` is asked for.
    "constant": optax.constant_schedule(3e-3),
    "cosine": optax.cosine_decay_schedule(3e-3, decay_steps=12),
    "warmup-cosine": optax.warmup_cosine_decay_schedule(0.0, 3e-3, warmup_steps=3, decay_steps=12),
}


@pytest.mark.parametrize("name", LR_SCHEDULES)
def test_each_schedule_is_optaxs_and_drives_keras_adam_on_the_head(name):
    schedule = freezing.learning_rate_schedule(
        name, 3e-3, epochs=4, steps_per_epoch=3, warmup_epochs=1
    )
    expected = OPTAX_SCHEDULES[name]
    assert [float(schedule(step)) for step in range(13)] == [
        float(expected(step)) for step in range(13)
    ]
    # The optimizer moves the head exactly as Keras' Adam with that schedule does, written out
    # from Keras' `Adam.update_step`: epsilon is added to sqrt(v) before the bias correction.
    model = tiny_model()
    optimizer = freezing.make_optimizer(model, schedule)
    head = {
        key: np.asarray(getattr(model.head, key)[...], np.float64) for key in ("kernel", "bias")
    }
    m = {key: np.zeros_like(value) for key, value in head.items()}
    v = {key: np.zeros_like(value) for key, value in head.items()}
    b1, b2 = freezing.ADAM_BETAS
    rng = np.random.default_rng(0)
    for step in range(1, 6):
        # Gradients from 1e-8 to 1: where Keras' and optax's epsilon placements differ.
        grads = jax.tree.map(
            lambda p: jnp.asarray(
                rng.normal(size=p.shape) * 10 ** rng.uniform(-8, 0, p.shape), p.dtype
            ),
            nnx.state(model, nnx.Param),
        )
        optimizer.update(model, grads)
        rate = float(expected(step - 1)) * np.sqrt(1 - b2**step) / (1 - b1**step)
        for key in head:
            g = np.asarray(grads["head"][key][...], np.float64)
            m[key] += (g - m[key]) * (1 - b1)
            v[key] += (g * g - v[key]) * (1 - b2)
            head[key] -= rate * m[key] / (np.sqrt(v[key]) + freezing.ADAM_EPSILON)
    for key in ("kernel", "bias"):
        np.testing.assert_allclose(getattr(model.head, key)[...], head[key], rtol=0, atol=1e-6)
