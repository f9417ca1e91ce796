"""The steps and the runner that compiles them, on tiny synthetic batches (no input pipeline)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import BATCH, IMAGE_SIZE, he_initialise_backbone, quadrant_batches, tiny_model

from mnist_flax import cpu_chunks, freezing, input_pipeline
from mnist_flax.config import FINE_TUNE_STAGE, FROZEN_STAGE
from mnist_flax.freezing import make_optimizer
from mnist_flax.steps import StepRunner, make_metrics


def raw_bits(tree) -> list[np.ndarray]:
    return [np.asarray(leaf).reshape(-1).view(np.uint8).copy() for leaf in jax.tree.leaves(tree)]


def test_training_learns_the_head_and_leaves_the_backbone_bit_identical():
    model = tiny_model()
    he_initialise_backbone(model)
    optimizer = make_optimizer(model, 1e-2)
    backbone_before = raw_bits(nnx.state(model.backbone))  # Params and BatchStats
    head_before = raw_bits(nnx.state(model.head))
    steps = StepRunner(model, optimizer, make_metrics())

    history = []
    batches = quadrant_batches(64, seed=0)
    for _ in range(4):
        steps.reset_metrics()
        for batch in batches:
            steps.train(batch)
        history.append(steps.read_metrics())
    steps.sync()

    assert history[-1]["loss"] < 0.6 * history[0]["loss"], history
    assert history[-1]["accuracy"] > history[0]["accuracy"] + 0.2, history
    assert len(nnx.state(model.backbone, nnx.BatchStat)) > 0
    for before, after in zip(backbone_before, raw_bits(nnx.state(model.backbone)), strict=True):
        assert np.array_equal(before, after)
    for before, after in zip(head_before, raw_bits(nnx.state(model.head)), strict=True):
        assert not np.array_equal(before, after)
    assert int(optimizer.step[...]) == 4 * len(batches)


# "cpu" runs the CPU path (images in chunks through a lax.map loop); "xla" is one straight graph,
# whose FLOPs XLA's cost analysis counts without loops.
@pytest.mark.parametrize("conv_impl", ["cpu", "xla"])
def test_compiled_train_step_does_not_run_the_backbone_backward_pass(conv_impl):
    model = tiny_model(conv_impl=conv_impl)
    steps = StepRunner(model, make_optimizer(model, 1e-3), make_metrics())
    batch = jax.device_put(quadrant_batches(BATCH, seed=0)[0])

    train_flops = steps.lower_train(batch).compile().cost_analysis()["flops"]
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images))
    forward_flops = forward.lower(state, batch["image"]).compile().cost_analysis()["flops"]

    # A backward pass through the backbone would make this about 3x.
    assert train_flops <= 1.3 * forward_flops, (train_flops, forward_flops)


def train_flops_over_forward(model, stage: str = FROZEN_STAGE, forward_flops: list | None = None):
    """The compiled train step's FLOPs over the compiled forward pass's (XLA's cost analysis).

    `forward_flops`: a one-element list caching the forward's FLOPs for models of one architecture.
    """
    # The CPU path's arithmetic as one straight graph: the cost analysis counts a lax.map body
    # once, and counts the XLA path's depthwise kernel gradient as a dense convolution.
    assert model.backbone.conv_impl == "cpu"
    model.batch_chunk = 0
    optimizer = make_optimizer(model, 1e-3, stage=stage)
    steps = StepRunner(model, optimizer, make_metrics(), stage=stage)
    side = 28 if model.adapter is not None else model.image_size
    channels = 1 if model.adapter is not None else 3
    batch = {
        "image": np.zeros((BATCH, side, side, channels), np.float32),
        "label": np.zeros(BATCH, np.int32),
        "mask": np.ones(BATCH, bool),
    }
    train_flops = steps.lower_train(batch).compile().cost_analysis()["flops"]
    if not forward_flops:
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images))
        compiled = forward.lower(state, batch["image"]).compile()
        forward_flops = [compiled.cost_analysis()["flops"]]
    return train_flops / forward_flops[0]


def test_notebook_train_step_runs_the_backward_pass_through_the_backbones_activations():
    # Measured 2.44 here (56 px into the backbone) and 2.21 at 224 px, alpha 1, batch 32: the
    # adapter's gradient needs the backbone's activation gradients, not its weight gradients.
    ratio = train_flops_over_forward(tiny_model(model="notebook", conv_impl="cpu"))
    assert 1.8 <= ratio <= 3.0, ratio


@pytest.mark.slow
def test_fine_tuning_compiles_more_work_the_earlier_it_starts():
    """Fine-tuning from block 16, 13, 8: increasing FLOPs, all below training the whole backbone."""
    forward_flops: list = []
    ratios = {
        start: train_flops_over_forward(
            tiny_model(conv_impl="cpu", fine_tune_from=start), FINE_TUNE_STAGE, forward_flops
        )
        for start in ("16", "13", "8", "Conv1")
    }
    # Measured here: 1.50, 1.85, 2.33 and 4.68 (the whole backward pass); at 224 px, alpha 1,
    # batch 32: 1.26, 1.56, 2.13, 3.57.
    assert 1.1 < ratios["16"] < ratios["13"] < ratios["8"] < ratios["Conv1"], ratios
    assert ratios["Conv1"] > 2.5, ratios
    # The same model in its frozen stage compiles no backward pass through the backbone.
    frozen_stage = tiny_model(conv_impl="cpu", fine_tune_from="8")
    assert train_flops_over_forward(frozen_stage, FROZEN_STAGE, forward_flops) < 1.1


@pytest.mark.parametrize(
    "model, fine_tune_from, stage",
    [("notebook", "16", FROZEN_STAGE), ("pipeline", "13", FINE_TUNE_STAGE)],
)
def test_training_moves_exactly_what_the_stage_trains(model, fine_tune_from, stage):
    """Bit-identical after training: every BatchNorm statistic and every parameter the stage
    does not train (the whole backbone while frozen, the layers before the cut while fine-tuning)."""
    classifier = tiny_model(model=model, fine_tune_from=fine_tune_from)
    he_initialise_backbone(classifier)
    labels = dict(nnx.to_flat_state(freezing.freeze_labels(classifier)))
    before = {path: raw_bits(v)[0] for path, v in nnx.to_flat_state(nnx.state(classifier))}
    optimizer = make_optimizer(classifier, 1e-2, stage=stage)
    steps = StepRunner(classifier, optimizer, make_metrics(), stage=stage)
    for batch in quadrant_batches(3 * BATCH, seed=3):
        if model == "notebook":  # 28x28 gray digits in [0, 1]
            batch = {**batch, "image": (batch["image"][:, :28, :28, :1] + 1) / 2}
        steps.train(batch)
    steps.sync()
    trained = {freezing.ADAPTER, freezing.HEAD}
    if stage == FINE_TUNE_STAGE:
        trained.add(freezing.FINE_TUNED)
    after = {path: raw_bits(v)[0] for path, v in nnx.to_flat_state(nnx.state(classifier))}
    for path, bits in after.items():
        moved = not np.array_equal(before[path], bits)
        # BatchStats have no label: the optimizer never sees them.
        assert moved == (labels.get(path) in trained), (path, labels.get(path))


def test_padding_rows_weigh_nothing():
    """Two batches that differ only in their padded rows give the same update and metrics."""
    real = quadrant_batches(BATCH, seed=1)[0]
    mask = np.arange(BATCH) < 5
    model = tiny_model()
    he_initialise_backbone(model)
    metrics = make_metrics()
    steps = StepRunner(model, make_optimizer(model, 1e-2), metrics)
    # Both batches start from the same state (copies: the step donates what it is given).
    initial = jax.tree.map(
        jnp.copy, (steps.model_state, steps.optimizer_state, steps.metrics_state)
    )
    results = []
    for garbage_seed in (0, 1):
        rng = np.random.default_rng(garbage_seed)
        batch = {
            "image": np.where(
                mask[:, None, None, None], real["image"], rng.normal(size=real["image"].shape)
            ).astype(np.float32),
            "label": np.where(mask, real["label"], rng.integers(0, 4, BATCH)).astype(np.int32),
            "mask": mask,
        }
        steps.model_state, steps.optimizer_state, steps.metrics_state = jax.tree.map(
            jnp.copy, initial
        )
        steps.train(batch)
        computed = steps.read_metrics()
        steps.sync()
        results.append(
            (
                np.asarray(model.head.kernel[...]),
                computed["loss"],
                computed["accuracy"],
                int(metrics.accuracy.count[...]),
            )
        )
    (kernel_a, loss_a, accuracy_a, count_a), (kernel_b, loss_b, accuracy_b, count_b) = results
    assert not np.array_equal(kernel_a, np.asarray(initial[0]["head"]["kernel"][...]))
    np.testing.assert_allclose(kernel_a, kernel_b, rtol=1e-6, atol=1e-7)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert accuracy_a == accuracy_b
    assert count_a == count_b == 5


def test_notebook_gradient_in_chunks_equals_the_whole_batchs():
    """The CPU path sums the notebook model's gradient over chunks of 2
    (`cpu_chunks.value_and_grad_in_chunks`):
    7 rows (three chunks and a remainder), one of them padding, give the whole batch's step."""
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(0, 1, (7, 28, 28, 1)).astype(np.float32),
        "label": rng.integers(0, 4, 7).astype(np.int32),
        "mask": np.arange(7) < 6,
    }
    results = []
    for chunk in (2, 0):
        model = tiny_model(model="notebook", conv_impl="cpu")
        he_initialise_backbone(model)
        model.batch_chunk = chunk
        assert cpu_chunks.gradient_chunk(model) == chunk
        steps = StepRunner(model, make_optimizer(model, 1e-2), make_metrics())
        steps.train(batch)
        metrics = steps.read_metrics()
        steps.sync()
        results.append((nnx.state(model, nnx.Param), metrics))
    (chunked, chunked_metrics), (whole, whole_metrics) = results
    initial = nnx.state(tiny_model(model="notebook", conv_impl="cpu"), nnx.Param)
    moved = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), chunked["adapter"], initial["adapter"]
    )
    assert all(jax.tree.leaves(moved))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), chunked, whole
    )
    assert chunked_metrics["loss"] == pytest.approx(whole_metrics["loss"], rel=1e-5)
    assert chunked_metrics["accuracy"] == whole_metrics["accuracy"]
    # The pipeline model differentiates nothing before its frozen backbone: whole batch.
    assert cpu_chunks.gradient_chunk(tiny_model(conv_impl="cpu")) == 0


