"""The NNX MobileNetV2 computes what keras.applications.MobileNetV2 (TensorFlow backend) computes.

Random Keras weights with non-trivial BatchNorm statistics are copied into the NNX model with
`mobilenet_v2_from_keras(keras_model)`; both run on random inputs in [-1, 1]. Tolerance everywhere:
max |flax - keras| <= 1e-4 * max |keras|. The option values are spread over a few cases so that every
alpha meets both convolution implementations and every size, pooling and top setting appears, without
running the full cross product.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx
from keras_helpers import (
    RTOL,
    assert_close_to_keras,
    random_images,
    random_keras_mobilenet,
)

from mnist_flax.convert import mobilenet_v2_from_keras
from mnist_flax.convolutions import correct_pad
from mnist_flax.keras_names import (
    backbone_layer_names,
    block_prefix,
    keras_layer_path,
    unit_of_layer,
)
from mnist_flax.mobilenet_v2 import (
    Conv2D,
    DepthwiseConv2D,
    InferenceBatchNorm,
    MobileNetV2,
    ModelConfigError,
    _make_divisible,
)

# (alpha, input (rows, cols), include_top, pooling, classifier_activation, conv_impl)
PARITY_CASES = [
    (0.35, (96, 96), True, None, "softmax", "cpu"),
    (0.35, (97, 97), False, "max", None, "xla"),
    (0.5, (97, 97), False, "avg", None, "cpu"),
    (0.5, (96, 96), True, None, None, "xla"),
    (0.75, (160, 160), False, None, None, "cpu"),
    (0.75, (64, 97), False, "avg", None, "xla"),  # non-square, one side odd
    (1.0, (97, 64), False, "max", None, "cpu"),
    (1.0, (160, 160), True, None, "softmax", "xla"),
    (1.3, (96, 96), False, "avg", None, "xla"),
    (1.3, (97, 97), True, None, None, "cpu"),
    (1.4, (96, 96), False, None, None, "cpu"),
    (1.4, (97, 97), False, "max", None, "xla"),
    (1.0, (224, 224), False, "avg", None, "cpu"),
    (1.4, (224, 224), True, None, "softmax", "xla"),
]


@pytest.mark.parametrize(
    ("alpha", "size", "include_top", "pooling", "activation", "conv_impl"), PARITY_CASES
)
def test_matches_keras(alpha, size, include_top, pooling, activation, conv_impl):
    classes = 10 if include_top else 1000
    keras_model = random_keras_mobilenet(
        alpha=alpha,
        input_shape=(*size, 3),
        include_top=include_top,
        pooling=pooling,
        classes=classes,
        classifier_activation=activation,
    )
    images = random_images((2, *size, 3))
    expected = keras_model(images, training=False)
    model = mobilenet_v2_from_keras(
        keras_model,
        alpha=alpha,
        include_top=include_top,
        classes=classes,
        classifier_activation=activation,
        pooling=pooling,
        conv_impl=conv_impl,
    )
    assert np.std(expected) > 1e-3 * np.abs(expected).max(), "degenerate reference output"
    assert_close_to_keras(nnx.jit(lambda m, x: m(x))(model, images), expected)


# Keras layers whose outputs are the 19 maps `MobileNetV2.feature_maps` returns.
def feature_layer_names(keras_model: keras.Model) -> list[str]:
    names = ["Conv1_relu"]
    for block_id in range(17):
        prefix = block_prefix(block_id)
        has_add = any(layer.name == f"{prefix}add" for layer in keras_model.layers)
        names.append(f"{prefix}add" if has_add else f"{prefix}project_BN")
    return [*names, "out_relu"]


def first_diverging_layer(ours: list, theirs: list, names: list[str]) -> str | None:
    """The Keras name of the first feature map beyond tolerance, or None when all agree."""
    for name, a, b in zip(names, ours, theirs, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or np.abs(a - b).max() > RTOL * np.abs(b).max():
            return name
    return None


@pytest.fixture(scope="module")
def keras_and_flax_features():
    """Block-by-block activations of one random Keras model, a faithful copy and a broken copy."""
    keras_model = random_keras_mobilenet(alpha=0.5, input_shape=(64, 64, 3))
    names = feature_layer_names(keras_model)
    probe = keras.Model(keras_model.input, [keras_model.get_layer(n).output for n in names])
    images = random_images((2, 64, 64, 3))
    theirs = probe(images, training=False)
    model = mobilenet_v2_from_keras(keras_model, alpha=0.5, conv_impl="cpu")
    features = nnx.jit(lambda m, x: m.feature_maps(x))
    ours = features(model, images)
    kernel = model.blocks[5].depthwise.kernel
    kernel.set_value(kernel[...] * 1.01)
    broken = features(model, images)
    return names, ours, theirs, broken


def test_every_block_matches_keras(keras_and_flax_features):
    names, ours, theirs, _ = keras_and_flax_features
    assert names[6] == "block_5_add"
    assert first_diverging_layer(ours, theirs, names) is None


def test_block_check_names_first_diverging_block(keras_and_flax_features):
    names, _, theirs, broken = keras_and_flax_features
    assert first_diverging_layer(broken, theirs, names) == "block_5_add"


@pytest.mark.parametrize("alpha", [0.35, 0.5, 0.75, 1.0, 1.3, 1.4])
@pytest.mark.parametrize("include_top", [False, True])
def test_parameter_count_equals_keras(alpha, include_top):
    keras_model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=alpha, include_top=include_top, weights=None
    )
    model = nnx.eval_shape(
        lambda: MobileNetV2(alpha=alpha, include_top=include_top, rngs=nnx.Rngs(0))
    )
    state = nnx.state(model, nnx.Param, nnx.BatchStat)
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(state))
    assert count == keras_model.count_params()


def test_real_imagenet_weights_match_keras(imagenet_h5):
    keras_model = keras.applications.MobileNetV2(
        input_shape=(224, 224, 3), include_top=False, weights=str(imagenet_h5), pooling="avg"
    )
    images = random_images((2, 224, 224, 3))
    model = mobilenet_v2_from_keras(imagenet_h5, pooling="avg")
    assert_close_to_keras(nnx.jit(lambda m, x: m(x))(model, images), keras_model(images))


def random_model(**options) -> MobileNetV2:
    """A MobileNetV2 with every variable drawn from U(0.5, 1.5), without the slow eager initialisers."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MobileNetV2(rngs=nnx.Rngs(0), **options)))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), state)
    return nnx.merge(graphdef, state)


