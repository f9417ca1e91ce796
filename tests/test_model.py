"""The classifiers: the notebook model's adapter, on-device preprocessing, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from helpers import IMAGE_SIZE, he_initialise_backbone, tiny_model

from mnist_flax import model as model_lib


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