def test_a_cached_features_batch_takes_the_same_step_without_the_backbone():
    """`--cache-features` batches hold the backbone's output: same update, a fraction of the work."""
    images = jax.device_put(quadrant_batches(BATCH, seed=2)[0])
    results = {}
    for kind in ("image", "features"):
        model = tiny_model()
        he_initialise_backbone(model)
        steps = StepRunner(model, make_optimizer(model, 1e-2), make_metrics())
        batch = images
        if kind == "features":
            batch = {
                "features": steps.forward(images["image"], "features"),
                "label": images["label"],
            }
            batch["mask"] = images["mask"]
        flops = steps.lower_train(batch).compile().cost_analysis()["flops"]
        steps.train(batch)
        metrics = steps.read_metrics()
        steps.sync()
        results[kind] = (flops, metrics, np.asarray(model.head.kernel[...]))
    (image_flops, image_metrics, image_kernel) = results["image"]
    (features_flops, features_metrics, features_kernel) = results["features"]
    # What remains is the head and the optimizer's pass over every parameter (zero updates
    # included): under 5% of the end-to-end step here, and less at real image sizes.
    assert features_flops < 0.1 * image_flops, (features_flops, image_flops)
    assert features_metrics == pytest.approx(image_metrics, rel=1e-5)
    np.testing.assert_allclose(features_kernel, image_kernel, rtol=1e-5, atol=1e-6)


