"""The classifier and what trains: freeze labels by path, on-device preprocessing, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import IMAGE_SIZE, he_initialise_backbone, tiny_model

from mnist_flax import model as model_lib
from mnist_flax.config import LR_SCHEDULES


def test_freeze_labels_label_backbone_frozen_and_head_trainable():
    model = tiny_model()
    labels = nnx.to_flat_state(model_lib.freeze_labels(model))
    by_module = {
        (path[0], label) for path, label in labels
    }  # every backbone param frozen, every head param trainable
    assert by_module == {("backbone", model_lib.FROZEN), ("head", model_lib.TRAINABLE)}
    assert len(labels) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert sorted(path for path, label in labels if label == model_lib.TRAINABLE) == [
        ("head", "bias"),
        ("head", "kernel"),
    ]


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
def test_each_schedule_is_optaxs_and_drives_the_heads_adam(name):
    schedule = model_lib.learning_rate_schedule(
        name, 3e-3, epochs=4, steps_per_epoch=3, warmup_epochs=1
    )
    expected = OPTAX_SCHEDULES[name]
    assert [float(schedule(step)) for step in range(13)] == [
        float(expected(step)) for step in range(13)
    ]
    # The optimizer moves the head exactly as optax's Adam with that schedule does.
    model = tiny_model()
    optimizer = model_lib.make_optimizer(model, schedule)
    head = nnx.to_pure_dict(nnx.state(model.head, nnx.Param))
    reference = optax.adam(expected, eps=model_lib.ADAM_EPSILON)
    reference_state = reference.init(head)
    rng = np.random.default_rng(0)
    for _ in range(5):
        grads = jax.tree.map(
            lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype),
            nnx.state(model, nnx.Param),
        )
        optimizer.update(model, grads)
        updates, reference_state = reference.update(
            nnx.to_pure_dict(grads)["head"], reference_state, head
        )
        head = optax.apply_updates(head, updates)
    for key in ("kernel", "bias"):
        np.testing.assert_allclose(getattr(model.head, key)[...], head[key], rtol=1e-6, atol=1e-7)
