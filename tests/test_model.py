"""The classifier and what trains: freeze labels by path, on-device preprocessing, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import IMAGE_SIZE, he_initialise_backbone, tiny_model

from mnist_flax import model as model_lib
from mnist_flax.config import LR_SCHEDULES, STAGES, backbone_layer_names
from mnist_flax.mobilenet_v2 import keras_layer_path


def groups_by_layer(model) -> dict[str, set[str]]:
    """{group: the Keras layer names (or submodules) of the parameters `freeze_labels` put in it}."""
    keras_name = {keras_layer_path(name): name for name in backbone_layer_names()}
    groups: dict[str, set[str]] = {}
    for path, group in nnx.to_flat_state(model_lib.freeze_labels(model)):
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
    assert groups[model_lib.FROZEN] == set(layers[:cut])
    assert groups.get(model_lib.FINE_TUNED, set()) == set(layers[cut:])
    assert groups[model_lib.HEAD] == {"head"}
    assert groups.get(model_lib.ADAPTER) == ({"adapter"} if model == "notebook" else None)
    labelled = nnx.to_flat_state(model_lib.freeze_labels(classifier))
    assert len(labelled) == len(nnx.to_flat_state(nnx.state(classifier, nnx.Param)))


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_trains_its_groups_and_leaves_the_rest_unchanged(stage):
    model = tiny_model(model="notebook", fine_tune_from="16")
    optimizer = model_lib.make_optimizer(model, 1e-2, stage=stage)
    before = nnx.to_flat_state(nnx.state(model, nnx.Param))
    before = {path: np.asarray(variable[...]).copy() for path, variable in before}
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    labels = dict(nnx.to_flat_state(model_lib.freeze_labels(model)))
    trained = {model_lib.ADAPTER, model_lib.HEAD}
    if stage == STAGES[1]:
        trained.add(model_lib.FINE_TUNED)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        moved = not np.array_equal(before[path], np.asarray(variable[...]))
        assert moved == (labels[path] in trained), (stage, path, labels[path])


def test_notebook_model_upsamples_digits_through_its_adapter():
    model = tiny_model(model="notebook")
    digits = np.random.default_rng(0).uniform(0, 1, (2, 28, 28, 1)).astype(np.float32)
    adapted = np.asarray(model.adapter(jnp.asarray(digits)))
    assert adapted.shape == (2, 56, 56, 3) and adapted.min() >= 0.0
    # Nearest-neighbour: the convolution of the upsampled digit, where each pixel is a 2x2 block.
    upsampled = np.repeat(np.repeat(digits, 2, axis=1), 2, axis=2)
    expected = jax.nn.relu(model.adapter.conv(jnp.asarray(upsampled)))
    np.testing.assert_allclose(adapted, np.asarray(expected), rtol=1e-6, atol=1e-6)
    assert model(jnp.asarray(digits)).shape == (2, 4)


def test_a_parameter_outside_backbone_and_head_is_refused():
    model = tiny_model()
    model.temperature = nnx.Param(jnp.ones(()))
    with pytest.raises(AssertionError, match="temperature"):
        model_lib.make_optimizer(model, 1e-3)


def test_preprocess_on_device_scales_to_minus_one_one_in_rgb():
    images = np.zeros((2, 28, 28, 1), np.uint8)
    images[1] = 255
    out = model_lib.preprocess_on_device(jnp.asarray(images), 40)
    assert out.shape == (2, 40, 40, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(out[0], -1.0, atol=1e-6)
    np.testing.assert_allclose(out[1], 1.0, atol=1e-6)


def test_uint8_batches_are_resized_inside_the_model():
    model = tiny_model()
    he_initialise_backbone(model)
    digits = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1)).astype(np.uint8)
    forward = nnx.jit(lambda model, images: model(images))
    from_uint8 = forward(model, jnp.asarray(digits))
    from_float = forward(model, model_lib.preprocess_on_device(jnp.asarray(digits), IMAGE_SIZE))
    # Equal up to XLA fusing the resize into the first convolution differently.
    np.testing.assert_allclose(np.asarray(from_uint8), np.asarray(from_float), rtol=1e-4, atol=1e-5)


def test_bfloat16_backbone_gives_float32_logits_and_float32_params():
    model = tiny_model(dtype="bfloat16")
    logits = nnx.jit(lambda model, images: model(images))(
        model, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))
    )
    assert logits.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {
        jnp.dtype(jnp.float32)
    }


OPTAX_SCHEDULES = {
    # 4 epochs of 3 steps, 1 warm-up epoch, peak 3e-3: what `learning_rate_schedule` is asked for.
    "constant": optax.constant_schedule(3e-3),
    "cosine": optax.cosine_decay_schedule(3e-3, decay_steps=12),
    "warmup-cosine": optax.warmup_cosine_decay_schedule(0.0, 3e-3, warmup_steps=3, decay_steps=12),
}


@pytest.mark.parametrize("name", LR_SCHEDULES)
def test_each_schedule_is_optaxs_and_drives_keras_adam_on_the_head(name):
    schedule = model_lib.learning_rate_schedule(
        name, 3e-3, epochs=4, steps_per_epoch=3, warmup_epochs=1
    )
    expected = OPTAX_SCHEDULES[name]
    assert [float(schedule(step)) for step in range(13)] == [
        float(expected(step)) for step in range(13)
    ]
    # The optimizer moves the head exactly as Keras' Adam with that schedule does, written out
    # from Keras' `Adam.update_step`: epsilon is added to sqrt(v) before the bias correction.
    model = tiny_model()
    optimizer = model_lib.make_optimizer(model, schedule)
    head = {
        key: np.asarray(getattr(model.head, key)[...], np.float64) for key in ("kernel", "bias")
    }
    m = {key: np.zeros_like(value) for key, value in head.items()}
    v = {key: np.zeros_like(value) for key, value in head.items()}
    b1, b2 = model_lib.ADAM_BETAS
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
            head[key] -= rate * m[key] / (np.sqrt(v[key]) + model_lib.ADAM_EPSILON)
    for key in ("kernel", "bias"):
        np.testing.assert_allclose(getattr(model.head, key)[...], head[key], rtol=0, atol=1e-6)
