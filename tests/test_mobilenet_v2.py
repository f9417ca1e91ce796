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

from mnist_flax import cpu_ops
from mnist_flax.config import backbone_layer_names
from mnist_flax.convert import mobilenet_v2_from_keras
from mnist_flax.convolutions import correct_pad
from mnist_flax.mobilenet_v2 import (
    MobileNetV2,
    ModelConfigError,
    _make_divisible,
    block_keras_prefix,
    keras_layer_path,
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
        prefix = block_keras_prefix(block_id)
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
    images = random_images((5, 33, 40, 3))  # 5 images: two chunks of 2 plus a remainder on "cpu"
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


def test_keras_layer_path_names_every_weighted_layer():
    model = nnx.eval_shape(lambda: MobileNetV2(rngs=nnx.Rngs(0)))
    layers = model.keras_layers()
    assert (
        len(layers) == 2 + 4 + 16 * 6 + 2 + 1
    )  # Conv1+bn, block 0 (no expand), 16 blocks, Conv_1+bn, top
    for name, module in layers.items():
        node = model
        for part in keras_layer_path(name):
            node = node[part] if isinstance(part, int) else getattr(node, part)
        assert node is module, name
    assert keras_layer_path("block_3_expand_BN") == ("blocks", 3, "expand_BN")
    for not_weighted in ("Conv1_relu", "block_0_expand", "block_2_add", "input_layer", "Conv1_pad"):
        assert keras_layer_path(not_weighted) is None


def test_backbone_layer_names_are_the_keras_layers_in_network_order():
    """`--fine-tune-from` is checked (and "after" is decided) on this list, without building a model."""
    model = nnx.eval_shape(lambda: MobileNetV2(include_top=False, rngs=nnx.Rngs(0)))
    assert tuple(model.keras_layers()) == backbone_layer_names()
    assert [model.unit_of_layer(name) for name in ("Conv1", "expanded_conv_project_BN")] == [0, 1]
    assert [model.unit_of_layer(name) for name in ("block_13_expand", "Conv_1_bn")] == [14, 18]


@pytest.mark.parametrize("cut", [0, 1, 14, 18, 19])
def test_prefix_then_suffix_is_the_whole_network(cut):
    """Where fine-tuning cuts the network, the cached prefix and the suffix compose to the model."""
    model = random_model(alpha=0.35, include_top=False, pooling="avg", conv_impl="cpu")
    images = random_images((3, 32, 32, 3))
    whole = nnx.jit(lambda m, x: m(x))(model, images)
    split = nnx.jit(lambda m, x: m.suffix(m.prefix(x, cut), cut))(model, images)
    np.testing.assert_allclose(np.asarray(split), np.asarray(whole), rtol=1e-5, atol=1e-6)


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


def test_the_l2_cache_size_is_read_from_sysfs(tmp_path):
    for index, (level, size) in enumerate(
        [("1", "48K"), ("1", "32K"), ("2", "2048K"), ("3", "2M")]
    ):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "level").write_text(level + "\n")
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert cpu_ops.l2_cache_bytes(tmp_path) == 2048 * 2**10
    (tmp_path / "index2" / "size").write_text("512K\n")
    assert cpu_ops.l2_cache_bytes(tmp_path) == 512 * 2**10
    (tmp_path / "index2" / "size").write_text("lots\n")
    assert cpu_ops.l2_cache_bytes(tmp_path) == 0
    assert cpu_ops.l2_cache_bytes(tmp_path / "absent") == 0


@pytest.mark.parametrize(
    "l2_bytes, at_224, at_448",
    [
        # 512 KiB of L2 a core (the AMD EPYC): chunks of 2, 1 where 2 images outgrow the budget.
        # At 448 px the stem's windows (224 x 224 x 27 float32 an image) and block 1's expanded
        # activation (224 x 224 x 48) do not fit CHUNK_BYTES twice.
        (2**19, [2] * 19, [1, 2, 1] + [2] * 16),
        # 2 MiB (the Intel Xeon): as many as fit, up to 8; unknown (0) counts as small.
        (2**21, [4, 8, 4] + [8] * 16, [1, 2, 1, 4, 4] + [8] * 14),
        (0, [2] * 19, [1, 2, 1] + [2] * 16),
    ],
)
def test_the_cpu_path_runs_each_unit_in_chunks_sized_to_its_activation(
    l2_bytes, at_224, at_448, monkeypatch, request
):
    """Chunks sized to each unit's widest activation and the CPU's L2 cache: the same output."""
    monkeypatch.setattr(cpu_ops, "l2_cache_bytes", lambda: l2_bytes)
    cpu_ops.max_chunk.cache_clear()
    request.addfinalizer(cpu_ops.max_chunk.cache_clear)  # before the real l2_cache_bytes returns
    model = random_model(alpha=0.35, include_top=False, pooling="avg", conv_impl="cpu")
    assert model.unit_chunks(224, 224) == at_224
    assert model.unit_chunks(448, 448) == at_448
    assert random_model(conv_impl="xla").unit_chunks(224, 224) == [0] * 19
    images = random_images((10, 224, 224, 3))  # whole chunks of 2, 4 and 8, and what is left
    chunked = nnx.jit(lambda m, x: m(x))(model, images)
    model.batch_chunk = 0
    assert model.unit_chunks(224, 224) == [0] * 19
    whole = nnx.jit(lambda m, x: m(x))(model, images)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-5, atol=1e-6)
