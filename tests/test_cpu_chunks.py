"""The CPU path's chunk plan (`cpu_chunks.py`): chunks sized to the CPU's cache, and whatever the
chunks, the results of the whole batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from keras_helpers import random_images

from mnist_flax import cpu_chunks
from mnist_flax.keras_names import NUM_UNITS
from mnist_flax.mobilenet_v2 import MobileNetV2
from mnist_flax.model import TransferClassifier


def random_classifier(image_size: int, fine_tune_from: str | None = None, **options):
    """An alpha-0.35 classifier whose backbone variables are drawn from U(0.5, 1.5) (without the
    slow eager initialisers), the same for every `fine_tune_from`."""
    abstract = nnx.eval_shape(
        lambda: MobileNetV2(
            alpha=0.35, include_top=False, pooling="avg", rngs=nnx.Rngs(0), **options
        )
    )
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), state)
    backbone = nnx.merge(graphdef, state)
    return TransferClassifier(
        backbone, 10, image_size=image_size, fine_tune_from=fine_tune_from, rngs=nnx.Rngs(0)
    )


def test_map_in_chunks_is_the_function_of_the_whole_batch():
    x = jnp.arange(7 * 3, dtype=jnp.float32).reshape(7, 3)
    calls = []

    def fn(chunk):
        calls.append(chunk.shape[0])
        return chunk * 2 + 1

    for size in (0, 2, 3, 7, 9):
        calls.clear()
        np.testing.assert_array_equal(cpu_chunks.map_in_chunks(fn, x, size), x * 2 + 1)
        # lax.map traces the chunk function once; the remainder is one more call.
        expected = [7] if size in (0, 7, 9) else [size, 7 % size]
        assert calls == expected, (size, calls)


def test_the_l2_cache_size_is_read_from_sysfs(tmp_path):
    for index, (level, size) in enumerate(
        [("1", "48K"), ("1", "32K"), ("2", "2048K"), ("3", "2M")]
    ):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "level").write_text(level + "\n")
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert cpu_chunks.l2_cache_bytes(tmp_path) == 2048 * 2**10
    (tmp_path / "index2" / "size").write_text("512K\n")
    assert cpu_chunks.l2_cache_bytes(tmp_path) == 512 * 2**10
    (tmp_path / "index2" / "size").write_text("lots\n")
    assert cpu_chunks.l2_cache_bytes(tmp_path) == 0
    assert cpu_chunks.l2_cache_bytes(tmp_path / "absent") == 0


@pytest.mark.parametrize(
    "l2_bytes, at_224, at_448",
    [
        # 512 KiB of L2 a core: chunks of 2, 1 where 2 images outgrow the budget. At 448 px the
        # stem's windows (224 x 224 x 27 float32 an image) and block 1's expanded activation
        # (224 x 224 x 48) do not fit CHUNK_BYTES twice.
        (2**19, [2] * 19, [1, 2, 1] + [2] * 16),
        # 2 MiB: as many as fit, up to 8; unknown (0) counts as small.
        (2**21, [4, 8, 4] + [8] * 16, [1, 2, 1, 4, 4] + [8] * 14),
        (0, [2] * 19, [1, 2, 1] + [2] * 16),
    ],
)
def test_the_cpu_path_runs_each_unit_in_chunks_sized_to_its_activation(
    l2_bytes, at_224, at_448, monkeypatch, request
):
    """Chunks sized to each unit's widest activation and the CPU's L2 cache: the same output."""
    monkeypatch.setattr(cpu_chunks, "l2_cache_bytes", lambda: l2_bytes)
    cpu_chunks.max_chunk.cache_clear()
    request.addfinalizer(cpu_chunks.max_chunk.cache_clear)  # before the real one returns
    model = random_classifier(224, conv_impl="cpu")
    assert cpu_chunks.unit_chunks(model, 224, 224) == at_224
    assert cpu_chunks.unit_chunks(model, 448, 448) == at_448
    assert cpu_chunks.unit_chunks(random_classifier(224, conv_impl="xla"), 224, 224) == [0] * 19
    images = random_images((10, 224, 224, 3))  # whole chunks of 2, 4 and 8, and what is left
    forward = nnx.jit(lambda m, x: m(x, stop="features"))
    chunked = forward(model, images)
    model.batch_chunk = 0
    assert cpu_chunks.unit_chunks(model, 224, 224) == [0] * 19
    whole = forward(model, images)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-5, atol=1e-6)
    # The backbone alone computes the same features on the whole batch.
    backbone = nnx.jit(lambda m, x: m.backbone(x))(model, images)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(backbone), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "fine_tune_from, cut",
    [("Conv1", 0), ("expanded_conv_depthwise", 1), ("block_13_expand", 14), ("Conv_1", 18)],
)
def test_the_frozen_units_then_the_rest_are_the_whole_classifier(fine_tune_from, cut):
    """Where fine-tuning cuts the backbone, the frozen units in chunks (what the stage caches)
    and the units after them on the whole batch compose to the classifier without a cut."""
    model = random_classifier(32, fine_tune_from, conv_impl="cpu")
    assert model.cut == cut and random_classifier(32).cut == NUM_UNITS
    images = random_images((3, 32, 32, 3))
    whole = nnx.jit(lambda m, x: m(x))(random_classifier(32, conv_impl="cpu"), images)

    @nnx.jit
    def in_two(m, x):
        return m(m(x, stop="activations"), start="activations")

    np.testing.assert_allclose(in_two(model, images), whole, rtol=1e-5, atol=1e-6)
    features = nnx.jit(lambda m, x: m(x, stop="features"))(model, images)
    logits = nnx.jit(lambda m, x: m(x, start="features"))(model, features)
    np.testing.assert_allclose(logits, whole, rtol=1e-5, atol=1e-6)
