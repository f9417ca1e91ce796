"""Evaluation of a saved run or a converted classifier: measure it on a split, draw what it got wrong.

`evaluate` rebuilds the run's model from the config its checkpoint recorded and restores the trained
head (`restore_run`); `evaluate_classifier` builds a whole classifier that `mnist-flax convert
--keras-model` wrote (a trained Keras model) from its directory (`load_classifier`); `mnist-flax
export` takes its classifier from the same two functions. Both run the test split through the same
`StepRunner` eval step as training (`_measure`), and write confusion.png and misclassified.png into
the workdir.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np
from flax import nnx

from mnist_flax import checkpoints, convert, input_pipeline, plotting, runtime
from mnist_flax.config import EVALUATE_CHECKPOINTS, ConfigError, TrainConfig
from mnist_flax.freezing import trainable_filter
from mnist_flax.model import TransferClassifier, create_model, resolve_resize
from mnist_flax.steps import StepRunner, make_metrics


def evaluate(
    workdir: str | os.PathLike, *, checkpoint: str = "auto", test_split: str | None = None
) -> dict:
    """Restores a checkpoint of the workdir's run and evaluates it on the test split.

    `checkpoint` (`config.EVALUATE_CHECKPOINTS`): "auto" takes the best by validation accuracy in a
    run with a validation split, else the final one; nothing is ever chosen by test accuracy.
    Prints the test accuracy and which checkpoint it measured and why, and writes confusion.png and
    misclassified.png into the workdir. Returns {"epoch", "checkpoint", "chosen", "test_split",
    "test_loss", "test_accuracy", "num_examples", "confusion"}.
    """
    run = restore_run(workdir, checkpoint=checkpoint, test_split=test_split)
    measured = _measure(run.model, run.config, run.split, pathlib.Path(workdir), run.description)
    return {"epoch": run.epoch, "checkpoint": checkpoint, "chosen": run.chosen, **measured}


@dataclasses.dataclass
class Loaded:
    """A classifier to measure or export, the config it was built from and its test split."""

    model: TransferClassifier
    config: TrainConfig
    split: input_pipeline.Split
    description: str  # which classifier, for the printed line
    epoch: int | None = None  # a run's: the checkpoint's epoch and why it was chosen
    chosen: str | None = None


def restore_run(
    workdir: str | os.PathLike, *, checkpoint: str = "auto", test_split: str | None = None
) -> Loaded:
    """The workdir's run as `evaluate` measures it (and `mnist-flax export` exports it): its model
    rebuilt from the config its checkpoint recorded, the chosen checkpoint's head restored.

    `checkpoint` as for `evaluate`; `test_split` (default: the run's) is loaded and checked against
    the run's classes before the slow model build.
    """
    workdir = pathlib.Path(workdir)
    if checkpoint not in EVALUATE_CHECKPOINTS:
        raise ConfigError(
            f"--checkpoint must be one of {', '.join(EVALUATE_CHECKPOINTS)}, got {checkpoint!r}"
        )
    store = checkpoints.RunCheckpoints(workdir, read_only=True)
    try:
        latest = store.latest_epoch()
        if latest is None:
            raise checkpoints.WorkdirError(
                f"{workdir} holds no checkpoint; train into it first (mnist-flax train --workdir ...)"
            )
        run_config = store.run_config(latest)
        validated = run_config.get("validation_split") is not None
        if checkpoint == "best" and not validated:
            raise ConfigError(
                f"--checkpoint best: the run in {workdir} has no validation split, so no "
                "checkpoint was chosen as best (choosing by test accuracy would overstate it); "
                "use --checkpoint latest, or train with --validation-split"
            )
        if checkpoint == "latest":
            epoch, chosen = latest, "the latest checkpoint"
        elif not validated:
            epoch = latest
            chosen = "the final checkpoint (the run has no validation split to choose a best by)"
        else:
            epoch = store.best_epoch(checkpoints.BEST_METRIC)
            recorded = store.run_meta(latest)["history"][epoch - 1][checkpoints.BEST_METRIC]
            chosen = (
                f"the best checkpoint by validation accuracy ({recorded:.2%} on "
                f"{run_config['validation_split']})"
            )
        config = TrainConfig.from_dict(run_config)
        config = dataclasses.replace(config, test_split=test_split or config.test_split)
        split = input_pipeline.load_split(
            config.dataset, config.test_split, data_dir=config.data_dir
        )
        num_classes = run_config["num_classes"]
        if split.num_classes != num_classes:
            raise checkpoints.CheckpointMismatchError(
                f"--test-split {config.test_split} of {config.dataset} has {split.num_classes} "
                f"classes but the checkpoint in {workdir} was trained on {num_classes}"
            )
        runtime.enable_compilation_cache(config.compilation_cache)
        model = create_model(config, num_classes)
        restored = store.restore(epoch, trainable=nnx.state(model, trainable_filter(model)))
        # In place: the head as trained.
        nnx.update(model, restored.trainable)
    finally:
        store.close()
    return Loaded(model, config, split, f"{chosen}, epoch {epoch}", epoch, chosen)


def evaluate_classifier(
    weights: str | os.PathLike,
    workdir: str | os.PathLike,
    *,
    dataset: str = TrainConfig.dataset,
    data_dir: str | os.PathLike | None = None,
    test_split: str = TrainConfig.test_split,
    batch_size: int = TrainConfig.batch_size,
) -> dict:
    """Evaluates the whole classifier in `weights` (`mnist-flax convert --keras-model`) on a split.

    Its kind (pipeline or notebook), alpha, image size and classes come from the directory's
    config.json. Prints the test accuracy and writes confusion.png and misclassified.png into
    `workdir`. Returns {"test_split", "test_loss", "test_accuracy", "num_examples", "confusion"}.
    """
    loaded = load_classifier(
        weights, dataset=dataset, data_dir=data_dir, test_split=test_split, batch_size=batch_size
    )
    return _measure(
        loaded.model, loaded.config, loaded.split, pathlib.Path(workdir), loaded.description
    )


def load_classifier(
    weights: str | os.PathLike,
    *,
    dataset: str = TrainConfig.dataset,
    data_dir: str | os.PathLike | None = None,
    test_split: str = TrainConfig.test_split,
    batch_size: int = TrainConfig.batch_size,
) -> Loaded:
    """The whole classifier in `weights` as `evaluate_classifier` measures it (and `mnist-flax
    export` exports it), with the test split, checked against its classes."""
    if not convert.is_converted_classifier(weights):
        raise convert.WeightsError(
            f"{weights} holds no converted classifier (a config.json of kind "
            f"{convert.CLASSIFIER_KIND!r}); write one with `mnist-flax convert --keras-model FILE "
            "--out DIR` (a run's workdir is evaluated with --workdir alone)"
        )
    saved = convert.classifier_config(weights)
    config = TrainConfig(
        dataset=dataset,
        data_dir=None if data_dir is None else str(data_dir),
        test_split=test_split,
        model=saved["model"],
        alpha=saved["alpha"],
        image_size=saved["image_size"],
        weights=str(weights),
        batch_size=batch_size,
    )
    config.validate()
    split = input_pipeline.load_split(config.dataset, config.test_split, data_dir=config.data_dir)
    if split.num_classes != saved["num_classes"]:
        raise checkpoints.CheckpointMismatchError(
            f"--test-split {config.test_split} of {config.dataset} has {split.num_classes} "
            f"classes but the classifier in {weights} has {saved['num_classes']}"
        )
    runtime.enable_compilation_cache(config.compilation_cache)
    model = create_model(config, saved["num_classes"])  # every parameter from the directory
    return Loaded(model, config, split, f"the {config.model} classifier in {weights}")


def _measure(
    model: TransferClassifier,
    config: TrainConfig,
    split: input_pipeline.Split,
    workdir: pathlib.Path,
    measured: str,
) -> dict:
    """Runs `split` through the eval step; prints the accuracy, saying it `measured` what; draws the figures."""
    num_classes = model.head.out_features
    runner = StepRunner(model, None, make_metrics())
    batches = input_pipeline.make_batches(
        split,
        batch_size=config.batch_size,
        image_size=config.image_size,
        shuffle_seed=None,
        resize=resolve_resize(config.resize, config.model),
    )
    confusion = np.zeros((num_classes, num_classes), np.int64)
    wrong_images, wrong_predicted, wrong_true = [], [], []
    for batch in batches.as_numpy_iterator():
        predicted = np.asarray(runner.eval(batch))
        real = batch["mask"]
        true, predicted, images = batch["label"][real], predicted[real], batch["image"][real]
        if config.model == "notebook":
            # The notebook model's [0, 1] digits, as the uint8 digits they were (the plot reads
            # float images as the pipeline's [-1, 1]).
            images = np.round(images * 255.0).astype(np.uint8)
        np.add.at(confusion, (true, predicted), 1)
        for index in np.flatnonzero(true != predicted)[
            : plotting.MISCLASSIFIED_SHOWN - len(wrong_images)
        ]:
            wrong_images.append(images[index])
            wrong_predicted.append(int(predicted[index]))
            wrong_true.append(int(true[index]))
    computed = runner.read_metrics()
    result = {
        "test_split": config.test_split,
        "test_loss": computed["loss"],
        "test_accuracy": computed["accuracy"],
        "num_examples": int(confusion.sum()),
        "confusion": confusion.tolist(),
    }
    plotting.plot_confusion(confusion, workdir / "confusion.png")
    plotting.plot_misclassified(
        wrong_images, wrong_predicted, wrong_true, workdir / "misclassified.png"
    )
    print(
        f"test accuracy {result['test_accuracy']:.2%} "
        f"({int(np.trace(confusion))}/{result['num_examples']}) on {config.dataset} "
        f"{config.test_split}, {measured}; wrote "
        f"{workdir / 'confusion.png'} and {workdir / 'misclassified.png'}"
    )
    return result