def test_a_block_of_steps_on_the_device_is_the_steps_one_by_one_bit_for_bit():
    """`train_block` / `eval_block` (epochs on cached values) take exactly the steps tf.data's
    batches give: the same parameters, Adam state and metrics, to the last bit."""
    rng = np.random.default_rng(4)
    num_examples = 21  # 3 batches of 8: the last one padded
    arrays = {
        "features": rng.normal(size=(num_examples, 1280)).astype(np.float32),
        "label": rng.integers(0, 4, num_examples).astype(np.int32),
    }
    split = input_pipeline.with_examples(
        input_pipeline.Split(
            examples=None,
            num_examples=num_examples,
            num_classes=4,
            name="cached",
            max_process_examples=num_examples,
        ),
        arrays,
    )
    seed = input_pipeline.epoch_seed(0, 1)
    results = []
    for on_device in (False, True):
        model = tiny_model()
        steps = StepRunner(model, make_optimizer(model, 1e-2), make_metrics())
        if on_device:
            examples = steps.place_examples(arrays)
            indices = input_pipeline.batch_indices(num_examples, BATCH, seed)
            steps.train_block(examples, indices[:2])  # two calls: blocks of 2 and 1 steps
            steps.train_block(examples, indices[2:])
            train_metrics = steps.read_metrics()
            steps.reset_metrics()
            steps.eval_block(examples, input_pipeline.batch_indices(num_examples, BATCH, None))
        else:
            for batch in input_pipeline.make_batches(
                split, batch_size=BATCH, image_size=IMAGE_SIZE, shuffle_seed=seed
            ).as_numpy_iterator():
                steps.train(batch)
            train_metrics = steps.read_metrics()
            steps.reset_metrics()
            for batch in input_pipeline.make_batches(
                split, batch_size=BATCH, image_size=IMAGE_SIZE, shuffle_seed=None
            ).as_numpy_iterator():
                steps.eval(batch)
        steps.sync()
        results.append(
            (
                raw_bits(nnx.state(model, nnx.Param)),
                raw_bits(steps.optimizer_state),
                train_metrics,
                steps.read_metrics(),
            )
        )
    (params_a, adam_a, train_a, eval_a), (params_b, adam_b, train_b, eval_b) = results
    assert all(np.array_equal(a, b) for a, b in zip(params_a, params_b, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(adam_a, adam_b, strict=True))
    assert train_a == train_b and eval_a == eval_b
    assert train_a["accuracy"] > 0 and eval_a["loss"] > 0