def test_conv_impls_share_parameters_and_results():
    images = random_images((5, 33, 40, 3))
    xla = random_model(alpha=0.35, include_top=False, pooling="avg", conv_impl="xla")
    cpu = random_model(alpha=0.35, include_top=False, pooling="avg", conv_impl="cpu")
    assert jax.tree.structure(nnx.state(xla)) == jax.tree.structure(nnx.state(cpu))
    assert jax.tree.all(
        jax.tree.map(lambda a, b: a.shape == b.shape, nnx.state(xla), nnx.state(cpu))
    )
    forward = nnx.jit(lambda m, x: m(x))
    assert_close_to_keras(forward(cpu, images), forward(xla, images), "cpu vs xla")


def test_bfloat16_compute_keeps_float32_parameters():
    images = random_images((2, 32, 32, 3))
    forward = nnx.jit(lambda m, x: m(x))
    reference = forward(random_model(alpha=0.35, include_top=False, pooling="avg"), images)
    model = random_model(alpha=0.35, include_top=False, pooling="avg", dtype=jnp.bfloat16)
    low = forward(model, images)
    assert low.dtype == jnp.bfloat16
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert {p.dtype for p in params} == {jnp.dtype(jnp.float32)}
    assert np.abs(np.asarray(low, np.float32) - reference).max() <= 0.05 * np.abs(reference).max()


def test_keras_layers_name_every_weighted_module_once():
    """`keras_layers` (built from `keras_names`) reaches every variable of the model exactly once,
    each through a layer of the kind its Keras name says."""
    model = nnx.eval_shape(lambda: MobileNetV2(rngs=nnx.Rngs(0)))
    layers = model.keras_layers()
    # Conv1+bn, block 0 (no expand), 16 blocks, Conv_1+bn, top.
    assert len(layers) == 2 + 4 + 16 * 6 + 2 + 1

    def kind(name):
        if name == "predictions":
            return nnx.Linear
        if name.startswith("bn_") or name.lower().endswith("_bn"):
            return InferenceBatchNorm
        return DepthwiseConv2D if name.endswith("depthwise") else Conv2D

    for name, module in layers.items():
        assert isinstance(module, kind(name)), name
    reached = [id(v) for m in layers.values() for _, v in nnx.to_flat_state(nnx.state(m))]
    everything = [id(v) for _, v in nnx.to_flat_state(nnx.state(model))]
    assert sorted(reached) == sorted(everything)
    assert keras_layer_path("block_3_expand_BN") == ("blocks", 3, "expand_BN")
    for not_weighted in ("Conv1_relu", "block_0_expand", "block_2_add", "input_layer", "Conv1_pad"):
        assert keras_layer_path(not_weighted) is None


def test_backbone_layer_names_are_the_keras_layers_in_network_order():
    """`--fine-tune-from` is checked (and "after" is decided) on this list, without building a model."""
    model = nnx.eval_shape(lambda: MobileNetV2(include_top=False, rngs=nnx.Rngs(0)))
    assert tuple(model.keras_layers()) == backbone_layer_names()
    assert [unit_of_layer(name) for name in ("Conv1", "expanded_conv_project_BN")] == [0, 1]
    assert [unit_of_layer(name) for name in ("block_13_expand", "Conv_1_bn")] == [14, 18]
    assert unit_of_layer("predictions") is None


def test_keras_rules():
    assert [_make_divisible(32 * a) for a in (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)] == [
        16,
        16,
        24,
        32,
        40,
        48,
    ]
    assert correct_pad(224, 97) == ((0, 1), (1, 1))
    for alpha, features in ((1.4, 1792), (1.0, 1280), (0.35, 1280)):
        model = nnx.eval_shape(lambda a=alpha: MobileNetV2(alpha=a, rngs=nnx.Rngs(0)))
        assert model.num_features == features


def test_bad_options_raise_clear_errors():
    with pytest.raises(ModelConfigError, match="conv_impl"):
        MobileNetV2(conv_impl="fast", rngs=nnx.Rngs(0))
    with pytest.raises(ModelConfigError, match="pooling"):
        MobileNetV2(pooling="sum", rngs=nnx.Rngs(0))
    model = nnx.eval_shape(lambda: MobileNetV2(alpha=0.35, include_top=False, rngs=nnx.Rngs(0)))
    with pytest.raises(ModelConfigError, match="minimum"):
        model(jnp.zeros((1, 31, 64, 3)))
